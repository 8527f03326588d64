"""What one read may spend and remember: every cap of the reader, and :class:`_Load`.

All bounds live here, so that none is loosened unseen. One budget covers the whole read
of a file, blobs and re-parses included, in two currencies:

* memory: bytes the reader allocates (every byte taken from a pickle stream, bytearrays
  only once their bytes are read; ``_BYTES_PER_OP`` for the object an operation may
  make; ``_BYTES_PER_ITEM`` per element copied by an allowlisted callable or a walk;
  ``_BYTES_PER_CLASS`` per torch module class made, ``_BYTES_PER_UNPICKLER`` per pickle
  started (a storage blob re-read is a new pickle); every tensor copied out of a
  storage), at most ``_MEMORY_PER_FILE_BYTE`` times the file size plus ``_MEMORY_SLACK``;
* work: one unit (about a microsecond) per operation, per element copied or walked, per
  KiB read or copied, ``_WORK_PER_UNPICKLER`` per pickle started, and the quadratic cost
  of parsing a decimal integer, at most ``_WORK_SLACK`` plus one unit per
  ``_FILE_BYTES_PER_WORK`` bytes of the file.

Exceeding either is one :class:`CheckpointError`. A published-size EDM pickle (55.7M
parameters, 223 MB) uses 2.1x its size in memory (48% of its budget) and 4% of its work
budget. Besides: storages may not claim more bytes than the file has, tensors not more
than ``_TENSOR_BYTES_PER_STORAGE_BYTE`` times the storage bytes (plus
``_TENSOR_BYTES_SLACK``); memo indices, tensor rank and nesting depth are capped.
"""

from checkpoints_convert.errors import CheckpointError

# One tensor may repeat storage elements (zero strides), but not without bound.
_MAX_EXPANSION = 1024
# All tensors of one read together: at most this many bytes per storage byte, plus slack.
_TENSOR_BYTES_PER_STORAGE_BYTE = 4
_TENSOR_BYTES_SLACK = 1 << 20
_MAX_RANK = 16
# Memo indices must lie below this (a published EDM pickle uses ~1e5).
_MAX_MEMO = 1 << 22
# Containers nested deeper than this are refused (a published network nests ~20 deep).
_MAX_DEPTH = 100

# The memory budget of one read: a multiple of the file size plus slack.
_MEMORY_PER_FILE_BYTE = 4
_MEMORY_SLACK = 64 << 20
_BYTES_PER_OP = 128         # an operation's object, its stack slot and memo entry
_BYTES_PER_ITEM = 64        # an element of a copied list, dict or set
_BYTES_PER_CLASS = 8 << 10  # a torch module class made for the read
_BYTES_PER_UNPICKLER = 4 << 10   # an unpickler and its stand-ins (one per pickle, blobs too)
_WORK_PER_UNPICKLER = 50
# The work budget of one read, in units of about a microsecond.
_WORK_SLACK = 1 << 20
_FILE_BYTES_PER_WORK = 16
_BYTES_PER_WORK = 1 << 10   # reading or copying a KiB
_DIGITS_SQUARED_PER_WORK = 200_000   # parsing n decimal digits costs n^2 / this


class _Load:
  """Everything one read may use and remember; nothing here outlives the read.

  Attributes:
    path: the file, named in errors.
    file_bytes: its size, which sets the budgets (see the module docstring).
  """

  def __init__(self, path: str, file_bytes: int):
    self.path = path
    self.file_bytes = file_bytes
    self.storage_bytes = 0
    self.tensor_bytes = 0
    self.memory = 0
    self.work = 0
    self.memory_budget = _MEMORY_PER_FILE_BYTE * file_bytes + _MEMORY_SLACK
    self.work_budget = _WORK_SLACK + file_bytes // _FILE_BYTES_PER_WORK
    self.python_memo = {}    # _to_python: id -> (value, result), shared by the whole read
    self.finish_memo = {}    # _finish: id -> (value, result)
    self.tuple_memo = {}     # _as_tuple: id -> (list, tuple)

  def fail(self, message: str) -> CheckpointError:
    return CheckpointError(f'{self.path}: {message}')

  def charge(self, nbytes: int = 0, work: int = 0) -> None:
    """Counts ``nbytes`` of memory and ``work`` units; refuses once either budget is spent."""
    self.memory += nbytes
    self.work += work + nbytes // _BYTES_PER_WORK
    if self.memory > self.memory_budget:
      raise self.fail(f'reading it would allocate over {self.memory_budget} bytes '
                      f'({_MEMORY_PER_FILE_BYTE}x its {self.file_bytes} bytes + '
                      f'{_MEMORY_SLACK >> 20} MiB): the file repeats or amplifies its content')
    if self.work > self.work_budget:
      raise self.fail(f'reading it would take over {self.work_budget} work units '
                      f'({_WORK_SLACK} + 1 per {_FILE_BYTES_PER_WORK} bytes of the file): '
                      'the file repeats or amplifies its content')

  def count_op(self) -> None:
    self.charge(_BYTES_PER_OP, 1)

  def copy(self, items: int) -> None:
    """Charges a copy (or a walk) of ``items`` container elements."""
    self.charge(items * _BYTES_PER_ITEM, items)

  def parse_digits(self, digits: int) -> None:
    """Charges parsing a decimal integer of ``digits`` digits (quadratic in CPython)."""
    self.charge(0, digits * digits // _DIGITS_SQUARED_PER_WORK)

  def add_class(self) -> None:
    self.charge(_BYTES_PER_CLASS, 1)

  def add_unpickler(self) -> None:
    self.charge(_BYTES_PER_UNPICKLER, _WORK_PER_UNPICKLER)

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
    self.charge(nbytes)
