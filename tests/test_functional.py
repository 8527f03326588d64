"""The functional API: traced numeric settings (one program for a sweep), explicit noise
levels and per-step diagnostics, on the exact 2-D mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isir_jax import samplers, testbed
from isir_jax.samplers import edm

TB = testbed.make_testbed('gmm2')
DEN, DISC = TB.model_denoiser, TB.discriminator
KEYS = jax.random.split(jax.random.key(0), 64)
STEP = dict(num_steps=5)


def assert_same_samples(a, b, atol=2e-4):
  """Equal up to float rounding (vmapped and single programs may round differently): at
  least 95% of the samples agree within ``atol`` (an ISIR choice between nearly equal
  weights may flip under rounding)."""
  diff = np.abs(np.asarray(a) - np.asarray(b)).reshape(len(a), -1).max(axis=1)
  assert np.mean(diff < atol) >= 0.95, np.sort(diff)[-5:]


def _one_program_sweep(run, values):
  """``jit(vmap(run))`` over two value sets: one compiled program, the static runs' results."""
  sweep = jax.jit(jax.vmap(run))
  first = sweep(jnp.asarray(values))
  second = sweep(jnp.asarray(values[::-1]))
  assert sweep._cache_size() == 1    # pylint: disable=protected-access
  return first, second


def test_vmap_over_isir_weight_scale_is_one_program():
  def run(scale):
    return samplers.isir_sample(DEN, DISC, KEYS, shape=TB.shape, S_churn=20.0,
                                num_candidates=4, weight_scale=scale, **STEP)[0]
  x, x_rev = _one_program_sweep(run, [0.5, 2.0])
  static = jax.jit(lambda: run(2.0))()
  assert_same_samples(x[1], static)
  assert_same_samples(x_rev[0], static)
  assert np.abs(np.asarray(x[0]) - np.asarray(x[1])).max() > 0.1


def test_vmap_over_dg_weights_is_one_program():
  def run(w1):
    return samplers.dg_sample(DEN, DISC, KEYS, shape=TB.shape, dg_weight_1st_order=w1,
                              **STEP)
  (x, stats), _ = _one_program_sweep(run, [0.0, 2.0])
  static_x, static_stats = jax.jit(lambda: run(2.0))()
  assert_same_samples(x[1], static_x)
  np.testing.assert_array_equal(stats['disc_grads'][1], static_stats['disc_grads'])
  # A traced weight of 0 still runs its guidance calls, and counts them; its images are EDM's.
  assert int(stats['disc_grads'][0, 0]) == int(static_stats['disc_grads'][0])
  edm_x, _ = samplers.edm_sample(DEN, KEYS, shape=TB.shape, **STEP)
  assert_same_samples(x[0], edm_x)


@pytest.mark.parametrize('name,values', [
    ('S_churn', [0.0, 30.0]), ('S_noise', [1.0, 1.007]), ('eta', [0.3, 1.0])])
def test_step_settings_may_be_traced(name, values):
  base = dict(proposal='ancestral') if name == 'eta' else dict(S_churn=10.0)

  def run(v):
    return samplers.edm_sample(DEN, KEYS, shape=TB.shape, num_steps=10,
                               **dict(base, **{name: v}))[0]
  x, _ = _one_program_sweep(run, values)
  for i, v in enumerate(values):
    # The deterministic ODE (S_churn = 0) amplifies rounding differences to ~2e-4 here.
    assert_same_samples(x[i], jax.jit(lambda v=v: run(v))(), atol=1e-3)


def test_explicit_noise_levels():
  t = edm.StepSettings(**STEP).sigmas(DEN)
  karras, _ = samplers.edm_sample(DEN, KEYS, shape=TB.shape, S_churn=5.0, **STEP)
  explicit, stats = samplers.edm_sample(DEN, KEYS, shape=TB.shape, S_churn=5.0,
                                        noise_levels=np.asarray(t)[:-1])
  np.testing.assert_array_equal(explicit, karras)
  assert int(stats['nfe'][0]) == 9
  with pytest.raises(ValueError, match='strictly decreasing positive'):
    edm.StepSettings(noise_levels=[1.0, 2.0, 0.0])
  with pytest.raises(ValueError, match='num_steps=6 disagrees with the 2 steps'):
    edm.StepSettings(noise_levels=[1.0, 0.5], num_steps=6)


def test_per_step_diagnostics():
  settings = dict(S_churn=20.0, S_min=0.05, S_max=10.0, num_candidates=4, num_steps=6)
  _, plain = samplers.isir_sample(DEN, DISC, KEYS, shape=TB.shape, **settings)
  assert 'ess_steps' not in plain
  _, stats = samplers.isir_sample(DEN, DISC, KEYS, shape=TB.shape, step_stats=True, **settings)
  ess = np.asarray(stats['ess_steps'])
  assert ess.shape == (64, 6)
  corrected = ~np.isnan(ess[0])
  assert 0 < corrected.sum() < 6 and (corrected == ~np.isnan(ess).any(axis=0)).all()
  np.testing.assert_allclose(np.nanmean(ess, axis=1), stats['ess'], rtol=1e-5)

  th, _ = samplers.estimate_thresholds(DEN, DISC, KEYS, shape=TB.shape, rej_percentile=0.9,
                                       num_steps=6)
  _, st = samplers.diffrs_sample(DEN, DISC, KEYS, shape=TB.shape, num_steps=6, thresholds=th,
                                 step_stats=True)
  tests, accepts = np.asarray(st['level_tests']), np.asarray(st['level_accepts'])
  assert tests.shape == (64, 7) and (accepts <= tests).all() and accepts.sum() < tests.sum()
  rate = np.where(tests.sum(1) > 0, accepts.sum(1) / np.maximum(tests.sum(1), 1), 1.0)
  np.testing.assert_allclose(rate, st['accept_rate'], rtol=1e-6)
