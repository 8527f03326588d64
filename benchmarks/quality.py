"""Sample quality and cost of EDM, DG, DiffRS and ISIR on two learned digits testbeds.

    python -m benchmarks.quality [--num_samples=1000] [--seeds=5] [--testbeds=skew,natural]
    python -m benchmarks.quality --tiny --out=/tmp/q     # minutes: the code path only

Testbeds (``configs/digits.py``):
  skew      the digits-skew denoiser (trained on digits with classes 0-4 four times as
            frequent as 5-9) and its discriminator: the answer is known, plain EDM's
            class-frequency error sits near 0.3 and a perfect correction brings it to ~0.
            Primary metric: the class-frequency error.
  natural   the denoiser of the natural digits and its discriminator. Primary: FD-digits.

Every setting (`Row`: label, sampler section of ``configs/digits.py``, overrides, kernel)
draws ``num_samples`` samples per seed through `isir_jax.sampling.Sampler` (the path of
``main.py --mode=sample``), sample i from ``fold_in(key(seed), i)``: the same keys for every
setting, so differences on a seed are paired. Scores (`benchmarks.digit_scores`): class-
frequency error, FD-digits against the feature net's held-out digits, precision and recall
(k-NN manifolds, k = 3). Each row is paired with the default EDM (18 Heun steps) and with EDM
on its own kernel (churned Heun, ancestral, DPM-Solver++(2M) SDE); its verdict
(`benchmarks.verdicts`) is "better" only when the primary metric improves beyond noise (paired
95% t-interval over the seeds) and no other metric gets significantly worse, beside the
same verdict with the primary p-values Holm-adjusted over the table's rows. The control row,
EDM with 4 steps, blurs its way to a lower class error and must not come out "better".

Tuned knobs (`Tuned`: ISIR's weight_scale, DG's w1, DiffRS's percentile, any later one) are
chosen on the validation seeds (``--val_seeds``, default 100-104) by
`verdicts.SELECTION_RULE`; only the chosen value runs on the test seeds (0 .. seeds-1).
``isir_jax/pretrained.py`` ``TUNED`` holds the chosen values for the demo (copy them from
``quality.json`` "chosen"; a test checks that they agree).

Resume by content: a stored run is reused only when the hash of its full run config
(sampler settings, DiffRS threshold values, sample section, seed), its sample count, the
bytes of the model and reference files and the source of the sampling and scoring code all
match (`run_content`); anything else reruns. Cost per sample: denoiser evaluations,
discriminator forward evaluations and gradients, and GFLOP from each network's XLA cost
analysis (`benchmarks.cost`) times its count.

Writes ``quality.md``, ``quality.json`` (every run, keyed by content; a rerun resumes from
it) and one quality-versus-compute plot per testbed (``quality_<testbed>.png``) into ``--out``.
"""

import dataclasses
import functools
import glob
import hashlib
import json
import math
import os
import tempfile
import time
from typing import Any, Callable, Union

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from benchmarks import cost
from benchmarks import digit_scores
from benchmarks import plotting
from benchmarks import verdicts
from configs import digits
from isir_jax import demo
from isir_jax import io
from isir_jax import sampling
from isir_jax.samplers import diffrs

_NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1000, 'Samples per setting and seed.')
_SEEDS = flags.DEFINE_integer('seeds', 5, 'Test seeds per setting (0 .. seeds-1).')
_VAL_SEEDS = flags.DEFINE_list('val_seeds', ['100', '101', '102', '103', '104'],
                               'Validation seeds, on which tuned knobs are chosen.')
_BATCH = flags.DEFINE_integer('batch_size', 1000, 'Samples per sampler call.')
_TESTBEDS = flags.DEFINE_list('testbeds', ['skew', 'natural'], 'Testbeds to run.')
_ONLY = flags.DEFINE_list('only', [], 'Run only these row labels (default: all).')
_TINY = flags.DEFINE_bool('tiny', False, '8 samples, 2 test and 2 validation seeds, a few rows.')
_XLA_CACHE = flags.DEFINE_string('xla_cache', 'workdir/xla_cache', 'Compilation cache dir.')
_OUT = flags.DEFINE_string('out', os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               'results'), 'Output directory.')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class Row:
  """One setting: ``settings`` override the ``configs/digits.py`` demo sampler ``section``;
  ``kernel`` names the EDM row on the same proposal kernel (a key of `KERNEL_BASELINES`)."""
  label: str
  section: str
  settings: dict
  kernel: str = 'heun'


