"""Quality against compute of every sampler on the exact Gaussian-mixture testbeds.

The model denoiser is exact for the *wrong* mixture (weights 0.5/0.5), the discriminator is
the exact log density ratio to the true one (0.2/0.8). Each row reports the largest error of
the sampled mixture weights against the true weights (mean and standard deviation over
seeds, the same keys for every method), the network evaluations per sample (denoiser,
discriminator forward, discriminator gradient) and the GFLOP per sample these would cost
with the CIFAR-10 networks (`benchmarks.cost`). ISIR runs with each proposal kernel over an
(N, K) sweep; the frontier table compares each shared-mean kernel with churned-Heun ISIR at
equal error. SMC (population correction) runs over group sizes, kernels, candidates,
resampling rules, windows and twisted proposals; a last table gives, per method, the
cheapest setting that reaches a target error.

    python -m benchmarks.testbed [--testbeds gmm2,gmm64] [--samples 4096] [--seeds 3]

Writes benchmarks/results/testbed.md and the plot benchmarks/results/testbed.png.
"""

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageDraw

from benchmarks import cost
from isir_jax import samplers, testbed
from isir_jax.samplers import diffrs

CHURN = 40.0  # largest churn (gamma = sqrt(2) - 1 at 18 steps): the stochastic proposal
# ISIR (N, K) sweeps per kernel: churned Heun pays 2 denoiser calls per proposal, the
# shared-mean kernels one call per step, so they are swept further.
SWEEPS = {'churn': ((2, 1), (4, 1), (8, 1), (4, 4)),
          'ancestral': ((4, 1), (8, 1), (16, 1), (32, 1), (8, 4), (16, 4)),
          'dpmpp_2m_sde': ((4, 1), (8, 1), (16, 1), (32, 1), (8, 4), (16, 4))}
# SMC settings: (label, settings) on top of the 18-step kernel named in the settings.
ANCESTRAL = dict(proposal='ancestral')
SMC_ROWS = tuple(
    [(f'SMC ancestral G={g}', dict(ANCESTRAL, group_size=g)) for g in (4, 8, 16, 64)] +
    [('SMC ancestral G=16 ESS<0.5', dict(ANCESTRAL, group_size=16, ess_threshold=0.5)),
     ('SMC ancestral G=16 window t>=0.5', dict(ANCESTRAL, group_size=16,
                                                resample_window=(0.5, math.inf))),
     ('SMC ancestral G=16 no final resample', dict(ANCESTRAL, group_size=16,
                                                    final_resample=False)),
     ('SMC ancestral G=16 multinomial', dict(ANCESTRAL, group_size=16, resample='multinomial')),
     ('SMC ancestral G=16 N=4', dict(ANCESTRAL, group_size=16, num_candidates=4)),
     ('SMC ancestral G=64 N=4', dict(ANCESTRAL, group_size=64, num_candidates=4)),
     ('SMC dpmpp_2m_sde G=16', dict(proposal='dpmpp_2m_sde', group_size=16)),
     ('SMC churn G=16', dict(S_churn=CHURN, group_size=16)),
     ('SMC churn G=64', dict(S_churn=CHURN, group_size=64)),
     ('SMC churn G=16 N=4', dict(S_churn=CHURN, group_size=16, num_candidates=4)),
     ('SMC twisted G=16 w=0.5', dict(ANCESTRAL, group_size=16, guidance_weight=0.5)),
     ('SMC twisted G=16 w=1', dict(ANCESTRAL, group_size=16, guidance_weight=1.0)),
     ('guided ancestral (SMC G=1 w=1)', dict(ANCESTRAL, group_size=1, guidance_weight=1.0))])
TARGET_ERROR = 0.015   # the cheapest-setting table's target
GROUPS = ('EDM', 'DG', 'DiffRS', 'ISIR churn', 'ISIR ancestral', 'ISIR dpmpp_2m_sde', 'SMC')
COLOURS = dict(zip(GROUPS, ('black', 'blue', 'green', 'red', (230, 140, 0), 'purple',
                            (0, 160, 160))))


