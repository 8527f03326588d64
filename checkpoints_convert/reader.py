"""Torch-free, code-free reader of PyTorch checkpoints.

Reads the two checkpoint families this project converts, without importing torch
and without executing anything from the file:

* EDM network pickles (``edm-*.pkl``, ``network-snapshot-*.pkl``): plain
  ``pickle.dump`` of a dict whose networks are ``torch_utils.persistence``
  objects. Each becomes a :class:`ModuleRecord` (class name, init kwargs, module
  ``__dict__``); the embedded ``module_src`` is ignored, never executed.
* ``torch.save`` files, in the zip format (``ARCHIVE/data.pkl`` plus one raw
  record per storage) and in the legacy format (magic number, protocol version,
  sys info, object pickle, storage keys, then the raw storages).

Unpickling goes through a restricted ``find_class`` that resolves only an
allowlist of globals, each mapped to a local stand-in that builds plain data
(numpy arrays, dicts, :class:`ModuleRecord`). Any other global is refused with a
:class:`CheckpointError` naming it, before anything is called.
"""

import collections
import functools
import io
import math
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Callable

import numpy as np

# torch.serialization constants of the legacy (non-zip) format.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001

# torch storage classes -> numpy dtype names. UntypedStorage holds raw bytes.
_STORAGE_DTYPES = {
    'DoubleStorage': 'float64', 'FloatStorage': 'float32', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool', 'ComplexFloatStorage': 'complex64',
    'ComplexDoubleStorage': 'complex128', 'UntypedStorage': 'uint8',
}

# torch dtype globals (``torch.float32``) -> numpy dtype names.
_TORCH_DTYPES = {
    'float64': 'float64', 'double': 'float64', 'float32': 'float32', 'float': 'float32',
    'float16': 'float16', 'half': 'float16', 'bfloat16': 'bfloat16',
    'int64': 'int64', 'long': 'int64', 'int32': 'int32', 'int': 'int32',
    'int16': 'int16', 'short': 'int16', 'int8': 'int8', 'uint8': 'uint8',
    'uint16': 'uint16', 'uint32': 'uint32', 'uint64': 'uint64', 'bool': 'bool',
    'complex64': 'complex64', 'complex128': 'complex128',
}

# numpy dtype kinds a checkpoint may hold: bool, ints, floats, complex. Never object.
_NUMERIC_KINDS = frozenset('biufc')
# A tensor may repeat storage elements (zero strides), but not without bound.
_MAX_EXPANSION = 1024
_TORCH_NN_MODULE = re.compile(r'torch\.nn\.modules\.[a-z_]+\.[A-Z][A-Za-z0-9_]*')


class CheckpointError(Exception):
  """A checkpoint could not be read; the message is one line naming the file."""


