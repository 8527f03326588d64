"""Sample quality of EDM, DG, DiffRS and ISIR on the bundled digits (not a test).

    python -m benchmarks.quality [--num_samples=512] [--seeds=3] [--sweep=2x1,4x1,2x2,4x2]

Every method samples ``num_samples`` digits for each of ``seeds`` seeds (sample i of
seed s from ``fold_in(key(s), i)``, the same keys for every method) with the demo's
models and 18-step schedule; each run is scored by FD-digits against the 1,797 real
digits. ISIR runs over the (N candidates x K iterations) ``sweep`` and the adaptive
per-step (N_i, K_i) rule of the seed computed from the DiffRS thresholds. The stochastic
EDM step that ISIR proposes from (``edm_churn``, = ISIR with N = 1) is included, so the
effect of the selection is separated from that of the churn.

Writes ``benchmarks/results/quality.md`` (FD mean +/- std over seeds, NFE/sample, wall
seconds), ``quality.json`` (every run; a rerun resumes from it) and ``quality.png``
(FD versus NFE). The ``data`` row scores disjoint subsets of real digits of the same
size: the floor of FD-digits at this sample count.
"""

import json
import math
import os

from absl import app
from absl import flags
import ml_collections
import numpy as np
import PIL.Image
import PIL.ImageDraw

from configs import digits
from isir_jax import demo
from isir_jax.samplers import diffrs
from isir_jax.samplers import isir
from isir_jax.train import digits_data
from isir_jax.train import feature_net as feature_net_lib

_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 512, 'Samples per method and seed.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per method (0 .. seeds-1).')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Samples per sampler call.')
_SWEEP = flags.DEFINE_list('sweep', ['2x1', '4x1', '4x2', '8x1'],
                           'ISIR settings NxK (candidates x iterations).')
_CHURN = flags.DEFINE_float('churn', 5.0, 'S_churn of the stochastic proposals.')
_OUT = flags.DEFINE_string('out', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               'results'), 'Output directory.')


def methods(config: ml_collections.ConfigDict, sweep: list[str], churn: float
            ) -> dict[str, ml_collections.ConfigDict]:
  """Label -> sampler settings of every benchmarked method."""
  base = config.demo.samplers
  out = {m: demo.method_settings(config, m) for m in ('edm', 'dg', 'diffrs')}
  stoch = dict(base.isir_stochastic.to_dict(), S_churn=churn)
  edm_churn = {k: v for k, v in stoch.items() if k not in ('num_candidates', 'num_iterations')}
  out['edm_churn'] = ml_collections.ConfigDict(dict(edm_churn, name='edm'))
  for item in sweep:
    n, k = (int(v) for v in item.lower().split('x'))
    out[f'isir N={n} K={k}'] = ml_collections.ConfigDict(
        dict(stoch, num_candidates=n, num_iterations=k))
  margins = diffrs.load_thresholds(config.demo.diffrs_thresholds).increment[1:]
  n_i, k_i = isir.adaptive_schedule(margins)
  out['isir adaptive'] = ml_collections.ConfigDict(
      dict(stoch, num_candidates=tuple(int(v) for v in n_i),
           num_iterations=tuple(int(v) for v in k_i)))
  return out


