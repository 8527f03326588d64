"""ISIR on the exact testbed: convergence to the true mixture, and the seed's defects pinned."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isir_jax import samplers, testbed
from isir_jax.samplers import churn, edm, isir, schedule

TB = testbed.make_testbed('gmm2')
# 18 Heun steps with the largest churn: the stochastic proposal the method needs.
STEP = dict(num_steps=18, S_churn=40.0)


def sample_keys(seed: int, n: int):
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))


# One small configuration shared by several tests, so that they share compiled programs.
SMALL = dict(num_steps=6, S_churn=40.0, num_candidates=5, num_iterations=3)


@functools.lru_cache(maxsize=None)
def _jitted(settings: tuple):
  return jax.jit(samplers.get_sampler('isir')(TB.model_denoiser, TB.discriminator,
                                              shape=TB.shape, **dict(settings)))


def isir_fn(**settings):
  return _jitted(tuple(sorted(settings.items())))


def test_isir_n16_k4_recovers_true_weights():
  x, stats = isir_fn(num_candidates=16, num_iterations=4, **STEP)(sample_keys(0, 2000))
  np.testing.assert_allclose(TB.weights(x), TB.true.weights, atol=0.03)
  # 17 Heun steps and a last Euler step, each with N + (K-1)(N-1) = 61 proposals.
  assert np.all(np.asarray(stats['nfe']) == 61 * (2 * 17 + 1))
  ess = np.asarray(stats['ess'])
  assert np.all((ess > 1 / 16) & (ess <= 1 + 1e-6))


def test_isir_error_shrinks_with_n_and_with_k():
  """Weight error averaged over two seeds, N = 1, 2, 4 (K = 1) and K = 1, 2, 4 (N = 4).

  N and K are traced arguments of one compiled program (`isir.isir_sample_schedule`).
  """
  fn = jax.jit(functools.partial(isir.isir_sample_schedule, TB.model_denoiser, TB.discriminator,
                                 shape=TB.shape, max_candidates=4, **STEP))

  def error(n, k):
    errors = []
    for seed in (1, 2):
      x, stats = fn(sample_keys(seed, 2000), n, k)
      assert np.all(np.asarray(stats['nfe']) == (n + (k - 1) * (n - 1)) * (2 * 17 + 1))
      errors.append(TB.weight_error(x))
    return np.mean(errors)
  by_n = [error(n, 1) for n in (1, 2, 4)]
  by_k = [by_n[-1]] + [error(4, k) for k in (2, 4)]
  assert by_n[0] > by_n[1] > by_n[2], by_n
  assert by_k[0] > by_k[1] > by_k[2], by_k
  assert by_n[0] > 0.25 and by_k[2] < 0.03, (by_n, by_k)


def test_isir_with_one_candidate_is_stochastic_edm_bit_for_bit():
  keys = sample_keys(1, 2000)
  x_edm, s_edm = jax.jit(samplers.get_sampler('edm')(TB.model_denoiser, shape=TB.shape,
                                                     **STEP))(keys)
  x_isir, s_isir = isir_fn(num_candidates=1, num_iterations=1, **STEP)(keys)
  np.testing.assert_array_equal(np.asarray(x_isir), np.asarray(x_edm))
  np.testing.assert_array_equal(s_isir['nfe'], s_edm['nfe'])


def test_chunked_equals_unchunked():
  keys = sample_keys(4, 64)
  full, s_full = isir_fn(**SMALL)(keys)
  chunked, s_chunk = isir_fn(candidate_chunk=2, **SMALL)(keys)
  np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_chunk['ess'], s_full['ess'], rtol=1e-5)


class Recording:
  """Wraps a model and records the rows of every call that runs (a debug callback)."""

  def __init__(self, inner):
    self.inner, self.rows = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def _record(self, x):
    jax.debug.callback(lambda r: self.rows.append(int(r)), jnp.int32(x.shape[0]))

  def __call__(self, x, sigma, class_labels=None):
    self._record(x)
    return self.inner(x, sigma, class_labels)

  def log_ratio(self, x, sigma, class_labels=None):
    self._record(x)
    return self.inner.log_ratio(x, sigma, class_labels)


@pytest.mark.parametrize('chunk', [None, 2])
@pytest.mark.parametrize('per_step_k', [False, True])
def test_model_calls_are_bounded_and_counted(chunk, per_step_k):
  """Memory: no network call evaluates more than B * candidate_chunk rows (without a chunk,
  one chain's N + (K-1)(N-1) proposals). Cost: unchunked, the rows evaluated are exactly the
  reported counts (no wasted evaluation); chunked, the counts exclude only the padding of
  the last chunk of each chain."""
  b, n, k = 4, 5, 3
  den, disc = Recording(TB.model_denoiser), Recording(TB.discriminator)
  fn = samplers.get_sampler('isir')(den, disc, shape=TB.shape, num_steps=6, S_churn=40.0,
                                    num_candidates=n, candidate_chunk=chunk,
                                    num_iterations=(k, k, k, k, k, 2) if per_step_k else k)
  _, stats = jax.jit(fn)(sample_keys(0, b))
  jax.effects_barrier()
  nfe, disc_evals = int(np.sum(stats['nfe'])), int(np.sum(stats['disc_evals']))
  bound = b * (chunk or isir.num_proposals(n, k))
  assert max(den.rows) <= bound and max(disc.rows) <= bound, (den.rows, disc.rows)
  if chunk is None:
    assert (sum(den.rows), sum(disc.rows)) == (nfe, disc_evals)
  else:
    assert set(den.rows) == set(disc.rows) == {b * chunk}
    assert nfe <= sum(den.rows) < 2 * nfe and disc_evals <= sum(disc.rows) < 2 * disc_evals


def test_static_k_draws_as_the_iteration_loop():
  """All proposals drawn before the choices == the loop over iterations (a traced K)."""
  keys = sample_keys(3, 64)
  static, s_static = isir_fn(**SMALL)(keys)
  settings = {k: v for k, v in SMALL.items() if k not in ('num_candidates', 'num_iterations')}
  looped, s_loop = jax.jit(functools.partial(
      isir.isir_sample_schedule, TB.model_denoiser, TB.discriminator, shape=TB.shape,
      max_candidates=SMALL['num_candidates'], **settings))(
          keys, SMALL['num_candidates'], SMALL['num_iterations'])
  np.testing.assert_allclose(static, looped, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_static['ess'], s_loop['ess'], rtol=1e-5)
  np.testing.assert_array_equal(s_static['nfe'], s_loop['nfe'])


def test_candidates_are_distinct_and_start_from_the_same_state():
  """The seed mutated x_i and t_i while drawing, so later candidates started re-noised."""
  step = edm.StepSettings(num_steps=8, S_churn=40.0)
  t = step.sigmas(TB.model_denoiser)
  keys = sample_keys(5, 2)
  x = jax.random.normal(jax.random.key(6), (2,) + TB.shape) * t[3]
  ids = jnp.arange(8)
  cands = jax.jit(lambda x: edm.propose(TB.model_denoiser, x, keys, ids, 3, t, None, step,
                                        True))(x)
  flat = np.asarray(cands).reshape(2, 8, -1)
  dist = np.linalg.norm(flat[:, :, None] - flat[:, None], axis=-1) + np.eye(8)
  assert dist.min() > 1e-3

  @jax.jit
  def alone(j):
    # One churned Heun step from (x_3, t_3) with candidate j's own noise.
    eps = schedule.candidates_normal(jax.vmap(lambda k: schedule.step_key(k, 3))(keys),
                                     j[None], TB.shape)[:, 0]
    return churn.edm_step(TB.model_denoiser, x, jnp.full([2], t[3]), jnp.full([2], t[4]), eps,
                        gamma=step.gamma(jnp.full([2], t[3])))[0]

  for j in range(8):
    np.testing.assert_allclose(cands[:, j], alone(jnp.asarray(j)), rtol=1e-6, atol=1e-6)


def test_deterministic_proposal_is_refused():
  with pytest.raises(ValueError, match='only the initial-latent'):
    samplers.get_sampler('isir')(TB.model_denoiser, TB.discriminator, shape=TB.shape,
                                 num_steps=6, num_candidates=4)
  x, stats = isir_fn(num_steps=6, num_candidates=4, initial_only=True)(sample_keys(7, 64))
  assert np.all(np.asarray(stats['nfe']) == 11)  # plain EDM steps
  assert float(stats['ess_initial'].mean()) < 1.0 and np.all(np.asarray(stats['ess']) == 1)
  with pytest.raises(ValueError, match='discriminator is required'):
    samplers.get_sampler('isir')(TB.model_denoiser, None, shape=TB.shape)


def test_isir_chain_targets_the_weights_and_masks_inactive_candidates():
  """i-SIR with the kept candidate re-weighted is invariant for the target ∝ w."""
  w = jnp.array([1.0, 2.0, 3.0, 4.0])
  keys = sample_keys(8, 20000)

  def propose(ids):
    v = jax.vmap(lambda k: jax.vmap(
        lambda c: jax.random.randint(jax.random.fold_in(k, c), (), 0, 4))(ids))(keys)
    return v[..., None].astype(jnp.float32), jnp.log(w)[v]

  pick, pick_lw, ess = jax.jit(lambda: isir.isir_chain(propose, keys, 2, 2, 6))()
  freq = np.bincount(np.asarray(pick[:, 0], int), minlength=4) / 20000
  np.testing.assert_allclose(freq, w / w.sum(), atol=0.01)
  np.testing.assert_allclose(pick_lw, jnp.log(w)[pick[:, 0].astype(int)], rtol=1e-6)
  assert np.all((np.asarray(ess) >= 0.5) & (np.asarray(ess) <= 1.0 + 1e-6))

  # Candidates beyond n_active (here with overwhelming weights) are never picked.
  def propose_ids(ids):
    lw = jnp.where(ids >= 2, 100.0, 0.0)
    return (jnp.broadcast_to(ids, (8,) + ids.shape)[..., None].astype(jnp.float32),
            jnp.broadcast_to(lw, (8,) + ids.shape))

  pick, _, _ = isir.isir_chain(propose_ids, keys[:8], 2, 5, 3)
  # Live ids: 0, 1 (iteration 1), then slot 1 of iterations 2 and 3 (ids 5 and 9).
  assert set(np.asarray(pick[:, 0]).astype(int)) <= {0, 1, 5, 9}


def test_adaptive_schedule_and_per_step_schedules():
  n, k = isir.adaptive_schedule([0.0, 0.0084, 0.5, 2.0156])
  np.testing.assert_array_equal(n, [1, 2, 2, 6])
  # rho = 2M / (2M + N - 1); K = ceil(-3 ln 10 / ln rho).
  np.testing.assert_array_equal(k, [1, 2, 10, 9])
  x, stats = isir_fn(num_steps=4, S_churn=40.0, num_candidates=tuple(n),
                     num_iterations=tuple(k))(sample_keys(9, 8))
  # Per step (N + (K-1)(N-1)) * NFE: 1*2 + 3*2 + 11*2 + 46*1 (the last step is Euler).
  assert np.all(np.asarray(stats['nfe']) == 76)
  assert np.all(np.isfinite(np.asarray(x)))
  with pytest.raises(ValueError, match='num_candidates must be'):
    isir_fn(num_steps=4, S_churn=40.0, num_candidates=(1, 2))


def test_sample_depends_only_on_its_key():
  """Sample 5 is the same whatever the other samples of its batch are."""
  keys = sample_keys(4, 64)
  others = sample_keys(11, 64).at[5].set(keys[5])
  batch, _ = isir_fn(**SMALL)(keys)
  again, _ = isir_fn(**SMALL)(others)
  np.testing.assert_allclose(again[5], batch[5], rtol=1e-5, atol=1e-5)
  assert not np.allclose(again[4], batch[4])
