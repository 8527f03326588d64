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

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from checkpoints_convert import reader  # noqa: E402
from test_reader import (Call, Global, Storage, dumps, legacy_stream, module_state,  # noqa: E402
                         persistent, tensor)

EDM_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'data', 'edm')
MIB = 1 << 20


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


def repickle(obj):
  """Reader output (ModuleRecords, arrays, containers) -> a picklable EDM-style graph."""
  if isinstance(obj, reader.ModuleRecord):
    return persistent(obj.class_name, repickle(obj.state))
  if isinstance(obj, np.ndarray):
    return _as_tensor(obj)
  if isinstance(obj, dict):
    return {k: repickle(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(repickle(v) for v in obj)
  return obj


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
                      "unexpected tensor 'model.map_layer0.w\\n\\x1b[2Jerror: fine'"),
    'int_parameter_name': ('ddpmpp_vp.pkl', _int_parameter_name,
                           'name 3 in model.map_layer0 is a int, not a string'),
    'huge_int_key': ('ddpmpp_vp.pkl', _set_model_kwarg(2 ** 70, 1),
                     'dict key or set member <int of 71 bits> is not a string or a 64-bit int'),
    'int_key': ('ddpmpp_vp.pkl', _set_model_kwarg(7, 1), 'SongUNet: 7=1 is not a supported option'),
    'wrong_size_u': ('iddpm_adm.pkl', _wrong_u,
                     'iDDPM levels u have shape (10,), expected (1001,)'),
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


@functools.cache
def reader_cases() -> dict[str, tuple[str, bytes, str]]:
  """name -> (file name, bytes, expected text in the one error line)."""
  store = Storage('torch.FloatStorage', '0', 4)
  proto2 = pickle.PROTO + b'\x02'
  shared_meta = dict(type='class', class_name='EDMPrecond', state=module_state(
      _init_kwargs={f'k{i}': [i] for i in range(20_000)}))
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
  }
  return cases


def marker_rebind() -> bytes:
  """A pickle that BUILDs new state onto the ``torch.FloatStorage`` stand-in itself."""
  return (pickle.PROTO + b'\x02' + pickle.GLOBAL + b'torch\nFloatStorage\n' + pickle.EMPTY_DICT
          + _unicode('dtype') + _unicode('uint8') + pickle.SETITEM + pickle.BUILD + pickle.STOP)


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
