"""Sample quality and cost of EDM, DG, DiffRS and ISIR on two learned digits testbeds.

    python -m benchmarks.quality [--num_samples=1000] [--seeds=5] [--testbeds=skew,natural]
    python -m benchmarks.quality --tiny --out=/tmp/q     # seconds: the code path only

Testbeds (``configs/digits.py``):
  skew      the digits-skew denoiser (trained on digits with classes 0-4 four times as
            frequent as 5-9) and its discriminator: the answer is known, plain EDM's
            class-frequency error sits near 0.3 and a perfect correction brings it to ~0.
  natural   the denoiser of the natural digits and its discriminator: FD-digits.

Every setting draws ``num_samples`` samples for each seed s = 0..seeds-1 through
`isir_jax.sampling.Sampler` (the path of ``main.py --mode=sample``), sample i from
``fold_in(key(s), i)``: the same keys for every method, so differences to EDM on the
same seed are paired. Each metric (class-frequency error, FD-digits) is reported as its
mean over seeds and the mean paired difference to EDM with a 95% Student-t confidence
interval; the verdict is "better" or "worse" when the interval excludes 0, else "not
significant". Cost per sample: denoiser evaluations, discriminator forward evaluations
and discriminator gradients, and GFLOP from each network's XLA cost analysis
(`benchmarks.cost`) times its count.

Writes ``quality.md``, ``quality.json`` (every run; a rerun resumes from it) and one
quality-versus-compute plot per testbed (``quality_<testbed>.png``) into ``--out``.
"""

import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
import scipy.stats

from benchmarks import cost
from benchmarks import plotting
from configs import digits
from isir_jax import demo
from isir_jax import io
from isir_jax import sampling
from isir_jax.samplers import diffrs
from isir_jax.train import digits_data
from isir_jax.train import feature_net as feature_net_lib

_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Samples per setting and seed.')
_SEEDS = flags.DEFINE_integer('seeds', 5, 'Seeds per setting (0 .. seeds-1).')
_BATCH = flags.DEFINE_integer('batch_size', 1000, 'Samples per sampler call.')
_TESTBEDS = flags.DEFINE_list('testbeds', ['skew', 'natural'], 'Testbeds to run.')
_ONLY = flags.DEFINE_list('only', [], 'Run only these setting labels (default: all).')
_TINY = flags.DEFINE_bool('tiny', False, 'Tiny models, 8 samples, 2 seeds, 3 settings.')
_XLA_CACHE = flags.DEFINE_string('xla_cache', 'workdir/xla_cache', 'Compilation cache dir.')
_OUT = flags.DEFINE_string('out', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               'results'), 'Output directory.')

# Label -> (demo sampler section of configs/digits.py, overrides of its settings).
CHURN = dict(S_churn=5.0, S_min=0.01, S_max=50.0, S_noise=1.0)
ANCESTRAL = dict(proposal='ancestral', eta=1.0)
SETTINGS = {
    'edm': ('edm', {}),
    'edm churn': ('edm', CHURN),
    'edm ancestral': ('edm', ANCESTRAL),
    'dg w1=2 (default)': ('dg', {}),
    'dg w1=4': ('dg', dict(dg_weight_1st_order=4.0)),
    'dg w1=8': ('dg', dict(dg_weight_1st_order=8.0)),
    'diffrs p=0.75 (default)': ('diffrs', dict(rej_percentile=0.75)),
    'diffrs p=0.9': ('diffrs', dict(rej_percentile=0.9)),
    'isir churn N=4 K=1': ('isir_stochastic', dict(num_candidates=4, num_iterations=1)),
    'isir churn N=4 K=2': ('isir_stochastic', dict(num_candidates=4, num_iterations=2)),
    'isir ancestral N=8 K=1': ('isir_ancestral', dict(num_candidates=8, num_iterations=1)),
    'isir ancestral N=16 K=1': ('isir_ancestral', dict(num_candidates=16, num_iterations=1)),
    'isir dpm2m N=8 K=1': ('isir_ancestral', dict(proposal='dpmpp_2m_sde', num_candidates=8,
                                                  num_iterations=1)),
    # Tempered weights exp(scale * d) for under-confident discriminators.
    'isir churn N=4 K=1 scale=4': ('isir_scaled', {}),
    'isir ancestral N=8 K=1 scale=4': ('isir_ancestral', dict(num_candidates=8, num_iterations=1,
                                                              weight_scale=4.0)),
}
# The sweep of each testbed, chosen to fit about an hour on an idle 2-core CPU at 1,000
# samples x 5 seeds. Left out for time: DG w1=1, DiffRS p=0.5, churned ISIR with N=8
# (280 NFE), ancestral ISIR with K=2 (the `isir_ancestral` config), DPM-Solver++(2M) beyond
# one setting, and on the natural model every second setting of a sweep.
SWEEPS = {
    'skew': tuple(SETTINGS),
    'natural': ('edm', 'edm churn', 'edm ancestral', 'dg w1=2 (default)',
                'diffrs p=0.75 (default)', 'isir churn N=4 K=1', 'isir ancestral N=8 K=1',
                'isir churn N=4 K=1 scale=4'),
}
TINY_SETTINGS = ('edm', 'dg w1=2 (default)', 'isir churn N=4 K=1')
# Paired against this setting on the same seed.
BASELINE = 'edm'