@dataclasses.dataclass(frozen=True)
class Tuned:
  """A knob chosen on the validation seeds among ``candidates`` (`verdicts.SELECTION_RULE`).

  ``config_section``: the ``configs/digits.py`` demo section whose ``knob`` takes the chosen
  value (``TUNED``), or None when no demo method has these settings.
  """
  label: str
  section: str
  settings: dict
  knob: str
  candidates: tuple
  default: Any
  kernel: str = 'heun'
  config_section: Union[str, None] = None

  def row(self, value, chosen: bool = False) -> Row:
    label = f'{self.label}={value:g}' + (' (tuned)' if chosen else '')
    return Row(label, self.section, dict(self.settings, **{self.knob: value}), self.kernel)


CHURN = dict(S_churn=5.0, S_min=0.01, S_max=50.0, S_noise=1.0)
ANCESTRAL = dict(proposal='ancestral', eta=1.0)
DPM2M = dict(proposal='dpmpp_2m_sde', eta=1.0)
# SMC on the ancestral kernel resampling down to t' = 0, and SMC as the presets run it: the 2M
# kernel, resampling while t' >= 0.5 (explicit, so that the rows do not follow the presets).
SMC_ANCESTRAL = dict(ANCESTRAL, resample_window=(0.0, math.inf))
SMC_DPM2M = dict(DPM2M, resample_window=(0.5, math.inf))
# EDM on each proposal kernel: the same-kernel baseline of the rows on it.
KERNEL_BASELINES = {'heun': 'edm', 'churn': 'edm churn', 'ancestral': 'edm ancestral',
                    'dpmpp_2m_sde': 'edm dpm2m'}
BASELINE = 'edm'   # the default EDM: 18 Heun steps
CONTROL = 'edm 4 steps (control)'

# Every row the benchmark knows, in table order; one line each. A new sampler adds its
# section to configs/digits.py `demo_samplers` and a line here, e.g.
#   Row('smc churn G=4', 'smc', dict(group_size=4), 'churn'), or, chosen on validation seeds,
#   Tuned('smc churn G', 'smc', {}, 'group_size', (2, 4, 8), 4, 'churn', config_section='smc'),
# and its label to `SWEEPS`.
ENTRIES = (
    Row('edm', 'edm', {}),
    Row(CONTROL, 'edm', dict(num_steps=4)),
    Row('edm churn', 'edm', CHURN, 'churn'),
    Row('edm ancestral', 'edm', ANCESTRAL, 'ancestral'),
    Row('edm dpm2m', 'edm', DPM2M, 'dpmpp_2m_sde'),
    Row('dg w1=2 (paper)', 'dg', dict(dg_weight_1st_order=2.0)),
    Tuned('dg w1', 'dg', {}, 'dg_weight_1st_order', (2.0, 4.0, 8.0), 2.0,
          config_section='dg'),
    Row('diffrs p=0.75 (paper)', 'diffrs', dict(rej_percentile=0.75)),
    Tuned('diffrs p', 'diffrs', {}, 'rej_percentile', (0.75, 0.9), 0.75,
          config_section='diffrs'),
    Row('isir churn N=4 K=1', 'isir_stochastic', dict(num_candidates=4, num_iterations=1),
        'churn'),
    Row('isir churn N=4 K=2', 'isir_stochastic', dict(num_candidates=4, num_iterations=2),
        'churn'),
    Row('isir ancestral N=8 K=1', 'isir_ancestral', dict(num_candidates=8, num_iterations=1),
        'ancestral'),
    Row('isir ancestral N=16 K=1', 'isir_ancestral', dict(num_candidates=16, num_iterations=1),
        'ancestral'),
    Row('isir dpm2m N=8 K=1', 'isir_ancestral', dict(DPM2M, num_candidates=8, num_iterations=1),
        'dpmpp_2m_sde'),
    # Tempered weights exp(scale * d) for under-confident discriminators; the default, 1, is
    # the plain row above.
    Tuned('isir churn N=4 K=1 scale', 'isir_scaled', {}, 'weight_scale', (2.0, 4.0, 8.0),
          1.0, 'churn', config_section='isir_scaled'),
    Tuned('isir ancestral N=8 K=1 scale', 'isir_ancestral',
          dict(num_candidates=8, num_iterations=1), 'weight_scale', (4.0, 8.0), 1.0,
          'ancestral'),
    # SMC over groups of G consecutive samples (ancestral kernel, resampling every step).
    Tuned('smc ancestral G', 'smc', SMC_ANCESTRAL, 'group_size', (8, 16, 64), 16, 'ancestral'),
    # Resampling only while t' >= 0.5, so that the last steps separate the copies (the
    # window was picked on validation seeds 100-102 among t' >= 0.5 / >= 2 and G = 8 / 16).
    Row('smc ancestral G=16 window t>=0.5', 'smc',
        dict(ANCESTRAL, group_size=16, resample_window=(0.5, math.inf)), 'ancestral'),
    # SMC on DPM-Solver++(2M) SDE proposals, which keep EDM's recall at 18 NFE (the ancestral
    # kernel loses 0.12), resampling while t' >= 0.5: the demo's SMC (the kernel and window
    # picked on validation seeds 100-104 by `benchmarks.smc_variants`).
    Tuned('smc dpm2m window t>=0.5 G', 'smc', SMC_DPM2M, 'group_size', (8, 16, 64), 16,
          'dpmpp_2m_sde', config_section='smc'),
    # The same with an SIR move of N = 8 candidates per particle and weighted step (more
    # discriminator calls, no more NFE: the candidates share the step's mean).
    Row('smc dpm2m G=16 window t>=0.5 N=8', 'smc', dict(SMC_DPM2M, group_size=16, num_candidates=8),
        'dpmpp_2m_sde'),
    # The guided ancestral kernel alone (DG's term in the mean, G = 1: no weights).
    Row('guided ancestral w=2 (smc G=1)', 'smc',
        dict(SMC_ANCESTRAL, group_size=1, guidance_weight=2.0), 'ancestral'),
)
ENTRY = {e.label: e for e in ENTRIES}
# The entries of each testbed (their same-kernel baselines join automatically). Left out for
# time: churned ISIR with N=8 (280 NFE), ancestral ISIR with K=2, and on the natural model
# (whose discriminator is barely better than chance) every tuned knob but SMC's, DiffRS,
# ancestral ISIR, the larger N and the DPM-Solver++ rows.
SWEEPS = {
    'skew': tuple(ENTRY),
    'natural': ('edm', CONTROL, 'edm ancestral', 'dg w1=2 (paper)', 'isir churn N=4 K=1',
                'smc ancestral G', 'smc dpm2m window t>=0.5 G'),
}
TINY_SWEEP = ('edm', CONTROL, 'isir churn N=4 K=1', 'dg w1')
TINY_CANDIDATES = 2   # the first candidates of a tuned knob under --tiny
PRIMARY = {'skew': 'class_error', 'natural': 'fd'}
# Per-sample statistics shown in the tables' extra column (means over samples and seeds).
EXTRA_STATS = ('ess', 'accept_rate', 'ancestors', 'lineages', 'near_duplicates')
DUPLICATE_FRACTION = 0.1   # near-duplicate: closer than this x the real digits' NN distance
_PLACES = {'class_error': 3, 'fd': 2, 'fd_all': 2, 'precision': 3, 'recall': 3}


