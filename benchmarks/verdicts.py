"""Paired comparisons over seeds, quality-aware verdicts, Holm's correction and the
selection rule of tuned settings: the statistics of ``benchmarks/quality.py``.

A setting is compared with a baseline on the same seeds (the same keys), one metric at a
time, by the mean of the per-seed differences and its 95% Student-t interval. Its verdict is
"better" only when the primary metric improves beyond noise AND no guard metric (the other
metrics: FD-digits, precision, recall, class error) gets significantly worse, so that a
sampler can neither blur nor collapse its way to a better number.
"""

import dataclasses

import numpy as np
import scipy.stats

LEVEL = 0.05   # two-sided: 95% intervals
# Lower is better for these metrics; higher for the others.
LOWER_IS_BETTER = {'class_error': True, 'fd': True, 'fd_all': True, 'precision': False,
                   'recall': False}
METRIC_NAMES = {'class_error': 'class error', 'fd': 'FD', 'fd_all': 'FD (all digits)',
                'precision': 'precision', 'recall': 'recall'}
SELECTION_RULE = (
    'on the validation seeds, the candidate with the best mean primary metric among those with '
    'no metric (class error, FD, precision, recall) significantly worse than EDM on the same '
    'kernel (paired 95% t-interval); the default value if none qualifies')


@dataclasses.dataclass(frozen=True)
class Difference:
  """Mean paired difference (setting - baseline) over ``n`` seeds, its 95% t-interval and
  the two-sided p-value of a zero mean."""
  mean: float
  low: float
  high: float
  p: float
  n: int

  def direction(self, metric: str, p_value: float | None = None) -> int:
    """+1 significantly better, -1 significantly worse, 0 neither (at ``p_value`` if given,
    e.g. Holm-adjusted, else at the interval)."""
    significant = (p_value < LEVEL if p_value is not None
                   else bool(self.high < 0 or self.low > 0))
    if not significant or self.mean == 0:
      return 0
    lower = self.mean < 0
    return 1 if lower == LOWER_IS_BETTER[metric] else -1

  def format(self, places: int) -> str:
    return f'{self.mean:+.{places}f} [{self.low:+.{places}f}, {self.high:+.{places}f}]'


def paired(diffs) -> Difference:
  """Mean, 95% Student-t interval and p-value of paired differences (nan below 2 seeds)."""
  d = np.asarray(diffs, np.float64)
  mean = float(np.mean(d)) if len(d) else float('nan')
  if len(d) < 2:
    return Difference(mean, float('nan'), float('nan'), float('nan'), len(d))
  se = float(np.std(d, ddof=1) / np.sqrt(len(d)))
  half = float(scipy.stats.t.ppf(1 - LEVEL / 2, len(d) - 1)) * se
  if se == 0:
    p = 1.0 if mean == 0 else 0.0
  else:
    p = float(2 * scipy.stats.t.sf(abs(mean) / se, len(d) - 1))
  return Difference(mean, mean - half, mean + half, p, len(d))


def compare(runs: dict, base: dict, metrics) -> dict:
  """Paired differences of ``runs`` and ``base`` (seed -> metrics dict) on their common seeds.

  Returns:
    metric -> `Difference`.
  """
  seeds = sorted(set(runs) & set(base))
  return {m: paired([runs[s][m] - base[s][m] for s in seeds]) for m in metrics}


def holm(p_values) -> np.ndarray:
  """Holm's step-down adjustment of a family of p-values (nan entries stay nan, excluded)."""
  p = np.asarray(p_values, np.float64)
  out = np.full(p.shape, np.nan)
  idx = np.flatnonzero(~np.isnan(p))
  order = idx[np.argsort(p[idx], kind='stable')]
  m = len(order)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    out[i] = running
  return out


def verdict(diffs: dict, primary: str, primary_p: float | None = None) -> str:
  """The quality-aware verdict of one comparison.

  Args:
    diffs: metric -> `Difference` (the primary metric and the guards).
    primary: the metric the setting is meant to improve.
    primary_p: the primary metric's p-value to judge it by (e.g. Holm-adjusted); default:
      its own 95% interval. Guards are always judged at their raw 95% intervals, which is
      the stricter side for a "better".

  Returns:
    'better', 'worse' (the primary metric significantly worse), 'not better: <guards>
    worse' (a guard significantly worse), 'not significant', or 'n/a' (below 2 seeds).
  """
  d = diffs[primary]
  if np.isnan(d.low):
    return 'n/a'
  direction = d.direction(primary, primary_p)
  worse = [METRIC_NAMES[m] for m, g in diffs.items() if m != primary and g.direction(m) < 0]
  if direction < 0:
    return 'worse'
  if worse:
    return f'not better: {", ".join(worse)} worse'
  return 'better' if direction > 0 else 'not significant'


def select(candidates: dict, primary: str, default):
  """The tuned value of a knob by `SELECTION_RULE`.

  Args:
    candidates: value -> (mean primary metric on the validation seeds, metric ->
      `Difference` to EDM on the same kernel on those seeds).
    primary: the primary metric.
    default: the value kept when no candidate qualifies.

  Returns:
    ``(value, eligible values)``.
  """
  eligible = [v for v, (_, diffs) in candidates.items()
              if not any(d.direction(m) < 0 for m, d in diffs.items())]
  if not eligible:
    return default, eligible
  sign = 1.0 if LOWER_IS_BETTER[primary] else -1.0
  return min(eligible, key=lambda v: sign * candidates[v][0]), eligible
