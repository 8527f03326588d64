"""The checked unpickler: the pure-Python unpickler with every harmful operation replaced.

:class:`_Unpickler` resolves globals only through an allowlist, each to a stand-in made
for this read (the tensor rebuilders and EDM's persistent objects are its own methods;
the rest come from :mod:`standins` and :mod:`tensors`); calls only those; sets state
only on objects it created for that, once; and charges every operation, every byte it
reads and every copy it makes to the read's budget (:class:`budget._Load`).
"""

import pickle
import re
import sys
from typing import Any, Callable

from checkpoints_convert.budget import _Load, _MAX_MEMO
from checkpoints_convert.errors import CheckpointError, brief, label
from checkpoints_convert.records import ModuleRecord, _as_tuple, _check_module_state, _to_python
from checkpoints_convert.standins import (_EasyDict, _NumpyDType, _OrderedDict,
                                          _checked_members, _frozenset, _key, _numpy_scalar,
                                          _rebuild_parameter, _set, _torch_module_class)
from checkpoints_convert.tensors import (_STORAGE_DTYPES, _TORCH_DTYPES, _TorchDType,
                                         _storage_type, _tensor, _torch_dtype)

_TORCH_NN_MODULE = re.compile(r'torch\.nn\.modules\.[a-z_]+\.[A-Z][A-Za-z0-9_]*')


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
  what remains, then fails. Every byte read is charged to the read's budget.
  """

  def __init__(self, file, load: _Load):
    self.file = file
    self.load = load

  def read(self, n: int) -> bytes:
    if n > sys.maxsize:
      raise pickle.UnpicklingError('pickle data was truncated')
    data = self.file.read(n)
    if len(data) != n:
      raise pickle.UnpicklingError('pickle data was truncated')
    self.load.charge(n)
    return data

  def readline(self) -> bytes:
    line = self.file.readline()
    self.load.charge(len(line))
    return line


def _sized(value: Any) -> int:
  """Elements an allowlisted callable may copy out of ``value`` (0 for a scalar)."""
  return len(value) if isinstance(value, (list, tuple, dict, set, frozenset)) else 0


class _Unpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """The pure-Python unpickler with every operation that could harm replaced by a checked one.

  * globals resolve only through the allowlist, to this read's own stand-ins;
  * REDUCE/INST/OBJ call only allowlisted callables; NEWOBJ creates only torch module
    records and EasyDicts, which BUILD may then set state on, once; BUILD on anything
    else is refused;
  * dict keys and set members are checked by :func:`_key` before they are hashed;
  * APPEND(S)/SETITEM(S)/ADDITEMS act only on lists/dicts/sets;
  * every operation, byte read, decimal digit parsed and element copied is charged to
    the read's budget; memo indices stay below ``_MAX_MEMO``.

  Args:
    file: the pickle stream.
    load: the read this stream belongs to.
    where: the file (or ``'FILE (storage blob)'``), named in errors.
    persistent_load: handler for persistent ids (torch storages); ``None`` refuses them.
    load_blob: the stand-in for ``torch.storage._load_from_bytes`` (reads a storage blob);
      ``None`` refuses that global (inside a storage blob).
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, load: _Load, where: str, persistent_load=None, load_blob=None):
    load.add_unpickler()
    super().__init__(_Exact(file, load))
    self._load = load
    self._where = where
    self._persistent = persistent_load
    self._buildable = {}
    self._module_classes = {}
    self._globals = self._allowlist(load_blob)
    self._callables = {id(v): v for v in self._globals.values() if callable(v)}

  def _allowlist(self, load_blob: Callable[[Any], Any] | None) -> dict[str, Any]:
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
    if load_blob is not None:
      table['torch.storage._load_from_bytes'] = load_blob
    for name in _STORAGE_DTYPES:
      table[f'torch.{name}'] = table[f'torch.storage.{name}'] = _storage_type(name)
    for name in _TORCH_DTYPES:
      table[f'torch.{name}'] = _torch_dtype(name)
    return table

  def _fail(self, message: str) -> CheckpointError:
    return CheckpointError(f'{self._where}: {message}')

  def find_class(self, module: str, name: str) -> Any:
    self._load.charge(len(module) + len(name))   # the qualified name made below
    qualified = f'{module}.{name}'
    if qualified in self._globals:
      return self._globals[qualified]
    if _TORCH_NN_MODULE.fullmatch(qualified):
      if qualified not in self._module_classes:
        self._load.add_class()
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
    self._load.copy(len(args) + sum(_sized(a) for a in args))
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
    if not 0 <= index < _MAX_MEMO:
      raise self._fail(f'memo index {index} out of range')
    self.memo[index] = self.stack[-1]

  def load_reduce(self):
    args = self.stack.pop()
    self.stack[-1] = self._call(self.stack[-1], args)
  dispatch[pickle.REDUCE[0]] = load_reduce

  def _instantiate(self, klass, args):
    self._load.copy(len(args))
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
    self._load.copy(_sized(state))
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

  def _decimal(self) -> bytes:
    """A text-opcode line to parse as an int, charged at CPython's quadratic cost."""
    line = self.readline()
    self._load.parse_digits(len(line))
    return line

  def load_int(self):
    line = self._decimal()
    self.append(line == b'01\n' if line in (b'00\n', b'01\n') else int(line, 0))
  dispatch[pickle.INT[0]] = load_int

  def load_long(self):
    digits = self._decimal()[:-1]
    self.append(int(digits[:-1] if digits.endswith(b'L') else digits, 0))
  dispatch[pickle.LONG[0]] = load_long

  def load_bytearray8(self):
    size = int.from_bytes(self.read(8), 'little')
    data = self.read(size)          # fails as truncated before anything is allocated
    self._load.charge(size)
    self.append(bytearray(data))
  dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

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
                        init_args=_as_tuple(_to_python(args, self._load), self._load))

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
