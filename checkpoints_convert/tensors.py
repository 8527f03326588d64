"""Torch storages and tensors: the one place that reads storage bytes.

:func:`_view` turns a storage's raw bytes and a tensor's ``(offset, size, stride)`` into
an array, checking every bound in Python integers before touching a byte;
:func:`_tensor` checks what a pickle passes to torch's rebuild functions before that.
Storage classes and dtypes (``torch.FloatStorage``, ``torch.float32``) resolve to the
immutable stand-ins made here, afresh for each read.
"""

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from checkpoints_convert.budget import _Load, _MAX_EXPANSION, _MAX_RANK
from checkpoints_convert.errors import brief

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