def data_floor(config, net, n: int, seeds: int) -> list[float]:
  """FD-digits of disjoint random subsets of ``n`` real digits (as many as fit, <= seeds)."""
  images, _ = digits_data.load_digits(config.data.path)
  perm = np.random.default_rng(0).permutation(len(images))
  count = min(seeds, len(images) // n)
  return [feature_net_lib.fd_digits(net, images[perm[i * n:(i + 1) * n]], config.demo.ref_stats)
          for i in range(count)]


def summarise(runs: dict, order: list[str]) -> list[dict]:
  """Per method: FD mean/std over seeds, mean NFE/sample, mean sampling seconds, compile s."""
  rows = []
  for label in order:
    rs = [r for r in runs.values() if r['method'] == label]
    if not rs:
      continue
    fd = np.array([r['fd'] for r in rs])
    # Paired with EDM on the same seed (same keys): removes most of the sample noise.
    diff = np.array([r['fd'] - runs[f'edm|{r["seed"]}']['fd'] for r in rs
                     if f'edm|{r["seed"]}' in runs])
    rows.append(dict(method=label, fd_mean=float(fd.mean()),
                     diff_mean=float(diff.mean()) if len(diff) else float('nan'),
                     diff_std=float(diff.std(ddof=1)) if len(diff) > 1 else float('nan'),
                     fd_std=float(fd.std(ddof=1)) if len(fd) > 1 else float('nan'),
                     nfe=float(np.mean([r['nfe'] for r in rs])),
                     seconds=float(np.mean([r['seconds'] for r in rs])),
                     compile_s=float(rs[0].get('compile_s', float('nan'))), seeds=len(rs),
                     extra=rs[0].get('extra', '')))
  return rows


def write_markdown(path: str, rows: list[dict], floor: list[float], args: dict) -> None:
  lines = ['# Sample quality on the bundled digits (FD-digits, lower is better)', '',
           f'Command: `python -m benchmarks.quality --num_samples={args["num_samples"]} '
           f'--seeds={args["seeds"]} --sweep={",".join(args["sweep"])}`  ',
           f'{args["num_samples"]} samples per run, seeds 0..{args["seeds"] - 1} (the same keys '
           'for every method), 18 Heun steps, the committed demo models; FD-digits against '
           'all 1,797 real digits. Seconds: sampling wall time per run on this machine '
           f'({args["machine"]}), compilation excluded and listed apart.', '',
           '| method | FD-digits (mean ± std) | FD - FD(edm), same seed | seeds | NFE/sample | '
           'seconds/run | compile s | notes |',
           '|---|---|---|---|---|---|---|---|']
  if floor:
    lines.append(f'| data (real digits) | {np.mean(floor):.2f} ± '
                 f'{np.std(floor, ddof=1) if len(floor) > 1 else float("nan"):.2f} | - | {len(floor)} | '
                 '0 | - | - | '
                 f'{len(floor)} disjoint real subsets: the floor |')
  for r in rows:
    lines.append(f'| {r["method"]} | {r["fd_mean"]:.2f} ± {r["fd_std"]:.2f} | '
                 f'{r["diff_mean"]:+.2f} ± {r["diff_std"]:.2f} | {r["seeds"]} | '
                 f'{r["nfe"]:.1f} | '
                 f'{r["seconds"]:.1f} | {r["compile_s"]:.1f} | {r["extra"]} |')
  lines += ['', 'NFE counts denoiser evaluations per sample; DG also takes one discriminator '
            'gradient per step, DiffRS and ISIR one discriminator evaluation per candidate. '
            'ISIR proposes with the stochastic step of `edm_churn` (S_churn 5, S_min 0.01, '
            'S_max 50); ESS is the mean normalised effective sample size of its weights.', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def plot(path: str, rows: list[dict], floor: list[float], size=(900, 600)) -> None:
  """FD-digits versus NFE/sample (log x), one labelled point with a std bar per method."""
  w, h = size
  left, right, top, bottom = 70, 30, 30, 60
  img = PIL.Image.new('RGB', size, 'white')
  draw = PIL.ImageDraw.Draw(img)
  xs = [math.log10(max(r['nfe'], 1.0)) for r in rows]
  ys = [r['fd_mean'] for r in rows] + floor
  ys_hi = [r['fd_mean'] + (0 if math.isnan(r['fd_std']) else r['fd_std']) for r in rows] + floor
  x0, x1 = math.floor(min(xs) * 10) / 10 - 0.05, math.ceil(max(xs) * 10) / 10 + 0.05
  y0, y1 = 0.0, max(ys_hi) * 1.1
  px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
  py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
  draw.rectangle([left, top, w - right, h - bottom], outline='black')
  for e in range(0, 5):
    for m in (1, 2, 5):
      v = m * 10 ** e
      if x0 <= math.log10(v) <= x1:
        draw.line([px(math.log10(v)), h - bottom, px(math.log10(v)), h - bottom + 5], fill='black')
        draw.text((px(math.log10(v)) - 8, h - bottom + 8), str(v), fill='black')
  for i in range(6):
    v = y0 + i * (y1 - y0) / 5
    draw.line([left - 5, py(v), left, py(v)], fill='black')
    draw.text((5, py(v) - 6), f'{v:.2f}', fill='black')
  draw.text((w // 2 - 60, h - 25), 'NFE / sample (log)', fill='black')
  draw.text((left + 5, 5), 'FD-digits (mean +/- std over seeds)', fill='black')
  if floor:
    yf = py(float(np.mean(floor)))
    draw.line([left, yf, w - right, yf], fill=(150, 150, 150))
    draw.text((w - right - 120, yf - 14), 'real-data floor', fill=(120, 120, 120))
  colours = {'edm': 'black', 'dg': 'blue', 'diffrs': 'green'}
  for r, x in zip(rows, xs):
    c = colours.get(r['method'].split(' ')[0], 'red' if 'isir' in r['method'] else 'gray')
    cx, cy = px(x), py(r['fd_mean'])
    if not math.isnan(r['fd_std']):
      draw.line([cx, py(r['fd_mean'] - r['fd_std']), cx, py(r['fd_mean'] + r['fd_std'])], fill=c)
    draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=c)
    draw.text((cx + 6, cy - 6), r['method'], fill=c)
  img.save(path)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
  os.makedirs(_OUT.value, exist_ok=True)
  json_path = os.path.join(_OUT.value, 'quality.json')
  args = dict(num_samples=_NUM_SAMPLES.value, seeds=_SEEDS.value, sweep=_SWEEP.value,
              machine=f'{jax.devices()[0].device_kind}, {os.cpu_count()} cores')
  runs = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      saved = json.load(f)
    if saved.get('args', {}).get('num_samples') == args['num_samples']:
      runs = saved['runs']
  denoiser, discriminator, net = demo.load_models(config)
  label_dim = int(getattr(denoiser, 'label_dim', 0) or 0)
  todo = methods(config, _SWEEP.value, _CHURN.value)
  floor = data_floor(config, net, _NUM_SAMPLES.value, _SEEDS.value)
  batch = min(_BATCH.value, _NUM_SAMPLES.value)
  compiled = {}
  # Seed-major, so that an interrupted run still has every method at the first seeds.
  for seed in range(_SEEDS.value):
    for label, settings in todo.items():
      if f'{label}|{seed}' in runs:
        continue
      if label not in compiled:
        compiled[label] = demo.compile_sampler(settings, denoiser, discriminator, batch)
      fn, compile_s = compiled[label]
      images, stats, seconds = demo.draw(fn, label_dim, seed, _NUM_SAMPLES.value, batch)
      extra = []
      if 'ess' in stats:
        extra.append(f'ESS {float(np.mean(stats["ess"])):.2f}')
      if 'accept_rate' in stats:
        extra.append(f'accept {float(np.mean(stats["accept_rate"])):.2f}')
      run = dict(method=label, seed=seed, nfe=float(stats['nfe'].mean()), seconds=seconds,
                 fd=feature_net_lib.fd_digits(net, images, config.demo.ref_stats),
                 compile_s=compile_s, extra=', '.join(extra))
      runs[f'{label}|{seed}'] = run
      print(f'{label} seed {seed}: FD {run["fd"]:.3f}, NFE {run["nfe"]:.1f}, {seconds:.1f} s',
            flush=True)
      with open(json_path + '.tmp', 'w') as f:
        json.dump({'args': args, 'runs': runs}, f, indent=1)
      os.replace(json_path + '.tmp', json_path)
    rows = summarise(runs, list(todo))
    write_markdown(os.path.join(_OUT.value, 'quality.md'), rows, floor, args)
    plot(os.path.join(_OUT.value, 'quality.png'), rows, floor)
  print(open(os.path.join(_OUT.value, 'quality.md')).read())


if __name__ == '__main__':
  app.run(main)
