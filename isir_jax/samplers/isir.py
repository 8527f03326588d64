"""Diffusion ISIR: each reverse step corrected by iterated sampling-importance-resampling.

One reverse step from ``x`` at ``t_i`` targets ``p(x'|x) ∝ q(x'|x) r(x') / r(x)`` with ``q`` the
model's *stochastic* step (the proposal kernel, `edm.StepSettings.proposal`) and
``r = exp(d(., t_{i+1}))`` the discriminator's density ratio. i-SIR with N candidates and K
iterations (Andrieu et al. 2018):

  iteration 1:   draw N proposals x'_1..x'_N ~ q(.|x), pick j with probability ∝ r(x'_j);
  iteration k>1: candidate 1 is the current pick (with its weight), draw N-1 fresh proposals,
                 pick again.

The pick after K iterations is the next state. ``r(x)`` is common to all candidates and
cancels. The initial state ``x_T`` is chosen by the same i-SIR among ``sigma_max * eps``
draws weighted by ``exp(d(x, t_0))``. Every candidate of a step starts from the same
``(x_i, t_i)`` and none depends on the current pick, so with a K common to all steps the
``N + (K-1)(N-1)`` proposals of a step (B times that many rows) go through one discriminator
call before the K choices are made, or through ``candidate_chunk``-sized pieces mapped by
``lax.map`` (same draws and choices; values agree to float rounding, as XLA may round
differently for different batch shapes). Per-step K draws each iteration's proposals in turn.

Cost per step with proposals ``P = N + (K-1)(N-1)``:
  * 'churn' (EDM's churned Heun step): every proposal has its own churn noise before the
    solver step, so the denoiser runs on all of them: ``2 P`` evaluations (Heun; the last
    step, Euler, ``P``), and ``P`` discriminator evaluations;
  * 'ancestral', 'dpmpp_2m_sde' (shared mean): the mean is one denoiser call on the B
    states and the proposals are ``mean + s eps_c``: 1 denoiser evaluation whatever N and
    K, and ``P`` discriminator evaluations.

No wasted steps: where a step's proposal is deterministic (churn ``gamma_i = 0`` outside
``[S_min, S_max]``; ``s = 0`` at the last step of the shared-mean kernels) all candidates
would be the same point, so that step runs with N = K = 1: one plain step, no discriminator
call, nothing counted beyond it. The program holds both step bodies (the i-SIR step and the
plain one) under one ``lax.cond`` on a static per-step table inside the one scan, each
traced once: a smaller program than a scan per segment of the step range, which would trace
the plain body once per deterministic segment (twice for EDM's churn window).

The limit: as N, K grow each step samples ``q(x'|x) r(x') / Z(x)`` with ``Z(x) = E_q[r(x')]``.
The product over steps telescopes to the data distribution where ``Z(x) = r(x, t_i)``, which
holds for the model's exact reverse kernel but only approximately for a discretised step, so
a kernel- and discretisation-dependent bias remains (exact testbed, 18 Heun steps at
S_churn = 40: weight error < 0.01 at N=16, K=4; 32 steps: it overshoots by about 0.04; see
benchmarks/results/testbed.md for the shared-mean kernels).

Per-step schedules: ``num_candidates`` / ``num_iterations`` are ints or per-step sequences
(length ``num_steps``); `adaptive_schedule` gives the seed's rule from DiffRS margins. With a
variable N the candidate batch has the static size ``max N_i`` and the candidates beyond
``N_i`` get zero weight (they are computed for the static shape, but not counted: the
counts are the method's, ``N_i + (K_i-1)(N_i-1)`` proposals per step, as are those of
``candidate_chunk`` padding); a variable K is a ``while_loop`` bound, so it costs only what
it uses.

Keys: candidate c of step i of sample b draws its proposal noise from
``fold_in(fold_in(fold_in(keys[b], i), 0), c)`` -- candidate 0 of iteration 1 is exactly the
noise of `edm_sample`, so N = 1 reproduces EDM with the same kernel bit for bit.
"""

