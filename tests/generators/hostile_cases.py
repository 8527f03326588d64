"""Hostile checkpoint files for tests/test_hostile_inputs.py, built from small code.

Each case is a few bytes to a few MB, written at test time (nothing binary is
committed). Reader cases target one class of attack on the reader each; EDM cases are
the repository's EDM fixture re-pickled with one hostile change, so that the unchanged
re-pickle (case ``valid``) converts and each change alone is what gets refused.

    python tests/generators/hostile_cases.py OUT_DIR   # writes every case, for inspection

Pickles come from tests/test_reader.py's pickler (arbitrary globals, nothing imported)
or, where no object graph can express the attack, from raw opcodes.
"""

import functools
import io
import os
import pickle
import sys
import zipfile
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from checkpoints_convert import reader  # noqa: E402
from test_reader import (LEGACY_MAGIC, Call, Global, Storage, dumps, legacy_stream,  # noqa: E402
                         module_state, persistent, tensor)

EDM_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'data', 'edm')
MIB = 1 << 20
# The end of every refusal by the read's budget (memory or work).
AMPLIFIES = 'the file repeats or amplifies its content'


class Built(Call):
  """Pickles as ``REDUCE(func, args)`` followed by ``BUILD(state)``."""

  def __init__(self, func, args, state):
    super().__init__(func, *args)
    self.state = state

  def __reduce__(self):
    return self.func, self.args, self.state


def _storage_blob(data: np.ndarray):
  """``torch.storage._load_from_bytes(legacy stream of one storage)``, as EDM pickles hold."""
  kind = {np.dtype('float32'): 'torch.FloatStorage', np.dtype('int64'): 'torch.LongStorage',
          np.dtype('float64'): 'torch.DoubleStorage', np.dtype('bool'): 'torch.BoolStorage',
          np.dtype('complex64'): 'torch.ComplexFloatStorage'}[data.dtype]
  blob = legacy_stream(Storage(kind, '0', data.size), {'0': data.ravel()})
  return Call(Global('torch.storage._load_from_bytes'), blob)


def _as_tensor(array: np.ndarray):
  array = np.array(array, order='C')
  strides = tuple(s // array.itemsize for s in array.strides)
  return tensor(_storage_blob(array), 0, array.shape, strides)


def repickle(obj, memo=None):
  """Reader output (ModuleRecords, arrays, containers) -> a picklable EDM-style graph.

  Shared parts stay shared (once each in the pickle).
  """
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)][1]
  if isinstance(obj, reader.ModuleRecord):
    result = persistent(obj.class_name, repickle(obj.state, memo))
  elif isinstance(obj, np.ndarray):
    result = _as_tensor(obj)
  elif isinstance(obj, dict):
    result = {k: repickle(v, memo) for k, v in obj.items()}
  elif isinstance(obj, (list, tuple)):
    result = type(obj)(repickle(v, memo) for v in obj)
  else:
    result = obj
  memo[id(obj)] = (obj, result)
  return result


def edm_network(fixture: str, mutate=None) -> bytes:
  """An EDM fixture re-pickled, after ``mutate(ema)`` edits its (read) network in place."""
  ema = reader.read_network_pickle(os.path.join(EDM_FIXTURES, fixture))['ema']
  if mutate:
    mutate(ema)
  return dumps({'ema': repickle(ema)})


def _set_model_kwarg(name, value):
  def mutate(ema):
    ema.submodule('model').state['_init_kwargs'][name] = value
  return mutate


def _first_parameters(ema) -> dict:
  return ema.submodule('model.map_layer0').state['_parameters']


def _make_edm_precond(ema):
  ema.class_name = 'EDMPrecond'
  ema.state.update(sigma_min=0.002, sigma_max=80.0, sigma_data=np.array(0.5, np.float32))


def _wrong_u(ema):
  ema.state['_buffers']['u'] = ema.state['_buffers']['u'][:10]


