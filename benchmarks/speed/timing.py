"""Timing: one stopwatch, interleaved repetitions, AOT compilation with cost and memory."""

import dataclasses
import resource
import statistics
import time
from typing import Any, Callable

import jax

MB = 2 ** 20


def stopwatch(fn: Callable[[], Any]) -> tuple[Any, float]:
  """``fn()`` and its wall seconds, the result ready (the one clock of the benchmark)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> float:
  """Wall seconds of ``fn()``, its result ready."""
  return stopwatch(fn)[1]


def interleave(runs: dict[str, Callable[[], float]], repeats: int, budget_s: float
               ) -> dict[str, list[float]]:
  """Runs each timing function in turn (A, B, A, B, ...); each returns its seconds.

  A side stops repeating once its timings add up to ``budget_s`` (it always runs once).
  """
  times = {name: [] for name in runs}
  for r in range(repeats):
    for name, run in runs.items():
      if r == 0 or sum(times[name]) < budget_s:
        times[name].append(run())
  return times


def med(xs: list[float]) -> float:
  return statistics.median(xs) if xs else float('nan')


@dataclasses.dataclass
class Compiled:
  """An AOT-compiled JAX function with its compile time, FLOPs and memory."""
  fn: Callable
  compile_s: float
  flops: float
  temp_mb: float
  arg_mb: float


def compile_fn(fn: Callable, *args) -> Compiled:
  """AOT-compiles ``jax.jit(fn)`` for ``args``; ``Compiled.fn()`` runs it on them."""
  compiled, compile_s = stopwatch(lambda: jax.jit(fn).lower(*args).compile())
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return Compiled(lambda: compiled(*args), compile_s, float((cost or {}).get('flops', 0.)),
                  mem.temp_size_in_bytes / MB, mem.argument_size_in_bytes / MB)


def rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.
