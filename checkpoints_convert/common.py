"""What the three converters (edm, dg, inception) share, each in one place.

* :class:`ConversionError`: the one error type of a conversion (a CheckpointError,
  so ``main_guard`` prints it as one ``error:`` line and exits 2).
* :func:`structure_problems` / :func:`check_structure`: the file's tensors against
  the architecture's, key for key and shape for shape, naming the key, both shapes and
  the setting that most probably differs.
* :func:`check_values`: every architecture value against its :class:`Rule` (type and
  range), before any module is built or traced (:func:`build`).
* :func:`check_dst`: refuses a ``--dst`` the converter must not write or replace,
  before any input is read; only a converter's own output (``MARKER_NAME`` listing
  exactly what is there) is replaced without ``--overwrite``.
* :func:`write_model`: writes to a temporary sibling, loads it back with the project's
  loader and compares it with what was converted, then renames into place; on error
  removes only what it wrote.
* :func:`run`: the converters' CLI body (``--dst`` check, convert, warnings, write, one
  summary line).
"""

import dataclasses
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence
import warnings

from absl import flags
from absl import logging
import jax
import numpy as np

from checkpoints_convert import reader
from checkpoints_convert.reader import CheckpointError
from isir_jax import checkpoints

_MAX_PROBLEMS = 5
# Written last into every converted model directory: what the converter wrote there.
MARKER_NAME = 'converted.json'
_MAX_MARKER_BYTES = 1 << 20
# A --dst with more entries than this is not a converter's output.
_MAX_DST_ENTRIES = 10_000


class ConversionError(CheckpointError):
  """The file does not fit the architecture, or a setting is invalid (one-line message)."""


# ---------------------------------------------------------------------------
# Structure: expected vs actual tensors.


# The one wording of the three kinds of structure problem, for every converter.
_PROBLEMS = {
    'shape': 'key {key} has shape {actual}, expected {expected}',
    'unexpected': 'unexpected key {key} with shape {actual}',
    'missing': 'missing key {key} (expected shape {expected})',
}


def structure_problems(actual: Mapping[str, tuple], expected: Mapping[str, tuple], source: str,
                       hint: Optional[Callable[[str, str], str]] = None) -> list[str]:
  """Compares tensor shapes by key; returns one message per difference.

  Each message reads ``SOURCE: key K has shape A, expected E``, ``SOURCE: unexpected
  key K with shape A`` or ``SOURCE: missing key K (expected shape E)``, followed by
  ``; check SETTING`` where ``hint`` names one. Keys print as they are when printable
  (else as a bounded repr), shapes as tuples.

  Args:
    actual: key -> shape found in the file (or converted from it).
    expected: key -> shape the configured architecture has.
    source: the file, prefixed to each message.
    hint: ``hint(key, kind)`` with kind ``'missing'``, ``'shape'`` or ``'unexpected'``:
      the setting that most probably explains it; ``None`` where no setting is known.

  Returns:
    Wrong shapes and unexpected keys (in file order), then missing keys; empty when
    the structures match.
  """
  def render(key, kind):
    text = _PROBLEMS[kind].format(key=reader.label(key, 120), actual=tuple(actual.get(key, ())),
                                  expected=tuple(expected.get(key, ())))
    return f'{source}: {text}' + (f'; check {hint(key, kind)}' if hint else '')

  return ([render(key, 'shape') for key in actual
           if key in expected and tuple(actual[key]) != tuple(expected[key])]
          + [render(key, 'unexpected') for key in actual if key not in expected]
          + [render(key, 'missing') for key in expected if key not in actual])


def raise_problems(problems: Sequence[str]) -> None:
  """Raises one ConversionError listing the first few problems (and how many more)."""
  if problems:
    more = len(problems) - _MAX_PROBLEMS
    raise ConversionError('; '.join(problems[:_MAX_PROBLEMS])
                          + (f' (and {more} more)' if more > 0 else ''))


def check_structure(actual: Mapping[str, tuple], expected: Mapping[str, tuple], source: str,
                    hint: Optional[Callable[[str, str], str]] = None) -> None:
  """:func:`structure_problems`, raised as one ConversionError if there are any."""
  raise_problems(structure_problems(actual, expected, source, hint))


# ---------------------------------------------------------------------------
# Architecture values: type and range, before anything is built.


