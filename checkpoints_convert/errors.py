"""The reader's one error type, and file values rendered bounded in its messages.

Values from a file may be hostile: :func:`brief` renders them with bounded work and
length and never calls an unknown object's ``repr``; :func:`one_line` escapes control
characters, so that every message stays one printable line.
"""

import reprlib
from typing import Any, Callable, Iterable

import numpy as np


class CheckpointError(Exception):
  """A checkpoint could not be read; the message is one line naming the file."""


class _BoundedRepr(reprlib.Repr):
  """reprlib with small limits that never calls an unknown object's repr."""

  def __init__(self):
    super().__init__()
    self.maxlevel, self.maxstring, self.maxother = 3, 60, 40
    self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = 6

  def repr_int(self, x, level):
    if x.bit_length() > 64:
      return f'<int of {x.bit_length()} bits>'
    return super().repr_int(x, level)

  def repr_instance(self, x, level):
    if isinstance(x, (float, np.generic)):
      return repr(x)
    if isinstance(x, np.ndarray):
      return f'<{x.dtype} array {x.shape}>'
    return f'<{type(x).__name__}>'


_REPR = _BoundedRepr()


def brief(value: Any, limit: int = 80) -> str:
  """A bounded repr of a value from a file, cut to ``limit`` characters."""
  try:
    text = _REPR.repr(value)
  except Exception:  # pylint: disable=broad-except
    text = f'<unprintable {type(value).__name__}>'
  return text if len(text) <= limit else text[:limit] + '...'


def label(value: Any, limit: int = 80) -> str:
  """A name from a file: as is if a short printable string, else its bounded repr."""
  if isinstance(value, str) and value.isprintable() and len(value) <= limit:
    return value
  return brief(value, limit)


def listing(values: Iterable, render: Callable[[Any], str] = brief, limit: int = 8) -> str:
  """The first ``limit`` values, rendered and comma-separated, and how many more."""
  values = list(values)
  text = ', '.join(render(v) for v in values[:limit])
  return text + (f' (and {len(values) - limit} more)' if len(values) > limit else '')


def one_line(text: str, limit: int = 1000) -> str:
  """One printable line: control characters escaped, cut to ``limit`` characters."""
  text = ''.join(c if c.isprintable() else c.encode('unicode_escape').decode() for c in text)
  return text if len(text) <= limit else text[:limit] + '...'


def _detail(error: Exception) -> str:
  """An exception's message, only if it is a string (never a repr of its arguments)."""
  return error.args[0] if error.args and isinstance(error.args[0], str) else ''
