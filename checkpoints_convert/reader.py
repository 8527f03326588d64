"""Torch-free, code-free reader of PyTorch checkpoints: the public read functions.

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

* No code from the file runs. ``unpickler._Unpickler`` (the pure-Python unpickler
  with its dangerous operations replaced) resolves only an allowlist of globals, each
  to a stand-in of this read; REDUCE/NEWOBJ call only those; BUILD sets state only on
  objects the reader created for it, once. Stand-ins are made per read and immutable,
  so nothing one file does reaches the next read.
* No byte outside a storage is read. ``tensors._view`` is the only place that turns a
  storage plus ``(offset, size, stride)`` into an array; it checks every bound with
  Python integers before touching a byte.
* Work and memory are bounded by the file (``budget._Load``, every cap in
  ``budget``): one budget for the whole read charges every byte read from a pickle
  stream, every operation, copy, parsed integer and tensor, and stops the read past a
  small multiple of the file size; storages may not claim more bytes than the file
  has; dict keys and set members are strings or 64-bit ints (``standins._key``: no
  hash bombs); walks over the result are memoised and depth-capped (``records``).
  The file is read into memory first, so a file changed while it is read cannot crash
  the reader.
* Tensor names are identifiers joined by dots, none both a tensor and a parent
  (``records.check_names``), so that a converted tree can be written and loaded.
* Errors are one line: :class:`CheckpointError`, file values rendered with a
  bounded ``repr`` (:func:`brief`, :func:`label`), never a whole structure.

The reader's modules, each importing only those before it: ``errors`` (the error
type, bounded rendering), ``budget`` (the caps of one read), ``tensors`` (storages,
tensor views), ``records`` (ModuleRecord, the walks that finish a read), ``standins``
(allowlisted containers, numpy and torch.nn globals), ``unpickler`` (the checked
unpickler), ``formats`` (EDM pickle, torch.save zip, legacy torch.save) and this one.
Names with a leading underscore are the reader's internals, shared between these
modules; converters and tests import from here only.
"""

import functools
import os
import pickle
import stat
import sys
from typing import Any, Callable

import numpy as np

from checkpoints_convert.budget import _Load
from checkpoints_convert.errors import CheckpointError, _detail, brief, label, listing, one_line
from checkpoints_convert.formats import _read_any
from checkpoints_convert.records import ModuleRecord, _finish, check_names

__all__ = ['CheckpointError', 'ModuleRecord', 'brief', 'label', 'listing', 'one_line',
           'read_checkpoint', 'read_network_pickle', 'get_network', 'read_state_dict',
           'main_guard']


def _read_file(path: str) -> bytes:
  """The whole file, read once (never mapped: a file cut while it is read cannot crash us)."""
  try:
    with open(path, 'rb') as f:
      if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        raise CheckpointError(f'{path}: not a regular file')
      return f.read(os.fstat(f.fileno()).st_size)
  except (FileNotFoundError, NotADirectoryError):
    raise CheckpointError(f'{path}: no such file') from None
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read it ({e.strerror or type(e).__name__})') from None


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
  try:
    data = _read_file(path)
    load = _Load(path, len(data))
    return _finish(_read_any(load, data), load)
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
    CheckpointError: unreadable file, refused global, not a flat mapping of string
      names to tensors (the message lists the top-level keys to choose from), or a name
      that is not identifiers joined by dots (``records.check_names``).
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
  check_names(data, lambda message: CheckpointError(f'{path}: {message}'))
  return dict(data)


def main_guard(main: Callable[..., Any]) -> Callable[..., Any]:
  """Decorates a converter's ``main`` to turn CheckpointError into a clean exit.

  The error prints as one line ``error: <message>`` on stderr (control characters and
  undecodable bytes escaped, length bounded), and the process exits with status 2,
  without a traceback. Any other exception ends the same way, named by its type, so
  that no input reaches the user as a traceback.
  """

  @functools.wraps(main)
  def guarded(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except CheckpointError as e:
      message = str(e)
    except Exception as e:  # pylint: disable=broad-except
      message = f'{type(e).__name__}: {_detail(e) or "(no message)"}'
    print(f'error: {one_line(message, 2000)}', file=sys.stderr)
    sys.exit(2)

  return guarded
