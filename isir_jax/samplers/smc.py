"""Population correction: sequential Monte Carlo with the discriminator's density ratio.

ISIR normalises each reverse step on its own; SMC instead carries a log-weight per sample
and resamples within groups of ``G = group_size`` consecutive samples (the particles;
sample b is in group ``b // G``). After a weighted step from ``(x, t)`` to ``(x', t')``

    log w += lambda (d(x', t') - d(x, t)),          lambda = weight_scale,

and the group is resampled in proportion to ``w`` (systematic or multinomial), after which
the weights are reset. The increments telescope to ``lambda d(x_0, 0)`` (the first weighted
step subtracts nothing: the initial potential is 1), so as G grows the particles follow
``p_model(x_0) r(x_0)^lambda``, the data distribution at lambda = 1, *whatever* each step's
normaliser ``E_q[r(x')] / r(x)`` is: the bias that a discretised kernel leaves in ISIR's
per-step target does not arise (Feynman-Kac steering, Singhal et al. 2025, "A general
framework for inference-time scaling and steering of diffusion models"; Wu et al. 2023,
"Practical and asymptotically exact conditional sampling in diffusion models").

Options, each a setting of `SMCSettings`:
  * which steps are weighted: the stochastic steps whose target level ``t'`` lies in
    ``resample_window`` (the discriminator is called on those only; skipping steps keeps
    the telescoping, the next weighted step subtracts the last evaluated ``d``), and
    whether the last of them is (``final_resample``: resampling there leaves exact copies,
    as no later noise separates them);
  * when to resample: every weighted step (``ess_threshold=None``) or when the group's
    ESS falls below ``ess_threshold * G``; the last weighted step always resamples, so the
    outputs are equally weighted;
  * ``num_candidates`` N > 1: each particle draws N candidates of its step, keeps one in
    proportion to ``r^lambda`` and carries the weight ``mean_c r(x'_c)^lambda / r(x)^lambda``
    (a properly weighted SIR move: ISIR with K = 1 as the move inside SMC). The initial
    latent is such a move too (``r(x) = 1``), as in ISIR;
  * ``guidance_weight`` w > 0 (the 'ancestral' kernel only; twisted SMC): on weighted steps
    the mean is computed from the guided denoiser ``D - w g`` (DG's term, ``g = -t^2
    grad_x d``, in DG's time window), the same noise scale, and the weight gains the
    Gaussian density ratio ``q_plain(x'|x) / q_guided(x'|x)``, so the target is unchanged.
    One discriminator gradient per weighted step where some sample is in the window.
    ``twist_correction=False`` leaves that ratio out: the guided kernel becomes the model
    that SMC corrects, an approximation that over-corrects along the ratio (as DG's w > 1
    or tempering does) instead of targeting the data.

G = 1 never resamples: with N = 1 it is the plain sampler of the same kernel (no
discriminator call; with guidance, the guided kernel alone), with N > 1 ISIR with K = 1,
bit for bit. Keys: the resampling of group g at step i draws from
``fold_in(fold_in(keys[g G], i), 2)`` (`schedule.resample_key`), so a sample does not
depend on the batch size or device count as long as batches hold whole groups.

Cost per sample: the plain sampler's denoiser calls (N times that on the weighted steps of
the 'churn' kernel), one discriminator forward per weighted step and candidate (N more for
the initial latent when N > 1), and with guidance one gradient per weighted step.
"""

import dataclasses
import math
from typing import Callable, Optional

import blackjax.smc.ess
import blackjax.smc.resampling
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isir_jax.samplers import checks, dg, edm, isir, schedule, weights

Array = jax.Array

RESAMPLERS = {'systematic': blackjax.smc.resampling.systematic,
              'multinomial': blackjax.smc.resampling.multinomial}