def _keys(seed: int, n: int):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def _methods(tb, steps: int, warmup_keys):
  """(group, label, sampler name, denoiser, settings) rows of the table."""
  base = dict(num_steps=steps)
  stoch = dict(base, S_churn=CHURN)
  rows = [('EDM', 'EDM (model)', 'edm', tb.model_denoiser, base),
          ('EDM', 'EDM (true)', 'edm', tb.true_denoiser, base),
          ('EDM', f'EDM (model, S_churn={CHURN:g})', 'edm', tb.model_denoiser, stoch),
          ('EDM', 'EDM ancestral (model)', 'edm', tb.model_denoiser,
           dict(base, proposal='ancestral')),
          ('EDM', 'EDM ancestral (true)', 'edm', tb.true_denoiser,
           dict(base, proposal='ancestral')),
          ('EDM', 'EDM dpmpp_2m_sde (true)', 'edm', tb.true_denoiser,
           dict(base, proposal='dpmpp_2m_sde')),
          ('DG', 'DG w1=2 (default)', 'dg', tb.model_denoiser, base),
          ('DG', 'DG w1=1 w2=1 (exact)', 'dg', tb.model_denoiser,
           dict(base, dg_weight_1st_order=1.0, dg_weight_2nd_order=1.0))]
  log_ratios = np.asarray(jax.jit(lambda k: diffrs.warmup_log_ratios(
      tb.model_denoiser, tb.discriminator, k, shape=tb.shape, **stoch))(warmup_keys))
  for q in (0.75, 0.95):
    th = diffrs.thresholds_from_log_ratios(log_ratios, q)
    rows.append(('DiffRS', f'DiffRS rej_percentile={q:g}', 'diffrs', tb.model_denoiser,
                 dict(stoch, thresholds=th)))
  for kernel, sweep in SWEEPS.items():
    step = stoch if kernel == 'churn' else dict(base, proposal=kernel)
    for n, k in sweep:
      rows.append((f'ISIR {kernel}', f'ISIR {kernel} N={n} K={k}', 'isir', tb.model_denoiser,
                   dict(step, num_candidates=n, num_iterations=k)))
  for label, settings in SMC_ROWS:
    rows.append(('SMC', label, 'smc', tb.model_denoiser, dict(base, **settings)))
  return rows


def near_duplicate_distance(tb, num_samples: int, fraction: float = 0.1) -> float:
  """``fraction`` of the median nearest-neighbour distance among ``num_samples`` draws of
  the true mixture: SMC outputs closer than this to another sample of their group count
  as near-duplicates."""
  rng = np.random.default_rng(0)
  comp = rng.choice(len(tb.true.weights), num_samples, p=tb.true.weights)
  x = tb.true.means[comp] + tb.true.stds[comp, None] * rng.standard_normal(
      (num_samples, tb.true.means.shape[1]))
  sq = (x ** 2).sum(1)
  d2 = sq[:, None] + sq[None] - 2 * x @ x.T
  np.fill_diagonal(d2, np.inf)
  return fraction * float(np.median(np.sqrt(np.maximum(d2.min(1), 0))))


def _extra(stats: dict, duplicate: float) -> str:
  """The table's extra column: ESS, acceptance, SMC's lineages and near-duplicates."""
  if 'ancestors' in stats:
    dup = float(np.mean(np.asarray(stats['group_nn_dist']) < duplicate))
    return (f"ESS {float(stats['ess'].mean()):.3f} (min {float(stats['ess_min'].mean()):.2f}), "
            f"ancestors {float(stats['ancestors'].mean()):.1f}, dup {dup:.1%}")
  if 'ess' in stats:
    return f"ESS {float(stats['ess'].mean()):.3f}"
  if 'accept_rate' in stats:
    return f"accept {float(stats['accept_rate'].mean()):.3f}"
  return ''


def run(name: str, num_samples: int, seeds: int, steps: int, costs: cost.NetworkCosts) -> list:
  """Samples every method with every seed; one result dict per method."""
  tb = testbed.make_testbed(name)
  duplicate = near_duplicate_distance(tb, num_samples)
  results = []
  for group, label, sampler, denoiser, settings in _methods(tb, steps,
                                                            _keys(100, num_samples)):
    fn = jax.jit(samplers.get_sampler(sampler)(denoiser, tb.discriminator, shape=tb.shape,
                                               **settings))
    start = time.time()
    errors, counts = [], []
    for seed in range(seeds):
      x, stats = jax.block_until_ready(fn(_keys(seed, num_samples)))
      errors.append(tb.weight_error(x))
      counts.append({k: float(stats[k].mean()) for k in ('nfe', 'disc_evals', 'disc_grads')})
      extra = _extra(stats, duplicate)
    means = {k: float(np.mean([c[k] for c in counts])) for k in counts[0]}
    r = dict(group=group, label=label, error=float(np.mean(errors)),
             error_std=float(np.std(errors, ddof=1)) if seeds > 1 else float('nan'),
             gflop=cost.gflop_per_sample(means, costs), extra=extra,
             wall=time.time() - start, **means)
    print(f"{name} | {label} | {r['error']:.3f} +- {r['error_std']:.3f} | "
          f"{r['gflop']:.0f} GFLOP", flush=True)
    results.append(r)
  return results


