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

What the reader guarantees, whatever the file holds (each in one place):

* No code from the file runs. :class:`_Unpickler` (the pure-Python unpickler with
  its dangerous operations replaced) resolves only an allowlist of globals, each to a
  stand-in of this read; REDUCE/NEWOBJ call only those; BUILD sets state only on
  objects the reader created for it, once. Stand-ins are made per read and immutable,
  so nothing one file does reaches the next read.
* No byte outside a storage is read. :func:`_view` is the only place that turns a
  storage plus ``(offset, size, stride)`` into an array; it checks every bound with
  Python integers before touching a byte.
* Work and memory are bounded by the file (:class:`_Load`): storages may not claim
  more bytes than the file has; tensors may not materialise more than
  ``_TENSOR_BYTES_PER_STORAGE_BYTE`` times the storage bytes (plus 1 MiB); pickle
  operations and memo indices are capped; dict keys and set members are strings or
  64-bit ints (no hash bombs); walks over the result are memoised and depth-capped.
* Errors are one line: :class:`CheckpointError`, file values rendered with a
  bounded ``repr`` (:func:`brief`, :func:`label`), never a whole structure.
"""

import collections
import dataclasses
import functools
import io
import math
import mmap
import os
import pickle
import re
import reprlib
import sys
import zipfile
from typing import Any, Callable, Iterable

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

# numpy dtype kinds a tensor or scalar may have: bool, ints, floats. Never complex or object.
_NUMERIC_KINDS = frozenset('biuf')
# One tensor may repeat storage elements (zero strides), but not without bound.
_MAX_EXPANSION = 1024
# All tensors of one read together: at most this many bytes per storage byte, plus slack.
_TENSOR_BYTES_PER_STORAGE_BYTE = 4
_TENSOR_BYTES_SLACK = 1 << 20
_MAX_RANK = 16
# Pickle operations per read (a published EDM pickle needs ~1e5); memo indices below it.
_MAX_OPS = 1 << 22
# Containers nested deeper than this are refused (a published network nests ~20 deep).
_MAX_DEPTH = 100
_TORCH_NN_MODULE = re.compile(r'torch\.nn\.modules\.[a-z_]+\.[A-Z][A-Za-z0-9_]*')


class CheckpointError(Exception):
  """A checkpoint could not be read; the message is one line naming the file."""


# ---------------------------------------------------------------------------
# Rendering values from a file in messages: bounded work, bounded length, one line.


class _BoundedRepr(reprlib.Repr):
  """reprlib with small limits that never calls an unknown object's repr."""

  def __init__(self):
    super().__init__()
    self.maxlevel, self.maxstring, self.maxother = 3, 60, 40
    self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6

  def repr_int(self, x, level):
    if x.bit_length() > 64:
      return f'<int of {x.bit_length()} bits>'
    return super().repr_int(x, level)

  def repr_instance(self, x, level):
    if isinstance(x, (float, np.generic)):
      return repr(x)
    if isinstance(x, np.ndarray):
      return f'<{x.dtype} array {x.shape}>'
    return f'<{type(x).__name__}>'


_REPR = _BoundedRepr()


def brief(value: Any, limit: int = 80) -> str:
  """A bounded repr of a value from a file, cut to ``limit`` characters."""
  try:
    text = _REPR.repr(value)
  except Exception:  # pylint: disable=broad-except
    text = f'<unprintable {type(value).__name__}>'
  return text if len(text) <= limit else text[:limit] + '...'


def label(value: Any, limit: int = 80) -> str:
  """A name from a file: as is if a short printable string, else its bounded repr."""
  if isinstance(value, str) and value.isprintable() and len(value) <= limit:
    return value
  return brief(value, limit)


def listing(values: Iterable, render: Callable[[Any], str] = brief, limit: int = 8) -> str:
  """The first ``limit`` values, rendered and comma-separated, and how many more."""
  values = list(values)
  text = ', '.join(render(v) for v in values[:limit])
  return text + (f' (and {len(values) - limit} more)' if len(values) > limit else '')


def one_line(text: str, limit: int = 1000) -> str:
  """One printable line: control characters escaped, cut to ``limit`` characters."""
  text = ''.join(c if c.isprintable() else c.encode('unicode_escape').decode() for c in text)
  return text if len(text) <= limit else text[:limit] + '...'


def _detail(error: Exception) -> str:
  """An exception's message, only if it is a string (never a repr of its arguments)."""
  return error.args[0] if error.args and isinstance(error.args[0], str) else ''