@dataclasses.dataclass(frozen=True)
class SMCSettings:
  """SMC-specific settings (the step itself is `edm.StepSettings`)."""
  group_size: int = 16                    # G particles per group (consecutive samples)
  weight_scale: float = 1.0               # lambda: increments lambda (d(x') - d(x))
  resample: str = 'systematic'            # 'systematic' or 'multinomial'
  ess_threshold: Optional[float] = None   # None: every weighted step; else ESS < thr * G
  resample_window: tuple = (0.0, math.inf)   # target levels t' of the weighted steps
  final_resample: bool = True             # whether the last step in the window is weighted
  num_candidates: int = 1                 # N: SIR candidates per particle and weighted step
  candidate_chunk: Optional[int] = None   # candidates per discriminator call (None: all)
  guidance_weight: float = 0.0            # w: twisted proposal (ancestral kernel only)
  twist_correction: bool = True           # weight by q_plain / q_guided (exact target)
  time_min: float = 0.01                  # DG's window of VP times for the guidance
  time_max: float = 1.0

  def weighted_steps(self, step: edm.StepSettings, t: Array) -> np.ndarray:
    """Static bool [n]: the steps whose weights are updated (and maybe resampled)."""
    t_next = np.asarray(t)[1:]
    lo, hi = self.resample_window
    weighted = step.noisy_steps(t) & (t_next >= lo) & (t_next <= hi)
    if not self.final_resample and weighted.any():
      weighted[np.flatnonzero(weighted)[-1]] = False
    return weighted


def _parse(settings: dict) -> tuple[edm.StepSettings, SMCSettings]:
  step, cfg = checks.parse_settings('smc', settings, edm.StepSettings, SMCSettings)
  cfg = dataclasses.replace(cfg, resample_window=tuple(cfg.resample_window))
  if cfg.group_size < 1:
    raise ValueError(f'smc: group_size must be >= 1, got {cfg.group_size}')
  if cfg.resample not in RESAMPLERS:
    raise ValueError(f'smc: resample must be one of {sorted(RESAMPLERS)}, got {cfg.resample!r}')
  if cfg.ess_threshold is not None and not 0 < cfg.ess_threshold <= 1:
    raise ValueError(f'smc: ess_threshold must be in (0, 1] or None, got {cfg.ess_threshold}')
  if len(cfg.resample_window) != 2 or not 0 <= cfg.resample_window[0] <= cfg.resample_window[1]:
    raise ValueError('smc: resample_window must be (low, high) noise levels with 0 <= low <= '
                     f'high, got {cfg.resample_window!r}')
  if cfg.num_candidates < 1:
    raise ValueError(f'smc: num_candidates must be >= 1, got {cfg.num_candidates}')
  if cfg.candidate_chunk is not None and cfg.candidate_chunk < 1:
    raise ValueError(f'smc: candidate_chunk must be >= 1 or None, got {cfg.candidate_chunk}')
  if cfg.guidance_weight and step.proposal != 'ancestral':
    raise ValueError("smc: guidance_weight needs proposal='ancestral' (its Gaussian kernel "
                     f'gives the density ratio of the twisted proposal), got {step.proposal!r}')
  if not step.stochastic:
    raise ValueError('smc: the proposal is deterministic, so no step is weighted; set '
                     "S_churn > 0 (proposal='churn') or eta > 0 (shared-mean kernels)")
  return step, cfg


def _log_mean_exp(lw: Array) -> Array:
  """``log mean_c exp(lw[:, c])`` per row of [B, c]."""
  return jax.nn.logsumexp(lw, axis=1) - jnp.log(lw.shape[1])


def _finite(lw: Array) -> Array:
  """Non-finite log weights are never drawn (`weights.drawable`); a group with none left
  is drawn uniformly."""
  lw = weights.drawable(lw)
  return jnp.where(jnp.isfinite(lw).any(-1, keepdims=True), lw, 0.0)


def resample_groups(keys: Array, log_w: Array, scheme: str, trigger: Array) -> Array:
  """Ancestor indices [B] (global rows) after resampling each group where ``trigger``.

  Args:
    keys: [B / G] resampling keys, one per group.
    log_w: [B / G, G] log weights (non-finite ones are never drawn).
    scheme: 'systematic' or 'multinomial'.
    trigger: bool [B / G]: groups that resample; the others keep their particles.
  """
  groups, size = log_w.shape
  weights = jax.nn.softmax(_finite(log_w), axis=1)
  idx = jax.vmap(lambda k, w: RESAMPLERS[scheme](k, w, size))(keys, weights)
  idx = jnp.where(trigger[:, None], idx, jnp.arange(size))
  return (jnp.arange(groups)[:, None] * size + idx).reshape(-1)