def row(label: str) -> Row:
  """The fixed `Row` of ``label``."""
  entry = ENTRY[label]
  if not isinstance(entry, Row):
    raise ValueError(f'{label!r} is a tuned knob; use ENTRY[label].row(value)')
  return entry


def sweep(testbed: str, tiny: bool, only=()) -> list:
  """The entries of a testbed's run (those labelled in ``only`` if it is not empty)."""
  labels = TINY_SWEEP if tiny else SWEEPS[testbed]
  return [ENTRY[label] for label in labels if not only or label in only]


def candidates(tuned: Tuned, tiny: bool) -> tuple:
  return tuned.candidates[:TINY_CANDIDATES] if tiny else tuned.candidates


def _position(r: Row) -> int:
  """Index in `ENTRIES` of a row, or of the tuned entry whose candidate it is."""
  for i, e in enumerate(ENTRIES):
    if r.label == e.label or (isinstance(e, Tuned) and r.label.startswith(e.label + '=')):
      return i
  return len(ENTRIES)


def with_baselines(rows: list[Row], default: bool = True) -> list[Row]:
  """``rows`` and the EDM rows they are paired with (each once), in `ENTRIES` order."""
  needed = {KERNEL_BASELINES[r.kernel] for r in rows} | ({BASELINE} if default else set())
  out = [ENTRY[label] for label in needed] + [r for r in rows if r.label not in needed]
  return sorted(out, key=_position)


# ----------------------------------------------------------------------------- configs


def testbed_config(testbed: str, tiny: bool) -> ml_collections.ConfigDict:
  """The testbed's digits config, with the untuned demo sections (the rows set every knob)."""
  arg = ','.join(['edm'] + (['natural'] if testbed == 'natural' else []) +
                 (['tiny'] if tiny else []))
  config = digits.get_config(arg)
  config.demo.samplers = digits.demo_samplers()
  return config