def frontier(results: list) -> list:
  """For each churned-Heun ISIR point, the cheapest point of each shared-mean kernel whose
  error is at most the churned one plus the larger seed std of the two: (kernel, churn
  row, shared row or None)."""
  churn = [r for r in results if r['group'] == 'ISIR churn']
  out = []
  for kernel in ('ancestral', 'dpmpp_2m_sde'):
    shared = [r for r in results if r['group'] == f'ISIR {kernel}']
    for c in churn:
      ok = [s for s in shared
            if s['error'] <= c['error'] + max(np.nan_to_num(c['error_std']),
                                              np.nan_to_num(s['error_std']))]
      out.append((kernel, c, min(ok, key=lambda s: s['gflop']) if ok else None))
  return out


def cheapest_at(results: list, target: float) -> dict:
  """Per group (EDM excluded: it uses the true model in some rows), the cheapest row whose
  mean error is at most ``target``."""
  out = {}
  for r in results:
    if r['group'] != 'EDM' and r['error'] <= target:
      best = out.get(r['group'])
      if best is None or r['gflop'] < best['gflop']:
        out[r['group']] = r
  return out


def table(name: str, results: list, num_samples: int, seeds: int, steps: int) -> str:
  tb = testbed.make_testbed(name)
  lines = [f'### {name}', '',
           f'True weights {tb.true.weights.tolist()}, model {tb.model.weights.tolist()}; '
           f'{num_samples} samples x {seeds} seeds, {steps} steps, '
           f'{jax.devices()[0].platform}.', '',
           '| method | weight error (mean +- std) | NFE | disc fwd | disc grad | '
           'GFLOP/sample (CIFAR-10 nets) | extra | wall s |',
           '|---|---|---|---|---|---|---|---|']
  for r in results:
    lines.append(f"| {r['label']} | {r['error']:.3f} +- {r['error_std']:.3f} | "
                 f"{r['nfe']:.1f} | {r['disc_evals']:.1f} | {r['disc_grads']:.1f} | "
                 f"{r['gflop']:.0f} | {r['extra']} | {r['wall']:.1f} |")
  lines += ['', f'Frontier on {name}: for each churned-Heun ISIR row, the cheapest shared-mean '
            'ISIR row with an error at most the churned one plus the larger seed std.', '',
            '| churned Heun ISIR | error | GFLOP | shared mean | error | GFLOP | cost ratio |',
            '|---|---|---|---|---|---|---|']
  for kernel, c, s in frontier(results):
    if s is None:
      lines.append(f"| {c['label']} | {c['error']:.3f} | {c['gflop']:.0f} | {kernel}: none "
                   'reaches it | | | |')
    else:
      lines.append(f"| {c['label']} | {c['error']:.3f} | {c['gflop']:.0f} | {s['label']} | "
                   f"{s['error']:.3f} | {s['gflop']:.0f} | {s['gflop'] / c['gflop']:.2f} |")
  lines += ['', f'Cheapest setting of each method with a mean weight error <= {TARGET_ERROR} on '
            f'{name}, and its cost relative to the cheapest SMC one.', '',
            '| method | cheapest setting | error | GFLOP | GFLOP / SMC\'s |', '|---|---|---|---|---|']
  cheapest = cheapest_at(results, TARGET_ERROR)
  smc_cost = cheapest['SMC']['gflop'] if cheapest.get('SMC') else float('nan')
  for group in GROUPS:
    r = cheapest.get(group)
    if r is None:
      lines.append(f'| {group} | none reaches {TARGET_ERROR} | | | |')
    else:
      lines.append(f"| {group} | {r['label']} | {r['error']:.3f} | {r['gflop']:.0f} | "
                   f"{r['gflop'] / smc_cost:.1f} |")
  floors = {g: min(r['error'] for r in results if r['group'] == g)
            for g in ('ISIR churn', 'ISIR ancestral', 'ISIR dpmpp_2m_sde')}
  lines += ['', 'Lowest ISIR error per kernel: ' +
            ', '.join(f'{g[5:]} {v:.3f}' for g, v in floors.items()) + '.', '']
  return '\n'.join(lines)