@dataclasses.dataclass(frozen=True)
class Rule:
  """The type and range an architecture value must have.

  ``kind`` is int, float, str or bool (an int is also a float; a bool is neither);
  numbers lie in ``[low, high]``; strings are one of ``choices`` when given; with
  ``length=(min, max)`` the value is a list of such items.
  """
  kind: type
  low: float = -math.inf
  high: float = math.inf
  choices: tuple = ()
  length: Optional[tuple[int, int]] = None

  def describe(self) -> str:
    item = {int: 'an int', float: 'a number', str: 'a string', bool: 'a bool'}[self.kind]
    if self.choices:
      item = 'one of ' + ', '.join(map(repr, self.choices))
    elif self.kind in (int, float) and (self.low > -math.inf or self.high < math.inf):
      item += f' in [{self.low:g}, {self.high:g}]'
    if self.length:
      return f'a list of {self.length[0]} to {self.length[1]} items, each {item}'
    return item

  def _item_ok(self, value: Any) -> bool:
    if isinstance(value, np.generic) and not isinstance(value, np.ndarray):
      value = value.item()
    if self.kind is bool:
      return type(value) is bool
    if self.kind is str:
      return type(value) is str and (not self.choices or value in self.choices)
    if type(value) is bool or not isinstance(value, (int, float)):
      return False
    if self.kind is int and type(value) is not int:
      return False
    return self.low <= value <= self.high  # False for NaN

  def ok(self, value: Any) -> bool:
    if self.length is None:
      return self._item_ok(value)
    return (isinstance(value, (list, tuple))
            and self.length[0] <= len(value) <= self.length[1]
            and all(self._item_ok(v) for v in value))


def check_values(values: Mapping[str, Any], rules: Mapping[str, Rule], what: str,
                 prefix: str = '') -> None:
  """Raises ConversionError naming the first value that breaks its rule, or has none.

  Args:
    values: name -> value (from the file or the command line).
    rules: name -> Rule; a name without a rule is refused as unsupported.
    what: the context of the message (the file and class; empty for flags).
    prefix: put before each name (``'--'`` for flags).
  """
  lead = f'{what}: ' if what else ''
  for name, value in values.items():
    rule = rules.get(name)
    shown = f'{lead}{prefix}{reader.label(name)}={reader.brief(value)}'
    if rule is None:
      raise ConversionError(f'{shown} is not a supported option')
    if not rule.ok(value):
      raise ConversionError(f'{shown} is not {rule.describe()}')


def build(make: Callable[[], Any], what: str) -> Any:
  """Runs ``make`` (build a module from checked values and trace its shapes).

  Values that pass their rules may still not fit together (a resolution that the
  levels do not divide); that is one ConversionError, not a traceback.
  """
  try:
    return make()
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'{what}: the architecture cannot be built ({type(e).__name__}: '
                          f'{reader.one_line(str(e), 200)})') from None


# ---------------------------------------------------------------------------
# The output directory.


def define_output_flags() -> None:
  """``--dst`` and ``--overwrite``, the same for every converter."""
  flags.DEFINE_string('dst', None, 'Output model directory (config.json + params/ + '
                      f'{MARKER_NAME}), written to a temporary sibling and renamed into place.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing non-empty --dst that is not '
                    f"exactly a converter's output (as its {MARKER_NAME} lists it).")


def _entries(path: str) -> Iterator[tuple[str, Any]]:
  """``(relative path, size)`` of every file under ``path``; ``'dir'``/``'other'`` otherwise.

  Links are not followed (a link is ``'other'``); directories are listed before their
  contents, in sorted order.
  """
  for base, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(dirs + files):
      full = os.path.join(base, name)
      rel = os.path.relpath(full, path)
      if os.path.islink(full):
        yield rel, 'other'
      elif os.path.isdir(full):
        yield rel, 'dir'
      elif os.path.isfile(full):
        yield rel, os.path.getsize(full)
      else:
        yield rel, 'other'


def _written(path: str) -> dict:
  """What the marker of a converted directory says was written there; {} if no marker."""
  marker = os.path.join(path, MARKER_NAME)
  if os.path.islink(marker) or not os.path.isfile(marker) or (
      os.path.getsize(marker) > _MAX_MARKER_BYTES):
    return {}
  try:
    with open(marker, encoding='utf-8') as f:
      written = json.load(f).get('written')
  except (OSError, ValueError, AttributeError, RecursionError):
    return {}
  return written if isinstance(written, dict) else {}


def foreign_entries(path: str) -> list[str]:
  """The entries of a directory that no converter wrote there (empty: safe to replace).

  A converter writes ``MARKER_NAME`` last, listing every file it wrote with its size;
  anything else (another file, a changed size, a link, a directory without a marker)
  is foreign. A directory with more than ``_MAX_DST_ENTRIES`` entries is foreign.
  """
  entries = dict(itertools.islice(_entries(path), _MAX_DST_ENTRIES + 1))
  written = _written(path)
  foreign = [name for name, kind in entries.items()
             if name != MARKER_NAME and written.get(name) != kind]
  if len(entries) > _MAX_DST_ENTRIES:
    foreign.append(f'more than {_MAX_DST_ENTRIES} entries')
  return foreign