def testbed_config(testbed: str, tiny: bool) -> ml_collections.ConfigDict:
  arg = ','.join(['edm'] + (['natural'] if testbed == 'natural' else []) +
                 (['tiny'] if tiny else []))
  return digits.get_config(arg)


def setting_config(config: ml_collections.ConfigDict, label: str, seed: int, num: int,
                   batch: int, workdir: str) -> ml_collections.ConfigDict:
  """The run config of one setting and seed (DiffRS thresholds at its percentile, from the
  committed warm-up log ratios)."""
  section, overrides = SETTINGS[label]
  cfg = demo.method_config(config, section, seed=seed, batch_size=min(batch, num))
  cfg.sample.num_samples = num
  overrides = dict(overrides)
  percentile = overrides.pop('rej_percentile', None)
  cfg.sampler.update(overrides)
  if percentile is not None:
    log_ratios = io.load_warmup_log_ratios(config.demo.diffrs_thresholds)
    path = os.path.join(workdir, f'diffrs_thresholds_p{percentile}.npz')
    io.save_thresholds(path, diffrs.thresholds_from_log_ratios(log_ratios, percentile))
    cfg.sampler.thresholds = path
  return cfg


def draw_setting(config: ml_collections.ConfigDict, label: str, seed: int, num: int,
                 batch: int, models, workdir: str) -> tuple[np.ndarray, dict, float]:
  """Samples ``num`` digits with one setting and seed through the driver's `Sampler`:
  ``(images, per-sample stats, sampling seconds)``."""
  cfg = setting_config(config, label, seed, num, batch, workdir)
  sampler = sampling.Sampler(cfg, models, workdir)
  t0 = time.perf_counter()
  images, stats, _ = sampler.draw(0, num, progress=f'{config.testbed} {label} seed {seed}')
  return images, stats, time.perf_counter() - t0


def paired_interval(diffs: np.ndarray) -> tuple[float, float, float]:
  """Mean and 95% Student-t confidence interval of paired differences."""
  mean = float(np.mean(diffs))
  if len(diffs) < 2:
    return mean, float('nan'), float('nan')
  half = float(scipy.stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1)
               / np.sqrt(len(diffs)))
  return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
  """Lower is better for both metrics."""
  if np.isnan(low):
    return 'n/a'
  return 'better' if high < 0 else 'worse' if low > 0 else 'not significant'


def score(images: np.ndarray, net, config, reference: np.ndarray) -> dict:
  classes = net.predict(images)
  return dict(class_error=digits_data.class_frequency_error(classes, reference),
              fd=feature_net_lib.fd_digits(net, images, config.demo.ref_stats))


