"""The quality benchmark's statistics, resume by content and the tuned values' round trip."""

import json
import os

import numpy as np
import pytest
import scipy.stats

from benchmarks import quality
from benchmarks import verdicts
from configs import digits
from isir_jax import io
from isir_jax.samplers import diffrs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _diff(mean, half=0.01):
  return verdicts.Difference(mean, mean - half, mean + half, 0.001 if abs(mean) > half else 0.5,
                             5)


def test_paired_interval_and_p_value():
  d = verdicts.paired([1.0, 2.0, 3.0])   # mean 2, sd 1, t(0.975, 2) = 4.303
  half = scipy.stats.t.ppf(0.975, 2) / np.sqrt(3)
  assert (d.mean, d.low, d.high, d.n) == pytest.approx((2.0, 2 - half, 2 + half, 3))
  assert d.p == pytest.approx(scipy.stats.ttest_1samp([1.0, 2.0, 3.0], 0).pvalue)
  assert np.isnan(verdicts.paired([1.0]).low)


def test_holm_adjustment():
  # Sorted 0.01, 0.03, 0.04: 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04).
  np.testing.assert_allclose(verdicts.holm([0.01, 0.04, 0.03, np.nan])[:3], [0.03, 0.06, 0.06])
  assert np.isnan(verdicts.holm([0.01, np.nan])[1])


def test_verdict_needs_the_guards():
  good = dict(class_error=_diff(-0.1), fd=_diff(-5.0), precision=_diff(0.0), recall=_diff(0.0))
  assert verdicts.verdict(good, 'class_error') == 'better'
  # The 4-step control: a lower class error bought with worse FD and precision.
  blur = dict(good, fd=_diff(+30.0), precision=_diff(-0.2))
  assert verdicts.verdict(blur, 'class_error') == 'not better: FD, precision worse'
  assert verdicts.verdict(dict(good, recall=_diff(-0.1)), 'class_error') == (
      'not better: recall worse')
  assert verdicts.verdict(dict(good, class_error=_diff(+0.1)), 'class_error') == 'worse'
  assert verdicts.verdict(good, 'class_error', primary_p=0.2) == 'not significant'
  assert verdicts.verdict(dict(good, fd=_diff(+5.0)), 'fd') == 'worse'


def test_selection_skips_candidates_worse_on_a_guard():
  fine = dict(class_error=_diff(-0.1), fd=_diff(0.0), precision=_diff(0.0), recall=_diff(0.0))
  collapsed = dict(fine, recall=_diff(-0.3))
  value, eligible = verdicts.select({1.0: (0.2, fine), 4.0: (0.1, fine), 8.0: (0.05, collapsed)},
                                    'class_error', default=1.0)
  assert (value, eligible) == (4.0, [1.0, 4.0])
  assert verdicts.select({8.0: (0.05, collapsed)}, 'class_error', default=1.0) == (1.0, [])
  assert verdicts.select({1.0: (6.0, fine), 2.0: (5.0, fine)}, 'fd', 1.0)[0] == 2.0


def test_every_row_has_a_same_kernel_baseline_in_its_sweeps():
  for testbed in quality.SWEEPS:
    rows = quality.with_baselines([e if isinstance(e, quality.Row) else e.row(e.default)
                                   for e in quality.sweep(testbed, tiny=False)])
    labels = [r.label for r in rows]
    assert quality.BASELINE in labels and quality.CONTROL in labels
    for r in rows:
      assert quality.KERNEL_BASELINES[r.kernel] in labels, r.label


def test_changed_setting_under_an_old_label_reruns(monkeypatch):
  calls = []

  def fake_draw(config, setting, seed, num, batch, models, workdir):
    calls.append((setting.label, dict(setting.settings)))
    images = np.random.default_rng(len(calls)).uniform(-1, 1, (num, 8, 8, 1)).astype(np.float32)
    return images, {'nfe': np.full(num, 35)}, 0.0

  monkeypatch.setattr(quality, 'draw_setting', fake_draw)
  runs = {}
  runner = quality.Runner('skew', True, runs, lambda: None)
  old = quality.Row('edm churn', 'edm', quality.CHURN, 'churn')
  first = runner.run([old], [0], 8, 8)
  assert len(calls) == 1
  assert runner.run([old], [0], 8, 8) == first and len(calls) == 1   # same content: reused
  changed = quality.Row('edm churn', 'edm', dict(quality.CHURN, S_churn=6.0), 'churn')
  second = runner.run([changed], [0], 8, 8)
  assert len(calls) == 2 and calls[-1][1]['S_churn'] == 6.0            # same label: rerun
  assert second[('edm churn', 0)]['content'] != first[('edm churn', 0)]['content']
  runner.run([old], [1], 8, 8)
  assert len(calls) == 3                                                # another seed: rerun
  # A tuned value equal to a fixed row's settings reuses that row's run under a new label.
  same = quality.Row('edm churn (again)', 'edm', quality.CHURN, 'churn')
  assert runner.run([same], [0], 8, 8)[('edm churn (again)', 0)] is first[('edm churn', 0)]
  assert len(calls) == 3