def _write_marker(path: str, converter: str) -> None:
  written = dict(_entries(path))
  with open(os.path.join(path, MARKER_NAME), 'w', encoding='utf-8') as f:
    json.dump({'converter': converter, 'written': written}, f, indent=1, sort_keys=True)


def _contains(parent: str, child: str) -> bool:
  return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _check_utf8(path: str, what: str) -> None:
  """A path must be valid UTF-8: orbax writes through tensorstore, configs are JSON."""
  try:
    os.path.abspath(path).encode('utf-8')
  except UnicodeEncodeError:
    raise ConversionError(f'{what} {reader.label(path, 200)} is not valid UTF-8 (its absolute '
                          'path has undecodable bytes); rename it') from None


def check_dst(dst: Optional[str], sources: Sequence[str], overwrite: bool = False) -> str:
  """Refuses a ``--dst`` the converter must not write or replace; returns its absolute path.

  Refused: an empty value; a path (or an input path) that is not valid UTF-8; the
  working directory or one of its parents (``.``, ``/``); a directory that is or
  contains an input; a symlink (dangling or not); an existing non-directory; a path
  below a file; a place the process cannot create files in; and, unless ``overwrite``,
  a non-empty directory holding anything a converter did not write there
  (:func:`foreign_entries`).

  Args:
    dst: the ``--dst`` value.
    sources: the input files.
    overwrite: allow replacing a non-empty directory that is not a converter's output.

  Raises:
    ConversionError: one line naming ``--dst`` and why.
  """
  if not dst or not dst.strip():
    raise ConversionError('--dst is empty: give the output model directory')
  _check_utf8(dst, '--dst')
  for src in sources:
    if src:
      _check_utf8(src, 'input')
  shown = reader.label(dst, 200)
  path = os.path.abspath(dst)
  real = os.path.realpath(path)
  if _contains(real, os.path.realpath(os.getcwd())):
    raise ConversionError(f'--dst {shown} is the working directory or one of its parents')
  for src in sources:
    if src and _contains(real, os.path.realpath(src)):
      raise ConversionError(f'--dst {shown} is or contains the input {reader.label(src, 200)}')
  if os.path.islink(path):
    raise ConversionError(f'--dst {shown} is a symbolic link; give a directory path')
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ConversionError(f'--dst {shown} exists and is not a directory')
  ancestor = os.path.dirname(path)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise ConversionError(f'--dst {shown} is below {reader.label(ancestor, 200)}, which is not '
                          'a directory')
  try:
    os.rmdir(tempfile.mkdtemp(prefix='.probe-', dir=ancestor))
  except OSError as e:
    raise ConversionError(f'--dst {shown}: cannot create files in '
                          f'{reader.label(ancestor, 200)} ({e.strerror})') from None
  if os.path.isdir(path) and not overwrite:
    foreign = foreign_entries(path)
    if foreign:
      raise ConversionError(
          f"--dst {shown} is a non-empty directory that is not a converter's output (what "
          f'its {MARKER_NAME} lists); it holds {reader.listing(foreign)}; pass --overwrite to '
          'replace it')
  return path


def _value_difference(expected: Any, actual: Any) -> Optional[str]:
  """The first leaf whose dtype or bytes differ between two trees of the same structure."""
  flat = lambda tree: dict((jax.tree_util.keystr(path), leaf) for path, leaf
                           in jax.tree_util.tree_flatten_with_path(tree)[0])
  have = flat(actual)
  for key, want in flat(expected).items():
    want, got = np.ascontiguousarray(want), np.ascontiguousarray(have[key])
    if want.dtype != got.dtype:
      return f'{key} has dtype {got.dtype}, expected {want.dtype}'
    if not np.array_equal(want.reshape(-1).view(np.uint8), got.reshape(-1).view(np.uint8)):
      return f'{key} holds other values'
  return None


