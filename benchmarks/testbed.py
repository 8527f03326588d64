"""Quality of every sampler on the exact Gaussian-mixture testbed.

The model denoiser is exact for the *wrong* mixture (weights 0.5/0.5), the discriminator is
the exact log density ratio to the true one (0.2/0.8). Each row reports the largest error of
the sampled mixture weights against the true weights and the denoiser evaluations per sample.

    python -m benchmarks.testbed [--testbeds gmm2,gmm64] [--samples 4000] [--steps 18]

Writes the tables to benchmarks/results/testbed.md as well.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from isir_jax import samplers, testbed
from isir_jax.samplers import diffrs

CHURN = 40.0  # largest churn (gamma = sqrt(2) - 1 at 18 steps): the stochastic proposal


def _keys(seed: int, n: int):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def _methods(tb, steps: int, warmup_keys):
  """(label, sampler name, denoiser, settings) rows of the table."""
  base = dict(num_steps=steps)
  rows = [('EDM (model)', 'edm', tb.model_denoiser, base),
          ('EDM (true)', 'edm', tb.true_denoiser, base),
          (f'EDM (model, S_churn={CHURN:g})', 'edm', tb.model_denoiser,
           dict(base, S_churn=CHURN)),
          ('DG w1=2 (default)', 'dg', tb.model_denoiser, base),
          ('DG w1=1 w2=1 (exact)', 'dg', tb.model_denoiser,
           dict(base, dg_weight_1st_order=1.0, dg_weight_2nd_order=1.0))]
  stoch = dict(base, S_churn=CHURN)
  log_ratios = np.asarray(jax.jit(lambda k: diffrs.warmup_log_ratios(
      tb.model_denoiser, tb.discriminator, k, shape=tb.shape, **stoch))(warmup_keys))
  for q in (0.75, 0.9, 0.95, 0.99):
    th = diffrs.thresholds_from_log_ratios(log_ratios, q)
    rows.append((f'DiffRS rej_percentile={q:g}', 'diffrs', tb.model_denoiser,
                 dict(stoch, thresholds=th)))
  for n, k in ((2, 1), (4, 1), (16, 1), (4, 4), (16, 4)):
    rows.append((f'ISIR N={n} K={k}', 'isir', tb.model_denoiser,
                 dict(stoch, num_candidates=n, num_iterations=k)))
  return rows


def run(name: str, num_samples: int, steps: int) -> str:
  """Samples every method once and returns the markdown table."""
  tb = testbed.make_testbed(name)
  keys = _keys(0, num_samples)
  lines = [f'Testbed {name}: true weights {tb.true.weights.tolist()}, model '
           f'{tb.model.weights.tolist()}; {num_samples} samples, {steps} steps, '
           f'{jax.devices()[0].platform}.', '',
           '| method | weights | weight error | NFE/sample | extra | wall s |',
           '|---|---|---|---|---|---|']
  for label, sampler, denoiser, settings in _methods(tb, steps, _keys(100, num_samples)):
    fn = jax.jit(samplers.get_sampler(sampler)(denoiser, tb.discriminator, shape=tb.shape,
                                               **settings))
    start = time.time()
    x, stats = jax.block_until_ready(fn(keys))
    wall = time.time() - start
    extra = ''
    if 'ess' in stats:
      extra = f"ESS {float(stats['ess'].mean()):.3f}"
    if 'accept_rate' in stats:
      extra = f"accept {float(stats['accept_rate'].mean()):.3f}"
    w = np.round(tb.weights(x), 3).tolist()
    line = (f'| {label} | {w} | {tb.weight_error(x):.3f} | '
            f"{float(stats['nfe'].mean()):.1f} | {extra} | {wall:.1f} |")
    print(line, flush=True)
    lines.append(line)
  lines.append('')
  lines.append('wall s includes compilation. ISIR and DiffRS use the churned Heun step '
               f'(S_churn={CHURN:g}) as proposal; DiffRS thresholds come from a warm-up '
               'of the same number of samples with other keys.')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--testbeds', default='gmm2,gmm64',
                      help='comma-separated testbed names (gmm2, gmm64)')
  parser.add_argument('--samples', type=int, default=4000)
  parser.add_argument('--steps', type=int, default=18)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'testbed.md'))
  args = parser.parse_args()
  tables = [run(name, args.samples, args.steps) for name in args.testbeds.split(',')]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write('# Samplers on the exact Gaussian-mixture testbed\n\n'
            f'`python -m benchmarks.testbed --testbeds {args.testbeds} --samples {args.samples} '
            f'--steps {args.steps}`\n\n' + '\n'.join(tables))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
