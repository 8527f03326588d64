"""DiffRS on the exact testbed: thresholds, acceptance, back-steps, restarts, lanes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isir_jax import io
from isir_jax import samplers, testbed
from isir_jax.samplers import diffrs, edm

TB = testbed.make_testbed('gmm2')
SMALL = dict(num_steps=6, S_churn=40.0)


def sample_keys(seed: int, n: int):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


_JITTED = {}


def diffrs_fn(**settings):
  """Jitted sampler, shared by the tests that use the same settings (one compilation)."""
  key = tuple(sorted((k, id(v) if isinstance(v, diffrs.Thresholds) else v)
                     for k, v in settings.items()))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(samplers.get_sampler('diffrs')(TB.model_denoiser, TB.discriminator,
                                                          shape=TB.shape, **settings))
  return _JITTED[key]


@pytest.fixture(scope='module')
def small_thresholds():
  th, lr = diffrs.estimate_thresholds(TB.model_denoiser, TB.discriminator, sample_keys(100, 512),
                                      shape=TB.shape, rej_percentile=0.9, **SMALL)
  return th, lr


def test_thresholds_are_clipped_quantiles_and_round_trip(small_thresholds, tmp_path):
  th, lr = small_thresholds
  assert lr.shape == (512, 7)
  # The warm-up is EDM sampling with the same keys: its first and last columns are
  # d(x_T, t_0) of the EDM latents and d(x_0, 0) of the EDM samples.
  keys = sample_keys(100, 4)
  t = edm.StepSettings(**SMALL).sigmas(TB.model_denoiser)
  x_t = edm.initial_candidates(keys, jnp.arange(1), t[0], TB.shape)[:, 0]
  x_0, _ = jax.jit(samplers.get_sampler('edm')(TB.model_denoiser, shape=TB.shape, **SMALL))(keys)
  np.testing.assert_allclose(lr[:4, 0], TB.discriminator.log_ratio(x_t, jnp.full([4], t[0])),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lr[:4, -1], TB.discriminator.log_ratio(x_0, jnp.zeros([4])),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(th.log_ratio, np.maximum(np.quantile(lr, 0.9, axis=0), 0),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
      th.increment[1:], np.maximum(np.quantile(np.diff(lr, axis=1), 0.9, axis=0), 0),
      rtol=1e-5, atol=1e-7)
  assert th.increment[0] == 0 and np.all(th.log_ratio >= 0) and np.all(th.increment >= 0)
  path = str(tmp_path / 'thresholds.npz')
  io.save_thresholds(path, th, lr)
  loaded = diffrs.Thresholds(*io.load_thresholds(path))
  np.testing.assert_array_equal(loaded.log_ratio, th.log_ratio)
  np.testing.assert_array_equal(loaded.increment, th.increment)
  np.testing.assert_array_equal(io.load_warmup_log_ratios(path), lr)
  # Samplers know no files: the arrays are the setting, a path is refused.
  diffrs.diffrs_sampler(TB.model_denoiser, TB.discriminator, shape=TB.shape, thresholds=loaded,
                        **SMALL)
  with pytest.raises(TypeError, match='read the file with isir_jax.io.load_thresholds'):
    diffrs.diffrs_sampler(TB.model_denoiser, TB.discriminator, shape=TB.shape, thresholds=path,
                          **SMALL)


def test_diffrs_recovers_true_weights():
  step = dict(num_steps=18, S_churn=40.0)
  th, _ = diffrs.estimate_thresholds(TB.model_denoiser, TB.discriminator, sample_keys(100, 2000),
                                     shape=TB.shape, rej_percentile=0.95, **step)
  x, stats = diffrs_fn(thresholds=th, **step)(sample_keys(0, 2000))
  assert bool(stats['finished'].all())
  np.testing.assert_allclose(TB.weights(x), TB.true.weights, atol=0.03)
  nfe, rate = np.asarray(stats['nfe']), np.asarray(stats['accept_rate'])
  # Rejections cost extra steps; every sample pays at least the plain 35.
  assert nfe.min() >= 35 and nfe.mean() > 36
  assert 0.5 < rate.mean() < 1.0 and rate.min() >= 0


def test_lanes_refill_without_changing_samples(small_thresholds):
  """Each sample depends on its key only: not on its lane, nor on the other samples."""
  th, _ = small_thresholds
  keys = sample_keys(1, 8)
  full, s_full = diffrs_fn(thresholds=th, **SMALL)(keys)
  lanes, s_lanes = diffrs_fn(thresholds=th, slots=3, **SMALL)(keys)
  assert bool(s_lanes['finished'].all())
  np.testing.assert_allclose(lanes, full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(s_lanes['nfe'], s_full['nfe'])
  others = sample_keys(12, 8).at[6].set(keys[6])
  again, s_again = diffrs_fn(thresholds=th, **SMALL)(others)
  np.testing.assert_allclose(again[6], full[6], rtol=1e-5, atol=1e-5)
  assert s_again['nfe'][6] == s_full['nfe'][6]


def test_max_iter_restarts_and_max_loops_cap(small_thresholds):
  th, _ = small_thresholds
  keys = sample_keys(2, 64)
  # max_iter = 2n - 1: any back-step leaves too little budget, so the sample restarts.
  x, stats = diffrs_fn(thresholds=th, max_iter=11, **SMALL)(keys)
  restarts, nfe = np.asarray(stats['restarts']), np.asarray(stats['nfe'])
  assert bool(stats['finished'].all()) and restarts.max() > 0
  assert np.all(nfe[restarts > 0] > 11) and np.all(nfe[restarts == 0] == 11)
  _, capped = diffrs_fn(thresholds=th, max_loops=3, **SMALL)(keys)
  assert not bool(capped['finished'].any())


def test_without_backsteps_only_the_prior_is_tested(small_thresholds):
  th, _ = small_thresholds
  _, stats = diffrs_fn(thresholds=th, backsteps=0, **SMALL)(sample_keys(3, 64))
  assert np.all(np.asarray(stats['nfe']) == 11)
  assert float(stats['accept_rate'].mean()) < 1.0  # some prior draws were rejected


def test_settings_are_checked():
  with pytest.raises(ValueError, match='thresholds are required'):
    samplers.get_sampler('diffrs')(TB.model_denoiser, TB.discriminator, shape=TB.shape)
  bad = diffrs.Thresholds(np.zeros(3), np.zeros(3))
  with pytest.raises(ValueError, match='num_steps \\+ 1'):
    samplers.get_sampler('diffrs')(TB.model_denoiser, TB.discriminator, shape=TB.shape,
                                   num_steps=6, thresholds=bad)


def test_pmap_and_vmap(small_thresholds):
  """sample_fn is pure: pmap over devices and vmap over batches give the jitted samples."""
  th, _ = small_thresholds
  fn = samplers.get_sampler('diffrs')(TB.model_denoiser, TB.discriminator, shape=TB.shape,
                                      thresholds=th, **SMALL)
  keys = sample_keys(5, 8)
  ref, _ = diffrs_fn(thresholds=th, **SMALL)(keys)
  devices = jax.local_device_count()
  mapped, _ = jax.pmap(fn)(keys[:devices * (8 // devices)].reshape(devices, -1))
  np.testing.assert_allclose(mapped.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
  vmapped, _ = jax.jit(jax.vmap(fn))(keys.reshape(2, 4))
  np.testing.assert_allclose(vmapped.reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


class CountingDenoiser:
  """Wraps a denoiser and counts the rows it evaluates at run time (not at trace time)."""

  def __init__(self, inner):
    self.inner, self.rows = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def __call__(self, x, sigma, class_labels=None):
    jax.debug.callback(lambda n: self.rows.append(int(n)), jnp.int32(x.shape[0]))
    return self.inner(x, sigma, class_labels)


def test_one_lane_evaluates_only_what_it_counts(small_thresholds):
  """With one lane no step is evaluated after a rejection or for a finished sample, and no
  Heun stage on the last (Euler) step: run-time evaluations == the reported nfe."""
  th, _ = small_thresholds
  den = CountingDenoiser(TB.model_denoiser)
  fn = jax.jit(samplers.get_sampler('diffrs')(den, TB.discriminator, shape=TB.shape,
                                              thresholds=th, slots=1, **SMALL))
  _, stats = fn(sample_keys(12, 6))
  jax.effects_barrier()
  nfe = np.asarray(stats['nfe'])
  assert float(stats['accept_rate'].mean()) < 1.0  # some tests rejected
  assert sum(den.rows) == nfe.sum() and set(den.rows) == {1}, (sum(den.rows), nfe)