def _bad_filter_buffer(ema):
  conv = ema.submodule('model.enc.8x8_down.conv0')
  conv.state['_buffers']['resample_filter'] = np.ones((2, 1, 2, 2), np.float32)


def _int_parameter_name(ema):
  _first_parameters(ema)[3] = np.zeros(2, np.float32)


def _injected_name(ema):
  _first_parameters(ema)['w\n\x1b[2Jerror: fine'] = np.zeros(2, np.float32)


def _slash_module_name(ema):
  model = ema.submodule('model')
  ema.state['_modules']['model/map_layer0'] = model.state['_modules'].pop('map_layer0')


def _deep_name(ema):
  _first_parameters(ema)['x.' * 2000 + 'weight'] = np.zeros(2, np.float32)


def _bias_and_bias_bias(ema):
  layer = ema.submodule('model.map_layer0')
  layer.state['_modules']['bias'] = reader.ModuleRecord(
      'torch.nn.modules.linear.Linear', module_state(parameters={'bias': np.zeros(2, np.float32)}))


def _extra_vp_buffer(ema):
  ema.state['_buffers']['u'] = np.zeros(3, np.float32)


def _shared_deep_beta_d(ema):
  ema.state['beta_d'] = _deep_shared(40, [1.0])


def _float64_overflow(ema):
  conv = ema.submodule('model.enc.8x8_down.conv0')
  conv.state['_buffers']['resample_filter'] = np.full((1, 1, 2, 2), 1e300)


def _nan_weight(ema):
  params = _first_parameters(ema)
  name = next(k for k, v in params.items() if v is not None)
  params[name] = params[name].copy()
  params[name].flat[0] = np.nan


# (fixture, mutation, expected text in the error line; None: converts with exit 0)
EDM_CASES = {
    'valid': ('ddpmpp_vp.pkl', None, None),
    'nan_weight': ('ddpmpp_vp.pkl', _nan_weight, None),
    'model_channels_str': ('ddpmpp_vp.pkl', _set_model_kwarg('model_channels', 'x'),
                           "SongUNet: model_channels='x' is not an int in [1, 4096]"),
    'negative_resolution': ('ddpmpp_vp.pkl', _set_model_kwarg('img_resolution', -16),
                            'img_resolution=-16 is not an int in [1, 4096]'),
    'empty_channel_mult': ('ddpmpp_vp.pkl', _set_model_kwarg('channel_mult', []),
                           'channel_mult=[] is not a list of 1 to 8 items'),
    'num_blocks_huge': ('ddpmpp_vp.pkl', _set_model_kwarg('num_blocks', 10 ** 6),
                        'num_blocks=1000000 is not an int in [0, 32]'),
    'malformed_filter_kwarg': ('ddpmpp_vp.pkl', _set_model_kwarg('resample_filter', [[1], 'x']),
                               'resample_filter='),
    'malformed_filter_buffer': ('ddpmpp_vp.pkl', _bad_filter_buffer,
                                'resample_filter differs from resample_filter=[1, 1]'),
    'tensor_sigma_data': ('ddpmpp_vp.pkl', _make_edm_precond,
                          'EDMPrecond: sigma_data=<float32 array ()> is not a number'),
    'injected_name': ('ddpmpp_vp.pkl', _injected_name,
                      "name 'w\\n\\x1b[2Jerror: fine' in model.map_layer0 is not an "
                      'identifier'),
    'int_parameter_name': ('ddpmpp_vp.pkl', _int_parameter_name,
                           'name 3 in model.map_layer0 is a int, not a string'),
    'huge_int_key': ('ddpmpp_vp.pkl', _set_model_kwarg(2 ** 70, 1),
                     'dict key or set member <int of 71 bits> is not a string or a 64-bit int'),
    'int_key': ('ddpmpp_vp.pkl', _set_model_kwarg(7, 1), 'SongUNet: 7=1 is not a supported option'),
    'wrong_size_u': ('iddpm_adm.pkl', _wrong_u,
                     'iDDPM levels u have shape (10,), expected (1001,)'),
    # Names that would join to an expected key, nest 2,000 deep, or be leaf and parent.
    'slash_module_name': ('ddpmpp_vp.pkl', _slash_module_name,
                          'name model/map_layer0 in VPPrecond is not an identifier'),
    'deep_name': ('ddpmpp_vp.pkl', _deep_name, 'is not an identifier'),
    'bias_and_bias_bias': ('ddpmpp_vp.pkl', _bias_and_bias_bias,
                           'model.map_layer0.bias is both a tensor and a module'),
    'extra_vp_buffer': ('ddpmpp_vp.pkl', _extra_vp_buffer,
                        'unexpected buffer u with shape (3,) (VPPrecond has no discrete'),
    # A 40-level shared list as a config value: 2^40 leaves if walked without a memo.
    'shared_deep_beta_d': ('ddpmpp_vp.pkl', _shared_deep_beta_d,
                           'VPPrecond: beta_d=[[[[...], [...]], [[...], [...]]], [[[...]'),
    # 1e300 overflows float32 (numpy warns): one error line, no warning lines.
    'float64_overflow': ('ddpmpp_vp.pkl', _float64_overflow,
                         'resample_filter differs from resample_filter=[1, 1]'),
}


