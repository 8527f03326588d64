"""Proposal kernels (churn, ancestral, DPM-Solver++(2M) SDE), skipped deterministic steps and
the cost counts of every sampler, on the exact 2-D mixture."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10, digits
from isir_jax import samplers, testbed, vpsde
from isir_jax.samplers import churn, edm, isir

TB = testbed.make_testbed('gmm2')
SHARED = ('ancestral', 'dpmpp_2m_sde')


def sample_keys(seed: int, n: int):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


@functools.lru_cache(maxsize=None)
def _jitted(name: str, true_denoiser: bool, settings: tuple):
  den = TB.true_denoiser if true_denoiser else TB.model_denoiser
  return jax.jit(samplers.get_sampler(name)(den, TB.discriminator, shape=TB.shape,
                                            **dict(settings)))


def sampler(name, true_denoiser=False, **settings):
  return _jitted(name, true_denoiser, tuple(sorted(settings.items())))


class Counting:
  """Wraps a model and records the rows of every call that *runs* (a debug callback, so
  branches of a ``lax.cond`` not taken are not recorded)."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def _record(self, x, sigma):
    jax.debug.callback(lambda s: self.calls.append((x.shape[0], float(np.max(s)))),
                       jnp.broadcast_to(sigma, x.shape[:1]))

  def __call__(self, x, sigma, class_labels=None):
    self._record(x, sigma)
    return self.inner(x, sigma, class_labels)

  def log_ratio(self, x, sigma, class_labels=None):
    self._record(x, sigma)
    return self.inner.log_ratio(x, sigma, class_labels)

  def guidance(self, x, sigma, class_labels=None):
    self._record(x, sigma)
    return self.inner.guidance(x, sigma, class_labels)


def run_counting(name, batch, **settings):
  den, disc = Counting(TB.model_denoiser), Counting(TB.discriminator)
  fn = jax.jit(samplers.get_sampler(name)(den, disc, shape=TB.shape, **settings))
  x, stats = fn(sample_keys(0, batch))
  jax.effects_barrier()
  return x, {k: np.asarray(v) for k, v in stats.items()}, den.calls, disc.calls


@pytest.mark.parametrize('proposal', SHARED)
@pytest.mark.parametrize('n,k,chunk', [(1, 1, None), (4, 1, 2), (3, 3, None)])
def test_shared_mean_is_one_denoiser_call_per_step(proposal, n, k, chunk):
  b, steps = 4, 6
  _, stats, den_calls, disc_calls = run_counting(
      'isir', b, num_steps=steps, proposal=proposal, num_candidates=n, num_iterations=k,
      candidate_chunk=chunk)
  assert den_calls == [(b, pytest.approx(s)) for s in np.asarray(
      edm.StepSettings(num_steps=steps).sigmas(TB.model_denoiser))[:-1]]
  proposals = isir.num_proposals(n, k)
  # The initial stage and steps 0..n-2 weigh every proposal; the last step (to sigma = 0)
  # is deterministic and makes no discriminator call.
  expected = steps * proposals if n > 1 else 0
  assert sum(rows for rows, _ in disc_calls) == b * expected
  np.testing.assert_array_equal(stats['nfe'], steps)
  np.testing.assert_array_equal(stats['disc_evals'], expected)
  np.testing.assert_array_equal(stats['disc_grads'], 0)


@pytest.mark.parametrize('settings', [
    dict(proposal='ancestral'), dict(proposal='ancestral', eta=0.5),
    dict(proposal='dpmpp_2m_sde'), dict(S_churn=40.0, S_min=0.05, S_max=20.0)])
def test_one_candidate_is_the_plain_sampler_bit_for_bit(settings):
  keys = sample_keys(1, 500)
  x_edm, s_edm = sampler('edm', num_steps=8, **settings)(keys)
  x_isir, s_isir = sampler('isir', num_steps=8, num_candidates=1, **settings)(keys)
  np.testing.assert_array_equal(np.asarray(x_isir), np.asarray(x_edm))
  for key in ('nfe', 'disc_evals', 'disc_grads'):
    np.testing.assert_array_equal(s_isir[key], s_edm[key])


def test_settings_are_checked():
  with pytest.raises(ValueError, match="proposal='ancestral' with eta=0 is the deterministic"):
    samplers.get_sampler('isir')(TB.model_denoiser, TB.discriminator, shape=TB.shape,
                                 proposal='ancestral', eta=0.0, num_candidates=4)
  with pytest.raises(ValueError, match='S_churn=5.0 belongs to'):
    samplers.get_sampler('edm')(TB.model_denoiser, shape=TB.shape, proposal='ancestral',
                                S_churn=5.0)
  with pytest.raises(ValueError, match='eta must be in'):
    samplers.get_sampler('edm')(TB.model_denoiser, shape=TB.shape, proposal='ancestral',
                                eta=1.5)
  with pytest.raises(ValueError, match="proposal must be 'churn'"):
    samplers.get_sampler('dg')(TB.model_denoiser, TB.discriminator, shape=TB.shape,
                               proposal='ancestral')
  with pytest.raises(ValueError, match='dpmpp_2m_sde'):
    samplers.get_sampler('diffrs')(TB.model_denoiser, TB.discriminator, shape=TB.shape,
                                   proposal='dpmpp_2m_sde', thresholds=(np.zeros(19),) * 2)