# ---------------------------------------------------------------------------
# What a read returns.


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
    children = listing(self.state.get('_modules') or {}, label)
    return f'ModuleRecord({brief(self.class_name)}, children=[{children}])'

  def _fail(self, message: str) -> CheckpointError:
    return CheckpointError(f'{self.source}: {message}')

  def state_dict(self) -> dict[str, np.ndarray]:
    """Parameters and persistent buffers under torch's dotted names, in torch's order.

    Returns:
      ``{name: array}`` exactly as ``torch.nn.Module.state_dict()`` names them;
      ``None`` parameters/buffers and non-persistent buffers are skipped.

    Raises:
      CheckpointError: a name that is not a string, a value that is not a tensor, or a
        module that contains itself, is shared by two parents or nests too deep.
    """
    out, seen = {}, set()

    def visit(record, prefix, parents):
      if id(record) in parents:
        raise self._fail(f'module {brief(prefix[:-1])} contains itself')
      if id(record) in seen:
        raise self._fail(f'module {brief(prefix[:-1])} is shared with another module')
      if len(parents) > _MAX_DEPTH:
        raise self._fail(f'modules nest deeper than {_MAX_DEPTH} levels')
      seen.add(id(record))
      state = record.state
      skipped = state.get('_non_persistent_buffers_set') or set()
      if not isinstance(skipped, (set, frozenset)):
        raise self._fail(f'{label(prefix)}_non_persistent_buffers_set is a '
                         f'{type(skipped).__name__}, not a set')
      tensors = [*(state.get('_parameters') or {}).items(),
                 *((k, v) for k, v in (state.get('_buffers') or {}).items() if k not in skipped)]
      for name, value in [*tensors, *(state.get('_modules') or {}).items()]:
        if not isinstance(name, str):
          raise self._fail(f'name {brief(name)} in {label(prefix[:-1] or record.class_name)} is '
                           f'a {type(name).__name__}, not a string')
      for name, value in tensors:
        if value is not None and not isinstance(value, np.ndarray):
          raise self._fail(f'{label(prefix + name)} of {label(record.class_name)} is a '
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
        raise self._fail(f'no submodule {part!r} in {label(record.class_name)} while resolving '
                         f"{dotted!r} (children: {listing(children, label) or 'none'})")
      record = child
    return record


# ---------------------------------------------------------------------------
# The budget and the memory of one read.


class _Load:
  """Everything one read may use and remember; nothing here outlives the read.

  Attributes:
    path: the file, named in errors.
    file_bytes: its size. Storages may not claim more bytes than that, and tensors
      may not take more than ``_TENSOR_BYTES_PER_STORAGE_BYTE`` times the storage
      bytes (plus ``_TENSOR_BYTES_SLACK``), so memory is bounded by the file.
  """

  def __init__(self, path: str, file_bytes: int):
    self.path = path
    self.file_bytes = file_bytes
    self.storage_bytes = 0
    self.tensor_bytes = 0
    self.ops = 0
    self.python_memo = {}    # _to_python: id -> (value, result), shared by the whole read
    self.finish_memo = {}    # _finish: id -> (value, result)

  def fail(self, message: str) -> CheckpointError:
    return CheckpointError(f'{self.path}: {message}')

  def count_op(self) -> None:
    self.ops += 1
    if self.ops > _MAX_OPS:
      raise self.fail(f'more than {_MAX_OPS} pickle operations')

  def add_storage(self, nbytes: int) -> None:
    self.storage_bytes += nbytes
    if self.storage_bytes > self.file_bytes:
      raise self.fail(f'storages claim {self.storage_bytes} bytes, more than the '
                      f'{self.file_bytes} bytes of the file')

  def add_tensor(self, nbytes: int) -> None:
    self.tensor_bytes += nbytes
    budget = _TENSOR_BYTES_PER_STORAGE_BYTE * self.storage_bytes + _TENSOR_BYTES_SLACK
    if self.tensor_bytes > budget:
      raise self.fail(f'tensors would take {self.tensor_bytes} bytes, over the {budget} '
                      f'allowed for {self.storage_bytes} storage bytes (views repeat '
                      'storage without bound)')


# ---------------------------------------------------------------------------
# Stand-ins for the allowlisted globals; made per read, immutable.


@dataclasses.dataclass(frozen=True, eq=False)
class _StorageType:
  """Stand-in for a torch storage class such as ``torch.FloatStorage``."""
  name: str
  dtype: np.dtype
  bfloat16: bool


@dataclasses.dataclass(frozen=True, eq=False)
class _TorchDType:
  """Stand-in for a torch dtype global such as ``torch.float32``."""
  dtype: np.dtype
  bfloat16: bool


def _storage_type(name: str) -> _StorageType:
  return _StorageType(name, _numpy_dtype(_STORAGE_DTYPES[name]),
                      _STORAGE_DTYPES[name] == 'bfloat16')


def _torch_dtype(name: str) -> _TorchDType:
  return _TorchDType(_numpy_dtype(_TORCH_DTYPES[name]), _TORCH_DTYPES[name] == 'bfloat16')


def _numpy_dtype(name: str) -> np.dtype:
  """numpy dtype of a torch dtype name; bfloat16 is held as its uint16 bit pattern."""
  return np.dtype('uint16' if name == 'bfloat16' else name)


class _Storage:
  """One torch storage: element dtype, element count and, once read, its raw bytes.

  The bytes (a 1-D uint8 array the reader made from the file) are set once by the
  reader: at creation (zip), by :meth:`fill` (legacy), or as a checked byte range of a
  root storage (legacy storage views). bfloat16 storages hold uint16 bit patterns.
  """

  __slots__ = ('dtype', 'numel', 'bfloat16', '_bytes', '_root')

  def __init__(self, dtype: np.dtype, numel: int, bfloat16: bool,
               data: np.ndarray | None = None, root: tuple | None = None):
    self.dtype = dtype
    self.numel = numel
    self.bfloat16 = bfloat16
    self._bytes = data
    self._root = root         # (root storage, byte offset) of a legacy storage view

  def fill(self, data: np.ndarray) -> None:
    if self._bytes is not None or self._root is not None:
      raise ValueError('a storage is listed twice')
    self._bytes = data

  def raw(self) -> np.ndarray | None:
    """The storage's bytes (1-D uint8), or None while not yet read."""
    if self._root is not None:
      root, start = self._root
      data = root.raw()
      return None if data is None else data[start:start + self.numel * self.dtype.itemsize]
    return self._bytes


class _PendingTensor:
  """A tensor whose storage is read after the object pickle (legacy format)."""

  def __init__(self, build: Callable[[], np.ndarray]):
    self.build = build


def _key(value: Any) -> Any:
  """A dict key or set member: str, 64-bit int, bool or None (cheap, honest hashes)."""
  if type(value) not in (str, int, bool, type(None)) or (
      type(value) is int and not -2 ** 63 <= value < 2 ** 63):
    raise ValueError(f'dict key or set member {brief(value)} is not a string or a 64-bit int')
  return value


def _checked_items(items: Any) -> list:
  """``(key, value)`` pairs of a dict, or of a list of pairs, with checked keys."""
  if isinstance(items, dict):
    return list(items.items())
  if not isinstance(items, (list, tuple)):
    raise ValueError(f'dict items are a {type(items).__name__}, not a list of pairs')
  pairs = []
  for item in items:
    if not isinstance(item, (list, tuple)) or len(item) != 2:
      raise ValueError(f'dict item {brief(item)} is not a (key, value) pair')
    pairs.append((_key(item[0]), item[1]))
  return pairs


def _checked_members(items: Any) -> list:
  if not isinstance(items, (list, tuple, set, frozenset)):
    raise ValueError(f'set members are a {type(items).__name__}, not a list')
  return [_key(item) for item in items]


class _OrderedDict(collections.OrderedDict):
  """Stand-in for ``collections.OrderedDict``; BUILD state (torch's ``_metadata``) is dropped."""

  def __init__(self, items=()):
    super().__init__(_checked_items(items))

  def __setstate__(self, state):
    if not isinstance(state, (dict, type(None))):
      raise ValueError(f'OrderedDict state is a {type(state).__name__}, not a dict')


def _set(items=()) -> set:
  """Stand-in for ``builtins.set``."""
  return set(_checked_members(items))


def _frozenset(items=()) -> frozenset:
  """Stand-in for ``builtins.frozenset``."""
  return frozenset(_checked_members(items))


class _EasyDict(dict):
  """Stand-in for ``dnnlib.util.EasyDict``: a plain dict (attribute access dropped)."""

  def __init__(self, items=()):
    super().__init__(_checked_items(items))

  def __setstate__(self, state):
    if not isinstance(state, (dict, type(None))):
      raise ValueError(f'EasyDict state is a {type(state).__name__}, not a dict')
    self.update(state or {})


class _NumpyDType:
  """Stand-in for ``numpy.dtype(spec, align, copy)`` restricted to numeric dtypes."""

  def __init__(self, spec, align=False, copy=False):
    del align, copy
    if not isinstance(spec, str) or len(spec) > 8:
      raise ValueError(f'numpy dtype spec {brief(spec)} is not a short string')
    self.dtype = np.dtype(spec)
    if self.dtype.kind not in _NUMERIC_KINDS or self.dtype.fields is not None:
      raise ValueError(f'numpy dtype {spec!r} is not a plain numeric dtype')

  def __setstate__(self, state):
    # numpy's dtype state: (version, byteorder, subarray, names, fields, ...).
    if not isinstance(state, tuple) or len(state) < 5:
      raise ValueError(f'malformed numpy dtype state {brief(state)}')
    if any(x is not None for x in state[2:5]):
      raise ValueError('structured numpy dtypes are not supported')
    if isinstance(state[1], str) and state[1] in ('<', '>') and self.dtype.itemsize > 1:
      self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data=None):
  """Stand-in for ``numpy.core.multiarray.scalar``: a numeric numpy scalar."""
  if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
    raise ValueError('numpy scalar needs a numeric dtype and raw bytes')
  if len(data) != dtype.dtype.itemsize:
    raise ValueError(f'numpy scalar of {dtype.dtype} has {len(data)} bytes')
  return np.frombuffer(data, dtype=dtype.dtype)[0]


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _check_module_state(class_name: str, state: Any) -> dict:
  """A module ``__dict__`` whose torch bookkeeping fields are dicts (not copied)."""
  if not isinstance(state, dict):
    raise ValueError(f'{label(class_name)} state is a {type(state).__name__}, not a dict')
  for field in ('_parameters', '_buffers', '_modules'):
    if not isinstance(state.get(field, {}), dict):
      raise ValueError(f'{label(class_name)}.{field} is a {type(state[field]).__name__}, '
                       'not a dict')
  return state


