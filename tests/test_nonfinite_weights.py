"""Non-finite log weights: recorded per sample at the noise level where they occurred (inside
jit), never picked, and refused by the driver with the level and the global indices."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isir_jax import sampling, samplers, testbed
from isir_jax.samplers import diffrs, edm, weights

TB = testbed.make_testbed('gmm2')
STEP = dict(num_steps=6, S_churn=40.0)
LEVEL = 3   # the noise level t_3 at which the broken discriminator fails


@dataclasses.dataclass(frozen=True, eq=False)
class BrokenAtLevel:
  """The testbed's discriminator, returning ``value`` at the noise level ``sigma``."""
  sigma: float
  value: float

  def log_ratio(self, x, sigma, class_labels=None):
    d = TB.discriminator.log_ratio(x, sigma, class_labels)
    return jnp.where(jnp.isclose(sigma, self.sigma, rtol=1e-6), self.value, d)


def _broken(value: float) -> BrokenAtLevel:
  t = edm.StepSettings(**STEP).sigmas(TB.model_denoiser)
  return BrokenAtLevel(float(t[LEVEL]), value)


def _keys(n: int):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(n))


@pytest.mark.parametrize('value', [np.nan, np.inf])
def test_isir_records_the_level_of_a_non_finite_log_weight(value):
  fn = samplers.get_sampler('isir')(TB.model_denoiser, _broken(value), shape=TB.shape,
                                    num_candidates=3, num_iterations=2, **STEP)
  x, stats = jax.jit(fn)(_keys(4))
  np.testing.assert_array_equal(stats[weights.STAT], LEVEL)
  # The draw never picks a non-finite weight: the samples stay finite.
  assert bool(jnp.isfinite(x).all())
  ok = jax.jit(samplers.get_sampler('isir')(TB.model_denoiser, TB.discriminator,
                                            shape=TB.shape, num_candidates=3, num_iterations=2,
                                            **STEP))(_keys(4))[1]
  np.testing.assert_array_equal(ok[weights.STAT], weights.NONE)


def test_diffrs_records_the_level_and_finishes():
  th = diffrs.Thresholds(np.zeros(7, np.float32), np.zeros(7, np.float32))
  fn = samplers.get_sampler('diffrs')(TB.model_denoiser, _broken(np.nan), shape=TB.shape,
                                      thresholds=th, **STEP)
  _, stats = jax.jit(fn)(_keys(4))
  np.testing.assert_array_equal(stats[weights.STAT], LEVEL)
  assert np.all(np.asarray(stats['finished']))   # refused, not rejected until a loop cap


def test_driver_refuses_non_finite_weights_naming_level_and_index():
  stats = {weights.STAT: np.array([-1, 3, -1, 5])}
  message = r'2 samples met a non-finite discriminator log ratio .*\{11: 3, 13: 5\}'
  with pytest.raises(sampling.RunError, match=message):
    sampling.check_samples(10, np.zeros([4, 2]), stats)
  sampling.check_samples(10, np.zeros([4, 2]), {weights.STAT: np.full(4, weights.NONE)})
