"""The file formats: EDM network pickles, torch.save zip archives, legacy torch.save.

* EDM pickles are plain pickles; their tensors' storages are blobs, each a legacy
  torch.save of one storage (``torch.storage._load_from_bytes``, :func:`_storage_blob`;
  a blob may not hold blobs).
* Zip archives hold ``ARCHIVE/data.pkl`` plus one stored (uncompressed) record per
  storage (:func:`_read_zip`); records may not overlap, and a storage is a view of its
  record's bytes in the file (nothing is copied).
* Legacy streams are a magic number, protocol version, sys info, the object pickle,
  the storage keys, then the raw storages (:func:`_read_legacy`).

The whole file is in memory (``reader`` reads it once). Every storage is charged to the
read's budget before its bytes are used.
"""

import io
import zipfile
from typing import Any

import numpy as np

from checkpoints_convert.budget import _Load
from checkpoints_convert.errors import CheckpointError, _detail, brief, label, one_line
from checkpoints_convert.tensors import _Storage, _StorageType, _check_ints
from checkpoints_convert.unpickler import _Unpickler

# torch.serialization constants of the legacy (non-zip) format.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


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


def _unpickler(file, load: _Load, where: str, persistent_load=None,
               blobs: bool = True) -> _Unpickler:
  """An unpickler of this read; with ``blobs``, storage blobs are read by :func:`_storage_blob`."""
  load_blob = (lambda blob: _storage_blob(blob, load, where)) if blobs else None
  return _Unpickler(file, load, where, persistent_load, load_blob)


def _storage_blob(blob: Any, load: _Load, where: str) -> _Storage:
  """``torch.storage._load_from_bytes``: a legacy torch.save of one storage (EDM pickles)."""
  if not isinstance(blob, bytes):
    raise ValueError('storage blob is not bytes')
  storage = _read_legacy(blob, load, f'{where} (storage blob)', blobs=False)
  if not isinstance(storage, _Storage):
    raise ValueError(f'storage blob holds {type(storage).__name__}, not a storage')
  return storage


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
    return _unpickler(stream, load, where, persistent_load, blobs).load()

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


def _record_ranges(archive: zipfile.ZipFile, data: bytes, load: _Load) -> dict[str, range]:
  """Record name -> the byte range of its data in the file, for every record of the archive.

  Ranges are found from each record's local header, must lie inside the file and may
  not overlap (torch writes them one after another): a storage is then a view of the
  file's bytes, and no two records share one.
  """
  ranges = {}
  for info in archive.infolist():
    start = info.header_offset
    header = data[start:start + 30]
    if len(header) < 30 or header[:4] != b'PK\x03\x04':
      raise load.fail(f'zip record {label(info.filename)} has no local header')
    begin = start + 30 + int.from_bytes(header[26:28], 'little') + int.from_bytes(
        header[28:30], 'little')
    if begin + info.compress_size > len(data):
      raise load.fail(f'zip record {label(info.filename)} reaches past the end of the file')
    ranges[info.filename] = range(begin, begin + info.compress_size)
  spans = sorted((archive.getinfo(n).header_offset, r.stop, n) for n, r in ranges.items())
  for (_, stop, name), (start, _, other) in zip(spans, spans[1:]):
    if start < stop:
      raise load.fail(f'zip records {label(name)} and {label(other)} overlap')
  return ranges


def _read_record(archive: zipfile.ZipFile, ranges: dict[str, range], name: str,
                 load: _Load) -> range:
  """The byte range of one stored (uncompressed, as torch writes them) record."""
  if name not in ranges:
    raise load.fail(f'zip record {label(name)} is missing')
  if archive.getinfo(name).compress_type != zipfile.ZIP_STORED:
    raise load.fail(f'zip record {label(name)} is compressed; torch.save stores records '
                    'uncompressed')
  return ranges[name]


def _read_zip(load: _Load, data: bytes) -> Any:
  """Reads a zip-format torch.save archive (the whole file, in memory)."""
  path = load.path
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
  except (zipfile.BadZipFile, OSError) as e:
    raise load.fail(f'truncated or corrupt zip archive ({one_line(_detail(e), 200)})') from None
  with archive:
    load.copy(len(archive.filelist))
    ranges = _record_ranges(archive, data, load)
    pickles = [n for n in ranges if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise load.fail('zip archive is not a torch.save file (no */data.pkl)')
    prefix = pickles[0][:-len('data.pkl')]
    big_endian = False
    if prefix + 'byteorder' in ranges:
      order = _read_record(archive, ranges, prefix + 'byteorder', load)
      big_endian = data[order.start:order.stop].strip() == b'big'
    storages = {}

    def persistent_load(pid):
      key, storage_type, numel, _ = _storage_from_id(pid, path)
      if key not in storages:
        dtype = _with_byteorder(storage_type.dtype, big_endian)
        record = _read_record(archive, ranges, f'{prefix}data/{key}', load)
        nbytes = numel * dtype.itemsize
        if len(record) < nbytes:
          raise load.fail(f'storage record data/{label(key)} holds {len(record)} bytes, '
                          f'{nbytes} expected')
        load.add_storage(nbytes)
        storages[key] = _Storage(dtype, numel, storage_type.bfloat16,
                                 np.frombuffer(data, np.uint8, nbytes, record.start))
      return storages[key]

    pickle_range = _read_record(archive, ranges, pickles[0], load)
    stream = io.BytesIO(data[pickle_range.start:pickle_range.stop])
    return _unpickler(stream, load, path, persistent_load).load()


def _read_any(load: _Load, data: bytes) -> Any:
  """Reads a pickle or torch.save file (zip or legacy), held in memory, into plain data."""
  head = data[:512]
  if head[:4] == b'PK\x03\x04':
    return _read_zip(load, data)
  if head[257:262] == b'ustar':
    raise load.fail('legacy tar-format torch.save files are not supported')
  if not head:
    raise load.fail('empty file (not a pickle)')
  first = _unpickler(io.BytesIO(data), load, load.path).load()
  if type(first) is int and first == _LEGACY_MAGIC:
    return _read_legacy(data, load, load.path)
  return first