class ModuleRecord:
  """A torch.nn.Module (or persistent object) rebuilt as plain data.

  Attributes:
    class_name: the recorded class. Persistent EDM classes carry the bare name
      stored by ``torch_utils.persistence`` (e.g. ``'EDMPrecond'``, ``'SongUNet'``);
      plain torch modules the full name (``'torch.nn.modules.container.ModuleDict'``).
    init_kwargs: the persistence ``_init_kwargs`` with numpy scalars turned into
      Python numbers; ``{}`` if none were recorded.
    init_args: the persistence ``_init_args`` (usually empty).
    state: the module ``__dict__``: ``_parameters``, ``_buffers``, ``_modules``
      and plain attributes, tensors as numpy arrays.
    source: the checkpoint file it was read from, named in errors.
  """

  source = '<checkpoint>'

  def __init__(self, class_name: str, state: dict, init_kwargs: dict | None = None,
               init_args: tuple = ()):
    self.class_name = class_name
    self.state = state
    self.init_kwargs = {} if init_kwargs is None else init_kwargs
    self.init_args = tuple(init_args)

  def __repr__(self) -> str:
    children = list(self.state.get('_modules') or {})
    return f'ModuleRecord({self.class_name!r}, children={children})'

  def state_dict(self) -> dict[str, np.ndarray]:
    """Parameters and persistent buffers under torch's dotted names, in torch's order.

    Returns:
      ``{name: array}`` exactly as ``torch.nn.Module.state_dict()`` names them;
      ``None`` parameters/buffers and non-persistent buffers are skipped.
    """
    out = {}

    def visit(record, prefix, parents):
      if id(record) in parents:
        raise CheckpointError(f'{self.source}: module {prefix[:-1]!r} contains itself')
      state = record.state
      skipped = state.get('_non_persistent_buffers_set') or set()
      tensors = [*(state.get('_parameters') or {}).items(),
                 *((k, v) for k, v in (state.get('_buffers') or {}).items() if k not in skipped)]
      for name, value in tensors:
        if value is not None and not isinstance(value, np.ndarray):
          raise CheckpointError(f'{self.source}: {prefix + name} of {record.class_name} is a '
                                f'{type(value).__name__}, not a tensor')
        if value is not None:
          out[prefix + name] = value
      for name, child in (state.get('_modules') or {}).items():
        if isinstance(child, ModuleRecord):
          visit(child, f'{prefix}{name}.', parents | {id(record)})

    visit(self, '', frozenset())
    return out

  def submodule(self, dotted: str) -> 'ModuleRecord':
    """Returns the child module at a dotted path such as ``'model.enc.8x8_conv'``."""
    record = self
    for part in dotted.split('.') if dotted else []:
      children = record.state.get('_modules') or {}
      child = children.get(part)
      if not isinstance(child, ModuleRecord):
        raise CheckpointError(
            f'{self.source}: no submodule {part!r} in {record.class_name} while resolving '
            f"{dotted!r} (children: {', '.join(children) or 'none'})")
      record = child
    return record


# ---------------------------------------------------------------------------
# Stand-ins for the allowlisted globals.


