"""Training: the shared loop (batches, resume), the losses, and a few steps of each trainer."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from isir_jax import discriminator, vpsde
from isir_jax.denoiser import load_denoiser
from isir_jax.train import digits_data
from isir_jax.train import feature_net
from isir_jax.train import loop
from isir_jax.train import losses
from isir_jax.train import trainers


def _first_last(history):
  return history[0]['loss'], history[-1]['loss']


def test_digits_data():
  images, labels = digits_data.load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
  assert images.min() == -1.0 and images.max() == 1.0
  assert len(np.unique(images)) == 17          # 16 grey levels + 0
  assert np.bincount(labels).min() >= 170      # ~180 of each digit


def test_batch_indices_are_epochs_and_pure():
  n, b = 10, 3
  epoch0 = np.concatenate([loop.batch_indices(n, b, 7, s) for s in range(3)])
  assert len(set(epoch0.tolist())) == 9        # no repeats within an epoch, last partial dropped
  np.testing.assert_array_equal(loop.batch_indices(n, b, 7, 4), loop.batch_indices(n, b, 7, 4))
  assert not np.array_equal(loop.batch_indices(n, b, 7, 0), loop.batch_indices(n, b, 7, 3))


def test_importance_sampled_vp_time_matches_its_density():
  tau = np.asarray(losses.sample_vp_time(jax.random.key(0), 200_000))
  assert 1e-5 <= tau.min() and tau.max() <= 1.0
  hist, edges = np.histogram(tau, bins=10, range=(0.1, 1.0))
  centres = (edges[1:] + edges[:-1]) / 2
  expected = np.asarray(losses.importance_time_density(jnp.asarray(centres)))
  np.testing.assert_allclose(hist / len(tau) / np.diff(edges), expected, rtol=0.05)


def test_perturb_vp_matches_edm_sigma():
  # mean * x + std * eps at tau(sigma) is mean * (x + sigma * eps): the discriminator's input.
  sigma = jnp.array([0.1, 1.0, 10.0])
  tau = vpsde.vp_time(sigma)
  x = jnp.ones((3, 2, 2, 1))
  key = jax.random.key(1)
  eps = jax.random.normal(key, x.shape)
  np.testing.assert_allclose(losses.perturb_vp(x, tau, key),
                             vpsde.vp_mean(tau)[:, None, None, None] * (x + sigma[:, None, None, None] * eps),
                             rtol=1e-4, atol=1e-5)


def test_load_images_formats(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / 'a.npz', arr_0=x)
  np.savez(tmp_path / 'b.npz', samples=x, label=np.eye(10)[[1, 2, 3, 4, 5]])
  img, lab = trainers.load_images(str(tmp_path / 'a.npz'))
  assert lab is None and img.min() >= -1 and img.max() <= 1
  np.testing.assert_allclose(img, x / 127.5 - 1, atol=1e-6)
  _, lab = trainers.load_images(str(tmp_path / 'b.npz'))
  np.testing.assert_array_equal(lab, [1, 2, 3, 4, 5])
  np.savez(tmp_path / 'c.npz', images=x)
  with pytest.raises(ValueError, match='c.npz'):
    trainers.load_images(str(tmp_path / 'c.npz'))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """The tiny digits config, every output redirected to a temporary directory."""
  root = tmp_path_factory.mktemp('train')
  config = digits.get_config('edm,tiny')
  for name in ('feature_net', 'denoiser', 'classifier', 'discriminator'):
    config.train[name].out = str(root / name)
  config.train.feature_net.ref_stats = str(root / 'stats.npz')
  config.train.discriminator.classifier = str(root / 'classifier')
  config.train.discriminator.gen_dir = str(root / 'gen')
  return config, str(root / 'work')


def test_feature_net_trains_and_resumes(tiny, tmp_path):
  config, workdir = tiny
  history = trainers.train_feature_net(config, workdir)
  first, last = _first_last(history)
  assert last < 0.8 * first
  assert 0.0 <= history[-1]['test_accuracy'] <= 1.0
  net = feature_net.load_feature_net(config.train.feature_net.out)
  images, _ = digits_data.load_digits()
  assert net.features(images[:5]).shape == (5, 8)
  assert os.path.isfile(config.train.feature_net.ref_stats)

  # Resume: 20 steps, then a rerun to 30, equals an uninterrupted 30-step run.
  kw = dict(num_steps=20, batch_size=16, channels=(8, 8, 8), feature_dim=8, log_every=10,
            lr=1e-2)
  feature_net.train_feature_net(str(tmp_path / 'a'), str(tmp_path / 'wa'), **kw)
  kw['num_steps'] = 30
  resumed = feature_net.train_feature_net(str(tmp_path / 'a'), str(tmp_path / 'wa'), **kw)
  assert [h['step'] for h in resumed] == [30]
  feature_net.train_feature_net(str(tmp_path / 'b'), str(tmp_path / 'wb'), **kw)
  pa = feature_net.load_feature_net(str(tmp_path / 'a')).params
  pb = feature_net.load_feature_net(str(tmp_path / 'b')).params
  jax.tree_util.tree_map(np.testing.assert_array_equal, pa, pb)


def test_denoiser_loss_decreases(tiny):
  config, workdir = tiny
  first, last = _first_last(trainers.train_denoiser(config, workdir))
  assert last < 0.8 * first
  den = load_denoiser(config.train.denoiser.out)
  out = den(jnp.zeros((2, 8, 8, 1)), jnp.array([0.5, 5.0]))
  assert out.shape == (2, 8, 8, 1) and bool(jnp.isfinite(out).all())


def test_classifier_then_discriminator(tiny):
  config, workdir = tiny
  first, last = _first_last(trainers.train_classifier(config, workdir))
  assert last < first
  # "Generated" digits: the real ones with their rows reversed (an easy, real difference).
  images, labels = digits_data.load_digits()
  os.makedirs(config.train.discriminator.gen_dir)
  fake = np.clip(images[::-1, ::-1] * 127.5 + 128, 0, 255).astype(np.uint8)
  np.savez(os.path.join(config.train.discriminator.gen_dir, 'samples_0.npz'),
           samples=fake[:64], label=labels[:64])
  history = trainers.train_discriminator(config, workdir)
  first, last = _first_last(history)
  assert last < first
  # 64 real and 64 generated digits, 10% of each held out: the held-out metrics are reported.
  with open(os.path.join(config.train.discriminator.out, 'config.json')) as f:
    report = json.load(f)['training']
  assert (report['num_real'], report['num_generated']) == (64, 64)
  assert 0 <= report['heldout_accuracy'] <= 1 and np.isfinite(report['heldout_bce'])
  assert history[-1]['heldout_bce'] == report['heldout_bce']
  disc = discriminator.load_discriminator(config.train.discriminator.out)
  x = jnp.asarray(images[:4])
  g, d = disc.guidance(x, jnp.full((4,), 0.5))
  assert d.shape == (4,) and bool(jnp.isfinite(g).all())


def test_early_stopping_keeps_the_best_held_out_params(tmp_path):
  """Training pulls w to 1; the held-out optimum is 0.3: the run stops past it, keeps ~0.3,
  and a rerun of the stopped run does not train further."""
  data = {'x': np.zeros((8, 1), np.float32)}
  loss_fn = lambda w, batch, key: ((w - 1.0) ** 2, {})
  evaluate = lambda w: {'loss': (w - 0.3) ** 2}
  kw = dict(optimizer=loop.make_optimizer(0.01), num_steps=1000, batch_size=4,
            workdir=str(tmp_path), evaluate=evaluate, eval_every=5, patience=3, log_every=50)
  state, history = loop.train(loss_fn, jnp.zeros(()), data, **kw)
  stopped = int(state.step)
  assert stopped < 1000 and stopped - int(state.best_step) == 15
  assert abs(float(state.best_params) - 0.3) < 0.03 and float(state.params) > 0.3
  assert history[-1]['step'] == stopped and 'heldout_loss' in history[-1]
  again, history = loop.train(loss_fn, jnp.zeros(()), data, **kw)
  assert int(again.step) == stopped and history == []
  assert float(again.best_params) == float(state.best_params)