import dataclasses
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isir_jax.samplers import checks, edm, schedule, weights

Array = jax.Array
IntOrSteps = Union[int, Sequence[int]]


def adaptive_schedule(margins) -> tuple[np.ndarray, np.ndarray]:
  """The seed's adaptive (N_i, K_i) from DiffRS margins ``M_i`` (e.g. `Thresholds.increment[1:]`).

  ``N_i = ceil(2 M_i + 1)``, ``rho_i = 2 M_i / (2 M_i + N_i - 1)``,
  ``K_i = ceil(-3 ln 10 / ln rho_i)`` (so that ``rho_i^K_i <= 1e-3``), ``K_i = 1`` where ``N_i = 1``.

  Args:
    margins: [n] non-negative margins, one per reverse step.

  Returns:
    int arrays N [n], K [n].
  """
  m = np.asarray(margins, np.float64)
  if np.any(m < 0):
    raise ValueError(f'isir.adaptive_schedule: margins must be >= 0, got {m}')
  n = np.ceil(2 * m + 1).astype(int)
  with np.errstate(divide='ignore', invalid='ignore'):
    rho = 2 * m / (2 * m + n - 1)
    k = np.ceil(-3 * np.log(10) / np.log(rho))
  k = np.where(n == 1, 1, k).astype(int)
  return n, k