# ---------------------------------------------------------------------------
# Reader cases: one attack each, read with read_network_pickle (.pkl) or
# read_state_dict (.pt).


def _floats(n: int) -> dict:
  return {'0': np.arange(n, dtype=np.float32)}


def _deep_shared(levels: int, leaf=()) -> list:
  node = list(leaf)
  for _ in range(levels):
    node = [node, node]
  return node


def _zip(files: dict) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    for name, data in files.items():
      z.writestr(name, data)
  return buf.getvalue()


class _ZipStorage(Storage):
  def __init__(self, storage_type: str, key: str, numel: int):
    super().__init__(storage_type, key, numel)
    self.pid = self.pid[:5]


def _u32(n: int) -> bytes:
  return n.to_bytes(4, 'little')


def _unicode(text: str) -> bytes:
  data = text.encode()
  return pickle.BINUNICODE + _u32(len(data)) + data


def _local_header(name: bytes, payload: bytes) -> bytes:
  crc, size = zlib.crc32(payload), len(payload).to_bytes(4, 'little')
  return (b'PK\x03\x04' + b'\x14\0' + b'\0' * 8 + crc.to_bytes(4, 'little') + size + size
          + len(name).to_bytes(2, 'little') + b'\0\0' + name)


def _central_entry(name: bytes, payload: bytes, offset: int) -> bytes:
  crc, size = zlib.crc32(payload), len(payload).to_bytes(4, 'little')
  return (b'PK\x01\x02' + b'\x14\0\x14\0' + b'\0' * 8 + crc.to_bytes(4, 'little') + size
          + size + len(name).to_bytes(2, 'little') + b'\0' * 12 + _u32(offset) + name)


def _nested_zip(records: int, blob_bytes: int) -> bytes:
  """A torch.save zip whose storage records nest: record i's data holds records i+1...

  Each of ``records`` storages (one float each) is read from a record of about
  ``blob_bytes`` bytes, all within one blob: a reader that copies records makes
  ``records * blob_bytes`` bytes of a ``blob_bytes`` file.
  """
  names = [f'a/data/{i}'.encode() for i in range(records)]
  payloads = [b'\0' * blob_bytes]
  for name in reversed(names[1:]):
    payloads.insert(0, _local_header(name, payloads[0]) + payloads[0])
  body = _local_header(names[0], payloads[0]) + payloads[0]
  offsets = [0]
  for name in names[:-1]:
    offsets.append(offsets[-1] + 30 + len(name))
  pkl = dumps({f'w{i}': tensor(_ZipStorage('torch.FloatStorage', str(i), 1), 0, (1,), (1,))
               for i in range(records)}, 2)
  entries = [_central_entry(n, p, o) for n, p, o in zip(names, payloads, offsets)]
  entries.append(_central_entry(b'a/data.pkl', pkl, len(body)))
  body += _local_header(b'a/data.pkl', pkl) + pkl
  directory = b''.join(entries)
  count = len(entries).to_bytes(2, 'little')
  return (body + directory + b'PK\x05\x06' + b'\0' * 4 + count + count
          + _u32(len(directory)) + _u32(len(body)) + b'\0\0')