def setting_config(config: ml_collections.ConfigDict, setting: Row, seed: int, num: int,
                   batch: int, workdir: str) -> ml_collections.ConfigDict:
  """The run config of one row and seed (DiffRS thresholds at its percentile, from the
  committed warm-up log ratios)."""
  cfg = demo.method_config(config, setting.section, seed=seed, batch_size=min(batch, num))
  cfg.sample.num_samples = num
  overrides = dict(setting.settings)
  percentile = overrides.pop('rej_percentile', None)
  cfg.sampler.update(overrides)
  if percentile is not None:
    log_ratios = io.load_warmup_log_ratios(config.demo.diffrs_thresholds)
    path = os.path.join(workdir, f'diffrs_thresholds_p{percentile}.npz')
    io.save_thresholds(path, diffrs.thresholds_from_log_ratios(log_ratios, percentile))
    cfg.sampler.thresholds = path
  return cfg


def draw_setting(config: ml_collections.ConfigDict, setting: Row, seed: int, num: int,
                 batch: int, models, workdir: str) -> tuple[np.ndarray, dict, float]:
  """Samples ``num`` digits with one row and seed through the driver's `Sampler`:
  ``(images, per-sample stats, sampling seconds)``."""
  cfg = setting_config(config, setting, seed, num, batch, workdir)
  sampler = sampling.Sampler(cfg, models, workdir)
  t0 = time.perf_counter()
  images, stats, _ = sampler.draw(0, num, progress=f'{config.testbed} {setting.label} seed {seed}')
  return images, stats, time.perf_counter() - t0


# ----------------------------------------------------------------------------- content keys

# The code whose source decides the samples and their scores.
CODE_GLOBS = ('isir_jax/samplers/*.py', 'isir_jax/sampling.py', 'isir_jax/parallel.py',
              'isir_jax/denoiser.py', 'isir_jax/discriminator.py', 'isir_jax/networks/*.py',
              'isir_jax/fid_math.py', 'isir_jax/train/feature_net.py',
              'isir_jax/train/digits_data.py', 'benchmarks/digit_scores.py')


@functools.lru_cache(maxsize=None)
def files_digest(*paths: str) -> str:
  """SHA-256 over the relative names and bytes of the files under ``paths`` (files or dirs)."""
  h = hashlib.sha256()
  for path in paths:
    files = ([path] if os.path.isfile(path) else
             sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs))
    if not files:
      raise FileNotFoundError(f'{path}: nothing to hash (no such file or empty directory)')
    for f in files:
      h.update(os.path.relpath(f, os.path.dirname(path)).encode() + b'\0')
      with open(f, 'rb') as fh:
        h.update(hashlib.sha256(fh.read()).digest())
  return h.hexdigest()


def code_digest(root: str = ROOT) -> str:
  """`files_digest` of the sampling and scoring source (`CODE_GLOBS`)."""
  files = sorted(f for g in CODE_GLOBS for f in glob.glob(os.path.join(root, g)))
  return files_digest(*files)


def run_content(cfg: ml_collections.ConfigDict, code: str) -> str:
  """The content key of one run: its full run config (sampler settings with the DiffRS
  thresholds file replaced by its bytes' hash, sample section, model dtype and kind, seed),
  the bytes of the model and reference files it reads, and ``code`` (`code_digest`).
  Paths and names are left out, so the key moves with the checkout but not with a label."""
  sampler = cfg.sampler.to_dict()
  if sampler.get('thresholds'):
    sampler['thresholds'] = files_digest(sampler['thresholds'])
  models = [cfg.model.denoiser] + ([cfg.model.discriminator] if sampler['name'] != 'edm' else [])
  payload = dict(sampler=sampler, sample=cfg.sample.to_dict(), seed=cfg.seed,
                 model={k: v for k, v in cfg.model.to_dict().items()
                        if k not in ('denoiser', 'discriminator')},
                 models=[files_digest(m) for m in models],
                 reference=files_digest(cfg.demo.feature_net, cfg.data.path, cfg.demo.ref_stats),
                 code=code)
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Job:
  """One (row, seed) of a testbed, with its content key."""
  testbed: str
  row: Row
  seed: int
  content: str