def lineage_stats(origin: Array, size: int) -> tuple[Array, Array]:
  """Per group of ``size``: distinct ancestors left and the effective number of lineages.

  ``origin`` [B] is each particle's initial index in its group. With ``n_a`` outputs
  descending from ancestor a, the effective number is ``G^2 / sum_a n_a^2`` (equal to the
  distinct count when every ancestor has as many descendants). Both [B / G].
  """
  counts = jnp.sum(jax.nn.one_hot(origin.reshape(-1, size), size), axis=1)   # [B/G, G]
  return jnp.sum(counts > 0, axis=1), size ** 2 / jnp.sum(counts ** 2, axis=1)


def nearest_in_group(x: Array, size: int) -> Array:
  """Euclidean distance [B] from each sample to the nearest other sample of its group
  (inf for G = 1): near-duplicates left by resampling have a small one."""
  flat = x.reshape(-1, size, math.prod(x.shape[1:]))
  sq = jnp.sum((flat[:, :, None] - flat[:, None]) ** 2, axis=-1)
  sq = jnp.where(jnp.eye(size, dtype=bool), jnp.inf, sq)
  return jnp.sqrt(jnp.min(sq, axis=-1)).reshape(-1)


def _ancestral_mean(denoiser, x: Array, keys: Array, i, t: Array, class_labels,
                    step: edm.StepSettings):
  """The ancestral kernel of step i as ``(m, c, s, draw)``: its mean, coefficients and
  ``draw(ids)`` (the draws of `edm.proposals`)."""
  c, _, s = (jnp.asarray(v)[i] for v in step.mean_coefficients(t))
  m, _ = edm.shared_mean(denoiser, x, None, edm.full_rows(t[i], x.shape[0]), c, 0.0,
                         class_labels)
  return m, c, s, lambda ids: m[:, None] + s * edm.step_noise(keys, ids, i, x.shape[1:])


def _twisted(discriminator, x: Array, m: Array, c, s, keys: Array, i, t: Array,
             class_labels, cfg: SMCSettings):
  """The twisted ancestral kernel of step i: ``(draw, correction, ran)``.

  ``draw(ids)`` gives candidates around the guided mean ``m - (1 - c) w g`` (the DDIM mean
  of ``D - w g``) with the plain kernel's noise; ``correction(xs)`` is the log density
  ratio ``log q_plain(x'|x) - log q_guided(x'|x)`` [B, c]; ``ran`` whether the
  discriminator's gradient was evaluated (some sample inside DG's window).
  """
  g, _, inside = dg.windowed_guidance(discriminator, x, edm.full_rows(t[i], x.shape[0]),
                                      class_labels, cfg.time_min, cfg.time_max)
  m_guided = m - (1 - c) * cfg.guidance_weight * g

  def draw(ids):
    return m_guided[:, None] + s * edm.step_noise(keys, ids, i, x.shape[1:])

  def correction(xs):
    axes = tuple(range(2, xs.ndim))
    plain = jnp.sum((xs - m[:, None]) ** 2, axis=axes)
    guided = jnp.sum((xs - m_guided[:, None]) ** 2, axis=axes)
    return (guided - plain) / (2 * s ** 2)

  return draw, correction, jnp.any(inside)