def _torch_module_class(qualified: str) -> type:
  """A ModuleRecord subclass standing in for one plain torch.nn module class (per read).

  Such modules are pickled as NEWOBJ (no arguments) followed by BUILD with the
  module ``__dict__``; :class:`_Unpickler` allows exactly that.
  """

  def __setstate__(self, state):
    self.state = _check_module_state(qualified, state)

  return type(qualified.rsplit('.', 1)[1], (ModuleRecord,),
              {'__setstate__': __setstate__, 'qualified': qualified})


# ---------------------------------------------------------------------------
# Tensors: the one place that reads storage bytes.


def _check_ints(name: str, values: Any) -> tuple[int, ...]:
  if not isinstance(values, (tuple, list)) or len(values) > _MAX_RANK or not all(
      type(v) is int and v >= 0 for v in values):
    raise ValueError(f'tensor {name} {brief(values)} is not a tuple of non-negative ints '
                     f'(at most {_MAX_RANK})')
  return tuple(values)


def _view(data: np.ndarray, dtype: np.dtype, bfloat16: bool, offset: int, size: tuple,
          stride: tuple, load: _Load) -> np.ndarray:
  """Copies the tensor view ``(offset, size, stride)`` out of a storage's raw bytes.

  The only function that reads tensor bytes. Every bound is checked first, in Python
  integers (no overflow): the elements present are those whole ones in ``data``
  (its real byte length, whatever the file claims); the view's last element must lie
  among them; the tensor may repeat elements at most ``_MAX_EXPANSION`` times; and
  the read's byte budget is charged before the copy is allocated.

  Args:
    data: the storage's bytes, a 1-D uint8 array made by the reader.
    dtype: element dtype with its byte order (bfloat16 as uint16 bit patterns).
    bfloat16: widen the bit patterns to float32 (exact).
    offset: first element, in elements of ``dtype`` (checked non-negative int).
    size: shape (checked non-negative ints).
    stride: element strides, same rank (checked non-negative ints).
    load: the read, charged with the result's bytes.

  Returns:
    A C-contiguous, native-byte-order copy.
  """
  if dtype.kind not in _NUMERIC_KINDS:
    raise ValueError(f'{dtype} tensors are not supported (complex or non-numeric dtype)')
  if data.dtype != np.uint8 or data.ndim != 1:
    raise ValueError('storage bytes are not a 1-D byte array')
  out_dtype = np.dtype(np.float32) if bfloat16 else dtype.newbyteorder('=')
  count = data.shape[0] // dtype.itemsize
  numel = math.prod(size)
  if numel == 0:
    return np.zeros(size, out_dtype)
  if numel > _MAX_EXPANSION * count:
    raise ValueError(f'tensor of size {brief(size)} is over {_MAX_EXPANSION}x its storage of '
                     f'{count} elements')
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= count:
    raise ValueError(f'tensor of size {brief(size)}, stride {brief(stride)}, offset {offset} '
                     f'reads past its storage of {count} elements')
  load.add_tensor(numel * out_dtype.itemsize)
  elements = data[:count * dtype.itemsize].view(dtype)
  strides = [s * dtype.itemsize if n > 1 else 0 for n, s in zip(size, stride)]
  view = np.lib.stride_tricks.as_strided(elements[offset:], shape=size, strides=strides,
                                         writeable=False)
  out = np.array(view, dtype=dtype.newbyteorder('='), order='C', copy=True)
  return (out.astype(np.uint32) << 16).view(np.float32) if bfloat16 else out


