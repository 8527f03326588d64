"""EDM and DG samplers and the exact Gaussian-mixture testbed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isir_jax import samplers, testbed
from isir_jax import vpsde
from isir_jax.samplers import churn, dg, edm, schedule

TB = testbed.make_testbed('gmm2')
TRUE_W, MODEL_W = TB.true.weights, TB.model.weights


def sample_keys(seed: int, n: int):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


def test_registry():
  assert samplers.get_sampler('edm') is samplers.edm_sampler
  for name in ('dg', 'diffrs', 'isir'):
    assert callable(samplers.get_sampler(name))
  with pytest.raises(ValueError, match='unknown sampler'):
    samplers.get_sampler('ddim')
  with pytest.raises(TypeError, match='unknown settings'):
    samplers.get_sampler('edm')(TB.true_denoiser, shape=TB.shape, num_stepz=4)


def test_karras_schedule():
  t = schedule.karras_sigmas(4, 0.002, 80.0, 7.0, lambda s: s)
  rho = 7.0
  expected = [(80 ** (1 / rho) + i / 3 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
              for i in range(4)] + [0.0]
  np.testing.assert_allclose(t, expected, rtol=1e-6)
  gamma = schedule.churn_gamma(jnp.array([0.5, 5.0, 50.0]), 40.0, 18, 1.0, 10.0)
  np.testing.assert_allclose(gamma, [0.0, np.sqrt(2) - 1, 0.0], rtol=1e-6)
  np.testing.assert_allclose(schedule.churn_gamma(jnp.array([5.0]), 1.8, 18, 0, np.inf), [0.1],
                             rtol=1e-6)


@pytest.mark.parametrize('name', ['gmm2', 'gmm64'])
def test_testbed_denoiser_is_tweedie(name):
  """D(x; sigma) = x + sigma^2 grad log p_sigma(x), and log_ratio is the log density difference."""
  tb = testbed.make_testbed(name)
  x = jax.random.normal(jax.random.key(0), (5,) + tb.shape)
  sigma = jnp.array([0.01, 0.1, 0.5, 2.0, 20.0])
  mean = jnp.asarray(tb.true.means[1], jnp.float32).reshape((1,) + tb.shape)

  @jax.jit
  def compute(x, sigma):
    flat = x.reshape(5, -1)
    score = jax.grad(lambda y: tb.model.log_prob(y.reshape(5, -1), sigma).sum())(x)
    return (tb.model_denoiser(x, sigma), x + sigma[:, None, None, None] ** 2 * score,
            tb.discriminator.log_ratio(x, sigma),
            tb.true.log_prob(flat, sigma) - tb.model.log_prob(flat, sigma),
            tb.discriminator.log_ratio(mean, jnp.array([0.002])))

  denoised, tweedie, lr, lr_expected, lr_mean = compute(x, sigma)
  np.testing.assert_allclose(denoised, tweedie, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(lr, lr_expected, rtol=1e-6)
  # Near a component mean at small sigma the ratio is the ratio of the mixture weights.
  np.testing.assert_allclose(lr_mean, [np.log(0.8 / 0.5)], rtol=1e-4)


def test_guidance_is_gated_per_sample():
  x = jax.random.normal(jax.random.key(1), (2,) + TB.shape)
  sigma = jnp.array([0.001, 1.0])  # VP tau of 0.001 is below time_min = 0.01

  @jax.jit
  def compute(x, sigma):
    g, lr, _ = dg.windowed_guidance(TB.discriminator, x, sigma, None, 0.01, 1.0)
    # g / sigma turns the model's ODE direction into the true one (exact ratio).
    d_model = (x - TB.model_denoiser(x, sigma)) / sigma[:, None, None, None]
    d_true = (x - TB.true_denoiser(x, sigma)) / sigma[:, None, None, None]
    return g, lr, TB.discriminator.log_ratio(x, sigma), d_model, d_true

  g, lr, lr_expected, d_model, d_true = compute(x, sigma)
  assert np.all(np.asarray(g[0]) == 0) and np.any(np.asarray(g[1]) != 0)
  np.testing.assert_allclose(lr, lr_expected, rtol=1e-6)
  np.testing.assert_allclose(d_model[1] + g[1] / sigma[1], d_true[1], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module')
def edm_true():
  fn = jax.jit(samplers.get_sampler('edm')(TB.true_denoiser, shape=TB.shape, num_steps=18))
  return fn(sample_keys(0, 2000))


def test_edm_reproduces_each_mixture(edm_true):
  x, stats = edm_true
  assert x.shape == (2000,) + TB.shape and x.dtype == jnp.float32
  assert np.all(np.asarray(stats['nfe']) == 35)  # 18 Heun steps, the last one Euler
  np.testing.assert_allclose(TB.weights(x), TRUE_W, atol=0.03)
  model = jax.jit(samplers.get_sampler('edm')(TB.model_denoiser, shape=TB.shape, num_steps=18,
                                              S_churn=10.0, solver='euler'))
  x, stats = model(sample_keys(0, 2000))
  assert np.all(np.asarray(stats['nfe']) == 18)
  np.testing.assert_allclose(TB.weights(x), MODEL_W, atol=0.03)


def test_gmm64_edm_reproduces_each_mixture():
  tb = testbed.make_testbed('gmm64')
  for den, w in [(tb.true_denoiser, tb.true.weights), (tb.model_denoiser, tb.model.weights)]:
    x, _ = jax.jit(samplers.get_sampler('edm')(den, shape=tb.shape, num_steps=12))(
        sample_keys(1, 1000))
    assert x.shape == (1000, 8, 8, 1)
    np.testing.assert_allclose(tb.weights(x), w, atol=0.03)


def test_dg_with_exact_ratio_recovers_truth(edm_true):
  """With w1 = w2 = 1 the guided model direction is the true one: DG follows EDM(true)."""
  dg = jax.jit(samplers.get_sampler('dg')(
      TB.model_denoiser, TB.discriminator, shape=TB.shape, num_steps=18,
      dg_weight_1st_order=1.0, dg_weight_2nd_order=1.0))
  x, stats = dg(sample_keys(0, 2000))
  assert np.all(np.asarray(stats['nfe']) == 35)
  np.testing.assert_allclose(TB.weights(x), TRUE_W, atol=0.03)
  # The trajectories themselves agree; the guidance only stops below sigma ~ 0.045 (tau < 0.01).
  assert float(jnp.mean(jnp.abs(x - edm_true[0]))) < 1e-3


def test_dg_boosting_doubles_guidance_of_negative_log_ratio_samples():
  """With 2 steps, boosting acts only at step 0 (i % 2 == 0; no churn yet, the carried log
  ratio starts at +inf): samples with d(x_T, t_0) < 0 get guidance weight 2 w1."""
  keys = sample_keys(2, 256)
  run = lambda w, **kw: jax.jit(samplers.get_sampler('dg')(
      TB.model_denoiser, TB.discriminator, shape=TB.shape, num_steps=2,
      dg_weight_1st_order=w, **kw))(keys)[0]
  boosted, single, double = run(1.0, boosting=True), run(1.0), run(2.0)
  t0 = edm.StepSettings(num_steps=2).sigmas(TB.model_denoiser)[0]
  x_t = edm.initial_candidates(keys, jnp.arange(1), t0, TB.shape)[:, 0]
  negative = np.asarray(TB.discriminator.log_ratio(x_t, jnp.full([256], t0)) < 0)
  assert 0 < negative.sum() < 256
  expected = np.where(negative[:, None, None, None], double, single)
  np.testing.assert_allclose(boosted, expected, rtol=1e-4, atol=1e-4)


def test_latents_override_and_deterministic_sampler_uses_them():
  lat = jax.random.normal(jax.random.key(3), (4,) + TB.shape)
  fn = jax.jit(samplers.get_sampler('edm')(TB.true_denoiser, shape=TB.shape, num_steps=6))
  a, _ = fn(sample_keys(0, 4), None, lat)
  b, _ = fn(sample_keys(9, 4), None, lat)
  np.testing.assert_array_equal(a, b)  # S_churn = 0: the keys play no role
  with pytest.raises(ValueError, match='latents must have shape'):
    fn(sample_keys(0, 4), None, lat[:3])


def test_sample_depends_only_on_its_key():
  fn = jax.jit(samplers.get_sampler('edm')(TB.model_denoiser, shape=TB.shape, num_steps=6,
                                           S_churn=20.0))
  keys = sample_keys(4, 8)
  batch, _ = fn(keys)
  again, _ = fn(sample_keys(5, 8).at[5].set(keys[5]))
  np.testing.assert_array_equal(again[5], batch[5])
  assert not np.allclose(again[4], batch[4])


def test_edm_step_heun_mask_matches_static():
  x = jax.random.normal(jax.random.key(5), (3,) + TB.shape)
  t_cur, t_next = jnp.array([2.0, 1.0, 0.5]), jnp.array([1.0, 0.5, 0.0])

  @jax.jit
  def compute(x):
    args = lambda s: (TB.model_denoiser, x[s], t_cur[s], t_next[s], None)
    mixed = churn.edm_step_rows(*args(slice(None)), gamma=jnp.zeros([3]), heun=t_next > 0)
    static = lambda s, heun: churn.edm_step(*args(s), gamma=jnp.zeros(t_cur[s].shape),
                                            heun=heun)[0]
    return mixed, jnp.concatenate([static(slice(0, 2), True), static(slice(2, 3), False)])

  mixed, static = compute(x)
  np.testing.assert_allclose(mixed, static, rtol=1e-6)


class _LabelChecking:
  """A model wrapper asserting at trace time that labels come row-aligned with x."""

  def __init__(self, inner):
    self.inner = inner

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def _check(self, x, class_labels):
    assert class_labels is not None and class_labels.shape == (x.shape[0], 10)

  def __call__(self, x, sigma, class_labels=None):
    self._check(x, class_labels)
    return self.inner(x, sigma, class_labels)

  def log_ratio(self, x, sigma, class_labels=None):
    self._check(x, class_labels)
    return self.inner.log_ratio(x, sigma, class_labels)

  def guidance(self, x, sigma, class_labels=None):
    self._check(x, class_labels)
    return self.inner.guidance(x, sigma, class_labels)


@pytest.mark.parametrize('name,settings', [
    ('edm', {}), ('dg', dict(dg_weight_2nd_order=1.0, boosting=True)),
    ('isir', dict(S_churn=40.0, num_candidates=3, num_iterations=2, candidate_chunk=2)),
    ('diffrs', dict(thresholds=(np.zeros(7), np.zeros(7)), slots=2))])
def test_class_labels_follow_their_rows(name, settings):
  den, disc = _LabelChecking(TB.model_denoiser), _LabelChecking(TB.discriminator)
  fn = samplers.get_sampler(name)(den, disc, shape=TB.shape, num_steps=6, **settings)
  labels = jax.nn.one_hot(jnp.arange(4) % 10, 10)
  x, stats = jax.eval_shape(fn, sample_keys(0, 4), labels)
  assert x.shape == (4,) + TB.shape and stats['nfe'].shape == (4,)


class CountingGuidance:
  """Wraps a discriminator and counts its ``guidance`` calls at run time."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def guidance(self, x, sigma, *args):
    jax.debug.callback(lambda: self.calls.append(1))
    return self.inner.guidance(x, sigma, *args)


def test_dg_skips_the_discriminator_when_the_batch_is_outside_the_window():
  disc = CountingGuidance(TB.discriminator)
  step = edm.StepSettings(num_steps=8)
  t = step.sigmas(TB.model_denoiser)[:-1]
  inside = np.asarray(vpsde.in_window(t, 0.01, 1.0))
  assert 0 < inside.sum() < len(inside)  # the last steps are below tau = 0.01
  fn = jax.jit(samplers.get_sampler('dg')(TB.model_denoiser, disc, shape=TB.shape, num_steps=8))
  x, _ = fn(sample_keys(4, 16))
  jax.effects_barrier()
  assert len(disc.calls) == inside.sum() and np.all(np.isfinite(np.asarray(x)))