@checks.sample_function('smc', uses='log_ratio')
def smc_sample(denoiser, discriminator, keys: Array, class_labels: Optional[Array] = None,
               latents: Optional[Array] = None, *, shape, **settings) -> tuple[Array, dict]:
  """SMC sampling with the discriminator's density ratio (module docstring).

  Args:
    denoiser: a `Denoiser`.
    discriminator: a `Discriminator` (``log_ratio``; ``guidance`` with guidance_weight > 0).
    keys: [B] per-sample keys, B a multiple of group_size; sample b is in group b // G.
    class_labels: [B, label_dim] or None.
    latents: optional [B, *shape] standard normal latents (candidate 0 of each latent).
    shape: static image shape.
    **settings: `edm.StepSettings` fields (a stochastic proposal) plus the `SMCSettings`
      fields group_size, weight_scale, resample, ess_threshold, resample_window,
      final_resample, num_candidates, candidate_chunk, guidance_weight, twist_correction,
      time_min, time_max.

  Returns:
    images [B, *shape] and per-sample stats: the counts of `edm.cost_stats`; 'ess' and
    'ess_min' (the group's normalised ESS before resampling, mean and minimum over the
    weighted steps; 1 without any), 'resamples' (resampling events of the group),
    'ancestors' (distinct initial particles left in the group), 'lineages' (their effective
    number, `lineage_stats`), 'group_nn_dist' (`nearest_in_group`), `weights.STAT` (the
    first level k whose log weights, evaluated at t_k, were NaN or infinite in the group,
    -1 if none; such particles are never drawn, and the driver refuses the group's samples).
  """
  step, cfg = _parse(settings)
  if cfg.guidance_weight:
    checks.check_models('smc', denoiser, discriminator, 'guidance')
  size, n = cfg.group_size, cfg.num_candidates
  batch = keys.shape[0]
  if batch % size:
    raise ValueError(f'smc: the batch of {batch} keys is not a multiple of group_size={size} '
                     '(groups of consecutive samples must be whole)')
  t = step.sigmas(denoiser)
  # G = 1 with N = 1 never uses its weights: no discriminator forward at all, and without
  # guidance every step is the plain one.
  evaluate = size > 1 or n > 1
  weighted = cfg.weighted_steps(step, t) & (evaluate or cfg.guidance_weight != 0)
  last_weighted = int(np.flatnonzero(weighted)[-1]) if weighted.any() else -1
  groups = batch // size
  lead_keys = keys[::size]

  def log_r(x, sigma):
    """``lambda d(x, sigma)`` [B, c] of candidates x [B, c, ...]."""
    if not evaluate:
      return jnp.zeros(x.shape[:2])
    return cfg.weight_scale * isir.candidate_log_ratios(discriminator, x, sigma, class_labels)

  def sir(draw, sigma, choice_keys, correction=None):
    """A properly weighted SIR move among ``n`` candidates of ``draw``: the pick, its
    ``lambda d``, and ``log mean_c`` of the candidates' weights (with the correction)."""
    def propose(ids):
      x = draw(ids)
      return x, log_r(x, sigma)
    xs, lw = isir.chunked(propose, jnp.arange(n), cfg.candidate_chunk)
    total = lw if correction is None else lw + correction(xs)
    if n == 1:
      return xs[:, 0], lw[:, 0], total[:, 0]
    pick, _ = isir.choose(choice_keys, 0, total, n)
    return isir.take(xs, pick), isir.take(lw, pick), _log_mean_exp(total)

  # Initial latents: an SIR move among N candidates weighted by r(x, t_0) (N > 1), else
  # the plain latent with potential 1 (no call).
  lkeys = jax.vmap(schedule.latent_key)(keys)
  if n > 1:
    x, prev, log_w = sir(lambda ids: edm.initial_candidates(keys, ids, t[0], shape, latents),
                         t[0], lkeys)
  else:
    x = edm.initial_candidates(keys, jnp.arange(1), t[0], shape, latents)[:, 0]
    prev = log_w = jnp.zeros([batch])
  zeros = jnp.zeros([groups])
  initial_bad = weights.record_first(weights.initial(groups), 0,
                                     weights.nonfinite_rows(log_w.reshape(groups, size)))
  stats0 = dict(ess_sum=zeros, ess_min=jnp.ones([groups]), resamples=zeros.astype(jnp.int32),
                nonfinite=initial_bad, grads=jnp.zeros([], jnp.int32))
  origin = jnp.tile(jnp.arange(size), groups)

  def resample_step(i, x_new, x0_prev, log_w, prev, origin, acc):
    """Group ESS, resampling and statistics after the weight update of step i."""
    lw = log_w.reshape(groups, size)
    acc = dict(acc, nonfinite=weights.record_first(acc['nonfinite'], i + 1,
                                                   weights.nonfinite_rows(lw)))
    ess = jax.vmap(blackjax.smc.ess.ess)(_finite(lw)) / size
    trigger = jnp.full([groups], size > 1)
    if cfg.ess_threshold is not None and size > 1:
      trigger = (ess < cfg.ess_threshold) | (i == last_weighted)
    skeys = jax.vmap(lambda k: schedule.resample_key(schedule.step_key(k, i)))(lead_keys)
    rows = resample_groups(skeys, lw, cfg.resample, trigger)
    acc = dict(acc, ess_sum=acc['ess_sum'] + ess, ess_min=jnp.minimum(acc['ess_min'], ess),
               resamples=acc['resamples'] + trigger.astype(jnp.int32))
    log_w = jnp.where(jnp.repeat(trigger, size), 0.0, log_w[rows])
    x0_prev = None if x0_prev is None else x0_prev[rows]
    return x_new[rows], x0_prev, log_w, prev[rows], origin[rows], acc

  def body(carry, i, heun):
    (x, x0_prev), log_w, prev, origin, acc = carry
    skeys = jax.vmap(lambda k: schedule.step_key(k, i))(keys)
    # The plain kernel, outside the branches (its mean is one denoiser call either way).
    if cfg.guidance_weight:
      m, c, s, draw = _ancestral_mean(denoiser, x, keys, i, t, class_labels, step)
      x0_next = None
    else:
      draw, x0_next = edm.proposals(denoiser, (x, x0_prev), keys, i, t, class_labels, step,
                                    heun)

    def weighted_step(_):
      if cfg.guidance_weight:
        draw_w, correction, ran = _twisted(discriminator, x, m, c, s, keys, i, t,
                                           class_labels, cfg)
        acc_i = dict(acc, grads=acc['grads'] + ran.astype(jnp.int32))
        correction = correction if cfg.twist_correction else None
      else:
        draw_w, correction, acc_i = draw, None, acc
      x_new, new_prev, log_mean = sir(draw_w, t[i + 1], skeys, correction)
      return resample_step(i, x_new, x0_next, log_w + log_mean - prev, new_prev, origin,
                           acc_i)

    def plain_step(_):
      return draw(jnp.arange(1))[:, 0], x0_next, log_w, prev, origin, acc

    if weighted.all() or not weighted.any():
      out = (weighted_step if weighted.all() else plain_step)(None)
    else:
      out = lax.cond(jnp.asarray(weighted)[i], weighted_step, plain_step, None)
    x, x0_prev, log_w, prev, origin, acc = out
    return (x, x0_prev), log_w, prev, origin, acc

  (x, _), _, _, origin, acc = edm.run_steps(
      body, (edm.initial_state(x, step), log_w, prev, origin, stats0), step)

  # The method's counts: N proposals on weighted steps (each `step.nfe(i)` denoiser
  # evaluations for 'churn', one shared mean otherwise) and one plain step elsewhere.
  proposals = np.where(weighted, n, 1)
  denoised = np.ones_like(proposals) if step.shared_mean else proposals
  nfe = int(np.sum(denoised * step.nfe_table()))
  disc_evals = (int(weighted.sum()) * n + (n if n > 1 else 0)) * evaluate
  stats = edm.cost_stats(batch, nfe, disc_evals, acc['grads'])
  ancestors, lineages = lineage_stats(origin, size)
  per_group = dict(ess=jnp.where(weighted.any(), acc['ess_sum'] / max(weighted.sum(), 1), 1.0),
                   ess_min=acc['ess_min'], resamples=acc['resamples'], ancestors=ancestors,
                   lineages=lineages, **{weights.STAT: acc['nonfinite']})
  stats.update({k: jnp.repeat(v, size) for k, v in per_group.items()})
  stats['group_nn_dist'] = nearest_in_group(x, size)
  return x, stats


def smc_sampler(denoiser, discriminator=None, *, shape, **settings) -> Callable:
  """SMC's factory: ``smc_sampler(denoiser, discriminator, *, shape, **settings)`` returns
  ``sample_fn(keys, class_labels=None, latents=None) -> (images, stats)``, keys [B] with B a
  multiple of group_size.

  Settings: `edm.StepSettings` fields (a stochastic proposal) plus group_size, weight_scale,
  resample, ess_threshold, resample_window, final_resample, num_candidates, candidate_chunk,
  guidance_weight, twist_correction, time_min, time_max (`smc_sample`). Stats: 'nfe',
  'disc_evals', 'disc_grads', 'ess', 'ess_min', 'resamples', 'ancestors', 'lineages',
  'group_nn_dist', 'nonfinite_level'.
  """
  return edm.make_sampler(smc_sample, _parse, denoiser, discriminator, shape=shape, **settings)
