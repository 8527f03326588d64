"""What one read may spend and remember: every cap of the reader, and :class:`_Load`.

All bounds live here, so that none is loosened unseen. A read's work and memory are
bounded by its file: storages may not claim more bytes than the file has, tensors not
more than ``_TENSOR_BYTES_PER_STORAGE_BYTE`` times the storage bytes (plus
``_TENSOR_BYTES_SLACK``); pickle operations, memo indices, tensor rank and nesting
depth are capped.
"""

from checkpoints_convert.errors import CheckpointError

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