def _copy_bomb(callable_name: str, value, copies: int) -> bytes:
  """``copies`` calls of one allowlisted callable on one memoised container."""
  func = Global(callable_name)
  return dumps([Call(func, value) for _ in range(copies)])


def _long_int_blob(count: int, digits: int) -> bytes:
  """A storage blob whose header holds ``count`` decimal (protocol 1, text) integers."""
  header = [dumps(LEGACY_MAGIC, 2), dumps(1001, 2),
            dumps(dict(protocol_version=1001, little_endian=True,
                       junk=[int('9' * digits)] * count), 1)]
  body = legacy_stream(Storage('torch.FloatStorage', '0', 1), {'0': np.ones(1, np.float32)})
  skip = sum(len(dumps(x, 2)) for x in (LEGACY_MAGIC, 1001, dict(
      protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))))
  return b''.join(header) + body[skip:]


def _many_module_classes(count: int) -> bytes:
  return (pickle.PROTO + b'\x02' + pickle.EMPTY_LIST + pickle.MARK
          + b''.join(pickle.GLOBAL + f'torch.nn.modules.linear\nL{i}\n'.encode()
                     for i in range(count)) + pickle.APPENDS + pickle.STOP)


def _state_changed_after_build() -> bytes:
  """A torch module whose state passes the check at BUILD, then is changed through the memo."""
  return (pickle.PROTO + b'\x02' + pickle.EMPTY_DICT + _unicode('ema')
          + pickle.GLOBAL + b'torch.nn.modules.linear\nLinear\n' + pickle.EMPTY_TUPLE
          + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.BINPUT + b'\x01' + pickle.BUILD
          + pickle.SETITEM + pickle.BINGET + b'\x01' + _unicode('_modules')
          + pickle.BININT1 + b'\x05' + pickle.SETITEM + pickle.POP + pickle.STOP)


