"""The bundled digits demo: committed assets, FD-digits, and the demo end to end (tiny)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from isir_jax import demo
from isir_jax.train import digits_data
from isir_jax.train import feature_net


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


def test_committed_models_give_finite_samples():
  config = digits.get_config('edm')
  denoiser, discriminator, _ = demo.load_models(config)
  assert (denoiser.img_resolution, denoiser.img_channels) == (8, 8 // 8)
  settings = config.demo.samplers.edm.copy_and_resolve_references()
  settings.num_steps = 4
  fn = demo.build_sampler(settings, denoiser, None)
  images, stats = fn(demo.sample_keys(0, 0, 4), None)
  assert images.shape == (4, 8, 8, 1) and bool(jnp.isfinite(images).all())
  np.testing.assert_array_equal(stats['nfe'], 7)
  d = discriminator.log_ratio(images, jnp.full((4,), 0.5))
  assert d.shape == (4,) and bool(jnp.isfinite(d).all())


def test_demo_tiny_end_to_end(tmp_path, capsys):
  config = digits.get_config('tiny')
  rows = demo.demo(config, str(tmp_path))
  assert [r.method for r in rows] == list(config.demo.methods)
  for r in rows:
    assert r.images.shape == (8, 8, 8, 1) and np.isfinite(r.fd) and r.nfe >= 1
    assert os.path.getsize(tmp_path / f'digits_{r.method}.png') > 0
  out = capsys.readouterr().out
  assert 'FD-digits' in out and all(m in out for m in config.demo.methods)
  # The stochastic ISIR does more work per sample than one deterministic EDM run.
  nfe = {r.method: r.nfe for r in rows}
  assert nfe['edm'] == 35 and nfe['isir_stochastic'] > nfe['edm']