def _tensor(storage, offset, size, stride, load: _Load,
            torch_dtype: _TorchDType | None = None):
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
  if torch_dtype is None:
    dtype, bfloat16 = storage.dtype, storage.bfloat16
  elif storage.dtype.itemsize != 1:
    raise ValueError('a tensor with an explicit dtype needs an untyped storage')
  else:
    dtype, bfloat16 = torch_dtype.dtype, torch_dtype.bfloat16
  if dtype.kind not in _NUMERIC_KINDS:
    raise ValueError(f'{dtype} tensors are not supported (complex or non-numeric dtype)')

  def build():
    data = storage.raw()
    if data is None:
      raise ValueError('a tensor storage is missing from the storage list')
    return _view(data, dtype, bfloat16, offset, size, stride, load)

  return build() if storage.raw() is not None else _PendingTensor(build)


# ---------------------------------------------------------------------------
# The restricted unpickler.


def _counted(op: Callable) -> Callable:
  def counted(self):
    self._load.count_op()  # pylint: disable=protected-access
    op(self)
  return counted


class _Dispatch(dict):
  """Opcode -> handler; an unknown opcode means the data is not a pickle."""

  def __missing__(self, code: int):
    raise pickle.UnpicklingError(f'invalid load key {bytes([code])!r}')


class _Exact:
  """A file whose reads return exactly the bytes asked for, or fail as truncated.

  Never allocates more than is there: a huge length read from the file only reads
  what remains, then fails.
  """

  def __init__(self, file):
    self.file = file
    self.readline = file.readline

  def read(self, n: int) -> bytes:
    data = self.file.read(n)
    if len(data) != n:
      raise pickle.UnpicklingError('pickle data was truncated')
    return data


