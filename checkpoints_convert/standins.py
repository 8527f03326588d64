"""Stand-ins for the allowlisted container, numpy and torch.nn globals.

Each checks what the pickle passes before building anything: dict keys and set members
are strings or 64-bit ints (:func:`_key`: cheap, honest hashes), numpy dtypes are plain
numeric ones, module state is a dict whose torch fields are dicts. Torch module classes
are made for each read (:func:`_torch_module_class`).
"""

import collections
from typing import Any

import numpy as np

from checkpoints_convert.errors import brief
from checkpoints_convert.records import ModuleRecord, _check_module_state
from checkpoints_convert.tensors import _NUMERIC_KINDS


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


def _torch_module_class(qualified: str) -> type:
  """A ModuleRecord subclass standing in for one plain torch.nn module class (per read).

  Such modules are pickled as NEWOBJ (no arguments) followed by BUILD with the
  module ``__dict__``; ``unpickler._Unpickler`` allows exactly that.
  """

  def __setstate__(self, state):
    self.state = _check_module_state(qualified, state)

  return type(qualified.rsplit('.', 1)[1], (ModuleRecord,),
              {'__setstate__': __setstate__, 'qualified': qualified})
