"""What a read returns: :class:`ModuleRecord`, and the walks that finish a read.

The walks (:func:`_to_python`, :func:`_finish`, :meth:`ModuleRecord.state_dict`) visit
shared parts once, charge what they copy to the read's budget and refuse nesting deeper
than ``_MAX_DEPTH``. Module state is checked once the whole file is read (a pickle may
change it through its memo after creating the module); tensor names by
:func:`check_names`.
"""

import re
from typing import Any, Callable, Iterable

import numpy as np

from checkpoints_convert.budget import _Load, _MAX_DEPTH
from checkpoints_convert.errors import CheckpointError, brief, label, listing
from checkpoints_convert.tensors import _PendingTensor


# A tensor name: parts of letters, digits and '_', joined by dots, bounded in number and length.
_NAME_PART = re.compile(r'[A-Za-z0-9_]{1,64}')
_MAX_NAME_PARTS = 32
_MAX_NAME_CHARS = 512


def _name_problem(name: str) -> str | None:
  parts = name.split('.')
  if len(parts) > _MAX_NAME_PARTS or len(name) > _MAX_NAME_CHARS:
    return (f'has more than {_MAX_NAME_PARTS} parts or {_MAX_NAME_CHARS} characters')
  if not all(_NAME_PART.fullmatch(p) for p in parts):
    return ("is not identifiers joined by dots (letters, digits and '_', no empty part, "
            'at most 64 characters each)')
  return None


def check_names(names: Iterable[str], fail: Callable[[str], Exception]) -> None:
  """Refuses a tensor name that is not identifiers joined by dots, or that is also a parent.

  Names become paths of nested dicts (Flax trees, orbax files): a part with a ``/``, an
  empty part, a name that is both a tensor and the parent of another (``bias`` and
  ``bias.bias``) or a name thousands of parts deep would write a model that does not
  load, or crash the writer.

  Args:
    names: the dotted names (strings; anything else is refused).
    fail: message -> the exception to raise.
  """
  names = list(names)
  parents = set()
  for name in names:
    if not isinstance(name, str):
      raise fail(f'tensor name {brief(name)} is a {type(name).__name__}, not a string')
    problem = _name_problem(name)
    if problem:
      raise fail(f'tensor name {label(name, 200)} {problem}')
    parts = name.split('.')
    parents.update('.'.join(parts[:i]) for i in range(1, len(parts)))
  for name in names:
    if name in parents:
      raise fail(f'tensor name {label(name)} is also the parent of other tensors '
                 f'(e.g. {label(next(n for n in names if n.startswith(name + ".")))})')


def _check_module_state(class_name: str, state: Any) -> dict:
  """A module ``__dict__`` whose torch bookkeeping fields are dicts (not copied)."""
  if not isinstance(state, dict):
    raise ValueError(f'{label(class_name)} state is a {type(state).__name__}, not a dict')
  for field in ('_parameters', '_buffers', '_modules'):
    if not isinstance(state.get(field, {}), dict):
      raise ValueError(f'{label(class_name)}.{field} is a {type(state[field]).__name__}, '
                       'not a dict')
  skipped = state.get('_non_persistent_buffers_set') or set()
  if not isinstance(skipped, (set, frozenset)):
    raise ValueError(f'{label(class_name)}._non_persistent_buffers_set is a '
                     f'{type(skipped).__name__}, not a set')
  return state


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
      CheckpointError: a name that is not a string or not an identifier (see
        :func:`check_names`), a tensor and a module of the same name, a value that is not
        a tensor, or a module that contains itself, is shared by two parents or nests
        too deep.
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
      modules = state.get('_modules') or {}
      tensor_names = {name for name, _ in tensors if isinstance(name, str)}
      for name, value in [*tensors, *modules.items()]:
        if not isinstance(name, str):
          raise self._fail(f'name {brief(name)} in {label(prefix[:-1] or record.class_name)} is '
                           f'a {type(name).__name__}, not a string')
        if not _NAME_PART.fullmatch(name):
          raise self._fail(f'name {label(name)} in {label(prefix[:-1] or record.class_name)} is '
                           "not an identifier (1 to 64 letters, digits and '_')")
        if name in modules and name in tensor_names:
          raise self._fail(f'{label(prefix + name)} is both a tensor and a module')
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
    check_names(out, self._fail)
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
  """Turns numpy scalars into Python numbers, recursively through containers.

  Each container is copied once per read (``load.python_memo``), and charged.
  """
  if id(value) in load.python_memo:
    return load.python_memo[id(value)][1]
  if depth > _MAX_DEPTH:
    raise load.fail(f'containers nest deeper than {_MAX_DEPTH} levels')
  if isinstance(value, np.generic):
    result = value.item()
  elif isinstance(value, dict):
    load.copy(len(value))
    result = {k: _to_python(v, load, depth + 1) for k, v in value.items()}
  elif isinstance(value, (list, tuple)):
    load.copy(len(value))
    result = type(value)(_to_python(v, load, depth + 1) for v in value)
  else:
    result = value
  load.python_memo[id(value)] = (value, result)
  return result


def _as_tuple(value: list | tuple, load: _Load) -> tuple:
  """The tuple of a list made by :func:`_to_python`, made once per list and charged."""
  if type(value) is tuple:
    return value
  if id(value) not in load.tuple_memo:
    load.copy(len(value))
    load.tuple_memo[id(value)] = (value, tuple(value))
  return load.tuple_memo[id(value)][1]


def _finish(obj: Any, load: _Load, depth: int = 0) -> Any:
  """Builds every _PendingTensor, checks and tags every ModuleRecord, in place.

  Runs once the whole file is read, so a module's state is checked as it will be used
  (not as it was when created). Shared sub-structures are visited once
  (``load.finish_memo`` keeps the originals alive while their ids are keys) and every
  container is charged to the budget; nesting deeper than ``_MAX_DEPTH`` is refused.
  """
  memo = load.finish_memo
  if id(obj) in memo:
    return memo[id(obj)][1]
  if depth > _MAX_DEPTH:
    raise load.fail(f'containers nest deeper than {_MAX_DEPTH} levels')
  memo[id(obj)] = (obj, obj)
  if isinstance(obj, _PendingTensor):
    memo[id(obj)] = (obj, obj.build())
  elif isinstance(obj, (dict, list, tuple, set, frozenset)):
    load.copy(len(obj))
  if isinstance(obj, dict):
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
    try:
      _check_module_state(obj.class_name, obj.state)
    except ValueError as e:
      raise load.fail(str(e)) from None
  return memo[id(obj)][1]