class _StorageType:
  """Stand-in for a torch storage class such as ``torch.FloatStorage``."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _numpy_dtype(_STORAGE_DTYPES[name])
    self.bfloat16 = _STORAGE_DTYPES[name] == 'bfloat16'


class _TorchDType:
  """Stand-in for a torch dtype global such as ``torch.float32``."""

  def __init__(self, name: str):
    self.dtype = _numpy_dtype(_TORCH_DTYPES[name])
    self.bfloat16 = _TORCH_DTYPES[name] == 'bfloat16'


class _Storage:
  """A storage: a 1-D numpy array, or a slot filled later (legacy format).

  bfloat16 storages hold their uint16 bit patterns and flag ``bfloat16``.
  """

  def __init__(self, dtype: np.dtype, numel: int, bfloat16: bool,
               data: np.ndarray | None = None):
    self.dtype = dtype
    self.numel = numel
    self.bfloat16 = bfloat16
    self.data = data
    self.root = None      # for legacy storage views: (root storage, element offset)

  def array(self) -> np.ndarray | None:
    if self.root is not None:
      root, offset = self.root
      base = root.array()
      return None if base is None else base[offset:offset + self.numel]
    return self.data


class _PendingTensor:
  """A tensor whose storage is read after the object pickle (legacy format)."""

  def __init__(self, build: Callable[[], np.ndarray]):
    self.build = build


class _EasyDict(dict):
  """Stand-in for ``dnnlib.util.EasyDict``: a plain dict (attribute access dropped)."""

  def __setstate__(self, state):
    if not isinstance(state, (dict, type(None))):
      raise ValueError(f'EasyDict state is a {type(state).__name__}, not a dict')
    self.update(state or {})


class _NumpyDType:
  """Stand-in for ``numpy.dtype(spec, align, copy)`` restricted to numeric dtypes."""

  def __init__(self, spec, align=False, copy=False):
    del align, copy
    if not isinstance(spec, str):
      raise ValueError(f'numpy dtype spec {spec!r} is not a string')
    self.dtype = np.dtype(spec)
    if self.dtype.kind not in _NUMERIC_KINDS or self.dtype.fields is not None:
      raise ValueError(f'numpy dtype {spec!r} is not a plain numeric dtype')

  def __setstate__(self, state):
    # numpy's dtype state: (version, byteorder, subarray, names, fields, ...).
    if not isinstance(state, tuple) or len(state) < 2:
      raise ValueError(f'malformed numpy dtype state {state!r}')
    if any(x is not None for x in state[2:5]):
      raise ValueError('structured numpy dtypes are not supported')
    if state[1] in ('<', '>') and self.dtype.itemsize > 1:
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
  """Stand-in for ``numpy.core.multiarray.scalar``: a numeric numpy scalar."""
  if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
    raise ValueError('numpy scalar needs a numeric dtype and raw bytes')
  if len(data) != dtype.dtype.itemsize:
    raise ValueError(f'numpy scalar of {dtype.dtype} has {len(data)} bytes')
  return np.frombuffer(data, dtype=dtype.dtype)[0]


def _numpy_dtype(name: str) -> np.dtype:
  """numpy dtype of a torch dtype name; bfloat16 is held as its uint16 bit pattern."""
  return np.dtype('uint16' if name == 'bfloat16' else name)


def _widen_bfloat16(bits: np.ndarray) -> np.ndarray:
  """bfloat16 bit patterns -> float32 (exact: bfloat16 is the top half of float32)."""
  return (bits.astype(np.uint32) << 16).view(np.float32)


def _to_python(value: Any, memo: dict | None = None) -> Any:
  """Turns numpy scalars into Python numbers, recursively through containers.

  ``memo`` maps ``id(value)`` to ``(value, result)`` so shared parts are converted once.
  """
  memo = {} if memo is None else memo
  if id(value) not in memo:
    if isinstance(value, np.generic):
      result = value.item()
    elif isinstance(value, dict):
      result = {k: _to_python(v, memo) for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
      result = type(value)(_to_python(v, memo) for v in value)
    else:
      result = value
    memo[id(value)] = (value, result)
  return memo[id(value)][1]


def _short(value: Any, limit: int = 80) -> str:
  """A repr (or, for strings, the text) cut to ``limit`` characters on one line."""
  text = ' '.join(value.split()) if isinstance(value, str) else repr(value)
  return text if len(text) <= limit else text[:limit] + '...'


def _check_ints(name: str, values: Any) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
    raise ValueError(f'tensor {name} {_short(values)} is not a tuple of non-negative ints')
  return tuple(values)


def _strided(data: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
  """Copies the view ``(offset, size, stride)`` (in elements) out of a 1-D array.

  Bounds are checked first, so a hostile header cannot read outside the storage.
  """
  native = data.dtype.newbyteorder('=')
  numel = math.prod(size)
  if numel == 0:
    return np.zeros(size, native)
  if numel > _MAX_EXPANSION * data.shape[0]:
    raise ValueError(f'tensor of size {size} is over {_MAX_EXPANSION}x its storage of '
                     f'{data.shape[0]} elements')
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= data.shape[0]:
    raise ValueError(f'tensor of size {size}, stride {stride}, offset {offset} reads '
                     f'past its storage of {data.shape[0]} elements')
  view = np.lib.stride_tricks.as_strided(
      data[offset:], shape=size, strides=[s * data.dtype.itemsize for s in stride],
      writeable=False)
  return np.array(view, dtype=native, order='C', copy=True)


# ---------------------------------------------------------------------------
# The restricted unpickler.


class _Unpickler(pickle.Unpickler):
  """Unpickler that resolves only allowlisted globals, each to a local stand-in.

  Args:
    file: the pickle stream.
    path: the checkpoint file, named in errors.
    persistent_load: handler for persistent ids (torch storages); ``None``
      refuses them.
  """

  def __init__(self, file, path: str, persistent_load=None):
    super().__init__(file)
    self._path = path
    self._persistent = persistent_load
    self._globals = self._allowlist()

  def _allowlist(self) -> dict[str, Any]:
    table = {
        'torch_utils.persistence._reconstruct_persistent_obj': self._persistent_obj,
        'torch._utils._rebuild_tensor_v2': self._rebuild_tensor_v2,
        'torch._utils._rebuild_tensor_v3': self._rebuild_tensor_v3,
        'torch._utils._rebuild_parameter': _rebuild_parameter,
        'torch._utils._rebuild_parameter_with_state': _rebuild_parameter,
        'torch.storage._load_from_bytes': self._load_from_bytes,
        'collections.OrderedDict': collections.OrderedDict,
        'numpy.core.multiarray.scalar': _numpy_scalar,
        'numpy._core.multiarray.scalar': _numpy_scalar,
        'numpy.dtype': _NumpyDType,
        'dnnlib.util.EasyDict': _EasyDict,
        'builtins.set': set, '__builtin__.set': set,
        'builtins.frozenset': frozenset, '__builtin__.frozenset': frozenset,
    }
    for name in _STORAGE_DTYPES:
      table[f'torch.{name}'] = table[f'torch.storage.{name}'] = _storage_type(name)
    for name in _TORCH_DTYPES:
      table[f'torch.{name}'] = _torch_dtype(name)
    return table

  def find_class(self, module: str, name: str) -> Any:
    qualified = f'{module}.{name}'
    if qualified in self._globals:
      return self._globals[qualified]
    if _TORCH_NN_MODULE.fullmatch(qualified):
      return _torch_module_class(qualified)
    raise CheckpointError(
        f'refusing global {qualified} in {self._path}: not an allowlisted checkpoint type')

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent is None:
      raise CheckpointError(
          f'{self._path}: unexpected persistent id {_short(pid)} in a plain pickle')
    return self._persistent(pid)

  # -- stand-ins that need the file context ---------------------------------

  def _persistent_obj(self, meta):
    """``torch_utils.persistence._reconstruct_persistent_obj`` -> ModuleRecord."""
    if not isinstance(meta, dict) or meta.get('type') != 'class':
      raise ValueError(f'persistent object meta is not a class record: {_short(meta)}')
    class_name = meta.get('class_name')
    if not isinstance(class_name, str):
      raise ValueError(f'persistent object class name {_short(class_name)} is not a string')
    state = _check_module_state(class_name, meta.get('state'))
    return ModuleRecord(class_name, state,
                        init_kwargs=_to_python(dict(state.get('_init_kwargs') or {})),
                        init_args=_to_python(tuple(state.get('_init_args') or ())))

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return _tensor(storage, offset, size, stride)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad,
                         backward_hooks, dtype, metadata=None):
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _TorchDType):
      raise ValueError(f'tensor dtype {_short(dtype)} is not a torch dtype')
    return _tensor(storage, offset, size, stride, dtype)

  def _load_from_bytes(self, blob):
    """``torch.storage._load_from_bytes``: a legacy torch.save of one storage."""
    if not isinstance(blob, bytes):
      raise ValueError('storage blob is not bytes')
    storage = _read_legacy(blob, f'{self._path} (storage blob)')
    if not isinstance(storage, _Storage):
      raise ValueError(f'storage blob holds {type(storage).__name__}, not a storage')
    return storage


def _check_module_state(class_name: str, state: Any) -> dict:
  """A module ``__dict__`` whose torch bookkeeping fields are dicts."""
  if not isinstance(state, dict):
    raise ValueError(f'{class_name} state is a {type(state).__name__}, not a dict')
  for field in ('_parameters', '_buffers', '_modules'):
    if not isinstance(state.get(field, {}), dict):
      raise ValueError(f'{class_name}.{field} is a {type(state[field]).__name__}, not a dict')
  return dict(state)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


@functools.cache
def _storage_type(name: str) -> _StorageType:
  return _StorageType(name)


@functools.cache
def _torch_dtype(name: str) -> _TorchDType:
  return _TorchDType(name)


@functools.cache
def _torch_module_class(qualified: str) -> type:
  """A ModuleRecord subclass standing in for one plain torch.nn module class.

  Such modules are pickled as NEWOBJ (no arguments) followed by BUILD with the
  module ``__dict__``.
  """

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    record = ModuleRecord.__new__(cls)
    ModuleRecord.__init__(record, qualified, {})
    return record

  def __init__(self, *args, **kwargs):
    raise TypeError(f'{qualified} cannot be called from a checkpoint')

  def __setstate__(self, state):
    self.state = _check_module_state(qualified, state)

  return type(qualified.rsplit('.', 1)[1], (ModuleRecord,), {
      '__new__': __new__, '__init__': __init__, '__setstate__': __setstate__})


def _tensor(storage, offset, size, stride, torch_dtype: _TorchDType | None = None):
  """Builds the numpy array of a tensor now, or a _PendingTensor if not yet read.

  Offsets, sizes and strides count elements of the tensor dtype: the storage
  dtype, or ``torch_dtype`` over an untyped byte storage (``_rebuild_tensor_v3``).
  bfloat16 tensors come out widened to float32 (exactly).
  """
  if not isinstance(storage, _Storage):
    raise ValueError(f'tensor storage is {type(storage).__name__}, not a storage')
  offset = _check_ints('offset', (offset,))[0]
  size, stride = _check_ints('size', size), _check_ints('stride', stride)
  if len(size) != len(stride):
    raise ValueError(f'tensor size {size} and stride {stride} differ in rank')

  bfloat16 = storage.bfloat16 if torch_dtype is None else torch_dtype.bfloat16

  def build():
    data = storage.array()
    if data is None:
      raise ValueError('a tensor storage is missing from the storage list')
    if torch_dtype is not None:
      if data.dtype.itemsize != 1:
        raise ValueError('a tensor with an explicit dtype needs an untyped storage')
      dtype = torch_dtype.dtype
      usable = data.shape[0] // dtype.itemsize * dtype.itemsize
      data = data[:usable].view(dtype)
    out = _strided(data, offset, size, stride)
    return _widen_bfloat16(out) if bfloat16 else out

  return build() if storage.array() is not None else _PendingTensor(build)


def _finish(obj: Any, source: str, memo: dict | None = None) -> Any:
  """Builds every _PendingTensor and tags every ModuleRecord with its file, in place.

  ``memo`` maps ``id(obj)`` to ``(obj, result)``, so shared sub-structures are
  visited once (and the originals stay alive while their ids are keys).
  """
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)][1]
  memo[id(obj)] = (obj, obj)
  if isinstance(obj, _PendingTensor):
    memo[id(obj)] = (obj, obj.build())
  elif isinstance(obj, dict):
    for key, value in obj.items():
      obj[key] = _finish(value, source, memo)
  elif isinstance(obj, list):
    obj[:] = [_finish(v, source, memo) for v in obj]
  elif isinstance(obj, tuple):
    memo[id(obj)] = (obj, type(obj)(_finish(v, source, memo) for v in obj))
  elif isinstance(obj, ModuleRecord):
    obj.source = source
    for name in ('state', 'init_kwargs', 'init_args'):
      setattr(obj, name, _finish(getattr(obj, name), source, memo))
  return memo[id(obj)][1]


# ---------------------------------------------------------------------------
# File formats.


def _storage_from_id(pid: Any, path: str) -> tuple[str, _StorageType, int, Any]:
  """Validates ``('storage', type, key, location, numel[, view])``."""
  if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'):
    raise CheckpointError(f'{path}: unsupported persistent id {_short(pid)} '
                          '(only tensor storages are supported)')
  storage_type, key, numel = pid[1], pid[2], pid[4]
  if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not (
      isinstance(numel, int) and numel >= 0):
    raise CheckpointError(f'{path}: malformed storage id {_short(pid)}')
  return key, storage_type, numel, pid[5] if len(pid) == 6 else None


def _with_byteorder(dtype: np.dtype, big_endian: bool) -> np.dtype:
  if dtype.itemsize == 1 or dtype.kind not in _NUMERIC_KINDS:
    return dtype
  return dtype.newbyteorder('>' if big_endian else '<')


def _read_legacy(raw: bytes, path: str) -> Any:
  """Reads a legacy (non-zip) torch.save stream.

  Args:
    raw: the whole stream.
    path: named in errors.

  Returns:
    The saved object; tensors are _PendingTensors until :func:`_finish`.
  """
  stream = io.BytesIO(raw)

  def load(persistent_load=None):
    return _Unpickler(stream, path, persistent_load).load()

  if load() != _LEGACY_MAGIC:
    raise CheckpointError(f'{path}: not a torch.save stream (bad magic number)')
  protocol = load()
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointError(f'{path}: unsupported torch.save protocol {_short(protocol)}')
  sys_info = load()
  if not isinstance(sys_info, dict):
    raise CheckpointError(f'{path}: malformed torch.save header')
  big_endian = not sys_info.get('little_endian', True)

  storages = {}

  def persistent_load(pid):
    key, storage_type, numel, view = _storage_from_id(pid, path)
    if key not in storages:
      storages[key] = _Storage(_with_byteorder(storage_type.dtype, big_endian), numel,
                               storage_type.bfloat16)
    root = storages[key]
    if view is None:
      return root
    view_key, offset, view_numel = view
    _check_ints('storage view', (offset, view_numel))
    if view_key not in storages:
      storages[view_key] = _Storage(root.dtype, view_numel, root.bfloat16)
      storages[view_key].root = (root, offset)
    return storages[view_key]

  result = load(persistent_load)
  keys = load()
  if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
    raise CheckpointError(f'{path}: malformed storage key list')
  position = stream.tell()
  for key in keys:
    storage = storages.get(key)
    if storage is None:
      raise CheckpointError(f'{path}: storage key {key!r} is not used by any tensor')
    header = raw[position:position + 8]
    if len(header) < 8:
      raise CheckpointError(f'{path}: truncated file (storage {key!r} missing)')
    numel = int.from_bytes(header, 'big' if big_endian else 'little', signed=True)
    end = position + 8 + numel * storage.dtype.itemsize
    if numel != storage.numel or end > len(raw):
      raise CheckpointError(
          f'{path}: truncated or corrupt storage {key!r} ({numel} elements recorded, '
          f'{storage.numel} expected, {len(raw) - position - 8} bytes left)')
    storage.data = np.frombuffer(raw, storage.dtype, numel, position + 8)
    position = end
  return result


def _read_record(archive: zipfile.ZipFile, name: str, path: str) -> bytes:
  """One stored (uncompressed, as torch writes them) record of a zip archive."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise CheckpointError(f'{path}: zip record {name} is missing') from None
  if info.compress_type != zipfile.ZIP_STORED:
    raise CheckpointError(f'{path}: zip record {name} is compressed; torch.save stores '
                          'records uncompressed')
  return archive.read(info)