@functools.cache
def reader_cases() -> dict[str, tuple[str, bytes, str]]:
  """name -> (file name, bytes, expected text in the one error line)."""
  store = Storage('torch.FloatStorage', '0', 4)
  proto2 = pickle.PROTO + b'\x02'
  shared_meta = dict(type='class', class_name='EDMPrecond', state=module_state(
      _init_kwargs={f'k{i}': [i] for i in range(20_000)}))
  shared_args = dict(type='class', class_name='EDMPrecond', state=module_state(
      _init_args=list(range(100_000))))
  load_blob = Global('torch.storage._load_from_bytes')
  long_blob = _long_int_blob(100, 4300)
  cases = {
      # Out-of-bounds views: past the end, int64-overflowing strides, a short zip record.
      'oob_offset': ('sd.pt', legacy_stream({'w': tensor(store, 3, (2,), (1,))}, _floats(4)),
                     'reads past its storage of 4 elements'),
      'oob_overflow': ('sd.pt', legacy_stream(
          {'w': tensor(store, 0, (2, 2), (2 ** 63, 2 ** 62))}, _floats(4)),
                       'reads past its storage of 4 elements'),
      'oob_zip_record': ('sd.pt', _zip({
          'a/data.pkl': dumps({'w': tensor(_ZipStorage('torch.FloatStorage', '0', 1 << 20), 0,
                                           (1 << 20,), (1,))}, 2),
          'a/data/0': b'\0' * 16}), 'storage record data/0 holds 16 bytes, 4194304 expected'),
      # BUILD that plants a zero-byte array as a storage's data (then a view reads past it).
      'build_on_storage': ('net.pkl', dumps({'ema': persistent('Linear', module_state(
          parameters={'w': tensor(Built(Global('torch.storage._load_from_bytes'),
                                        (legacy_stream(store, _floats(4)),),
                                        {'_bytes': _as_tensor(np.zeros((1 << 20, 0), np.float32))}),
                                  0, (1 << 10,), (1,))}))}),
                           'BUILD on a _Storage is not allowed'),
      # Many views each 1024x one 256 KiB storage: 256 MiB each.
      'shared_view_blowup': ('sd.pt', legacy_stream(
          {f'w{i}': tensor(Storage('torch.FloatStorage', '0', 1 << 16), 0, (1024, 1 << 16), (0, 1))
           for i in range(16)}, _floats(1 << 16)), 'views repeat storage without bound'),
      # Hash bombs: int keys that all hash alike; a 60-level shared tuple as a key.
      'colliding_int_keys': ('net.pkl', dumps({'ema': Call(
          Global('collections.OrderedDict'), [(k * (2 ** 61 - 1), 0) for k in range(1, 20000)])}),
                             'is not a string or a 64-bit int'),
      'shared_tuple_key': ('net.pkl', proto2 + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE
                           + (pickle.DUP + pickle.TUPLE2) * 60 + pickle.BININT1 + b'\x01'
                           + pickle.SETITEM + pickle.STOP,
                           'dict key or set member ((((...)'),
      # repr bomb: a 40-level shared list rendered in an error message.
      'repr_bomb': ('net.pkl', dumps({'ema': Call(
          Global('torch_utils.persistence._reconstruct_persistent_obj'), _deep_shared(40))}),
                    'persistent object meta is not a class record: [[[['),
      # Deep nesting: 200,000 nested lists / tuples.
      'deep_lists': ('net.pkl', proto2 + pickle.EMPTY_LIST * 200_000
                     + pickle.APPEND * 199_999 + pickle.STOP, 'nest deeper than 100 levels'),
      'deep_tuples': ('net.pkl', proto2 + pickle.EMPTY_TUPLE + pickle.TUPLE1 * 200_000
                      + pickle.STOP, 'nest deeper than 100 levels'),
      # Memo abuse: index 2^27 in a 9-byte file; a GET of an index never PUT.
      'memo_index': ('net.pkl', proto2 + pickle.NONE + pickle.LONG_BINPUT + _u32(1 << 27)
                     + pickle.STOP, 'memo index 134217728 out of range'),
      'memo_get': ('net.pkl', proto2 + pickle.LONG_BINGET + _u32(5) + pickle.STOP,
                   'Memo value not found at index 5'),
      # 30,000 objects sharing one state whose init kwargs hold 20,000 entries.
      'shared_state': ('net.pkl', dumps([Call(
          Global('torch_utils.persistence._reconstruct_persistent_obj'), shared_meta)
          for _ in range(30_000)]), 'top level is a list'),
      # Lengths in the file that would allocate without bound.
      'huge_frame': ('net.pkl', pickle.PROTO + b'\x04' + pickle.FRAME
                     + (1 << 40).to_bytes(8, 'little') + pickle.NONE + pickle.STOP, 'truncated'),
      'huge_long': ('net.pkl', proto2 + pickle.LONG4 + _u32((1 << 31) - 1) + b'\0' * 16
                    + pickle.STOP, 'truncated'),
      # Complex tensors are refused.
      'complex_tensor': ('sd.pt', legacy_stream(
          {'w': tensor(Storage('torch.ComplexFloatStorage', '0', 2), 0, (2,), (1,))},
          {'0': np.zeros(2, np.complex64)}), 'complex64 tensors are not supported'),
      # Message injection: a global name with a newline and a terminal escape.
      'injection_global': ('net.pkl', pickle.PROTO + b'\x04' + _unicode('os')
                           + _unicode('system\n\x1b[31mfake: ok') + pickle.STACK_GLOBAL
                           + pickle.STOP, "refusing global 'os.system\\n\\x1b[31mfake: ok'"),
      # Amplification: what a small file makes the reader allocate or repeat, in total.
      # A 3 GiB bytearray length in an 18-byte file: nothing is allocated before its bytes.
      'huge_bytearray': ('net.pkl', pickle.PROTO + b'\x05' + pickle.BYTEARRAY8
                         + (3 << 30).to_bytes(8, 'little') + b'\0' * 5 + pickle.STOP,
                         'truncated'),
      # 300 storage records nested in one 512 KiB blob (150 MiB if each record is copied).
      'overlapping_zip_records': ('sd.pt', _nested_zip(300, 512 << 10),
                                  "zip records a/data/0 and a/data/1 overlap"),
      # set() / EasyDict() applied 5,000 times to one memoised 20,000-element container.
      'set_copy_bomb': ('net.pkl', _copy_bomb('builtins.set', list(range(20_000)), 5_000),
                        AMPLIFIES),
      'easydict_copy_bomb': ('net.pkl', _copy_bomb(
          'dnnlib.util.EasyDict', {f'k{i}': i for i in range(20_000)}, 5_000),
                             AMPLIFIES),
      # One 100,000-element _init_args list shared by 3,000 modules: converted once.
      'shared_init_args': ('net.pkl', dumps([Call(
          Global('torch_utils.persistence._reconstruct_persistent_obj'), shared_args)
          for _ in range(3_000)]), 'top level is a list'),
      # One memoised blob of 100 4,300-digit text integers, re-parsed 4,000 times.
      'long_int_reparse': ('net.pkl', dumps([Call(load_blob, long_blob) for _ in range(4_000)]),
                           AMPLIFIES),
      # 30,000 distinct torch module classes (a class each) from a 0.9 MB file.
      'many_module_classes': ('net.pkl', _many_module_classes(30_000), AMPLIFIES),
      # State changed through the memo after BUILD checked it: checked again after the read.
      'state_changed_after_build': ('net.pkl', _state_changed_after_build(),
                                    'Linear._modules is a int, not a dict'),
  }
  return cases


