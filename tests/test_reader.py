"""Tests of the torch-free, code-free checkpoint reader (checkpoints_convert.reader).

Valid inputs are real fixtures written by tests/generators/make_reader_fixtures.py
(reference EDM code + torch). Hostile and hand-made inputs are written here with
a pickler that emits arbitrary global names without importing them.
"""

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from checkpoints_convert import reader

DATA = os.path.join(os.path.dirname(__file__), 'data', 'reader')
NETWORK_PKL = os.path.join(DATA, 'edm-tiny.pkl')
STATE_DICTS = {'zip': os.path.join(DATA, 'state_dict_zip.pt'),
               'legacy': os.path.join(DATA, 'state_dict_legacy.pt')}
MODULE_DICT = 'torch.nn.modules.container.ModuleDict'
LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


@pytest.fixture(scope='module')
def expected():
  with np.load(os.path.join(DATA, 'expected.npz')) as npz:
    arrays = {k: npz[k] for k in npz.files}
  with open(os.path.join(DATA, 'expected.json')) as f:
    return arrays, json.load(f)


def section(arrays: dict, prefix: str) -> dict:
  return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def assert_same_arrays(actual: dict, wanted: dict) -> None:
  assert list(actual) == list(wanted)
  for name, value in wanted.items():
    assert isinstance(actual[name], np.ndarray), name
    assert actual[name].dtype == value.dtype, name
    assert actual[name].shape == value.shape, name
    assert actual[name].tobytes() == value.tobytes(), name   # bit for bit


# ---------------------------------------------------------------------------
# Writing arbitrary pickles without importing what they name.


class Global:
  """Pickles as ``GLOBAL module name``; the reader must never call it."""

  def __init__(self, qualified: str):
    self.module, self.name = qualified.rsplit('.', 1)

  def __call__(self, *args):
    raise AssertionError('a test stand-in was called')