def collect(runs: dict, jobs: list[Job], draw: Callable[[Job], dict],
            save: Callable[[], None] = lambda: None) -> dict:
  """The run of each job: the stored one of the same content, else ``draw(job)`` (stored).

  Args:
    runs: content key -> run dict; updated in place.
    jobs: the jobs, in order.
    draw: samples and scores one job.
    save: called after each new run (writes ``runs``).

  Returns:
    ``(label, seed)`` -> run, for the jobs.
  """
  out = {}
  for job in jobs:
    if job.content not in runs:
      runs[job.content] = dict(draw(job), testbed=job.testbed, label=job.row.label,
                               seed=job.seed, content=job.content)
      save()
    out[(job.row.label, job.seed)] = runs[job.content]
  return out


# ----------------------------------------------------------------------------- tables


def by_seed(results: dict, label: str, seeds) -> dict:
  """seed -> run of ``label`` on ``seeds`` (those present)."""
  return {s: results[(label, s)] for s in seeds if (label, s) in results}


@dataclasses.dataclass
class Selection:
  """A tuned knob's validation result."""
  tuned: Tuned
  value: Any
  eligible: list
  means: dict        # value -> metric -> mean over the validation seeds
  diffs: dict        # value -> metric -> Difference to EDM on the same kernel


def choose(tuned: Tuned, values, results: dict, seeds, primary: str) -> Selection:
  """Applies `verdicts.SELECTION_RULE` to a tuned knob's validation runs."""
  base = by_seed(results, KERNEL_BASELINES[tuned.kernel], seeds)
  means, diffs = {}, {}
  for v in values:
    runs = by_seed(results, tuned.row(v).label, seeds)
    means[v] = {m: float(np.mean([r[m] for r in runs.values()])) for m in digit_scores.METRICS}
    diffs[v] = verdicts.compare(runs, base, digit_scores.METRICS)
  value, eligible = verdicts.select({v: (means[v][primary], diffs[v]) for v in values},
                                    primary, tuned.default)
  return Selection(tuned, value, eligible, means, diffs)


def summarise(results: dict, rows: list[Row], seeds, primary: str, costs: cost.NetworkCosts,
              cifar10: cost.NetworkCosts) -> list[dict]:
  """Per row: metric means over the test seeds, paired differences to the default EDM and
  to EDM on its kernel with raw and Holm-adjusted verdicts, and costs."""
  metrics = digit_scores.METRICS + ('fd_all',)
  out = []
  for r in rows:
    rs = by_seed(results, r.label, seeds)
    if not rs:
      continue
    first = next(iter(rs.values()))
    row = dict(label=r.label, kernel=r.kernel, seeds=len(rs),
               **{m: float(np.mean([x[m] for x in rs.values()])) for m in metrics})
    for key in ('nfe', 'disc_evals', 'disc_grads'):
      row[key] = float(np.mean([x['stats'].get(key, np.nan) for x in rs.values()]))
    row['gflop'] = cost.gflop_per_sample(row, costs)
    row['gflop_cifar10'] = cost.gflop_per_sample(row, cifar10)
    row['seconds'] = float(np.mean([x['seconds'] for x in rs.values()]))
    row['extra'] = ', '.join(f'{k} {np.mean([x["stats"][k] for x in rs.values()]):.2f}'
                             for k in EXTRA_STATS if k in first['stats'])
    for name, base_label in (('vs_edm', BASELINE), ('vs_kernel', KERNEL_BASELINES[r.kernel])):
      if r.label == base_label:
        row[name] = None
        continue
      row[name] = verdicts.compare(rs, by_seed(results, base_label, seeds),
                                   digit_scores.METRICS)
    out.append(row)
  for name in ('vs_edm', 'vs_kernel'):
    family = [x for x in out if x[name] is not None]
    adjusted = verdicts.holm([x[name][primary].p for x in family])
    for x, p in zip(family, adjusted):
      x[f'{name}_verdict'] = verdicts.verdict(x[name], primary)
      x[f'{name}_holm_p'] = float(p)
      x[f'{name}_holm'] = verdicts.verdict(x[name], primary, primary_p=float(p))
  return out


def _diff_cells(diffs: dict) -> str:
  return ' | '.join(diffs[m].format(_PLACES[m]) for m in digit_scores.METRICS)


