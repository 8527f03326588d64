"""SMC on the exact testbed: its law, the two reductions, counts, keys and group statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isir_jax import samplers, testbed
from isir_jax.samplers import smc, weights

TB = testbed.make_testbed('gmm2')
STEPS = 18


def sample_keys(seed: int, n: int):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


@functools.lru_cache(maxsize=None)
def _jitted(name: str, settings: tuple, denoiser=TB.model_denoiser, discriminator=TB.discriminator):
  return jax.jit(samplers.get_sampler(name)(denoiser, discriminator, shape=TB.shape,
                                            **dict(settings)))


def run(name='smc', keys=None, **settings):
  return _jitted(name, tuple(sorted(settings.items())))(keys)


def test_g64_recovers_the_true_weights_where_plain_sampling_does_not():
  """18 ancestral steps: the model's weights are (0.5, 0.5), the truth (0.2, 0.8)."""
  keys = sample_keys(0, 4096)
  x, stats = run(keys=keys, num_steps=STEPS, proposal='ancestral', group_size=64)
  plain, _ = run('edm', keys=keys, num_steps=STEPS, proposal='ancestral')
  # Binomial standard error of a weight at 4096 samples is 0.006; plain sampling is off by 0.3.
  assert TB.weight_error(x) < 0.02, TB.weights(x)
  assert TB.weight_error(plain) > 0.25
  # One denoiser call per step (shared mean), one discriminator call per stochastic step
  # (all but the last, deterministic, step), resampling at each.
  assert np.all(stats['nfe'] == STEPS) and np.all(stats['disc_evals'] == STEPS - 1)
  assert np.all(stats['resamples'] == STEPS - 1) and np.all(stats['disc_grads'] == 0)
  assert 0 < float(stats['ess_min'].min()) <= float(stats['ess'].mean()) <= 1
  assert np.all((stats['ancestors'] >= 1) & (stats['ancestors'] <= 64))
  assert np.all(stats[weights.STAT] == weights.NONE)


@pytest.mark.parametrize('kernel', [dict(S_churn=40.0), dict(proposal='ancestral'),
                                    dict(proposal='dpmpp_2m_sde')])
def test_one_particle_one_candidate_is_the_plain_sampler_bit_for_bit(kernel):
  keys = sample_keys(1, 256)
  x_edm, s_edm = run('edm', keys=keys, num_steps=6, **kernel)
  x_smc, s_smc = run(keys=keys, num_steps=6, group_size=1, **kernel)
  np.testing.assert_array_equal(np.asarray(x_smc), np.asarray(x_edm))
  np.testing.assert_array_equal(s_smc['nfe'], s_edm['nfe'])
  assert np.all(s_smc['disc_evals'] == 0) and np.all(s_smc['resamples'] == 0)


@pytest.mark.parametrize('kernel', [dict(S_churn=40.0), dict(proposal='ancestral'),
                                    dict(proposal='dpmpp_2m_sde')])
def test_one_particle_n_candidates_is_isir_k1_bit_for_bit(kernel):
  keys = sample_keys(2, 256)
  settings = dict(num_steps=6, num_candidates=4, weight_scale=2.0, **kernel)
  x_isir, s_isir = run('isir', keys=keys, num_iterations=1, **settings)
  x_smc, s_smc = run(keys=keys, group_size=1, **settings)
  np.testing.assert_array_equal(np.asarray(x_smc), np.asarray(x_isir))
  for k in ('nfe', 'disc_evals', 'disc_grads'):
    np.testing.assert_array_equal(s_smc[k], s_isir[k])


class Counting:
  """Wraps a model and counts the rows of every call that runs (a debug callback)."""

  def __init__(self, inner):
    self.inner, self.rows, self.grad_rows = inner, [], []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def _count(self, into, x):
    jax.debug.callback(lambda r: into.append(int(r)), jnp.int32(x.shape[0]))

  def __call__(self, x, sigma, class_labels=None):
    self._count(self.rows, x)
    return self.inner(x, sigma, class_labels)

  def log_ratio(self, x, sigma, class_labels=None):
    self._count(self.rows, x)
    return self.inner.log_ratio(x, sigma, class_labels)

  def guidance(self, x, sigma, class_labels=None):
    self._count(self.grad_rows, x)
    return self.inner.guidance(x, sigma, class_labels)


@pytest.mark.parametrize('settings', [
    dict(S_churn=40.0, num_candidates=3),
    dict(proposal='ancestral', guidance_weight=1.0, resample_window=(0.05, 10.0)),
])
def test_counted_calls_equal_the_reported_counts(settings):
  b = 8
  den, disc = Counting(TB.model_denoiser), Counting(TB.discriminator)
  fn = samplers.get_sampler('smc')(den, disc, shape=TB.shape, num_steps=6, group_size=4,
                                   **settings)
  _, stats = jax.jit(fn)(sample_keys(3, b))
  jax.effects_barrier()
  assert sum(den.rows) == int(np.sum(stats['nfe']))
  assert sum(disc.rows) == int(np.sum(stats['disc_evals']))
  assert sum(disc.grad_rows) == int(np.sum(stats['disc_grads']))
  assert int(np.sum(stats['disc_evals'])) > 0


