"""The markdown report: tables written as they are measured, and the run's header lines."""

import os
import platform
from typing import Callable

import jax
import numpy as np


class Report:
  """Markdown lines, echoed to stdout and rewritten to ``path`` as they come.

  Rows are written as soon as they are measured, so a run stopped early (e.g. by the time
  limit of gpu_check.sh) keeps every complete measurement.
  """

  def __init__(self, path: str):
    self.path = path
    self.lines = []

  def add(self, *lines: str):
    for line in lines:
      print(line, flush=True)
      self.lines.append(line)
    if self.path:
      os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
      with open(self.path, 'w') as f:
        f.write('\n'.join(self.lines) + '\n')

  def table(self, header: list[str]) -> Callable[..., None]:
    """Starts a table; returns ``row(*values)``, which adds one row."""
    self.add('| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header))

    def fmt(v):
      if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 1000 else f'{v:.0f}'
      return str(v)
    return lambda *values: self.add('| ' + ' | '.join(fmt(v) for v in values) + ' |')


def ratio(a: float, b: float) -> float:
  return a / b if b and np.isfinite(b) else float('nan')


def reps(t: dict) -> str:
  return '/'.join(str(len(v)) for v in t.values())


def machine_info() -> list[str]:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return [f'- machine: {cpu}, {os.cpu_count()} cores; JAX {jax.__version__} on '
          f'{jax.default_backend()} ({jax.devices()[0].device_kind})',
          f'- load average at start: {os.getloadavg()[0]:.1f}']


# Path-valued flags are shown as placeholders in the report (no machine paths in results).
_PLACEHOLDERS = {'reference_checkout': '$EDM_CHECKOUT', 'seed_checkout': '$SEED_CHECKOUT',
                 'reference_python': '$TORCH_PYTHON', 'compilation_cache': '$CACHE_DIR'}


def command_line(args: list[str]) -> str:
  """The command that ran, with the values of path flags replaced by placeholders."""
  out = []
  for arg in args:
    name = arg.lstrip('-').split('=', 1)[0]
    out.append(f'--{name}={_PLACEHOLDERS[name]}' if name in _PLACEHOLDERS and '=' in arg
               else arg)
  return ' '.join(['python -m benchmarks.speed'] + out)