def testbed_markdown(testbed: str, rows: list[dict], selections: list[Selection],
                     floor: dict, ref: digit_scores.Reference, val_seeds, note: str) -> list[str]:
  """The section of one testbed: verdicts, differences, the selection and the floor."""
  primary = verdicts.METRIC_NAMES[PRIMARY[testbed]]
  fmt = lambda m, v: f'{v:.{_PLACES[m]}f}'
  lines = [f'## {testbed}', '', note, '',
           f'Primary metric: **{primary}**. Verdicts vs EDM (Heun, 18 steps) and vs EDM on the '
           'row\'s own kernel; "raw" judges the primary metric at its 95% interval, "Holm" at '
           'its p-value Holm-adjusted over the rows of the column; the other metrics are '
           'guards judged at their raw 95% intervals.', '',
           '| setting | kernel | class-freq error | FD-digits | precision | recall | '
           'FD (all digits) | vs EDM: raw | Holm | vs same-kernel EDM: raw | Holm | NFE | '
           'disc fwd | disc grad | GFLOP/sample | at CIFAR-10 sizes | s/run | seeds | notes |',
           '|' + '---|' * 19]
  for r in rows:
    cells = [r['label'], r['kernel']] + [fmt(m, r[m]) for m in
                                         ('class_error', 'fd', 'precision', 'recall', 'fd_all')]
    for name in ('vs_edm', 'vs_kernel'):
      cells += (['(baseline)', ''] if r[name] is None else
                [r[f'{name}_verdict'], f'{r[f"{name}_holm"]} (p {r[f"{name}_holm_p"]:.3f})'])
    cells += [f'{r["nfe"]:.1f}', f'{r["disc_evals"]:.1f}', f'{r["disc_grads"]:.1f}',
              f'{r["gflop"]:.3f}', f'{r["gflop_cifar10"]:.0f}', f'{r["seconds"]:.1f}',
              str(r['seeds']), r['extra']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  cells = ['real digits (floor)', '-'] + [
      fmt(m, floor[m]) for m in ('class_error', 'fd', 'precision', 'recall', 'fd_all')]
  lines.append('| ' + ' | '.join(cells + [''] * (19 - len(cells))) + ' |')
  lines += ['', (f'Floor: {floor["count"]} real digits of the feature net\'s training split '
                 '(0-1499) per test seed, scored like a sampler\'s output; the reference of '
                 'FD-digits, precision and recall is its held-out split (digits 1500-1796, '
                 f'297; classifier accuracy there {ref.heldout_accuracy:.3f}). "FD (all '
                 'digits)" uses the statistics of all 1,797 digits, which the feature net '
                 'partly trained on. Notes: mean ESS (ISIR, SMC), acceptance (DiffRS); for SMC '
                 'the distinct ancestors left per group, their effective number (lineages) and '
                 'near_duplicates, the share of outputs closer to another sample of their group '
                 f'than {DUPLICATE_FRACTION:g} x the median pixel distance from a real training '
                 'digit to its nearest other one.'), '']
  metric_head = 'class-freq error | FD-digits | precision | recall'
  for name, title in (('vs_edm', 'EDM (Heun, 18 steps)'), ('vs_kernel', 'EDM on the same kernel')):
    shown = [r for r in rows if r[name] is not None and
             (name == 'vs_edm' or KERNEL_BASELINES[r['kernel']] != BASELINE)]
    if not shown:
      continue
    lines += [f'Differences to {title}: mean [95% t-interval] over the test seeds.', '',
              f'| setting | {metric_head} | p ({primary}) | Holm p |', '|' + '---|' * 7]
    lines += [f'| {r["label"]} | {_diff_cells(r[name])} | {r[name][PRIMARY[testbed]].p:.3f} | '
              f'{r[f"{name}_holm_p"]:.3f} |' for r in shown]
    lines.append('')
  if selections:
    lines += [f'Tuned knobs, chosen on the validation seeds {", ".join(map(str, val_seeds))}: '
              f'{verdicts.SELECTION_RULE}. Differences to EDM on the same kernel.', '',
              f'| knob | value | {metric_head} | vs same-kernel EDM: {metric_head} | eligible | '
              'chosen |', '|' + '---|' * 12]
    for sel in selections:
      for v, means in sel.means.items():
        lines.append(f'| {sel.tuned.label} | {v:g} | ' +
                     ' | '.join(fmt(m, means[m]) for m in digit_scores.METRICS) +
                     f' | {_diff_cells(sel.diffs[v])} | {"yes" if v in sel.eligible else "no"} '
                     f'| {"**chosen**" if v == sel.value else ""} |')
    lines.append('')
    for sel in selections:
      where = (f'`isir_jax/pretrained.py` TUNED[{testbed!r}][{sel.tuned.config_section!r}]'
               f'[{sel.tuned.knob!r}]' if sel.tuned.config_section else 'no demo method')
      lines.append(f'- {sel.tuned.label}: {sel.tuned.knob} = {sel.value:g} '
                   f'({"rule" if sel.eligible else "no candidate eligible: default"}); '
                   f'used by {where}.')
    lines.append('')
  return lines


def markdown(sections: list[list[str]], args: dict) -> str:
  lines = ['# Sample quality and cost on the learned digits testbeds', '',
           f'Command: `{args["command"]}`  ',
           f'{args["num_samples"]} samples per setting and seed; test seeds '
           f'{", ".join(map(str, args["seeds"]))}, validation seeds '
           f'{", ".join(map(str, args["val_seeds"]))} (the same keys for every setting); the '
           'committed digits models. Differences are paired on the seed: setting minus EDM, '
           'mean [95% t-interval]. Lower is better for the class-frequency error and FD, higher '
           'for precision and recall (k-NN manifolds, k = 3, in the feature net\'s space). A '
           'verdict is "better" only when the primary metric improves beyond noise and no other '
           'metric is significantly worse. Cost per sample: denoiser evaluations (NFE), '
           'discriminator forward evaluations and gradients, and GFLOP at the digits network '
           'sizes and, for the same counts, at the CIFAR-10 sizes (XLA cost analysis, '
           f'`benchmarks.cost`). Seconds: sampling wall time per run on {args["machine"]}, '
           'shared with other work.', '']
  for section in sections:
    lines += section
  return '\n'.join(lines)


def plot(path: str, rows: list[dict], metric: str, title: str) -> None:
  points = [plotting.Point(r['label'], r['gflop'], r[metric], r['label'].split(' ')[0])
            for r in rows if np.isfinite(r['gflop'])]
  plotting.scatter_log_x(path, points, xlabel='GFLOP / sample (log)',
                         ylabel=f'{metric.replace("_", " ")} (mean over test seeds)', title=title)


def discriminator_note(config: ml_collections.ConfigDict) -> str:
  """One line on the testbed's discriminator: its held-out accuracy and BCE."""
  with open(os.path.join(config.model.discriminator, 'config.json')) as f:
    report = json.load(f).get('training', {})
  if 'heldout_accuracy' not in report:
    return 'Discriminator: no held-out metrics recorded.'
  return (f'Discriminator: {report["num_real"]} real vs {report["num_generated"]} generated '
          f'digits, {report["heldout_fraction"]:.0%} held out; held-out accuracy '
          f'{report["heldout_accuracy"]:.3f}, BCE {report["heldout_bce"]:.4f} (log 2 = 0.6931).')


# ----------------------------------------------------------------------------- main


def duplicate_distance(images: np.ndarray, fraction: float = DUPLICATE_FRACTION) -> float:
  """``fraction`` of the median pixel-space distance from a real digit to its nearest other
  real digit: a generated digit closer than this to another of its SMC group is a
  near-duplicate."""
  x = np.asarray(images, np.float64).reshape(len(images), -1)
  sq = (x ** 2).sum(1)
  d2 = sq[:, None] + sq[None] - 2 * x @ x.T
  np.fill_diagonal(d2, np.inf)
  return fraction * float(np.median(np.sqrt(np.maximum(d2.min(1), 0.0))))


class Runner:
  """Draws and scores the jobs of one testbed, resuming from ``runs`` by content."""

  def __init__(self, testbed: str, tiny: bool, runs: dict, save: Callable[[], None]):
    self.testbed, self.runs, self.save = testbed, runs, save
    self.config = testbed_config(testbed, tiny)
    self.models = sampling.load_models(self.config, with_discriminator=True)
    self.ref = digit_scores.reference(self.config)
    self.code = code_digest()
    self.workdir = tempfile.TemporaryDirectory(prefix='quality-')   # DiffRS thresholds
    self.duplicate_distance = duplicate_distance(self.ref.train_images)

  def jobs(self, rows: list[Row], seeds, num: int, batch: int) -> list[Job]:
    """Seed-major, so that an interrupted run has every row at the first seeds."""
    return [Job(self.testbed, r, s, run_content(
        setting_config(self.config, r, s, num, batch, self.workdir.name), self.code))
            for s in seeds for r in rows]

  def run(self, rows: list[Row], seeds, num: int, batch: int) -> dict:
    def draw(job: Job) -> dict:
      images, stats, seconds = draw_setting(self.config, job.row, job.seed, num, batch,
                                            self.models, self.workdir.name)
      run = dict(seconds=seconds, settings=job.row.settings, section=job.row.section,
                 stats={k: float(np.mean(v)) for k, v in stats.items()},
                 **digit_scores.score(images, self.ref))
      if 'group_nn_dist' in stats:   # SMC: outputs that are near-copies within their group
        run['stats']['near_duplicates'] = float(np.mean(
            np.asarray(stats['group_nn_dist']) < self.duplicate_distance))
      print(f'{self.testbed} {job.row.label} seed {job.seed}: class error '
            f'{run["class_error"]:.3f}, FD {run["fd"]:.2f}, precision {run["precision"]:.3f}, '
            f'recall {run["recall"]:.3f}, {sampling.format_stats(stats)}, {seconds:.1f} s',
            flush=True)
      return run
    return collect(self.runs, self.jobs(rows, seeds, num, batch), draw, self.save)


def run_testbed(testbed: str, tiny: bool, num: int, batch: int, seeds, val_seeds, runs: dict,
                save: Callable[[], None]) -> tuple[list[str], list[dict], dict]:
  """Validation (tuned knobs), then test rows, of one testbed: its markdown section, its
  table rows and its chosen values."""
  runner = Runner(testbed, tiny, runs, save)
  primary = PRIMARY[testbed]
  entries = sweep(testbed, tiny, _ONLY.value)
  tuned = [e for e in entries if isinstance(e, Tuned)]
  results = runner.run(with_baselines([t.row(v) for t in tuned for v in candidates(t, tiny)],
                                      default=False), val_seeds, num, batch)
  selections = [choose(t, candidates(t, tiny), results, val_seeds, primary) for t in tuned]
  chosen = {s.tuned.label: s.tuned.row(s.value, chosen=True) for s in selections}
  rows = with_baselines([chosen[e.label] if isinstance(e, Tuned) else e for e in entries])
  results = runner.run(rows, seeds, num, batch)
  cifar10 = cost.cifar10_costs()
  costs = cost.measure(*runner.models, runner.models[0].shape)
  table = summarise(results, rows, seeds, primary, costs, cifar10)
  floors = [digit_scores.floor(runner.ref, num, s) for s in seeds]
  floor = {m: float(np.mean([f[m] for f in floors])) for m in floors[0]}
  floor['count'] = min(num, len(runner.ref.train_images))
  section = testbed_markdown(testbed, table, selections, floor, runner.ref, val_seeds,
                             discriminator_note(runner.config))
  choices = {s.tuned.label: dict(value=s.value, knob=s.tuned.knob,
                                 config_section=s.tuned.config_section,
                                 eligible=s.eligible, rule=verdicts.SELECTION_RULE)
             for s in selections}
  return section, table, choices


def main(argv):
  del argv
  tiny = _TINY.value
  if tiny:
    num, seeds, val_seeds = 8, [0, 1], [100, 101]
  else:
    num, seeds, val_seeds = (_NUM_SAMPLES.value, list(range(_SEEDS.value)),
                             [int(s) for s in _VAL_SEEDS.value])
  os.makedirs(_OUT.value, exist_ok=True)
  json_path = os.path.join(_OUT.value, 'quality.json')
  # Each (row, seed) builds its sampler anew; the seeds of a row share one program.
  jax.config.update('jax_compilation_cache_dir', _XLA_CACHE.value)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  flags_used = (' --tiny' if tiny else f' --num_samples={num} --seeds={len(seeds)} '
                f'--val_seeds={",".join(map(str, val_seeds))}')
  args = dict(num_samples=num, seeds=seeds, val_seeds=val_seeds,
              command='python -m benchmarks.quality' + flags_used,
              machine=f'{jax.devices()[0].device_kind}, {os.cpu_count()} cores')
  saved = {}
  if os.path.exists(json_path):
    with open(json_path) as f:
      saved = json.load(f)
  # Runs keyed by their content (older layouts are dropped).
  runs = {k: v for k, v in saved.get('runs', {}).items() if v.get('content') == k}
  chosen = dict(saved.get('chosen', {}))

  def save():
    io.atomic_write(json_path, lambda f: f.write(json.dumps(
        {'args': args, 'chosen': chosen, 'runs': runs}, indent=1).encode()))

  sections = []
  for testbed in _TESTBEDS.value:
    section, table, chosen[testbed] = run_testbed(testbed, tiny, num, _BATCH.value, seeds,
                                                  val_seeds, runs, save)
    sections.append(section)
    save()
    metric = PRIMARY[testbed]
    plot(os.path.join(_OUT.value, f'quality_{testbed}.png'), table, metric,
         f'digits-{testbed}: {metric} vs compute (test seeds)')
  text = markdown(sections, args)
  io.atomic_write(os.path.join(_OUT.value, 'quality.md'), lambda f: f.write(text.encode()))
  print(text)


if __name__ == '__main__':
  app.run(main)
