"""SMC's kernel, window and moves on digits-skew, on validation seeds: the exploration behind
the SMC presets (the 2M kernel, resampling while t' >= 0.5).

    python -m benchmarks.smc_variants --num_samples=1024 [--val_seeds=100,101,102,103,104]

Every variant draws through `benchmarks.quality`'s runner (the same keys, scores and resume by
content) and is paired with EDM on its own kernel and with the default EDM (18 Heun steps).
The flags are the quality benchmark's, and the seeds its validation seeds: its test seeds stay
unseen by these choices. Writes ``smc_variants.md`` and ``smc_variants.json`` (the runs) into
``--out``.
"""

import json
import math
import os

from absl import app
import jax
import numpy as np

from benchmarks import digit_scores
from benchmarks import quality
from benchmarks import verdicts
from benchmarks.quality import ANCESTRAL, CHURN, DPM2M, Row
from isir_jax import io

EULER_CHURN = dict(CHURN, proposal='churn', solver='euler')   # 18 NFE, as the 2M kernel
# Each EDM row: the same-kernel baseline of the variants on its kernel.
BASELINES = {'heun': quality.ENTRY['edm'], 'ancestral': quality.ENTRY['edm ancestral'],
             'dpmpp_2m_sde': quality.ENTRY['edm dpm2m'],
             'euler_churn': Row('edm euler churn', 'edm', EULER_CHURN, 'euler_churn')}
_KERNELS = {'ancestral': ANCESTRAL, 'dpmpp_2m_sde': DPM2M, 'euler_churn': EULER_CHURN}


def variant(kernel: str, low: float, **settings) -> Row:
  """SMC with G = 16 on ``kernel``, resampling while t' >= ``low``."""
  label = ', '.join([f'smc {kernel} t>={low:g}'] + [f'{k}={v:g}' for k, v in settings.items()])
  return Row(label, 'smc', dict(_KERNELS[kernel], group_size=16,
                                resample_window=(low, math.inf), **settings), kernel)


VARIANTS = (
    variant('ancestral', 0.5),
    variant('euler_churn', 0.5),
    variant('dpmpp_2m_sde', 0.0),
    variant('dpmpp_2m_sde', 0.2),
    variant('dpmpp_2m_sde', 0.5),
    variant('dpmpp_2m_sde', 1.0),
    variant('dpmpp_2m_sde', 0.5, weight_scale=2.0),
    variant('dpmpp_2m_sde', 0.0, num_candidates=4),
    variant('dpmpp_2m_sde', 0.2, num_candidates=4),
    variant('dpmpp_2m_sde', 0.5, num_candidates=4),
    variant('dpmpp_2m_sde', 0.5, num_candidates=8),
)


def table(results: dict, seeds) -> str:
  """Markdown: means, and differences to the same-kernel EDM and to the default EDM."""
  metrics = digit_scores.METRICS
  head = ' | '.join(metrics)
  lines = [f'| setting | {head} | vs same-kernel EDM: {head} | vs EDM: {head} | '
           'disc fwd | lineages | near-duplicates |', '|---' * (4 + 3 * len(metrics)) + '|']
  edm = quality.by_seed(results, BASELINES['heun'].label, seeds)
  for row in list(BASELINES.values()) + list(VARIANTS):
    runs = quality.by_seed(results, row.label, seeds)
    same = quality.by_seed(results, BASELINES[row.kernel].label, seeds)
    stat = lambda k: np.mean([r['stats'].get(k, np.nan) for r in runs.values()])
    means = ' | '.join(f'{np.mean([r[m] for r in runs.values()]):.3f}' for m in metrics)
    lines.append(f'| {row.label} | {means} | '
                 f'{quality._diff_cells(verdicts.compare(runs, same, metrics))} | '
                 f'{quality._diff_cells(verdicts.compare(runs, edm, metrics))} | '
                 f'{stat("disc_evals"):.0f} | {stat("lineages"):.2f} | '
                 f'{stat("near_duplicates"):.2f} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  seeds = [int(s) for s in quality._VAL_SEEDS.value]
  num, out = quality._NUM_SAMPLES.value, quality._OUT.value
  os.makedirs(out, exist_ok=True)
  json_path = os.path.join(out, 'smc_variants.json')
  runs = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      runs = json.load(f)
  save = lambda: io.atomic_write(json_path, lambda f: f.write(json.dumps(runs, indent=1).encode()))
  jax.config.update('jax_compilation_cache_dir', quality._XLA_CACHE.value)
  runner = quality.Runner('skew', False, runs, save)
  results = runner.run(list(BASELINES.values()) + list(VARIANTS), seeds, num, num)
  command = (f'python -m benchmarks.smc_variants --num_samples={num} '
             f'--val_seeds={",".join(map(str, seeds))}')
  text = (f'# SMC variants on digits-skew (validation seeds)\n\nCommand: `{command}`  \n'
          f'{num} samples per variant and seed, the same keys for every row; G = 16, '
          "resampling while the target level t' >= the row's bound. Differences: mean [95% "
          't-interval] over the seeds; lower is better for the class-frequency error and FD, '
          'higher for precision and recall.\n\n' + table(results, seeds) + '\n')
  io.atomic_write(os.path.join(out, 'smc_variants.md'), lambda f: f.write(text.encode()))
  print(text)


if __name__ == '__main__':
  app.run(main)