def test_eta_zero_is_the_euler_ode_step():
  """DDIM on the sigma scale: x0 + t'/t (x - x0) = x + (t' - t)(x - x0)/t, EDM's Euler step."""
  latents = jax.random.normal(jax.random.key(2), (64,) + TB.shape)
  ddim, _ = sampler('edm', num_steps=6, proposal='ancestral', eta=0.0)(sample_keys(2, 64),
                                                                       None, latents)
  euler, _ = sampler('edm', num_steps=6, solver='euler')(sample_keys(3, 64), None, latents)
  np.testing.assert_allclose(ddim, euler, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('proposal,steps', [('ancestral', 64), ('dpmpp_2m_sde', 18)])
def test_shared_mean_kernels_with_the_true_denoiser_keep_the_weights(proposal, steps):
  """The ancestral step's own discretisation error is about 0.05 at 18 steps (it replaces
  the posterior of x0 by its mean), 0.02 at 64; the second-order mean reaches that at 18."""
  x, _ = sampler('edm', True, num_steps=steps, proposal=proposal)(sample_keys(0, 4000))
  np.testing.assert_allclose(TB.weights(x), TB.true.weights, atol=0.03)


def test_isir_with_ancestral_proposals_halves_the_error():
  keys = sample_keys(5, 2000)
  plain, _ = sampler('edm', num_steps=12, proposal='ancestral')(keys)
  x, stats = sampler('isir', num_steps=12, proposal='ancestral', num_candidates=8)(keys)
  assert TB.weight_error(x) <= 0.5 * TB.weight_error(plain), (
      TB.weight_error(x), TB.weight_error(plain))
  np.testing.assert_array_equal(stats['nfe'], 12)


def test_weight_scale_tempers_the_correction():
  """Weights exp(scale * d): scale 1 is the default bit for bit; a larger scale moves the
  model's 0.5/0.5 mixture further towards, then past, the true 0.2/0.8 weights."""
  keys = sample_keys(6, 2000)
  run = lambda **kw: sampler('isir', num_steps=12, proposal='ancestral', num_candidates=8,
                             **kw)(keys)[0]
  default = run()
  np.testing.assert_array_equal(run(weight_scale=1.0), default)
  first = [TB.weights(x)[0] for x in (run(weight_scale=0.25), default, run(weight_scale=4.0))]
  assert first[0] > first[1] > first[2], first
  assert first[2] < TB.true.weights[0] < 0.5, first   # over-corrected past the truth
  with pytest.raises(ValueError, match='weight_scale must be > 0, got 0'):
    sampler('isir', num_steps=12, proposal='ancestral', num_candidates=8, weight_scale=0.0)


def test_second_order_coefficients():
  """b integrates the linear extrapolation of x0 exactly: at eta = 1, against quadrature."""
  step = edm.StepSettings(num_steps=5, proposal='dpmpp_2m_sde')
  t = step.sigmas(TB.model_denoiser)
  c, b, s = step.mean_coefficients(t)
  t = np.asarray(t, np.float64)
  assert b[0] == 0 and b[-1] == 0 and c[-1] == 0 and s[-1] == 0
  for i in range(1, 4):
    h, h_prev = np.log(t[i] / t[i + 1]), np.log(t[i - 1] / t[i])
    u = np.linspace(0, h, 200001)
    # Weight 2 exp(-2 u) at lambda distance u before the end; x0 grows by (h - u) / h_prev.
    integrand = 2 * np.exp(-2 * u) * (h - u) / h_prev
    np.testing.assert_allclose(b[i], np.trapezoid(integrand, u), rtol=1e-4)
    np.testing.assert_allclose(c[i], np.exp(-2 * h), rtol=1e-5)
    np.testing.assert_allclose(s[i], t[i + 1] * np.sqrt(1 - np.exp(-2 * h)), rtol=1e-5)


def test_deterministic_churn_steps_make_no_discriminator_call():
  """Churn only inside [S_min, S_max]: the other steps run one plain step (N = K = 1)."""
  b, steps, n, k = 4, 8, 3, 2
  settings = dict(num_steps=steps, S_churn=40.0, S_min=0.05, S_max=20.0)
  step = edm.StepSettings(**settings)
  t = np.asarray(step.sigmas(TB.model_denoiser))
  noisy = step.noisy_steps(t)
  assert 0 < noisy.sum() < steps and not noisy[0] and not noisy[-1]
  _, stats, den_calls, disc_calls = run_counting('isir', b, num_candidates=n,
                                                 num_iterations=k, **settings)
  p = isir.num_proposals(n, k)
  # One discriminator call for the initial stage and one per churned step, at t_{i+1}.
  assert [rows for rows, _ in disc_calls] == [b * p] * (1 + noisy.sum())
  np.testing.assert_allclose([s for _, s in disc_calls[1:]], t[1:][noisy], rtol=1e-6)
  # Denoiser rows: B per stage of a plain step, B * P per stage of a churned one.
  rows = np.where(noisy, b * p, b) * step.nfe_table()
  assert sum(r for r, _ in den_calls) == rows.sum()
  np.testing.assert_array_equal(stats['nfe'], rows.sum() // b)
  np.testing.assert_array_equal(stats['disc_evals'], p * (1 + noisy.sum()))
  assert float(stats['ess'].min()) < 1.0


def test_edm_and_dg_counts():
  _, stats, den_calls, _ = run_counting('edm', 4, num_steps=6)
  np.testing.assert_array_equal(stats['nfe'], 11)
  assert sum(r for r, _ in den_calls) == 4 * 11
  np.testing.assert_array_equal(stats['disc_evals'], 0)
  _, stats, _, disc_calls = run_counting('dg', 4, num_steps=8, dg_weight_2nd_order=1.0)
  # Guidance at t_hat of each step and at t_next of each Heun stage, inside the window.
  tau_ok = lambda s: bool(vpsde.in_window(jnp.asarray(s), 0.01, 1.0))
  assert all(tau_ok(s) for _, s in disc_calls) and len(disc_calls) > 0
  np.testing.assert_array_equal(stats['disc_grads'], len(disc_calls))
  np.testing.assert_array_equal(stats['disc_evals'], 0)


def test_diffrs_counts_one_discriminator_evaluation_per_loop_iteration():
  th = (np.zeros(7), np.full(7, 0.3))
  _, stats, _, disc_calls = run_counting('diffrs', 6, num_steps=6, thresholds=th)
  assert np.all(stats['finished'])
  # With a lane per sample, the last sample to finish was in the loop from the start.
  assert int(stats['disc_evals'].max()) == len(disc_calls)
  assert np.all(stats['disc_evals'] >= 7) and np.all(stats['nfe'] >= 11)


def test_diffrs_euler_budget():
  """A 6-step Euler run needs 6 evaluations; the Heun budget (11) restarted it forever."""
  x, stats = sampler('diffrs', num_steps=6, solver='euler', max_iter=6, max_loops=200,
                     thresholds=((0.0,) * 7,) * 2, backsteps=0)(sample_keys(6, 8))
  assert np.all(np.asarray(stats['finished']))
  np.testing.assert_array_equal(stats['restarts'], 0)
  np.testing.assert_array_equal(stats['nfe'], 6)


def test_diffrs_cut_off_samples_keep_their_stats():
  """Thresholds no step passes: back-steps and restarts until max_loops stops the loop."""
  th = ((0.0,) * 7, (50.0,) * 7)
  x, stats = sampler('diffrs', num_steps=6, max_iter=11, max_loops=40,
                     thresholds=th)(sample_keys(7, 8))
  stats = {k: np.asarray(v) for k, v in stats.items()}
  assert not stats['finished'].any()
  assert np.all(stats['restarts'] > 0) and np.all(stats['nfe'] > 11)
  assert np.all((stats['accept_rate'] > 0) & (stats['accept_rate'] < 1))
  np.testing.assert_array_equal(stats['disc_evals'], 40)
  assert np.all(np.isfinite(np.asarray(x)))


# Label echo: class y has its own pair of modes +-e_y in 4-D; the denoiser is exact for
# weights (0.5, 0.5) on its label's pair and the discriminator is the exact ratio to
# (0.9, 0.1). A sample must end on its own label's pair (denoiser labels aligned), mostly
# on +e_y (discriminator labels aligned: under another label both modes of the pair are
# equidistant from that label's modes, so the preference vanishes).
_CLASSES = 4
_ECHO_SHAPE = (1, 1, _CLASSES)


def _pair_mixture(weights) -> list:
  eye = np.eye(_CLASSES)
  return [testbed.Mixture(np.stack([eye[y], -eye[y]]), np.full(2, 0.1), np.asarray(weights))
          for y in range(_CLASSES)]


class _EchoModels:
  """Denoiser and discriminator that select their label's mixture (one-hot labels [R, 4]);
  ``permute_disc_labels``: the discriminator reads label y as y + 1."""

  def __init__(self, permute_disc_labels: bool = False):
    self.model, self.true = _pair_mixture([0.5, 0.5]), _pair_mixture([0.9, 0.1])
    self.roll = permute_disc_labels
    self.sigma_min, self.sigma_max = 0.002, 80.0

  def round_sigma(self, sigma):
    return jnp.asarray(sigma)

  @staticmethod
  def _select(per_class, class_labels):
    return jnp.einsum('ry,yr...->r...', class_labels, jnp.stack(per_class))

  def __call__(self, x, sigma, class_labels):
    xf = x.reshape(x.shape[0], -1)
    s = jnp.broadcast_to(sigma, x.shape[:1])
    return self._select([m.denoise(xf, s) for m in self.model], class_labels).reshape(x.shape)

  def log_ratio(self, x, sigma, class_labels):
    if self.roll:
      class_labels = jnp.roll(class_labels, 1, axis=1)   # label y read as y + 1
    xf = x.reshape(x.shape[0], -1)
    s = jnp.broadcast_to(sigma, x.shape[:1])
    return self._select([t.log_prob(xf, s) - m.log_prob(xf, s)
                         for t, m in zip(self.true, self.model)], class_labels)

  def guidance(self, x, sigma, class_labels):
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    log_r, vjp = jax.vjp(lambda y: self.log_ratio(y, sigma, class_labels), x)
    return -churn.per_row(sigma ** 2, x) * vjp(jnp.ones_like(log_r))[0], log_r


def _echo_sides(x, classes) -> np.ndarray:
  """+1 / -1 where a sample is on +e_y / -e_y of its class y; 0 on another class's pair."""
  flat = np.asarray(x).reshape(len(x), -1)
  nearest = np.abs(flat).argmax(1)
  return np.where(nearest == classes, np.sign(flat[np.arange(len(x)), nearest]), 0)


_ECHO_SAMPLERS = [
    ('edm', dict(S_churn=10.0), None),
    ('dg', dict(dg_weight_1st_order=1.0, dg_weight_2nd_order=1.0), 0.8),
    ('diffrs', dict(S_churn=10.0, thresholds=((0.0,) * 7,) * 2, slots=48), 0.6),
    ('isir', dict(S_churn=40.0, num_candidates=8, candidate_chunk=4), 0.7),
    ('isir', dict(proposal='ancestral', num_candidates=16), 0.62),
    ('isir', dict(proposal='dpmpp_2m_sde', num_candidates=4, num_iterations=2), 0.65),
]


@pytest.mark.parametrize('name,settings,preferred', _ECHO_SAMPLERS)
def test_class_labels_stay_with_their_samples(name, settings, preferred):
  b = 128
  classes = np.arange(b) % _CLASSES
  labels = jax.nn.one_hot(classes, _CLASSES)
  models = _EchoModels()
  fn = jax.jit(samplers.get_sampler(name)(models, models, shape=_ECHO_SHAPE, num_steps=6,
                                          **settings))
  x, _ = fn(sample_keys(9, b), labels)
  sides = _echo_sides(x, classes)
  assert np.all(sides != 0), np.flatnonzero(sides == 0)
  # The check is sensitive: the same samples under shuffled labels fail it.
  assert np.mean(_echo_sides(x, np.roll(classes, 1)) != 0) < 0.1
  if preferred is not None:
    assert np.mean(sides > 0) >= preferred, np.mean(sides > 0)
    # ... and so is the preference: a discriminator reading permuted labels loses it.
    if name == 'isir' and settings.get('proposal') == 'ancestral':
      rolled = _EchoModels(permute_disc_labels=True)
      x, _ = jax.jit(samplers.get_sampler(name)(models, rolled, shape=_ECHO_SHAPE,
                                                num_steps=6, **settings))(sample_keys(9, b),
                                                                          labels)
      assert np.mean(_echo_sides(x, classes) > 0) < preferred - 0.1


def test_isir_ancestral_configs_build_their_samplers():
  """The shared-mean ISIR setting of the configs is accepted and costs 1 NFE per step."""
  bed = testbed.make_testbed('gmm64')
  driver_keys = ('name', 'rej_percentile', 'warmup_samples', 'thresholds')
  configs = [dict(cifar10.get_config(arg).sampler) for arg in ('isir_ancestral',
                                                                'isir_ancestral,tiny')]
  configs.append(dict(digits.get_config().demo.samplers.isir_ancestral))
  for sampler_config in configs:
    assert sampler_config['proposal'] == 'ancestral'
    settings = {k: v for k, v in sampler_config.items() if k not in driver_keys}
    fn = samplers.get_sampler('isir')(bed.model_denoiser, bed.discriminator, shape=bed.shape,
                                      **settings)
    _, stats = jax.eval_shape(fn, sample_keys(0, 2))
    assert stats['nfe'].shape == (2,)