class _Unpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler with every operation that could harm replaced by a checked one.

  * globals resolve only through the allowlist, to this read's own stand-ins;
  * REDUCE/INST/OBJ call only allowlisted callables; NEWOBJ creates only torch module
    records and EasyDicts, which BUILD may then set state on, once; BUILD on anything
    else is refused;
  * dict keys and set members are checked by :func:`_key` before they are hashed;
  * APPEND(S)/SETITEM(S)/ADDITEMS act only on lists/dicts/sets;
  * every operation counts against the read's cap; memo indices stay below it.

  Args:
    file: the pickle stream.
    load: the read this stream belongs to.
    where: the file (or ``'FILE (storage blob)'``), named in errors.
    persistent_load: handler for persistent ids (torch storages); ``None`` refuses them.
    blobs: allow ``torch.storage._load_from_bytes`` (not inside a storage blob).
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, load: _Load, where: str, persistent_load=None, blobs: bool = True):
    super().__init__(_Exact(file))
    self._load = load
    self._where = where
    self._persistent = persistent_load
    self._buildable = {}
    self._module_classes = {}
    self._globals = self._allowlist(blobs)
    self._callables = {id(v): v for v in self._globals.values() if callable(v)}

  def _allowlist(self, blobs: bool) -> dict[str, Any]:
    table = {
        'torch_utils.persistence._reconstruct_persistent_obj': self._persistent_obj,
        'torch._utils._rebuild_tensor_v2': self._rebuild_tensor_v2,
        'torch._utils._rebuild_tensor_v3': self._rebuild_tensor_v3,
        'torch._utils._rebuild_parameter': _rebuild_parameter,
        'torch._utils._rebuild_parameter_with_state': _rebuild_parameter,
        'collections.OrderedDict': _OrderedDict,
        'numpy.core.multiarray.scalar': _numpy_scalar,
        'numpy._core.multiarray.scalar': _numpy_scalar,
        'numpy.dtype': _NumpyDType,
        'dnnlib.util.EasyDict': _EasyDict,
        'builtins.set': _set, '__builtin__.set': _set,
        'builtins.frozenset': _frozenset, '__builtin__.frozenset': _frozenset,
    }
    if blobs:
      table['torch.storage._load_from_bytes'] = self._load_from_bytes
    for name in _STORAGE_DTYPES:
      table[f'torch.{name}'] = table[f'torch.storage.{name}'] = _storage_type(name)
    for name in _TORCH_DTYPES:
      table[f'torch.{name}'] = _torch_dtype(name)
    return table

  def _fail(self, message: str) -> CheckpointError:
    return CheckpointError(f'{self._where}: {message}')

  def find_class(self, module: str, name: str) -> Any:
    qualified = f'{module}.{name}'
    if qualified in self._globals:
      return self._globals[qualified]
    if _TORCH_NN_MODULE.fullmatch(qualified):
      if qualified not in self._module_classes:
        self._module_classes[qualified] = _torch_module_class(qualified)
      return self._module_classes[qualified]
    raise CheckpointError(f'refusing global {label(qualified, 200)} in {self._where}: '
                          'not an allowlisted checkpoint type')

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent is None:
      raise self._fail(f'unexpected persistent id {brief(pid)} in a plain pickle')
    return self._persistent(pid)

  # -- checked operations -----------------------------------------------------

  def _call(self, func: Any, args: Any) -> Any:
    if type(args) is not tuple:
      raise ValueError(f'call arguments are a {type(args).__name__}, not a tuple')
    if isinstance(func, type) and issubclass(func, ModuleRecord):
      raise TypeError(f'{func.qualified} cannot be called from a checkpoint')
    if self._callables.get(id(func)) is not func:
      raise self._fail(f'a {type(func).__name__} cannot be called from a checkpoint')
    result = func(*args)
    if isinstance(result, (_NumpyDType, _OrderedDict)):
      self._buildable[id(result)] = result
    return result

  def _new(self, cls: Any, args: Any, kwargs: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, ModuleRecord) and (
        self._module_classes.get(getattr(cls, 'qualified', None)) is cls):
      obj = ModuleRecord.__new__(cls)
      ModuleRecord.__init__(obj, cls.qualified, {})
    elif cls is _EasyDict:
      obj = _EasyDict()
    else:
      raise self._fail(f'NEWOBJ of a {label(getattr(cls, "__name__", type(cls).__name__))} '
                       'is not allowed (only torch modules and EasyDicts)')
    if args != () or kwargs:
      raise self._fail(f'NEWOBJ of {label(cls.__name__)} with arguments is not allowed')
    self._buildable[id(obj)] = obj
    return obj

  def _container(self, kind: type) -> Any:
    target = self.stack[-1]
    if not isinstance(target, kind):
      raise ValueError(f'cannot add items to a {type(target).__name__}')
    return target

  def _memo_put(self, index: int) -> None:
    if not 0 <= index < _MAX_OPS:
      raise self._fail(f'memo index {index} out of range')
    self.memo[index] = self.stack[-1]

  def load_reduce(self):
    args = self.stack.pop()
    self.stack[-1] = self._call(self.stack[-1], args)
  dispatch[pickle.REDUCE[0]] = load_reduce

  def _instantiate(self, klass, args):
    self.append(self._call(klass, tuple(args)))

  def load_newobj(self):
    args = self.stack.pop()
    cls = self.stack.pop()
    self.append(self._new(cls, args, {}))
  dispatch[pickle.NEWOBJ[0]] = load_newobj

  def load_newobj_ex(self):
    kwargs = self.stack.pop()
    args = self.stack.pop()
    cls = self.stack.pop()
    self.append(self._new(cls, args, kwargs))
  dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

  def load_build(self):
    state = self.stack.pop()
    inst = self.stack[-1]
    if self._buildable.pop(id(inst), None) is not inst:
      raise self._fail(f'BUILD on a {label(type(inst).__name__)} is not allowed (state is set '
                       'only on objects the reader created for it, once)')
    inst.__setstate__(state)
  dispatch[pickle.BUILD[0]] = load_build

  def load_dict(self):
    items = self.pop_mark()
    if len(items) % 2:
      raise ValueError('odd number of items for DICT')
    self.append({_key(items[i]): items[i + 1] for i in range(0, len(items), 2)})
  dispatch[pickle.DICT[0]] = load_dict

  def load_setitem(self):
    value = self.stack.pop()
    key = self.stack.pop()
    self._container(dict)[_key(key)] = value
  dispatch[pickle.SETITEM[0]] = load_setitem

  def load_setitems(self):
    items = self.pop_mark()
    if len(items) % 2:
      raise ValueError('odd number of items for SETITEMS')
    target = self._container(dict)
    for i in range(0, len(items), 2):
      target[_key(items[i])] = items[i + 1]
  dispatch[pickle.SETITEMS[0]] = load_setitems

  def load_additems(self):
    items = self.pop_mark()
    self._container(set).update(_checked_members(items))
  dispatch[pickle.ADDITEMS[0]] = load_additems

  def load_frozenset(self):
    self.append(frozenset(_checked_members(self.pop_mark())))
  dispatch[pickle.FROZENSET[0]] = load_frozenset

  def load_append(self):
    value = self.stack.pop()
    self._container(list).append(value)
  dispatch[pickle.APPEND[0]] = load_append

  def load_appends(self):
    items = self.pop_mark()
    self._container(list).extend(items)
  dispatch[pickle.APPENDS[0]] = load_appends

  def load_put(self):
    self._memo_put(int(self.readline()[:-1]))
  dispatch[pickle.PUT[0]] = load_put

  def load_long_binput(self):
    self._memo_put(int.from_bytes(self.read(4), 'little'))
  dispatch[pickle.LONG_BINPUT[0]] = load_long_binput

  dispatch = _Dispatch((code, _counted(op)) for code, op in dispatch.items())

  # -- stand-ins that need the read --------------------------------------------

  def _persistent_obj(self, meta):
    """``torch_utils.persistence._reconstruct_persistent_obj`` -> ModuleRecord."""
    if not isinstance(meta, dict) or meta.get('type') != 'class':
      raise ValueError(f'persistent object meta is not a class record: {brief(meta)}')
    class_name = meta.get('class_name')
    if not isinstance(class_name, str):
      raise ValueError(f'persistent object class name {brief(class_name)} is not a string')
    state = _check_module_state(class_name, meta.get('state'))
    kwargs, args = state.get('_init_kwargs') or {}, state.get('_init_args') or ()
    if not isinstance(kwargs, dict) or not isinstance(args, (tuple, list)):
      raise ValueError(f'{label(class_name)} init kwargs/args are a {type(kwargs).__name__}/'
                       f'{type(args).__name__}, not a dict/tuple')
    return ModuleRecord(class_name, state, init_kwargs=_to_python(kwargs, self._load),
                        init_args=_to_python(tuple(args), self._load))

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False,
                         backward_hooks=None, metadata=None):
    del requires_grad, backward_hooks, metadata
    return _tensor(storage, offset, size, stride, self._load)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad,
                         backward_hooks, dtype, metadata=None):
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _TorchDType):
      raise ValueError(f'tensor dtype {brief(dtype)} is not a torch dtype')
    return _tensor(storage, offset, size, stride, self._load, dtype)

  def _load_from_bytes(self, blob):
    """``torch.storage._load_from_bytes``: a legacy torch.save of one storage."""
    if not isinstance(blob, bytes):
      raise ValueError('storage blob is not bytes')
    storage = _read_legacy(blob, self._load, f'{self._where} (storage blob)', blobs=False)
    if not isinstance(storage, _Storage):
      raise ValueError(f'storage blob holds {type(storage).__name__}, not a storage')
    return storage