def summarise(runs: dict, testbed: str, labels: list[str], costs: cost.NetworkCosts
              ) -> list[dict]:
  """Per setting: metric means, paired differences to EDM with CIs and verdicts, costs."""
  cifar10 = cost.cifar10_costs()
  rows = []
  for label in labels:
    rs = {r['seed']: r for r in runs.values()
          if r['testbed'] == testbed and r['label'] == label}
    if not rs:
      continue
    row = dict(label=label, seeds=len(rs))
    for metric in ('class_error', 'fd'):
      row[metric] = float(np.mean([r[metric] for r in rs.values()]))
      base = {r['seed']: r[metric] for r in runs.values()
              if r['testbed'] == testbed and r['label'] == BASELINE}
      diffs = np.array([r[metric] - base[s] for s, r in rs.items() if s in base])
      mean, low, high = paired_interval(diffs) if len(diffs) else (np.nan,) * 3
      row[f'{metric}_diff'], row[f'{metric}_ci'] = mean, (low, high)
      row[f'{metric}_verdict'] = 'baseline' if label == BASELINE else verdict(low, high)
    for key in ('nfe', 'disc_evals', 'disc_grads'):
      row[key] = float(np.mean([r['stats'].get(key, np.nan) for r in rs.values()]))
    row['gflop'] = cost.gflop_per_sample(row, costs)
    row['gflop_cifar10'] = cost.gflop_per_sample(row, cifar10)
    row['seconds'] = float(np.mean([r['seconds'] for r in rs.values()]))
    row['extra'] = ', '.join(f'{k} {np.mean([r["stats"][k] for r in rs.values()]):.2f}'
                             for k in ('ess', 'accept_rate') if k in next(iter(rs.values()))['stats'])
    rows.append(row)
  return rows


def _fmt_diff(row: dict, metric: str, places: int) -> str:
  if row[f'{metric}_verdict'] == 'baseline':
    return '(baseline)'
  low, high = row[f'{metric}_ci']
  return (f'{row[f"{metric}_diff"]:+.{places}f} [{low:+.{places}f}, {high:+.{places}f}] '
          f'{row[f"{metric}_verdict"]}')


