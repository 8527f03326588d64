"""What a read returns: :class:`ModuleRecord`, and the walks that finish a read.

The walks (:func:`_to_python`, :func:`_finish`) visit shared parts once and refuse
nesting deeper than ``_MAX_DEPTH``.
"""

from typing import Any

import numpy as np

from checkpoints_convert.budget import _Load, _MAX_DEPTH
from checkpoints_convert.errors import CheckpointError, brief, label, listing
from checkpoints_convert.tensors import _PendingTensor


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