def _read_zip(path: str) -> Any:
  """Reads a zip-format torch.save archive."""
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointError(f'{path}: truncated or corrupt zip archive ({e})') from None
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise CheckpointError(f'{path}: zip archive is not a torch.save file (no */data.pkl)')
    prefix = pickles[0][:-len('data.pkl')]
    big_endian = False
    if prefix + 'byteorder' in archive.namelist():
      big_endian = _read_record(archive, prefix + 'byteorder', path).strip() == b'big'
    storages = {}

    def persistent_load(pid):
      key, storage_type, numel, _ = _storage_from_id(pid, path)
      if key not in storages:
        dtype = _with_byteorder(storage_type.dtype, big_endian)
        blob = _read_record(archive, f'{prefix}data/{key}', path)
        if len(blob) < numel * dtype.itemsize:
          raise CheckpointError(f'{path}: storage record data/{key} holds {len(blob)} bytes, '
                                f'{numel * dtype.itemsize} expected')
        storages[key] = _Storage(dtype, numel, storage_type.bfloat16,
                                 np.frombuffer(blob, dtype, numel))
      return storages[key]

    stream = io.BytesIO(_read_record(archive, pickles[0], path))
    return _Unpickler(stream, path, persistent_load).load()


def _read_any(path: str) -> Any:
  """Reads a pickle or torch.save file (zip or legacy) into plain data."""
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  with open(path, 'rb') as f:
    head = f.read(512)
    if head[:4] == b'PK\x03\x04':
      return _read_zip(path)
    if head[257:262] == b'ustar':
      raise CheckpointError(f'{path}: legacy tar-format torch.save files are not supported')
    f.seek(0)
    # Unpickle straight from the file: a multi-GB network pickle is not held twice.
    first = _Unpickler(f, path).load()
    if isinstance(first, int) and first == _LEGACY_MAGIC:
      f.seek(0)
      return _read_legacy(f.read(), path)
    return first