# ---------------------------------------------------------------------------
# Walks over the result: memoised (shared parts once) and depth-capped.


def _to_python(value: Any, load: _Load, depth: int = 0) -> Any:
  """Turns numpy scalars into Python numbers, recursively through containers."""
  if id(value) in load.python_memo:
    return load.python_memo[id(value)][1]
  if depth > _MAX_DEPTH:
    raise load.fail(f'containers nest deeper than {_MAX_DEPTH} levels')
  if isinstance(value, np.generic):
    result = value.item()
  elif isinstance(value, dict):
    result = {k: _to_python(v, load, depth + 1) for k, v in value.items()}
  elif isinstance(value, (list, tuple)):
    result = type(value)(_to_python(v, load, depth + 1) for v in value)
  else:
    result = value
  load.python_memo[id(value)] = (value, result)
  return result


def _finish(obj: Any, load: _Load, depth: int = 0) -> Any:
  """Builds every _PendingTensor and tags every ModuleRecord with its file, in place.

  Shared sub-structures are visited once (``load.finish_memo`` keeps the originals
  alive while their ids are keys); nesting deeper than ``_MAX_DEPTH`` is refused.
  """
  memo = load.finish_memo
  if id(obj) in memo:
    return memo[id(obj)][1]
  if depth > _MAX_DEPTH:
    raise load.fail(f'containers nest deeper than {_MAX_DEPTH} levels')
  memo[id(obj)] = (obj, obj)
  if isinstance(obj, _PendingTensor):
    memo[id(obj)] = (obj, obj.build())
  elif isinstance(obj, dict):
    for key, value in obj.items():
      obj[key] = _finish(value, load, depth + 1)
  elif isinstance(obj, list):
    obj[:] = [_finish(v, load, depth + 1) for v in obj]
  elif isinstance(obj, tuple):
    memo[id(obj)] = (obj, type(obj)(_finish(v, load, depth + 1) for v in obj))
  elif isinstance(obj, ModuleRecord):
    obj.source = load.path
    for name in ('state', 'init_kwargs', 'init_args'):
      setattr(obj, name, _finish(getattr(obj, name), load, depth + 1))
  return memo[id(obj)][1]