def markdown(tables: dict, args: dict, notes: dict) -> str:
  lines = ['# Sample quality and cost on the learned digits testbeds', '',
           f'Command: `{args["command"]}`  ',
           f'{args["num_samples"]} samples per setting and seed, seeds 0..{args["seeds"] - 1} '
           '(the same keys for every setting), 18 steps, the committed digits models. '
           'Differences are paired with EDM on the same seed: mean [95% t-interval] and the '
           'verdict (lower is better; "not significant" when the interval contains 0). Cost per '
           'sample: denoiser evaluations (NFE), discriminator forward evaluations and gradients, '
           'and GFLOP at the digits network sizes and, for the same counts, at the CIFAR-10 '
           'sizes (XLA cost analysis, `benchmarks.cost`). '
           f'Seconds: sampling wall time per run on {args["machine"]}, shared with other work.', '']
  for testbed, rows in tables.items():
    lines += [f'## {testbed}', '', notes.get(testbed, ''), '',
              '| setting | class-freq error | vs EDM | FD-digits | vs EDM | NFE | disc fwd | '
              'disc grad | GFLOP/sample | at CIFAR-10 sizes | s/run | seeds | notes |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
      lines.append(
          f'| {r["label"]} | {r["class_error"]:.3f} | {_fmt_diff(r, "class_error", 3)} | '
          f'{r["fd"]:.2f} | {_fmt_diff(r, "fd", 2)} | {r["nfe"]:.1f} | {r["disc_evals"]:.1f} | '
          f'{r["disc_grads"]:.1f} | {r["gflop"]:.3f} | {r["gflop_cifar10"]:.0f} | '
          f'{r["seconds"]:.1f} | {r["seeds"]} | '
          f'{r["extra"]} |')
    lines.append('')
  return '\n'.join(lines)


def plot(path: str, rows: list[dict], metric: str, title: str) -> None:
  points = [plotting.Point(r['label'], r['gflop'], r[metric], _group(r['label']))
            for r in rows if np.isfinite(r['gflop'])]
  plotting.scatter_log_x(path, points, xlabel='GFLOP / sample (log)',
                         ylabel=f'{metric.replace("_", " ")} (mean over seeds)', title=title)


def _group(label: str) -> str:
  return label.split(' ')[0]


def main(argv):
  del argv
  tiny = _TINY.value
  num, seeds = (8, 2) if tiny else (_NUM_SAMPLES.value, _SEEDS.value)
  os.makedirs(_OUT.value, exist_ok=True)
  json_path = os.path.join(_OUT.value, 'quality.json')
  # Each (setting, seed) builds its sampler anew; the seeds of a setting share one program.
  jax.config.update('jax_compilation_cache_dir', _XLA_CACHE.value)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  args = dict(num_samples=num, seeds=seeds,
              command='python -m benchmarks.quality' + (' --tiny' if tiny else
                                                        f' --num_samples={num} --seeds={seeds}'),
              machine=f'{jax.devices()[0].device_kind}, {os.cpu_count()} cores')
  runs = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      saved = json.load(f)
    if saved.get('args', {}).get('num_samples') == num:
      runs = saved['runs']
  tables, notes = {}, {}
  workdir = tempfile.TemporaryDirectory(prefix='quality-')   # per-percentile DiffRS thresholds
  for testbed in _TESTBEDS.value:
    labels = [label for label in (TINY_SETTINGS if tiny else SWEEPS[testbed])
              if not _ONLY.value or label in _ONLY.value]
    config = testbed_config(testbed, tiny)
    denoiser, discriminator, net = demo.load_models(config)
    costs = cost.measure(denoiser, discriminator, denoiser.shape)
    reference = demo.reference_frequencies(config)
    # Seed-major, so that an interrupted run still has every setting at the first seeds.
    for seed in range(seeds):
      for label in labels:
        key = f'{testbed}|{label}|{seed}'
        if key in runs:
          continue
        images, stats, seconds = draw_setting(config, label, seed, num, _BATCH.value,
                                              (denoiser, discriminator), workdir.name)
        run = dict(testbed=testbed, label=label, seed=seed, seconds=seconds,
                   stats={k: float(np.mean(v)) for k, v in stats.items()},
                   **score(images, net, config, reference))
        runs[key] = run
        print(f'{key}: class error {run["class_error"]:.3f}, FD {run["fd"]:.2f}, '
              f'{sampling.format_stats(stats)}, {seconds:.1f} s', flush=True)
        tmp = json_path + '.tmp'
        with open(tmp, 'w') as f:
          json.dump({'args': args, 'runs': runs}, f, indent=1)
        os.replace(tmp, json_path)
    tables[testbed] = summarise(runs, testbed, labels, costs)
    notes[testbed] = discriminator_note(config)
    metric = 'class_error' if testbed == 'skew' else 'fd'
    plot(os.path.join(_OUT.value, f'quality_{testbed}.png'), tables[testbed], metric,
         f'digits-{testbed}: {metric} vs compute')
  text = markdown(tables, args, notes)
  with open(os.path.join(_OUT.value, 'quality.md'), 'w') as f:
    f.write(text)
  print(text)


def discriminator_note(config: ml_collections.ConfigDict) -> str:
  """One line on the testbed's discriminator: its held-out accuracy and BCE."""
  with open(os.path.join(config.model.discriminator, 'config.json')) as f:
    report = json.load(f).get('training', {})
  if 'heldout_accuracy' not in report:
    return 'Discriminator: no held-out metrics recorded.'
  return (f'Discriminator: {report["num_real"]} real vs {report["num_generated"]} generated '
          f'digits, {report["heldout_fraction"]:.0%} held out; held-out accuracy '
          f'{report["heldout_accuracy"]:.3f}, BCE {report["heldout_bce"]:.4f} (log 2 = 0.6931).')


if __name__ == '__main__':
  app.run(main)