@dataclasses.dataclass(frozen=True)
class ISIRSettings:
  """ISIR-specific settings (the step itself is `edm.StepSettings`)."""
  num_candidates: IntOrSteps = 16
  num_iterations: IntOrSteps = 1
  candidate_chunk: Optional[int] = None      # candidates per call (None: all at once)
  initial_only: bool = False                 # i-SIR on the initial latent only
  weight_scale: float = 1.0                  # weights exp(scale * d): > 1 sharpens a weak d
  step_stats: bool = False                   # also report the ESS of every step ('ess_steps')

  def per_step(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step (N_i, K_i) int arrays [num_steps]; (1, 1) everywhere if `initial_only`."""
    out = []
    for name in ('num_candidates', 'num_iterations'):
      v = np.broadcast_to(np.asarray(getattr(self, name), int), (num_steps,)) if np.ndim(
          getattr(self, name)) == 0 else np.asarray(getattr(self, name), int)
      if v.shape != (num_steps,) or np.any(v < 1):
        raise ValueError(f'isir: {name} must be an int >= 1 or {num_steps} ints >= 1 '
                         f'(one per step), got {getattr(self, name)!r}')
      out.append(np.ones(num_steps, int) if self.initial_only else v)
    return out[0], out[1]

  def initial(self) -> tuple[int, int]:
    """(N, K) of the initial-latent stage: the largest of the steps'."""
    return int(np.max(self.num_candidates)), int(np.max(self.num_iterations))


def _parse(settings: dict) -> tuple[edm.StepSettings, ISIRSettings]:
  step, cfg = checks.parse_settings('isir', settings, edm.StepSettings, ISIRSettings)
  n, _ = cfg.per_step(step.num_steps)
  if n.max() > 1 and not step.stochastic:
    if step.shared_mean:
      why = (f'proposal={step.proposal!r} with eta=0 is the deterministic (DDIM / ODE) step; '
             'set 0 < eta <= 1')
    else:
      why = (f'S_churn={step.S_churn}, S_noise={step.S_noise}, S_min={step.S_min}, '
             f'S_max={step.S_max}; set S_churn > 0')
    raise ValueError(
        f'isir: the proposal is deterministic ({why}), so the num_candidates='
        f'{cfg.num_candidates} candidates of a reverse step would all be the same point and '
        'only the initial-latent stage would act. Use a stochastic proposal, or '
        'initial_only=True to run the initial-latent selection alone.')
  if checks.concrete(cfg.weight_scale) and cfg.weight_scale <= 0:
    raise ValueError(f'isir: weight_scale must be > 0, got {cfg.weight_scale}')
  chunk = cfg.candidate_chunk
  if chunk is not None and (not isinstance(chunk, (int, np.integer)) or chunk < 1):
    raise ValueError(f'isir: candidate_chunk must be an int >= 1 or None, got {chunk!r}')
  return step, cfg


def normalised_ess(log_w: Array, active) -> Array:
  """``(sum w)^2 / (sum w^2) / N`` per row of log weights [B, N_max] with ``active`` of them live."""
  w = jnp.exp(log_w - jnp.max(log_w, axis=1, keepdims=True))
  return jnp.sum(w, 1) ** 2 / jnp.sum(w ** 2, 1) / active


def chunked(evaluate: Callable, ids: Array, chunk: Optional[int]):
  """``evaluate(ids [c]) -> (x [B, c, ...], log_w [B, c])`` over contiguous ``ids``, at most
  ``chunk`` ids per call, in equal pieces (``lax.map``)."""
  count = ids.shape[0]
  if chunk is None or chunk >= count:
    return evaluate(ids)
  pieces = -(-count // chunk)
  size = -(-count // pieces)
  # Padding ids (fewer than `pieces`) are just further candidate indices; their results are
  # dropped.
  padded = ids[0] + jnp.arange(pieces * size)
  xs, lw = lax.map(evaluate, padded.reshape(pieces, size))         # [P, B, c, ...], [P, B, c]
  xs = jnp.moveaxis(xs, 0, 1).reshape((xs.shape[1], pieces * size) + xs.shape[3:])
  lw = jnp.moveaxis(lw, 0, 1).reshape(lw.shape[1], pieces * size)
  return xs[:, :count], lw[:, :count]


def candidate_log_ratios(discriminator, x: Array, sigma, class_labels: Optional[Array]) -> Array:
  """The discriminator's log ratio [B, c] of candidates x [B, c, ...] at noise ``sigma``, in
  one call on the B c rows (sample b's labels repeated for its candidates)."""
  batch, count = x.shape[:2]
  labels = None if class_labels is None else jnp.repeat(class_labels, count, axis=0)
  lw = discriminator.log_ratio(x.reshape((batch * count,) + x.shape[2:]),
                               edm.full_rows(sigma, batch * count), labels)
  return lw.reshape(batch, count)


def num_proposals(n, k):
  """Proposals of an i-SIR chain with N candidates and K iterations: ``N + (K-1)(N-1)``."""
  return n + (k - 1) * (n - 1)


def choose(choice_keys: Array, k, lw: Array, n_active) -> tuple[Array, Array]:
  """Choice k of a chain among candidates with log weights lw [B, N] (slot 0 is the kept pick
  for k > 0; slots beyond ``n_active`` get zero weight): the chosen slots [B] and the
  normalised ESS [B], NaN where an active log weight is not finite (never chosen)."""
  active = jnp.arange(lw.shape[1]) < n_active
  bad = weights.nonfinite_rows(lw, active)
  lw = jnp.where(active, weights.drawable(lw), -jnp.inf)
  idx = jax.vmap(lambda kk, l: jax.random.categorical(schedule.choice_key(kk, k), l))(
      choice_keys, lw)
  return idx, jnp.where(bad, jnp.nan, normalised_ess(lw, n_active))


def take(v: Array, idx: Array) -> Array:
  """Row b of the result is ``v[b, idx[b]]``."""
  return jnp.take_along_axis(v, idx.reshape((-1, 1) + (1,) * (v.ndim - 2)), axis=1)[:, 0]


def isir_chain(propose: Callable, choice_keys: Array, n_active, n_max: int, iterations,
               chunk: Optional[int] = None) -> tuple[Array, Array, Array]:
  """i-SIR over candidates from ``propose``: K iterations, N candidates.

  Proposals do not depend on the current pick, so with a static K every proposal of the
  chain (``N + (K-1)(N-1)``, ids in that order) is drawn and weighted in one call (or
  ``chunk``-sized pieces) before the K choices, which only read log weights. A traced K
  (per-step schedules) runs a loop that draws each iteration's proposals in turn; both
  give the same draws and choices.

  Args:
    propose: ``propose(ids [c]) -> (x [B, c, ...], log_w [B, c])`` for candidate indices ids;
      candidates with different ids are independent draws.
    choice_keys: [B] keys of the choices (iteration k uses ``schedule.choice_key(., k)``).
    n_active: N (int or traced scalar <= n_max); candidates beyond it get zero weight.
    n_max: static candidate batch size.
    iterations: K (int, or traced scalar >= 1).
    chunk: optional number of candidates per call.

  Returns:
    The pick [B, ...], its log weight [B], and the mean normalised ESS over iterations [B]
    (NaN where an active log weight was not finite).
  """
  if n_max == 1:  # Nothing to choose: plain sampling from the proposal.
    xs, lw = propose(jnp.arange(1))
    return xs[:, 0], lw[:, 0], jnp.ones(lw.shape[:1])
  if isinstance(iterations, (int, np.integer)):
    xs, lw = chunked(propose, jnp.arange(num_proposals(n_max, int(iterations))), chunk)
    # Choices on the log weights alone; `pick` indexes the proposals.
    pick, ess = choose(choice_keys, 0, lw[:, :n_max], n_active)
    for k in range(1, int(iterations)):
      fresh = num_proposals(n_max, k) + jnp.arange(n_max - 1)
      slots = jnp.concatenate([pick[:, None], jnp.broadcast_to(fresh, (len(pick), n_max - 1))],
                              axis=1)
      idx, e = choose(choice_keys, k, jnp.take_along_axis(lw, slots, axis=1), n_active)
      pick, ess = take(slots, idx), ess + e
    return take(xs, pick), take(lw, pick), ess / iterations

  slots = jnp.arange(n_max)
  xs, lw = chunked(propose, slots, chunk)
  idx, ess = choose(choice_keys, 0, lw, n_active)

  def iteration(k, carry):
    # Iteration k > 1: the current pick is candidate 1, with its weight; N-1 fresh proposals.
    pick, pick_lw, ess = carry
    fresh, fresh_lw = chunked(propose, num_proposals(n_max, k) + slots[:-1], chunk)
    xs = jnp.concatenate([pick[:, None], fresh], axis=1)
    lw = jnp.concatenate([pick_lw[:, None], fresh_lw], axis=1)
    idx, e = choose(choice_keys, k, lw, n_active)
    return take(xs, idx), take(lw, idx), ess + e

  pick, pick_lw, ess = lax.fori_loop(1, iterations, iteration, (take(xs, idx), take(lw, idx),
                                                                 ess))
  return pick, pick_lw, ess / iterations


@checks.sample_function('isir', uses='log_ratio')
def isir_sample(denoiser, discriminator, keys: Array, class_labels: Optional[Array] = None,
                latents: Optional[Array] = None, *, shape, **settings) -> tuple[Array, dict]:
  """Diffusion ISIR sampling (see the module docstring for the method).

  Args:
    denoiser: a `Denoiser`.
    discriminator: a `Discriminator` (only ``log_ratio`` is used).
    keys: [B] per-sample keys.
    class_labels: [B, label_dim] or None.
    latents: optional [B, *shape] standard normal latents; they replace candidate 0 of the
      initial stage (the other candidates still come from the keys).
    shape: static image shape.
    **settings: `edm.StepSettings` fields (a stochastic proposal when N > 1: S_churn > 0
      for 'churn', eta > 0 for the shared-mean kernels) plus num_candidates (N, int or per
      step), num_iterations (K, int or per step), candidate_chunk, initial_only,
      weight_scale (weights ``exp(weight_scale * d)``; 1 is the i-SIR target, > 1 sharpens
      an under-confident discriminator's correction; may be traced), step_stats.

  Returns:
    images [B, *shape] and stats: the counts of `edm.cost_stats` ('nfe', 'disc_evals',
    'disc_grads' = 0; steps with a deterministic proposal count one plain step), 'ess' [B]
    (mean over the corrected steps of the normalised ESS of the i-SIR weights, averaged over
    iterations; 1 when no step is corrected), 'ess_initial' [B] (the same for the initial
    stage), `weights.STAT` [B] (the first level k whose log weights, evaluated at t_k, were not
    finite; 0 is the initial stage, -1 if none) and, with ``step_stats``, 'ess_steps'
    [B, num_steps] (each step's; NaN where the step is not corrected).
  """
  step, cfg = _parse(settings)
  n_steps, k_steps = cfg.per_step(step.num_steps)
  n0, k0 = cfg.initial()
  return _isir(denoiser, discriminator, keys, class_labels, latents, shape, step,
               cfg.candidate_chunk, n_steps, k_steps, n0, k0, int(n_steps.max()), n0,
               cfg.weight_scale, cfg.step_stats)


def isir_sample_schedule(denoiser, discriminator, keys: Array, num_candidates: Array,
                         num_iterations: Array, class_labels: Optional[Array] = None,
                         latents: Optional[Array] = None, *, shape, max_candidates: int,
                         **settings) -> tuple[Array, dict]:
  """`isir_sample` with N and K as arrays that may be traced: one program for many (N, K).

  The candidate batch has the static size ``max_candidates`` (candidates beyond N get zero
  weight), so N = 1 here runs ``max_candidates`` candidates; use `isir_sample` for speed.
  The initial stage uses ``max(N)`` candidates and ``max(K)`` iterations. Same law of the
  samples as `isir_sample`, not the same draws (later iterations number their candidates
  from ``max_candidates``).

  Args:
    num_candidates, num_iterations: int scalars or [num_steps] arrays, 1 <= N <= max_candidates.
    max_candidates: static candidate batch size.
    (others as in `isir_sample`; settings exclude the N, K and initial-stage settings.)
  """
  fixed = {'num_candidates', 'num_iterations', 'initial_only'} & set(settings)
  if fixed:
    raise TypeError(f'isir.isir_sample_schedule: {sorted(fixed)} are arguments or unsupported')
  step, cfg = _parse(dict(settings, num_candidates=max_candidates))
  n_steps = jnp.broadcast_to(jnp.asarray(num_candidates, jnp.int32), (step.num_steps,))
  k_steps = jnp.broadcast_to(jnp.asarray(num_iterations, jnp.int32), (step.num_steps,))
  return _isir(denoiser, discriminator, keys, class_labels, latents, shape, step,
               cfg.candidate_chunk, n_steps, k_steps, jnp.max(n_steps), jnp.max(k_steps),
               max_candidates, max_candidates, cfg.weight_scale, cfg.step_stats)


def _isir(denoiser, discriminator, keys, class_labels, latents, shape, step, chunk, n_steps,
          k_steps, n0, k0, n_max: int, n0_max: int, weight_scale, step_stats: bool):
  """The sampler with per-step N, K [n] and initial n0, k0 (static or traced) and static
  candidate batch sizes ``n_max`` (steps) and ``n0_max`` (initial stage)."""
  t = step.sigmas(denoiser)
  batch = keys.shape[0]
  # A K common to all steps stays static, so that each chain draws its proposals in one call.
  static_k = isinstance(k_steps, np.ndarray) and np.all(k_steps == k_steps[0])
  # Steps with a deterministic proposal run with N = K = 1 (no discriminator call).
  noisy = step.noisy_steps(t) & (n_max > 1)

  def k_of(i):
    return int(k_steps[0]) if static_k else jnp.asarray(k_steps)[i]

  def log_weights(x, sigma, needed: bool):
    """log r(x) [B, c] of candidates x [B, c, ...] (zeros where there is nothing to choose)."""
    if not needed:
      return jnp.zeros(x.shape[:2])
    return weight_scale * candidate_log_ratios(discriminator, x, sigma, class_labels)

  # Initial stage: i-SIR among sigma_max * eps weighted by exp(d(x, t_0)).
  def propose_latent(ids):
    x = edm.initial_candidates(keys, ids, t[0], shape, latents)
    return x, log_weights(x, t[0], n0_max > 1)

  lkeys = jax.vmap(schedule.latent_key)(keys)
  x0, _, ess0 = isir_chain(propose_latent, lkeys, n0, n0_max, k0, chunk)
  # A NaN ESS marks a non-finite log weight: recorded at the level it was evaluated at.
  first_bad = weights.record_first(weights.initial(batch), 0, jnp.isnan(ess0))

  def body(carry, i, heun):
    state, ess_sum, first_bad, ess_steps = carry
    draw, x0_prev = edm.proposals(denoiser, state, keys, i, t, class_labels, step, heun)

    def corrected(_):
      def propose(ids):
        x_new = draw(ids)
        return x_new, log_weights(x_new, t[i + 1], True)

      n_i = jnp.asarray(n_steps)[i]
      skeys = jax.vmap(lambda k: schedule.step_key(k, i))(keys)
      x, _, ess = isir_chain(propose, skeys, n_i, n_max, k_of(i), chunk)
      return x, jnp.where(n_i > 1, ess, 0.0)

    def plain(_):
      return draw(jnp.arange(1))[:, 0], jnp.zeros([batch])

    if noisy.all() or not noisy.any():
      x, ess = (corrected if noisy.all() else plain)(None)
    else:
      x, ess = lax.cond(jnp.asarray(noisy)[i], corrected, plain, None)
    if ess_steps is not None:
      ess_steps = ess_steps.at[:, i].set(ess)
    return ((x, x0_prev), ess_sum + ess, weights.record_first(first_bad, i + 1, jnp.isnan(ess)),
            ess_steps)

  (x, _), ess_sum, first_bad, ess_steps = edm.run_steps(
      body, (edm.initial_state(x0, step), jnp.zeros([batch]), first_bad,
             jnp.zeros([batch, step.num_steps]) if step_stats else None), step)
  # The method's counts: P_i = N_i + (K_i-1)(N_i-1) proposals where the step is corrected,
  # 1 elsewhere; each proposal is one discriminator evaluation and (churn) `step.nfe(i)`
  # denoiser evaluations; a shared-mean step is one denoiser evaluation.
  n_steps, k_steps = jnp.asarray(n_steps), jnp.asarray(k_steps)
  corrected_steps = jnp.asarray(noisy) & (n_steps > 1)
  proposals = jnp.where(corrected_steps, num_proposals(n_steps, k_steps), 1)
  denoised = jnp.ones_like(proposals) if step.shared_mean else proposals
  nfe = jnp.sum(denoised * jnp.asarray(step.nfe_table()))
  disc_evals = jnp.sum(jnp.where(corrected_steps, proposals, 0))
  n0, k0 = jnp.asarray(n0), jnp.asarray(k0)
  if n0_max > 1:
    disc_evals = disc_evals + jnp.where(n0 > 1, num_proposals(n0, k0), 0)
  stats = edm.cost_stats(batch, nfe, disc_evals)
  stats['ess'] = jnp.where(corrected_steps.any(), ess_sum / jnp.maximum(corrected_steps.sum(), 1),
                           1.0)
  stats['ess_initial'] = ess0
  stats[weights.STAT] = first_bad
  if step_stats:
    stats['ess_steps'] = jnp.where(corrected_steps, ess_steps, jnp.nan)
  return x, stats


def isir_sampler(denoiser, discriminator=None, *, shape, **settings) -> Callable:
  """ISIR's factory: ``isir_sampler(denoiser, discriminator, *, shape, **settings)``
  returns ``sample_fn(keys, class_labels=None, latents=None) -> (images, stats)``.

  Settings: `edm.StepSettings` fields plus num_candidates, num_iterations, candidate_chunk,
  initial_only, weight_scale, step_stats (`isir_sample`). Stats: 'nfe', 'disc_evals',
  'disc_grads' = 0, 'ess', 'ess_initial' (and 'ess_steps' with step_stats).
  """
  return edm.make_sampler(isir_sample, _parse, denoiser, discriminator, shape=shape, **settings)