# ---------------------------------------------------------------------------
# File formats.


def _storage_from_id(pid: Any, where: str) -> tuple[str, _StorageType, int, Any]:
  """Validates ``('storage', type, key, location, numel[, view])``."""
  if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == 'storage'):
    raise CheckpointError(f'{where}: unsupported persistent id {brief(pid)} '
                          '(only tensor storages are supported)')
  storage_type, key, numel = pid[1], pid[2], pid[4]
  if not isinstance(storage_type, _StorageType) or type(key) is not str or not (
      type(numel) is int and numel >= 0):
    raise CheckpointError(f'{where}: malformed storage id {brief(pid)}')
  return key, storage_type, numel, pid[5] if len(pid) == 6 else None


def _with_byteorder(dtype: np.dtype, big_endian: bool) -> np.dtype:
  if dtype.itemsize == 1 or dtype.kind not in 'biufc':
    return dtype
  return dtype.newbyteorder('>' if big_endian else '<')


def _read_legacy(raw: bytes, load: _Load, where: str, blobs: bool = True) -> Any:
  """Reads a legacy (non-zip) torch.save stream.

  Args:
    raw: the whole stream.
    load: the read it belongs to.
    where: named in errors.
    blobs: whether its pickles may hold storage blobs.

  Returns:
    The saved object; tensors are _PendingTensors until :func:`_finish`.
  """
  stream = io.BytesIO(raw)

  def unpickle(persistent_load=None):
    return _Unpickler(stream, load, where, persistent_load, blobs).load()

  if unpickle() != _LEGACY_MAGIC:
    raise CheckpointError(f'{where}: not a torch.save stream (bad magic number)')
  protocol = unpickle()
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointError(f'{where}: unsupported torch.save protocol {brief(protocol)}')
  sys_info = unpickle()
  if not isinstance(sys_info, dict) or not isinstance(sys_info.get('little_endian', True), bool):
    raise CheckpointError(f'{where}: malformed torch.save header')
  big_endian = not sys_info.get('little_endian', True)

  storages = {}

  def persistent_load(pid):
    key, storage_type, numel, view = _storage_from_id(pid, where)
    if key not in storages:
      storages[key] = _Storage(_with_byteorder(storage_type.dtype, big_endian), numel,
                               storage_type.bfloat16)
    root = storages[key]
    if view is None:
      return root
    if not (isinstance(view, tuple) and len(view) == 3 and type(view[0]) is str):
      raise CheckpointError(f'{where}: malformed storage view {brief(view)}')
    view_key = view[0]
    offset, view_numel = _check_ints('storage view', view[1:])
    if offset + view_numel > root.numel:
      raise CheckpointError(f'{where}: storage view {view_key!r} ({offset}+{view_numel}) '
                            f'reaches past its storage of {root.numel} elements')
    if view_key not in storages:
      storages[view_key] = _Storage(root.dtype, view_numel, root.bfloat16,
                                    root=(root, offset * root.dtype.itemsize))
    return storages[view_key]

  result = unpickle(persistent_load)
  keys = unpickle()
  if not isinstance(keys, list) or not all(type(k) is str for k in keys):
    raise CheckpointError(f'{where}: malformed storage key list')
  position = stream.tell()
  for key in keys:
    storage = storages.get(key)
    if storage is None:
      raise CheckpointError(f'{where}: storage key {brief(key)} is not used by any tensor')
    header = raw[position:position + 8]
    if len(header) < 8:
      raise CheckpointError(f'{where}: truncated file (storage {brief(key)} missing)')
    numel = int.from_bytes(header, 'big' if big_endian else 'little', signed=True)
    nbytes = numel * storage.dtype.itemsize
    if numel != storage.numel or position + 8 + nbytes > len(raw):
      raise CheckpointError(
          f'{where}: truncated or corrupt storage {brief(key)} ({numel} elements recorded, '
          f'{storage.numel} expected, {len(raw) - position - 8} bytes left)')
    load.add_storage(nbytes)
    storage.fill(np.frombuffer(raw, np.uint8, nbytes, position + 8))
    position += 8 + nbytes
  return result


def _read_record(archive: zipfile.ZipFile, name: str, load: _Load) -> bytes:
  """One stored (uncompressed, as torch writes them) record of a zip archive."""
  try:
    info = archive.getinfo(name)
  except KeyError:
    raise load.fail(f'zip record {label(name)} is missing') from None
  if info.compress_type != zipfile.ZIP_STORED:
    raise load.fail(f'zip record {label(name)} is compressed; torch.save stores records '
                    'uncompressed')
  if info.file_size > load.file_bytes:
    raise load.fail(f'zip record {label(name)} claims {info.file_size} bytes, more than the file')
  return archive.read(info)