def check_loads(directory: str, params: Any, load: Callable[[str], Any], shown: str) -> None:
  """Loads a written model with the project's loader; it must give back ``params`` exactly.

  Args:
    directory: the written model directory.
    params: the tree that was written.
    load: ``directory -> params tree``, the project's loader of this family.
    shown: how to name the destination in errors.

  Raises:
    ConversionError: the loader fails, or its tree differs in keys, shapes, dtypes or bytes.
  """
  try:
    loaded = load(directory)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f'--dst {shown}: the written model does not load ({type(e).__name__}: '
                          f'{reader.one_line(str(e), 300)})') from None
  problem = checkpoints.tree_difference(params, loaded) or _value_difference(params, loaded)
  if problem:
    raise ConversionError(f'--dst {shown}: the written model loads back different from the '
                          f'conversion ({problem})')


def write_model(dst: str, params: Any, config: dict, sources: Sequence[str],
                load: Callable[[str], Any], overwrite: bool = False) -> None:
  """Writes a model directory atomically, checked by loading it; on error removes only what it wrote.

  The model is saved into a temporary sibling of ``dst`` (missing parents are made
  first) with its ``MARKER_NAME``, loaded back with ``load`` and compared with
  ``params`` (:func:`check_loads`), then renamed into place; a previous ``dst``
  (allowed by :func:`check_dst`, checked again here) is moved aside first and deleted
  only once the new one is in place.

  Args:
    dst: the ``--dst`` value.
    params: the converted tree.
    config: its architecture config (JSON).
    sources: the input files (``dst`` may not contain them).
    load: ``directory -> params tree``, the project's loader of this family.
    overwrite: allow replacing a directory that is not a converter's output.
  """
  path = check_dst(dst, sources, overwrite)
  made = []
  parent = os.path.dirname(path)
  while not os.path.lexists(parent):
    made.append(parent)
    parent = os.path.dirname(parent)
  tmp, old = None, None
  try:
    for directory in reversed(made):
      os.mkdir(directory)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(path)}.tmp-', dir=os.path.dirname(path))
    written = os.path.join(tmp, 'model')
    checkpoints.save_model(written, params, config)
    _write_marker(written, config.get('family', ''))
    check_loads(written, params, load, reader.label(dst, 200))
    if os.path.lexists(path):
      old = os.path.join(tmp, 'previous')
      os.rename(path, old)
    os.rename(written, path)
  except BaseException as e:
    if old is not None and not os.path.lexists(path):
      os.rename(old, path)
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    for directory in made:
      if os.path.isdir(directory):
        os.rmdir(directory)
    if isinstance(e, OSError):
      raise ConversionError(f'--dst {reader.label(dst, 200)}: cannot write the model '
                            f'({e.strerror or type(e).__name__})') from None
    raise
  shutil.rmtree(tmp)


# ---------------------------------------------------------------------------
# The CLI body.


def nonfinite_warning(params: Any, source: str) -> Optional[str]:
  """One line naming the tensors with NaN/Inf values, or None when all are finite.

  Non-finite weights are converted as they are (the file may mean them); the line
  makes them visible.
  """
  bad = [(jax.tree_util.keystr(path), int(np.size(leaf) - np.count_nonzero(np.isfinite(leaf))))
         for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
         if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.all(np.isfinite(leaf))]
  if not bad:
    return None
  return (f'warning: {source}: {sum(n for _, n in bad)} non-finite values in {len(bad)} '
          f'tensors ({reader.listing((name for name, _ in bad), str, 3)}); converted as they are')


def run(convert: Callable[[], tuple[Any, dict, str]], dst: Optional[str],
        sources: Sequence[str], load: Callable[[str], Any], overwrite: bool = False) -> None:
  """The body of every converter's ``main`` (inside ``reader.main_guard``).

  Checks ``--dst`` before anything is read; ``convert()`` reads, checks and returns
  ``(params, config, summary line)``; the model is written atomically and checked by
  loading it with ``load`` (:func:`write_model`). Python warnings raised meanwhile
  (numpy's RuntimeWarnings on extreme values) are captured: after a refusal only the
  ``error:`` line is printed; after a success each distinct RuntimeWarning is one
  escaped ``warning:`` line on stderr, as is the list of non-finite weights. The
  summary line goes to stdout, escaped.

  Raises:
    CheckpointError: any refusal (printed by ``main_guard`` as one ``error:`` line).
  """
  logging.set_verbosity(logging.WARNING)  # absl INFO lines (orbax, jax) would precede ours
  check_dst(dst, sources, overwrite)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('default')
    params, config, line = convert()
    write_model(dst, params, config, sources, load, overwrite)
  notes = [nonfinite_warning(params, ', '.join(sources))] + list(dict.fromkeys(
      f'warning: {w.message}' for w in caught if issubclass(w.category, RuntimeWarning)))
  for note in filter(None, notes):
    print(reader.one_line(note), file=sys.stderr)
  print(reader.one_line(line))