def plot(path: str, panels: dict, size=(1300, 560)) -> None:
  """Weight error against GFLOP/sample (log x), one panel per testbed, one point (with a
  std bar) per setting; the ISIR settings of a kernel are joined in order of cost."""
  img = PIL.Image.new('RGB', size, 'white')
  draw = PIL.ImageDraw.Draw(img)
  all_g = [r['gflop'] for rs in panels.values() for r in rs]
  x0, x1 = math.floor(math.log10(min(all_g))), math.ceil(math.log10(max(all_g)))
  width = size[0] // len(panels)
  for p, (name, results) in enumerate(panels.items()):
    left, right, top, bottom = p * width + 60, (p + 1) * width - 20, 40, size[1] - 110
    y1 = max(r['error'] + np.nan_to_num(r['error_std']) for r in results) * 1.05
    px = lambda g: left + (math.log10(g) - x0) / (x1 - x0) * (right - left)
    py = lambda e: bottom - e / y1 * (bottom - top)
    draw.rectangle([left, top, right, bottom], outline='black')
    for e in range(x0, x1 + 1):
      draw.line([px(10 ** e), bottom, px(10 ** e), bottom + 5], fill='black')
      draw.text((px(10 ** e) - 10, bottom + 8), f'1e{e}', fill='black')
    for i in range(6):
      v = i * y1 / 5
      draw.line([left - 5, py(v), left, py(v)], fill='black')
      draw.text((left - 45, py(v) - 6), f'{v:.2f}', fill='black')
    draw.text((left + 5, top - 30), f'{name}: weight error (mean +/- std over seeds)',
              fill='black')
    draw.text(((left + right) // 2 - 100, bottom + 25),
              'GFLOP / sample at CIFAR-10 network sizes (log)', fill='black')
    for group in GROUPS:
      rs = sorted((r for r in results if r['group'] == group), key=lambda r: r['gflop'])
      c = COLOURS[group]
      if group.startswith('ISIR'):   # (SMC settings differ in more than cost: no line)
        draw.line([(px(r['gflop']), py(r['error'])) for r in rs], fill=c, width=1)
      for r in rs:
        cx, cy = px(r['gflop']), py(r['error'])
        s = np.nan_to_num(r['error_std'])
        draw.line([cx, py(r['error'] - s), cx, py(r['error'] + s)], fill=c)
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=c)
    for i, group in enumerate(GROUPS):
      draw.text((left + (i % 4) * 140, bottom + 45 + (i // 4) * 15), group,
                fill=COLOURS[group])
  img.save(path)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--testbeds', default='gmm2,gmm64',
                      help='comma-separated testbed names (gmm2, gmm64)')
  parser.add_argument('--samples', type=int, default=4096,
                      help='samples per seed (a multiple of the largest SMC group, 64)')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=18)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'testbed.md'))
  args = parser.parse_args()
  costs = cost.cifar10_costs()
  panels = {name: run(name, args.samples, args.seeds, args.steps, costs)
            for name in args.testbeds.split(',')}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  png = os.path.splitext(args.out)[0] + '.png'
  plot(png, panels)
  with open(args.out, 'w') as f:
    f.write('# Samplers on the exact Gaussian-mixture testbed\n\n'
            f'`python -m benchmarks.testbed --testbeds {args.testbeds} --samples '
            f'{args.samples} --seeds {args.seeds} --steps {args.steps}`\n\n'
            'GFLOP/sample = NFE x denoiser + disc fwd x discriminator forward + disc grad x '
            'discriminator gradient, with the CIFAR-10 networks\' per-sample GFLOP '
            f'({costs.denoiser:.1f}, {costs.disc_forward:.1f}, {costs.disc_grad:.1f}; '
            '`python -m benchmarks.cost`). wall s includes compilation. ISIR churn and '
            f'DiffRS use the churned Heun step (S_churn={CHURN:g}); DiffRS thresholds come '
            'from a warm-up of the same number of samples with other keys. SMC: ESS is the '
            'group\'s normalised ESS before resampling (mean over steps; min: the lowest), '
            'ancestors the distinct initial particles left per group, dup the share of '
            'outputs closer to another sample of their group than 0.1 x the median '
            'nearest-neighbour distance of as many true-mixture draws. Plot: '
            f'`{os.path.basename(png)}`.\n\n' +
            '\n'.join(table(n, r, args.samples, args.seeds, args.steps)
                      for n, r in panels.items()))
  print(f'wrote {args.out} and {png}')


if __name__ == '__main__':
  main()