def test_samples_do_not_depend_on_the_batch_at_whole_groups():
  keys = sample_keys(4, 64)
  settings = dict(num_steps=6, proposal='ancestral', group_size=8)
  whole, _ = run(keys=keys, **settings)
  halves = [run(keys=keys[i:i + 32], **settings)[0] for i in (0, 32)]
  np.testing.assert_array_equal(np.asarray(whole), np.concatenate(halves))
  with pytest.raises(ValueError, match='multiple of group_size=8'):
    samplers.get_sampler('smc')(TB.model_denoiser, TB.discriminator, shape=TB.shape,
                                **settings)(keys[:12])


def test_ess_trigger_and_window_control_resampling():
  keys = sample_keys(5, 64)
  base = dict(num_steps=8, proposal='ancestral', group_size=8)
  _, every = run(keys=keys, **base)
  _, rare = run(keys=keys, ess_threshold=0.05, **base)
  # ESS-triggered: only the last weighted step must resample (outputs equally weighted).
  assert np.all(every['resamples'] == 7) and np.all(rare['resamples'] >= 1)
  assert np.all(rare['resamples'] < 7)
  t = np.asarray(samplers.StepSettings(num_steps=8).sigmas(TB.model_denoiser))
  window = (0.5, 10.0)
  _, windowed = run(keys=keys, resample_window=window, **base)
  inside = int(np.sum((t[1:-1] >= 0.5) & (t[1:-1] <= 10.0)))
  assert np.all(windowed['disc_evals'] == inside) and np.all(windowed['resamples'] == inside)
  _, no_final = run(keys=keys, final_resample=False, **base)
  assert np.all(no_final['disc_evals'] == 6)


def test_resampling_follows_the_weights_and_lineages_are_counted():
  keys = jax.random.split(jax.random.key(0), 2)
  log_w = jnp.log(jnp.array([[0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]]) + 1e-30)
  rows = smc.resample_groups(keys, log_w, 'systematic', jnp.array([True, True]))
  # Systematic resampling: all weight on particle 2 of group 0; group 1 keeps one of each.
  np.testing.assert_array_equal(rows[:4], [2, 2, 2, 2])
  np.testing.assert_array_equal(np.sort(rows[4:]), [4, 5, 6, 7])
  untouched = smc.resample_groups(keys, log_w, 'multinomial', jnp.array([False, False]))
  np.testing.assert_array_equal(untouched, np.arange(8))
  ancestors, lineages = smc.lineage_stats(jnp.array([2, 2, 2, 2, 0, 1, 2, 3]), 4)
  np.testing.assert_array_equal(ancestors, [1, 4])
  np.testing.assert_allclose(lineages, [1.0, 4.0])
  x = jnp.array([0.0, 0.0, 3.0, 7.0]).reshape(4, 1, 1, 1)
  np.testing.assert_allclose(smc.nearest_in_group(x, 4), [0.0, 0.0, 3.0, 4.0])


class NaNAtOneLevel:
  """The exact log ratio, NaN for every sample at noise levels in (lo, hi)."""

  def __init__(self, inner, lo, hi):
    self.inner, self.lo, self.hi = inner, lo, hi

  def log_ratio(self, x, sigma, class_labels=None):
    lr = self.inner.log_ratio(x, sigma, class_labels)
    return jnp.where((sigma > self.lo) & (sigma < self.hi), jnp.nan, lr)


def test_non_finite_log_weights_are_reported_with_their_level():
  t = np.asarray(samplers.StepSettings(num_steps=6).sigmas(TB.model_denoiser))
  disc = NaNAtOneLevel(TB.discriminator, t[3] * 0.99, t[3] * 1.01)   # step 2 targets t[3]
  fn = samplers.get_sampler('smc')(TB.model_denoiser, disc, shape=TB.shape, num_steps=6,
                                   proposal='ancestral', group_size=4)
  x, stats = jax.jit(fn)(sample_keys(6, 8))
  np.testing.assert_array_equal(stats[weights.STAT], 3)
  assert np.isfinite(np.asarray(x)).all()


def test_settings_are_checked():
  make = functools.partial(samplers.get_sampler('smc'), TB.model_denoiser, TB.discriminator,
                           shape=TB.shape)
  with pytest.raises(TypeError, match=r"unknown settings \['group'\].*did you mean 'group_size'"):
    make(group=4)
  with pytest.raises(ValueError, match="guidance_weight needs proposal='ancestral'"):
    make(S_churn=40.0, guidance_weight=1.0)
  with pytest.raises(ValueError, match='deterministic'):
    make()
  with pytest.raises(ValueError, match='resample must be one of'):
    make(proposal='ancestral', resample='stratified-ish')


def test_twist_correction_keeps_the_target_and_its_absence_overcorrects():
  """Guided proposals with w=1 on gmm2: the guided kernel alone overshoots the true weight
  of component 0 (0.2); SMC with the density-ratio correction stays nearer the truth than
  SMC on the guided kernel without it."""
  keys = sample_keys(7, 4096)
  base = dict(num_steps=STEPS, proposal='ancestral', group_size=16, guidance_weight=1.0)
  exact, _ = run(keys=keys, **base)
  approx, _ = run(keys=keys, twist_correction=False, **base)
  w_exact, w_approx = TB.weights(exact)[0], TB.weights(approx)[0]
  assert w_approx < w_exact and abs(w_exact - 0.2) < abs(w_approx - 0.2), (w_exact, w_approx)