def read_checkpoint(path: str) -> Any:
  """Reads any supported checkpoint file into plain data, with one-line errors.

  Args:
    path: an EDM pickle or a torch.save file (zip or legacy format).

  Returns:
    The unpickled object: dicts, lists, numbers, numpy arrays and ModuleRecords.

  Raises:
    CheckpointError: the file is missing, truncated, not a pickle, or refers to a
      global outside the allowlist.
  """
  try:
    return _finish(_read_any(path), path)
  except CheckpointError as e:
    raise CheckpointError(_short(str(e), 1000)) from None
  except (pickle.UnpicklingError, EOFError) as e:
    raise CheckpointError(
        f'{path}: truncated file or not a pickle ({_short(str(e), 200)})') from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{path}: malformed checkpoint ({type(e).__name__}: '
                          f'{_short(str(e), 200)})') from None


def read_network_pickle(path: str) -> dict:
  """Reads an EDM network pickle (``edm-*.pkl`` or ``network-snapshot-*.pkl``).

  Args:
    path: the pickle file.

  Returns:
    The top-level dict, e.g. ``{'ema': ModuleRecord, 'loss_fn': ModuleRecord,
    'augment_pipe': None, 'dataset_kwargs': {...}}``.

  Raises:
    CheckpointError: unreadable file, refused global, or no network in the file.
  """
  data = read_checkpoint(path)
  if not isinstance(data, dict):
    raise CheckpointError(f'{path}: not an EDM network pickle (top level is a '
                          f'{type(data).__name__}, expected a dict holding networks)')
  if not any(isinstance(v, ModuleRecord) for v in data.values()):
    raise CheckpointError(f'{path}: not an EDM network pickle (no network in the top-level '
                          f"dict; keys: {', '.join(map(str, data)) or 'none'})")
  return data