def test_content_follows_model_bytes_and_code(tmp_path):
  (tmp_path / 'isir_jax' / 'samplers').mkdir(parents=True)
  source = tmp_path / 'isir_jax' / 'samplers' / 'edm.py'
  source.write_text('a = 1\n')
  (tmp_path / 'model').mkdir()
  (tmp_path / 'model' / 'params').write_bytes(b'\0\1')
  before = quality.code_digest(str(tmp_path))
  model = quality.files_digest(str(tmp_path / 'model'))
  quality.files_digest.cache_clear()
  source.write_text('a = 2\n')
  (tmp_path / 'model' / 'params').write_bytes(b'\0\2')
  assert quality.code_digest(str(tmp_path)) != before
  assert quality.files_digest(str(tmp_path / 'model')) != model
  config = quality.testbed_config('skew', tiny=True)
  cfg = quality.setting_config(config, quality.row('edm'), 0, 8, 8, str(tmp_path))
  key = quality.run_content(cfg, before)
  assert quality.run_content(cfg, before) == key
  assert quality.run_content(cfg, 'other code') != key
  cfg.sample.num_samples = 16
  assert quality.run_content(cfg, before) != key


def test_configs_use_the_values_chosen_on_validation_seeds():
  with open(os.path.join(ROOT, 'benchmarks', 'results', 'quality.json')) as f:
    chosen = json.load(f).get('chosen')
  if not chosen:
    pytest.skip('benchmarks/results/quality.json predates the selection on validation seeds')
  for testbed, knobs in chosen.items():
    for label, c in knobs.items():
      if c['config_section']:
        assert digits.TUNED[testbed][c['config_section']][c['knob']] == c['value'], label


@pytest.mark.parametrize('arg', [None, 'natural'])
def test_committed_diffrs_thresholds_match_the_configured_percentile(arg):
  config = digits.get_config(arg)
  path = config.demo.diffrs_thresholds
  want = diffrs.thresholds_from_log_ratios(io.load_warmup_log_ratios(path),
                                           config.demo.rej_percentile)
  for got, expected in zip(io.load_thresholds(path), want):
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_duplicate_distance_is_a_fraction_of_the_median_nearest_neighbour_distance():
  # Points 0, 1 and 3 on a line: nearest-neighbour distances 1, 1, 2 (median 1).
  images = np.array([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1)
  assert quality.duplicate_distance(images, fraction=0.1) == pytest.approx(0.1)


def test_smc_variants_table_pairs_each_variant_with_its_kernel():
  from benchmarks import smc_variants
  rows = list(smc_variants.BASELINES.values()) + list(smc_variants.VARIANTS)
  assert len({r.label for r in rows}) == len(rows)
  assert {r.kernel for r in smc_variants.VARIANTS} <= set(smc_variants.BASELINES)
  # EDM on the 2M kernel at class error 0.3 on both seeds; a 2M variant 0.1 lower.
  results = {}
  for r in rows:
    for seed, noise in ((100, 0.0), (101, 0.01)):
      error = 0.3 + noise - (0.1 if r.kernel == 'dpmpp_2m_sde' and r.section == 'smc' else 0)
      results[(r.label, seed)] = dict(class_error=error, fd=50.0, precision=0.7, recall=0.9,
                                      stats=dict(disc_evals=11.0))
  lines = smc_variants.table(results, [100, 101]).splitlines()
  assert len(lines) == 2 + len(rows)
  window = next(line for line in lines if line.startswith('| smc dpmpp_2m_sde t>=0.5 |'))
  assert '| 0.205 | 50.000 |' in window and '-0.100 [-0.100, -0.100]' in window