def _read_zip(load: _Load) -> Any:
  """Reads a zip-format torch.save archive."""
  path = load.path
  try:
    archive = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError) as e:
    raise load.fail(f'truncated or corrupt zip archive ({one_line(_detail(e), 200)})') from None
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise load.fail('zip archive is not a torch.save file (no */data.pkl)')
    prefix = pickles[0][:-len('data.pkl')]
    big_endian = False
    if prefix + 'byteorder' in names:
      big_endian = _read_record(archive, prefix + 'byteorder', load).strip() == b'big'
    storages = {}

    def persistent_load(pid):
      key, storage_type, numel, _ = _storage_from_id(pid, path)
      if key not in storages:
        dtype = _with_byteorder(storage_type.dtype, big_endian)
        blob = _read_record(archive, f'{prefix}data/{key}', load)
        nbytes = numel * dtype.itemsize
        if len(blob) < nbytes:
          raise load.fail(f'storage record data/{label(key)} holds {len(blob)} bytes, '
                          f'{nbytes} expected')
        load.add_storage(nbytes)
        storages[key] = _Storage(dtype, numel, storage_type.bfloat16,
                                 np.frombuffer(blob, np.uint8, nbytes))
      return storages[key]

    stream = io.BytesIO(_read_record(archive, pickles[0], load))
    return _Unpickler(stream, load, path, persistent_load).load()


def _read_any(load: _Load) -> Any:
  """Reads a pickle or torch.save file (zip or legacy) into plain data."""
  path = load.path
  with open(path, 'rb') as f:
    head = f.read(512)
    if head[:4] == b'PK\x03\x04':
      return _read_zip(load)
    if head[257:262] == b'ustar':
      raise load.fail('legacy tar-format torch.save files are not supported')
    if not head:
      raise load.fail('empty file (not a pickle)')
    # Unpickle from a map of the file: a multi-GB network pickle is not held twice.
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
      first = _Unpickler(data, load, path).load()
      if type(first) is int and first == _LEGACY_MAGIC:
        return _read_legacy(data[:], load, path)
      return first


def read_checkpoint(path: str) -> Any:
  """Reads any supported checkpoint file into plain data, with one-line errors.

  Args:
    path: an EDM pickle or a torch.save file (zip or legacy format).

  Returns:
    The unpickled object: dicts, lists, numbers, numpy arrays and ModuleRecords.

  Raises:
    CheckpointError: the file is missing, truncated, not a pickle, refers to a
      global outside the allowlist, or breaks a bound (see the module docstring).
  """
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  try:
    load = _Load(path, os.path.getsize(path))
    return _finish(_read_any(load), load)
  except CheckpointError as e:
    raise CheckpointError(one_line(str(e))) from None
  except (pickle.UnpicklingError, EOFError) as e:
    raise CheckpointError(
        f'{path}: truncated file or not a pickle ({one_line(_detail(e), 200)})') from None
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{path}: malformed checkpoint ({type(e).__name__}: '
                          f'{one_line(_detail(e), 200)})') from None


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
                          f"dict; keys: {listing(data, label) or 'none'})")
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
    found = listing(k for k, v in data.items() if isinstance(v, ModuleRecord))
    if key in data:
      raise CheckpointError(f'{path}: entry {key!r} is a {type(value).__name__}, not a network '
                            f'(networks: {found or "none"})')
    raise CheckpointError(f"{path}: no {key!r} entry (found keys: {listing(data) or 'none'})")
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
    CheckpointError: unreadable file, refused global, or not a flat mapping of string
      names to tensors (the message lists the top-level keys to choose from).
  """
  data = read_checkpoint(path)
  if key is not None:
    if not isinstance(data, dict) or key not in data:
      keys = listing(data) if isinstance(data, dict) else type(data).__name__
      raise CheckpointError(f'{path}: no {key!r} entry (found keys: {keys})')
    data = data[key]
  if not isinstance(data, dict):
    raise CheckpointError(f'{path}: not a state dict (top level is a {type(data).__name__})')
  for name, value in data.items():
    if not isinstance(name, str):
      raise CheckpointError(f'{path}: not a state dict (name {brief(name)} is a '
                            f'{type(name).__name__}, not a string)')
    if not isinstance(value, np.ndarray):
      nested = [k for k, v in data.items() if isinstance(v, dict)]
      hint = f'; choose one of {listing(nested)} with key=' if nested and key is None else ''
      raise CheckpointError(f'{path}: not a flat state dict (entry {brief(name)} is a '
                            f'{type(value).__name__}, not a tensor{hint})')
  return dict(data)


def main_guard(main: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates a converter's ``main`` to turn CheckpointError into a clean exit.

  The error prints as one line ``error: <message>`` on stderr (control characters
  escaped, length bounded), and the process exits with status 2, without a traceback.
  """

  @functools.wraps(main)
  def guarded(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except CheckpointError as e:
      print(f'error: {one_line(str(e), 2000)}', file=sys.stderr)
      sys.exit(2)

  return guarded