def marker_rebind() -> bytes:
  """A pickle that BUILDs new state onto the ``torch.FloatStorage`` stand-in itself."""
  return (pickle.PROTO + b'\x02' + pickle.GLOBAL + b'torch\nFloatStorage\n' + pickle.EMPTY_DICT
          + _unicode('dtype') + _unicode('uint8') + pickle.SETITEM + pickle.BUILD + pickle.STOP)


def large_state_dict(numel: int) -> bytes:
  """A valid one-tensor legacy state dict of ``numel`` floats (a file worth cutting)."""
  return legacy_stream({'w': tensor(Storage('torch.FloatStorage', '0', numel), 0, (numel,),
                                    (1,))}, {'0': np.zeros(numel, np.float32)})


def state_dict_with_key(key: str) -> bytes:
  """A one-tensor state dict (zip format) whose only key is ``key``."""
  return _zip({'a/data.pkl': dumps({key: tensor(_ZipStorage('torch.FloatStorage', '0', 2), 0,
                                                (2,), (1,))}, 2),
               'a/data/0': np.zeros(2, np.float32).tobytes()})


def main(out: str) -> None:
  os.makedirs(out, exist_ok=True)
  for name, (file_name, data, _) in reader_cases().items():
    with open(os.path.join(out, f'{name}-{file_name}'), 'wb') as f:
      f.write(data)
  for name, (fixture, mutate, _) in EDM_CASES.items():
    with open(os.path.join(out, f'edm-{name}.pkl'), 'wb') as f:
      f.write(edm_network(fixture, mutate))
  print(f'wrote {len(reader_cases()) + len(EDM_CASES)} cases to {out}')


if __name__ == '__main__':
  main(sys.argv[1])