class Call:
  """Pickles as ``REDUCE(func, args)``."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


class Storage:
  """Pickles as the persistent id of a torch storage in a legacy torch.save stream."""

  def __init__(self, storage_type: str, key: str, numel: int):
    self.pid = ('storage', Global(storage_type), key, 'cpu', numel, None)


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def _save_stub_global(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    self.memoize(obj)

  dispatch[Global] = _save_stub_global

  def persistent_id(self, obj):
    return obj.pid if isinstance(obj, Storage) else None


def dumps(obj, protocol: int = 4) -> bytes:
  buf = io.BytesIO()
  _Pickler(buf, protocol).dump(obj)
  return buf.getvalue()


def legacy_stream(obj, storages: dict[str, np.ndarray], byteorder: str = '<') -> bytes:
  """A legacy torch.save stream: header pickles, object, keys, raw storages."""
  header = [LEGACY_MAGIC, 1001, dict(protocol_version=1001, little_endian=byteorder == '<',
                                      type_sizes=dict(short=2, int=4, long=4))]
  parts = [dumps(x, 2) for x in header] + [dumps(obj, 2), dumps(list(storages), 2)]
  for data in storages.values():
    parts += [np.array(data.size, f'{byteorder}i8').tobytes(),
              data.astype(data.dtype.newbyteorder(byteorder)).tobytes()]
  return b''.join(parts)


def tensor(storage, offset, size, stride):
  return Call(Global('torch._utils._rebuild_tensor_v2'), storage, offset, size, stride, False,
              collections.OrderedDict())


def persistent(class_name: str, state: dict):
  meta = dict(type='class', version=6, module_src='raise SystemExit("module_src ran")',
              class_name=class_name, state=state)
  return Call(Global('torch_utils.persistence._reconstruct_persistent_obj'), meta)


def module_state(parameters=None, modules=None, **attrs):
  return dict(training=False, _parameters=parameters or {}, _buffers={},
              _non_persistent_buffers_set=set(), _modules=modules or {}, **attrs)


def write(tmp_path, name: str, data: bytes) -> str:
  path = os.path.join(tmp_path, name)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def one_line_error(excinfo, path: str) -> str:
  message = str(excinfo.value)
  assert '\n' not in message and path in message, message
  assert excinfo.value.__suppress_context__ or excinfo.value.__context__ is None
  return message


# ---------------------------------------------------------------------------
# Round trips on real fixtures.


def test_network_pickle_round_trip(expected):
  arrays, meta = expected
  data = reader.read_network_pickle(NETWORK_PKL)
  assert list(data) == meta['keys']
  ema = reader.get_network(data, 'ema', NETWORK_PKL)
  assert ema.class_name == meta['ema_class']
  assert ema.init_kwargs == meta['ema_init_kwargs']
  assert all(not isinstance(v, np.generic) for v in ema.init_kwargs.values())
  assert_same_arrays(ema.state_dict(), section(arrays, 'edm/'))
  assert ema.submodule('model').class_name == meta['model_class']
  assert ema.submodule('model.enc').class_name == meta['enc_class'] == MODULE_DICT
  assert ema.submodule('model.enc.8x8_conv').state_dict()['weight'].shape == (8, 3, 3, 3)
  assert data['loss_fn'].class_name == meta['loss_class']
  assert data['augment_pipe'].state['p'] == meta['augment_p']
  assert data['dataset_kwargs']['use_labels'] is True


def test_none_buffers_are_skipped():
  ema = reader.read_network_pickle(NETWORK_PKL)['ema']
  conv = ema.submodule('model.enc.8x8_conv')
  assert conv.state['_buffers']['resample_filter'] is None
  assert set(conv.state_dict()) == {'weight', 'bias'}


@pytest.mark.parametrize('fmt', sorted(STATE_DICTS))
def test_state_dict_round_trip(expected, fmt):
  arrays, _ = expected
  state = reader.read_state_dict(STATE_DICTS[fmt])
  wanted = section(arrays, 'sd/')
  assert_same_arrays(state, wanted)
  assert state['transposed'].flags['C_CONTIGUOUS']
  np.testing.assert_array_equal(state['offset_slice'], state['transposed'].T[1:, 2:])


def test_submodule_error_names_children():
  ema = reader.read_network_pickle(NETWORK_PKL)['ema']
  with pytest.raises(reader.CheckpointError, match=r"no submodule 'nope'.*children: model"):
    ema.submodule('nope')


def test_import_without_torch():
  code = ('import sys; sys.modules["torch"] = None\n'
          'import checkpoints_convert.reader as r\n'
          f'r.read_network_pickle({NETWORK_PKL!r})\n'
          f'r.read_state_dict({STATE_DICTS["zip"]!r})\n'
          f'r.read_state_dict({STATE_DICTS["legacy"]!r})\n'
          'assert sys.modules["torch"] is None\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------
# Hand-written pickles: formats the fixtures do not cover.


@pytest.mark.parametrize('module', ['numpy.core.multiarray', 'numpy._core.multiarray'])
def test_numpy_scalars_in_init_kwargs(tmp_path, module):
  scalar = Call(Global(f'{module}.scalar'), Call(Global('numpy.dtype'), 'f8', False, True),
                np.float64(0.25).tobytes())
  state = module_state(_init_kwargs={'sigma_data': scalar, 'nested': [scalar]})
  path = write(tmp_path, 'net.pkl', dumps({'ema': persistent('EDMPrecond', state)}))
  ema = reader.get_network(reader.read_network_pickle(path), 'ema', path)
  assert ema.init_kwargs == {'sigma_data': 0.25, 'nested': [0.25]}
  assert type(ema.init_kwargs['sigma_data']) is float
  assert ema.state['_init_kwargs']['sigma_data'] == np.float64(0.25)


def test_storage_blob_and_strided_view(tmp_path):
  data = np.arange(12, dtype=np.float32)
  blob = legacy_stream(Storage('torch.FloatStorage', '7', 12), {'7': data})
  storage = Call(Global('torch.storage._load_from_bytes'), blob)
  weight = Call(Global('torch._utils._rebuild_parameter'),
                tensor(storage, 1, (3, 2), (1, 4)), True, collections.OrderedDict())
  state = module_state(parameters={'weight': weight, 'bias': None})
  path = write(tmp_path, 'net.pkl', dumps({'ema': persistent('Linear', state)}))
  got = reader.read_network_pickle(path)['ema'].state_dict()
  assert list(got) == ['weight']
  np.testing.assert_array_equal(got['weight'], [[1, 5], [2, 6], [3, 7]])


@pytest.mark.parametrize('byteorder', ['<', '>'])
def test_legacy_byte_order(tmp_path, byteorder):
  storages = {'a': np.array([1.5, -2.25, 3.0], np.float64), 'b': np.array([7, -8], np.int32)}
  sd = {'a': tensor(Storage('torch.DoubleStorage', 'a', 3), 0, (3,), (1,)),
        'b': tensor(Storage('torch.IntStorage', 'b', 2), 1, (1,), (1,))}
  path = write(tmp_path, 'sd.pt', legacy_stream(sd, storages, byteorder))
  got = reader.read_state_dict(path)
  assert got['a'].dtype == np.float64 and got['a'].dtype.isnative
  np.testing.assert_array_equal(got['a'], storages['a'])
  np.testing.assert_array_equal(got['b'], [-8])


def test_protocol2_containers(tmp_path):
  kwargs = Call(Global('dnnlib.util.EasyDict'), [('path', 'x.zip')])
  state = module_state(_init_kwargs={'dataset': kwargs},
                       tags=Call(Global('__builtin__.set'), ['a', 'b']))
  path = write(tmp_path, 'net.pkl', dumps({'ema': persistent('EDMPrecond', state)}, 2))
  ema = reader.read_network_pickle(path)['ema']
  assert ema.init_kwargs == {'dataset': {'path': 'x.zip'}}
  assert ema.state['tags'] == {'a', 'b'}
  assert ema.source == path


def test_shared_structure_is_visited_once(tmp_path):
  # 64 levels of (t, t): walking it naively would take 2**64 steps.
  shared = tensor(Storage('torch.FloatStorage', '0', 1), 0, (), ())
  for _ in range(64):
    shared = (shared, shared)
  path = write(tmp_path, 'sd.pt', legacy_stream({'deep': shared}, {'0': np.ones(1, np.float32)}))
  leaf = reader.read_checkpoint(path)['deep']
  for _ in range(64):
    assert leaf[0] is leaf[1]
    leaf = leaf[0]
  assert leaf.shape == () and leaf == 1.0


def test_nested_state_dict_needs_key(tmp_path):
  blob = {'0': np.array([1.5, -2.0], np.float32)}
  sd = {'w': tensor(Storage('torch.FloatStorage', '0', 2), 0, (2,), (1,))}
  path = write(tmp_path, 'ckpt.pt', legacy_stream({'model': sd, 'step': 3}, blob))
  with pytest.raises(reader.CheckpointError,
                     match=r"entry 'model' is a dict.*choose one of 'model' with key="):
    reader.read_state_dict(path)
  np.testing.assert_array_equal(reader.read_state_dict(path, key='model')['w'], [1.5, -2.0])
  with pytest.raises(reader.CheckpointError,
                     match=r"no 'ema' entry \(found keys: 'model', 'step'\)"):
    reader.read_state_dict(path, key='ema')


# ---------------------------------------------------------------------------
# Hostile input: refused before anything runs.


def payloads(marker: str) -> dict:
  touch = f"open({marker!r}, 'w').close()"
  return {
      'os.system': Call(Global('os.system'), f'touch {marker}'),
      'posix.system': Call(Global('posix.system'), f'touch {marker}'),
      'builtins.eval': Call(Global('builtins.eval'), touch),
      'builtins.exec': Call(Global('builtins.exec'), touch),
      '__builtin__.eval': Call(Global('__builtin__.eval'), touch),
      'subprocess.Popen': Call(Global('subprocess.Popen'), ['touch', marker]),
      'builtins.getattr': Call(Global('builtins.getattr'), 0, '__class__'),
      'torch.load': Call(Global('torch.load'), marker),
      'torch.nn.modules.module.register_module_forward_hook':
          Call(Global('torch.nn.modules.module.register_module_forward_hook'), None),
  }


def wrappers(payload):
  """The payload at top level, inside an EDM structure, and inside a storage blob."""
  blob = legacy_stream(payload, {})
  in_blob = tensor(Call(Global('torch.storage._load_from_bytes'), blob), 0, (1,), (1,))
  return {
      'top': dumps(payload),
      'protocol0': dumps(payload, 0),
      'edm': dumps({'ema': persistent('EDMPrecond', module_state(
          modules={'model': persistent('SongUNet', module_state(note=payload))}))}),
      'blob': dumps({'ema': persistent('EDMPrecond', module_state(parameters={'w': in_blob}))}),
      'legacy': legacy_stream({'w': payload}, {}),
  }


@pytest.mark.parametrize('where', ['top', 'protocol0', 'edm', 'blob', 'legacy'])
@pytest.mark.parametrize('name', sorted(payloads('x')))
def test_hostile_globals_refused(tmp_path, name, where):
  marker = os.path.join(tmp_path, 'pwned')
  path = write(tmp_path, 'evil.pkl', wrappers(payloads(marker)[name])[where])
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.read_network_pickle(path)
  message = one_line_error(excinfo, path)
  assert f'refusing global {name} in {path}' in message
  assert ('storage blob' in message) == (where == 'blob')
  assert not os.path.exists(marker)


@pytest.mark.parametrize('compression, message', [
    (zipfile.ZIP_STORED, 'refusing global os.system'),
    (zipfile.ZIP_DEFLATED, 'zip record evil/data.pkl is compressed'),
])
def test_hostile_zip_refused(tmp_path, compression, message):
  marker = os.path.join(tmp_path, 'pwned')
  path = os.path.join(tmp_path, 'evil.pt')
  with zipfile.ZipFile(path, 'w', compression) as z:
    z.writestr('evil/data.pkl', dumps(payloads(marker)['os.system'], 2))
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.read_state_dict(path)
  assert message in one_line_error(excinfo, path)
  assert not os.path.exists(marker)


def test_zip_missing_storage_record(tmp_path):
  path = os.path.join(tmp_path, 'sd.pt')
  with zipfile.ZipFile(STATE_DICTS['zip']) as src, zipfile.ZipFile(path, 'w') as dst:
    for info in src.infolist():
      if not info.filename.endswith('/data/0'):
        dst.writestr(info.filename, src.read(info))
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.read_state_dict(path)
  assert 'zip record state_dict_zip/data/0 is missing' in one_line_error(excinfo, path)


def test_module_src_is_not_executed(tmp_path):
  path = write(tmp_path, 'net.pkl', dumps({'ema': persistent('EDMPrecond', module_state())}))
  ema = reader.read_network_pickle(path)['ema']   # module_src would raise SystemExit
  assert ema.class_name == 'EDMPrecond' and ema.state_dict() == {}


@pytest.mark.parametrize('case, message', [
    ('past_end', 'reads past its storage of 4 elements'),
    ('negative_stride', 'stride (-1,) is not a tuple of non-negative ints'),
    ('object_dtype', "numpy dtype 'O' is not a plain numeric dtype"),
    ('torch_module_call', 'torch.nn.modules.linear.Linear cannot be called'),
    ('short_storage', "corrupt storage '0' (4 elements recorded, 8 expected"),
    ('bad_persistent_id', 'unsupported persistent id'),
    ('unwritten_storage', 'a tensor storage is missing from the storage list'),
    ('expansion_bomb', 'is over 1024x its storage of 4 elements'),
])
def test_malformed_structures_refused(tmp_path, case, message):
  data = {'0': np.zeros(4, np.float32)}
  storage = Storage('torch.FloatStorage', '0', 4)
  objects = {
      'past_end': tensor(storage, 2, (2, 2), (2, 1)),
      'negative_stride': tensor(storage, 3, (4,), (-1,)),
      'object_dtype': Call(Global('numpy.core.multiarray.scalar'),
                           Call(Global('numpy.dtype'), 'O', False, True), b'\0' * 8),
      'torch_module_call': Call(Global('torch.nn.modules.linear.Linear'), 3, 4),
      'short_storage': tensor(Storage('torch.FloatStorage', '0', 8), 0, (8,), (1,)),
      'bad_persistent_id': Storage('torch.FloatStorage', '0', 4),
      'expansion_bomb': tensor(storage, 0, (1 << 20, 1 << 20), (0, 0)),
      'unwritten_storage': tensor(Storage('torch.FloatStorage', '9', 1), 0, (), ()),
  }
  if case == 'bad_persistent_id':
    objects[case].pid = ('module', Global('torch.FloatStorage'), 'x', 'y')
  if case == 'unwritten_storage':
    data = {}
  path = write(tmp_path, 'bad.pt', legacy_stream({'w': objects[case]}, data))
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.read_state_dict(path)
  assert message in one_line_error(excinfo, path)


# ---------------------------------------------------------------------------
# Broken input: one clear line each.


def cut(path: str, tmp_path, fraction: float) -> str:
  with open(path, 'rb') as f:
    raw = f.read()
  return write(tmp_path, 'cut-' + os.path.basename(path), raw[:int(len(raw) * fraction)])


@pytest.mark.parametrize('source', [NETWORK_PKL, *STATE_DICTS.values()])
@pytest.mark.parametrize('fraction', [0.5, 0.97])
def test_truncated_files(tmp_path, source, fraction):
  path = cut(source, tmp_path, fraction)
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.read_checkpoint(path)
  assert 'truncated' in one_line_error(excinfo, path)


def test_random_bytes(tmp_path):
  path = write(tmp_path, 'noise.pkl', np.random.default_rng(0).bytes(4096))
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.read_network_pickle(path)
  assert 'not a pickle' in one_line_error(excinfo, path)


def test_missing_file(tmp_path):
  path = os.path.join(tmp_path, 'absent.pkl')
  with pytest.raises(reader.CheckpointError, match='no such file'):
    reader.read_network_pickle(path)


@pytest.mark.parametrize('obj, message', [
    ([1, 2, 3], 'top level is a list'),
    ({'a': 1, 'b': [2]}, "no network in the top-level dict; keys: a, b"),
])
def test_not_a_network_pickle(tmp_path, obj, message):
  path = write(tmp_path, 'plain.pkl', pickle.dumps(obj))
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.read_network_pickle(path)
  assert f'{path}: not an EDM network pickle' in one_line_error(excinfo, path)
  assert message in str(excinfo.value)


def test_state_dict_reader_rejects_network_pickle():
  with pytest.raises(reader.CheckpointError, match="entry 'ema' is a ModuleRecord, not a tensor"):
    reader.read_state_dict(NETWORK_PKL)


def test_get_network_missing_ema():
  data = reader.read_network_pickle(NETWORK_PKL)
  del data['ema']
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.get_network(data, 'ema', 'snap.pkl')
  assert str(excinfo.value) == ("snap.pkl: no 'ema' entry (found keys: 'loss_fn', "
                                "'augment_pipe', 'dataset_kwargs')")
  with pytest.raises(reader.CheckpointError,
                     match="entry 'dataset_kwargs' is a dict, not a network"):
    reader.get_network(data, 'dataset_kwargs', 'snap.pkl')


@pytest.mark.parametrize('case', ['not_a_tensor', 'self_loop'])
def test_module_record_state_errors(tmp_path, case):
  state = module_state(parameters={'weight': 3} if case == 'not_a_tensor' else {})
  path = write(tmp_path, 'net.pkl', dumps({'ema': persistent('Linear', state)}))
  ema = reader.read_network_pickle(path)['ema']
  if case == 'self_loop':
    ema.state['_modules']['me'] = ema
  with pytest.raises(reader.CheckpointError) as excinfo:
    ema.state_dict()
  message = one_line_error(excinfo, path)
  assert ('weight of Linear is a int, not a tensor' in message if case == 'not_a_tensor'
          else "module 'me' contains itself" in message)


def test_main_guard_prints_one_line(capsys):
  @reader.main_guard
  def main():
    reader.read_network_pickle('absent.pkl')

  with pytest.raises(SystemExit) as excinfo:
    main()
  assert excinfo.value.code == 2
  err = capsys.readouterr().err
  assert err == 'error: absent.pkl: no such file\n'


@pytest.mark.parametrize('names, message', [
    (['a/b.weight'], "tensor name a/b.weight is not identifiers joined by dots"),
    (['a..weight'], 'tensor name a..weight is not identifiers joined by dots'),
    (['x.' * 2000 + 'weight'], 'has more than 32 parts or 512 characters'),
    (['bias', 'bias.bias'], 'tensor name bias is also the parent of other tensors (e.g. bias.bias)'),
])
def test_state_dict_names_checked(tmp_path, names, message):
  storage = Storage('torch.FloatStorage', '0', 1)
  sd = {name: tensor(storage, 0, (1,), (1,)) for name in names}
  path = write(tmp_path, 'sd.pt', legacy_stream(sd, {'0': np.ones(1, np.float32)}))
  with pytest.raises(reader.CheckpointError) as excinfo:
    reader.read_state_dict(path)
  assert message in one_line_error(excinfo, path)
