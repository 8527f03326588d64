"""The bundled digits: committed assets, the digits-skew testbed, FD-digits, the demo and the
quality benchmark end to end (tiny), and the one sampling path they share with the driver."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import quality
from configs import digits
from isir_jax import demo
from isir_jax import io
from isir_jax import run_lib
from isir_jax import sampling
from isir_jax.train import digits_data
from isir_jax.train import feature_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def net():
  return feature_net.load_feature_net(digits.get_config().demo.feature_net)


def test_fd_digits_real_halves_far_below_real_vs_noise(net, tmp_path):
  images, _ = digits_data.load_digits()
  perm = np.random.default_rng(0).permutation(len(images))
  a, b = images[perm[:898]], images[perm[898:]]
  # Reference statistics of one half; the other half is a held-out real set.
  stats = str(tmp_path / 'half.npz')
  feature_net.reference_stats(net, a, stats)
  fd_real = feature_net.fd_digits(net, b, stats)
  noise = np.random.default_rng(1).uniform(-1, 1, a.shape).astype(np.float32)
  fd_noise = feature_net.fd_digits(net, noise, stats)
  blurred = 0.5 * (a + np.roll(a, 1, axis=2))  # a milder corruption lies in between
  fd_blur = feature_net.fd_digits(net, blurred, stats)
  assert fd_real < 0.05 * fd_noise
  assert fd_real < fd_blur < fd_noise


def test_feature_net_classifies_held_out_digits(net):
  images, labels = digits_data.load_digits()
  x, y = digits_data.split(images, labels, train=False)
  assert (net.predict(x) == y).mean() > 0.9


def test_skewed_resampling_has_the_asked_class_frequencies():
  _, labels = digits_data.load_digits()
  idx = digits_data.class_resample(labels, digits_data.SKEW_WEIGHTS, seed=3)
  freq = digits_data.class_frequencies(labels[idx])
  np.testing.assert_array_equal(freq, [0.16] * 5 + [0.04] * 5)   # exact on the index set
  # Every image of the 4x classes is used, each 3 or 4 times; the 1x classes use distinct ones.
  for c in range(5):
    uses = np.unique(idx[labels[idx] == c], return_counts=True)[1]
    assert set(uses) <= {3, 4} and len(uses) == np.sum(labels == c)
  for c in range(5, 10):
    assert len(np.unique(idx[labels[idx] == c])) == np.sum(labels[idx] == c)
  # The skew's own error is the testbed's known answer: total variation 0.3 from uniform.
  assert digits_data.class_frequency_error(labels[idx], np.full(10, 0.1)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match='class_weights must be 10 non-negative ints'):
    digits_data.class_resample(labels, (1, 2))


def test_class_frequency_error_of_real_digits_is_near_zero(net):
  images, labels = digits_data.load_digits()
  reference = digits_data.class_frequencies(labels)
  assert digits_data.class_frequency_error(labels, reference) == 0.0
  # Through the clean-digit classifier: only its few mistakes remain.
  assert digits_data.class_frequency_error(net.predict(images), reference) < 0.02


def test_committed_models_give_finite_samples():
  config = demo.method_config(digits.get_config('edm'), 'edm')
  config.sampler.num_steps = 4
  config.sample.batch_size = 4
  models = sampling.load_models(config, with_discriminator=True)
  images, stats, labels = sampling.Sampler(config, models, '').draw(0, 4)
  assert images.shape == (4, 8, 8, 1) and np.isfinite(images).all() and labels is None
  np.testing.assert_array_equal(stats['nfe'], 7)
  d = models[1].log_ratio(jnp.asarray(images), jnp.full((4,), 0.5))
  assert d.shape == (4,) and bool(jnp.isfinite(d).all())
  for name in ('denoiser', 'discriminator'):
    for testbed in ('natural', 'skew'):
      path = getattr(digits.get_config(testbed if testbed == 'natural' else None).model, name)
      assert os.path.isfile(os.path.join(path, 'config.json')), path


def test_discriminators_report_held_out_metrics():
  for arg in ('natural', None):
    with open(os.path.join(digits.get_config(arg).model.discriminator, 'config.json')) as f:
      report = json.load(f)['training']
    assert report['num_generated'] >= 10000
    assert 0.5 < report['heldout_accuracy'] <= 1 and report['heldout_bce'] < np.log(2)


def test_demo_tiny_end_to_end(tmp_path, capsys):
  config = digits.get_config('tiny')
  rows = demo.demo(config, str(tmp_path))
  assert [r.method for r in rows] == list(config.demo.methods)
  for r in rows:
    assert r.images.shape == (8, 8, 8, 1) and 0 <= r.class_error <= 1 and r.class_error_se >= 0
    assert os.path.getsize(tmp_path / f'digits_{r.method}.png') > 0
  out = capsys.readouterr().out
  assert 'class-freq error' in out and all(m in out for m in config.demo.methods)
  assert 'FD-digits is left out' in out   # 8 samples: too few for FD to mean anything
  nfe = {r.method: float(np.mean(r.stats['nfe'])) for r in rows}
  assert nfe['edm'] == 35 and nfe['isir_stochastic'] > nfe['edm']


def test_demo_driver_and_benchmark_draw_the_same_images(tmp_path):
  """The one sampling path: same config, keys and indices give the same saved uint8."""
  config = digits.get_config('edm,tiny')
  models = sampling.load_models(config, with_discriminator=True)
  net = feature_net.load_feature_net(config.demo.feature_net)
  reference = demo.reference_frequencies(config)
  n = config.demo.num_samples
  for method, label in (('edm', 'edm'), ('isir_stochastic', 'isir churn N=4 K=2')):
    from_demo = demo.run_method(config, method, models, net, reference, str(tmp_path)).images
    run = demo.method_config(config, method)
    run_lib.sample(run, str(tmp_path / method))
    from_driver = io.read_shard(io.shard_path(str(tmp_path / method), 0))[0]
    from_benchmark = quality.draw_setting(config, quality.row(label), config.seed, n, n, models,
                                          str(tmp_path))[0]
    np.testing.assert_array_equal(io.to_uint8(from_demo), from_driver)
    np.testing.assert_array_equal(io.to_uint8(from_benchmark), from_driver)


def test_quality_benchmark_tiny_end_to_end(tmp_path):
  cmd = [sys.executable, '-m', 'benchmarks.quality', '--tiny', '--testbeds=skew',
         f'--out={tmp_path}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = (tmp_path / 'quality.md').read_text()
  table = text[text.index('| setting | kernel |'):].split('\n\n')[0]
  rows = {r[0]: r for r in ([c.strip() for c in line.split('|')[1:-1]]
                            for line in table.splitlines()[2:])}
  # The tiny sweep, its same-kernel baseline (edm churn), the value chosen for DG's w1 on
  # the validation seeds, and the floor of real digits.
  chosen = json.loads((tmp_path / 'quality.json').read_text())['chosen']['skew']['dg w1']
  assert list(rows) == ['edm', quality.CONTROL, 'edm churn', f'dg w1={chosen["value"]:g} (tuned)',
                        'isir churn N=4 K=1', 'real digits (floor)']
  assert chosen['value'] in (2.0, 4.0) and chosen['config_section'] == 'dg'
  for label, r in rows.items():
    assert 0 <= float(r[2]) <= 1 and 0 <= float(r[4]) <= 1 and 0 <= float(r[5]) <= 1
    if label != 'real digits (floor)':
      assert float(r[11]) >= 1                                   # NFE
  assert rows['edm'][7] == '(baseline)' and rows['edm churn'][9] == '(baseline)'
  assert not rows[quality.CONTROL][7].startswith('better')
  assert 'Tuned knobs, chosen on the validation seeds 100, 101' in text
  assert os.path.getsize(tmp_path / 'quality_skew.png') > 0
  runs = json.loads((tmp_path / 'quality.json').read_text())['runs']
  # Validation: EDM and DG's 2 candidates; test: 5 rows; 2 seeds each.
  assert len(runs) == 2 * 3 + 2 * 5