def get_network(data: dict, key: str = 'ema', path: str = '<checkpoint>') -> ModuleRecord:
  """Returns ``data[key]`` as a ModuleRecord, or one clear error naming the file.

  Args:
    data: the dict returned by :func:`read_network_pickle`.
    key: the entry to take (EDM's published pickles keep the network in ``'ema'``).
    path: the file, for the error message.
  """
  value = data.get(key)
  if not isinstance(value, ModuleRecord):
    found = ', '.join(repr(k) for k, v in data.items() if isinstance(v, ModuleRecord))
    if key in data:
      raise CheckpointError(f'{path}: entry {key!r} is a {type(value).__name__}, not a network '
                            f'(networks: {found or "none"})')
    raise CheckpointError(f"{path}: no {key!r} entry (found keys: "
                          f"{', '.join(repr(k) for k in data) or 'none'})")
  return value


def read_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
  """Reads a torch.save'd state dict (zip or legacy format) as numpy arrays.

  Args:
    path: the ``.pt``/``.pth`` file.
    key: for checkpoints that nest the state dict (``{'model': {...}}``), the
      top-level entry to take; ``None`` expects a flat state dict.

  Returns:
    ``{name: array}`` in file order.

  Raises:
    CheckpointError: unreadable file, refused global, or not a flat mapping of
      tensors (the message lists the top-level keys to choose from).
  """
  data = read_checkpoint(path)
  if key is not None:
    if not isinstance(data, dict) or key not in data:
      keys = ', '.join(map(repr, data)) if isinstance(data, dict) else type(data).__name__
      raise CheckpointError(f'{path}: no {key!r} entry (found keys: {keys})')
    data = data[key]
  if not isinstance(data, dict):
    raise CheckpointError(f'{path}: not a state dict (top level is a {type(data).__name__})')
  for name, value in data.items():
    if not isinstance(value, np.ndarray):
      nested = [repr(k) for k, v in data.items() if isinstance(v, dict)]
      hint = f'; choose one of {", ".join(nested)} with key=' if nested and key is None else ''
      raise CheckpointError(f'{path}: not a flat state dict (entry {name!r} is a '
                            f'{type(value).__name__}, not a tensor{hint})')
  return dict(data)


def main_guard(main: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates a converter's ``main`` to turn CheckpointError into a clean exit.

  The error prints as one line ``error: <message>`` on stderr, and the process
  exits with status 2, without a traceback.
  """

  @functools.wraps(main)
  def guarded(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except CheckpointError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  return guarded
