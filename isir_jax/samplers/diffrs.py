"""Diffusion Rejection Sampling (DiffRS, Na et al. 2024) as one ``while_loop``.

Thresholds come from a warm-up run of plain sampling (`estimate_thresholds`): per level k,
``M_k`` is the ``rej_percentile`` quantile of ``d(x_k, t_k)`` and ``M2_k`` that of the
increment ``d(x_k, t_k) - d(x_{k-1}, t_{k-1})`` (``M2_0 = 0``), both clipped at 0.

Sampling, per sample (the seed's ``generate_diffrs.py``):
  * level 0 (only if ``min_backsteps == 0``): accept the prior draw with probability
    ``min(1, exp(d(x, t_0) - M_0))``, else redraw it from the prior;
  * after a step to level k, with ``min_backsteps < k <= max_backsteps`` and
    ``backsteps > 0``: accept with probability ``min(1, exp(d(x_k) - d(x_{k-1}) - M2_k))``;
    on rejection re-noise back ``b = backsteps`` levels, ``x + sqrt(t_{k-b}^2 - t_k^2) eps``,
    and test there with ``min(1, exp(d(x) - M_{k-b}))`` (the prior test at level 0),
    repeating until a test accepts;
  * a sample whose denoiser count plus the evaluations it still needs from level k (with the
    configured solver: ``2 n - 1 - 2 k`` for Heun, ``n - k`` for Euler) would pass
    ``max_iter`` restarts from noise.

The step is EDM's churned step or, with ``proposal='ancestral'``, the DDIM(eta) step of
`edm` (one denoiser call per step); DPM-Solver++(2M) is refused, as its previous denoiser
output is not defined after a back-step.

Layout: ``slots`` lanes (default: the batch) each carry one sample at its own level. Every
loop iteration evaluates the discriminator on all lanes (the pending test), then takes one
EDM step on the lanes that passed it (all lanes are evaluated, unless none steps; the Heun
stage likewise, unless no stepping lane needs it). A finished sample is written to its
output row and its lane is refilled with the next sample of the batch. All randomness of
sample b comes from ``keys[b]`` (its n-th loop iteration uses ``fold_in(keys[b], n)``), so
its result does not depend on the lane it ran in or on the batch. Counts per sample: 'nfe'
its own denoiser evaluations (a loop iteration in which some lane steps evaluates every
lane; the lanes that do not step are not charged), 'disc_evals' one discriminator
evaluation per loop iteration of the sample (its lane is evaluated every iteration).

Deviations from the reference, all deliberate: a back-step never goes below level 0 (the
reference would index ``t_{-1}``); ``nfe`` counts every denoiser evaluation spent on the
sample, restarts included (the reference resets the count on restart); the increment test
always uses the log ratio of the state the step started from (the reference reuses a stale
value when that state was not tested, e.g. with ``min_backsteps > 0``).
"""

import dataclasses
import math
import os
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isir_jax.samplers import edm, schedule

Array = jax.Array


class Thresholds(NamedTuple):
  """DiffRS thresholds per level k = 0..n: ``log_ratio`` (M_k) and ``increment`` (M2_k)."""
  log_ratio: np.ndarray
  increment: np.ndarray


def warmup_log_ratios(denoiser, discriminator, keys: Array,
                      class_labels: Optional[Array] = None, *, shape,
                      **settings) -> Array:
  """Plain EDM sampling that records ``d(x_k, t_k)`` at every level k = 0..n: [B, n + 1].

  Args:
    denoiser, discriminator: the models.
    keys: [B] per-sample keys (the trajectories are those of `edm_sample` with these keys).
    class_labels: [B, label_dim] or None.
    shape: static image shape.
    **settings: `edm.StepSettings` fields, the same as the DiffRS sampler will use.
  """
  step, rest = edm.split_settings(settings)
  if rest:
    raise TypeError(f'diffrs.warmup_log_ratios: unknown settings {sorted(rest)}')
  t = step.sigmas(denoiser)
  batch = keys.shape[0]
  first = jnp.arange(1)
  x0 = edm.initial_candidates(keys, first, t[0], shape)[:, 0]
  d = lambda x, k: discriminator.log_ratio(x, edm.full_rows(t[k], batch), class_labels)
  log_ratios = jnp.zeros([batch, step.num_steps + 1]).at[:, 0].set(d(x0, 0))

  def body(carry, i, heun):
    state, lr = carry
    draw, x0_prev = edm.proposals(denoiser, state, keys, i, t, class_labels, step, heun)
    x = draw(first)[:, 0]
    return (x, x0_prev), lr.at[:, i + 1].set(d(x, i + 1))

  return edm.run_steps(body, (edm.initial_state(x0, step), log_ratios), step)[1]


def thresholds_from_log_ratios(log_ratios, rej_percentile: float) -> Thresholds:
  """Quantile thresholds from warm-up log ratios [S, n + 1] (linear interpolation, as torch),
  clipped at 0 as DiffRS does."""
  lr = np.asarray(log_ratios, np.float64)
  if not 0.0 <= rej_percentile <= 1.0:
    raise ValueError(f'diffrs: rej_percentile must be in [0, 1], got {rej_percentile}')
  m = np.quantile(lr, rej_percentile, axis=0)
  m2 = np.concatenate([[0.0], np.quantile(np.diff(lr, axis=1), rej_percentile, axis=0)])
  return Thresholds(np.maximum(m, 0.0).astype(np.float32), np.maximum(m2, 0.0).astype(np.float32))


def estimate_thresholds(denoiser, discriminator, keys: Array,
                        class_labels: Optional[Array] = None, *, shape,
                        rej_percentile: float, **settings) -> tuple[Thresholds, np.ndarray]:
  """Warm-up run (jitted) and its thresholds; returns (thresholds, raw log ratios [B, n+1])."""
  run = jax.jit(lambda k, c: warmup_log_ratios(denoiser, discriminator, k, c, shape=shape,
                                               **settings))
  log_ratios = np.asarray(run(keys, class_labels))
  return thresholds_from_log_ratios(log_ratios, rej_percentile), log_ratios


@dataclasses.dataclass(frozen=True)
class DiffRSSettings:
  thresholds: Union[Thresholds, tuple, dict, None] = None   # arrays (io.load_thresholds reads files)
  backsteps: int = 1
  min_backsteps: int = 0
  max_backsteps: Optional[int] = None   # default: num_steps
  max_iter: int = 999999
  slots: Optional[int] = None           # lanes; default: the batch size
  max_loops: Optional[int] = None       # safety cap on loop iterations

  def load(self, num_steps: int) -> Thresholds:
    th = self.thresholds
    if th is None:
      raise ValueError('diffrs: thresholds are required (diffrs.estimate_thresholds, or '
                       'io.load_thresholds of an npz from io.save_thresholds)')
    if isinstance(th, (str, bytes, os.PathLike)):
      raise TypeError(f'diffrs: thresholds must be arrays (log_ratio, increment), got the path '
                      f'{th!r}; read the file with isir_jax.io.load_thresholds')
    th = Thresholds(**th) if isinstance(th, dict) else Thresholds(*th)
    th = Thresholds(*(np.asarray(v, np.float32) for v in th))
    for name, v in zip(Thresholds._fields, th):
      if v.shape != (num_steps + 1,):
        raise ValueError(f'diffrs: thresholds.{name} must have num_steps + 1 = '
                         f'{num_steps + 1} entries, got shape {v.shape}')
    return th


def _parse(settings: dict) -> tuple[edm.StepSettings, DiffRSSettings, Thresholds]:
  step, rest = edm.split_settings(settings)
  if step.proposal == 'dpmpp_2m_sde':
    raise ValueError("diffrs: proposal='dpmpp_2m_sde' needs the previous step's denoiser "
                     "output, undefined after a back-step; use 'churn' or 'ancestral'")
  cfg = DiffRSSettings(**rest)
  if cfg.backsteps < 0 or cfg.min_backsteps < 0:
    raise ValueError(f'diffrs: backsteps and min_backsteps must be >= 0, got '
                     f'{cfg.backsteps}, {cfg.min_backsteps}')
  return step, cfg, cfg.load(step.num_steps)


class _Lanes(NamedTuple):
  sample: Array      # [S] output row of the lane's sample, -1 when idle
  x: Array           # [S, ...] state at level idx
  idx: Array         # [S] level k (state at t_k)
  test: Array        # [S] pending test: 0 none, 1 increment, 2 absolute
  lr_prev: Array     # [S] d at the state the last step started from
  events: Array      # [S] loop iterations of this sample so far (its key stream)
  nfe_run: Array     # [S] denoiser evaluations since the last (re)start
  nfe: Array         # [S] all denoiser evaluations of the sample
  tests: Array       # [S] tests taken
  accepts: Array     # [S] tests accepted
  restarts: Array    # [S] max_iter restarts


def diffrs_sample(denoiser, discriminator, keys: Array, class_labels: Optional[Array] = None,
                  latents: Optional[Array] = None, *, shape, **settings) -> tuple[Array, dict]:
  """DiffRS sampling (see the module docstring).

  Args:
    denoiser, discriminator: the models (only ``discriminator.log_ratio`` is used).
    keys: [B] per-sample keys.
    class_labels: [B, label_dim] or None.
    latents: optional [B, *shape] first prior draws (later draws come from the keys).
    shape: static image shape.
    **settings: `edm.StepSettings` fields plus thresholds (required), backsteps (1),
      min_backsteps (0), max_backsteps (num_steps), max_iter, slots, max_loops.

  Returns:
    images [B, *shape] and stats: the counts of `edm.cost_stats` ('nfe', restarts
    included, 'disc_evals', 'disc_grads' = 0; see the module docstring), 'accept_rate'
    (accepted / taken tests; 1 when none), 'restarts', 'finished' (False only if the
    ``max_loops`` cap stopped the loop first; the stats of such a sample are those so far).
  """
  step, cfg, th = _parse(settings)
  n = step.num_steps
  batch = keys.shape[0]
  lanes = min(cfg.slots or batch, batch)
  max_b = n if cfg.max_backsteps is None else cfg.max_backsteps
  max_loops = cfg.max_loops or 1000 * n * math.ceil(batch / lanes)
  t = step.sigmas(denoiser)
  m_abs, m_inc = jnp.asarray(th.log_ratio), jnp.asarray(th.increment)
  step_nfe = jnp.asarray(step.nfe_table())
  # Denoiser evaluations still needed from level k = 0..n.
  remaining = jnp.asarray(np.cumsum(step.nfe_table()[::-1])[::-1].tolist() + [0])
  c_mean, _, s_mean = (jnp.asarray(v) for v in step.mean_coefficients(t))
  row = lambda m, x: m.reshape(m.shape + (1,) * (x.ndim - m.ndim))  # per-lane mask

  def testable_after_step(k):
    return (cfg.backsteps > 0) & (k > cfg.min_backsteps) & (k <= max_b)

  def test_at(k, after_step: bool):
    prior = (k == 0) & (cfg.min_backsteps == 0)
    if after_step:
      return jnp.where(testable_after_step(k), 1, 0)
    return jnp.where(testable_after_step(k) | prior, 2, 0)

  def fresh(sample):
    """Lane state of a new sample (its first prior draw)."""
    s = jnp.clip(sample, 0, batch - 1)
    x = edm.initial_candidates(keys[s], jnp.arange(1), t[0], shape,
                               None if latents is None else latents[s])[:, 0]
    zeros = jnp.zeros_like(sample)
    return _Lanes(sample, x, zeros, test_at(zeros, False), jnp.zeros(sample.shape), zeros,
                  zeros, zeros, zeros, zeros, zeros)

  def take_step(x, k, eps, labels, stepping):
    """One step of every lane from its level k to k + 1 (the Heun stage where it steps)."""
    t_cur, t_next = t[k], t[k + 1]
    if step.shared_mean:
      m, _ = edm.shared_mean(denoiser, x, None, t_cur, c_mean[k], None, labels)
      return m + edm.per_row(s_mean[k], x) * eps if step.stochastic else m
    heun = (k + 1 < n) & stepping if step.heun else False
    return edm.edm_step(denoiser, x, t_cur, t_next, eps if step.stochastic else None, labels,
                        gamma=step.gamma(t_cur), S_noise=step.S_noise, heun=heun)[0]

  def emit(out, out_stats, ln, rows, finished: bool):
    """Writes the lanes' samples and stats to output ``rows`` (``batch``: dropped)."""
    rate = jnp.where(ln.tests > 0, ln.accepts / jnp.maximum(ln.tests, 1), 1.0)
    new = dict(nfe=ln.nfe, disc_evals=ln.events, disc_grads=jnp.zeros_like(ln.nfe),
               accept_rate=rate, restarts=ln.restarts,
               finished=jnp.full(rows.shape, finished))
    out_stats = {k: v.at[rows].set(new[k].astype(v.dtype), mode='drop')
                 for k, v in out_stats.items()}
    return out.at[rows].set(ln.x, mode='drop'), out_stats

  def body(state):
    ln, out, out_stats, next_sample, loop = state
    active = ln.sample >= 0
    s = jnp.clip(ln.sample, 0, batch - 1)
    ekeys = jax.vmap(jax.random.fold_in)(keys[s], ln.events)
    labels = None if class_labels is None else class_labels[s]
    # Test the lane's current state (DiffRS acceptance), one discriminator call.
    d = discriminator.log_ratio(ln.x, t[ln.idx], labels)
    log_u = jnp.log(jax.vmap(lambda k: jax.random.uniform(schedule.choice_key(k, 0)))(ekeys))
    margin = jnp.where(ln.test == 1, d - ln.lr_prev - m_inc[ln.idx], d - m_abs[ln.idx])
    accept = (ln.test == 0) | (log_u < margin)
    taken = active & (ln.test > 0)
    # Rejected: back to the prior at level 0, else re-noise back `backsteps` levels.
    back = jnp.minimum(cfg.backsteps, ln.idx)
    idx_back = ln.idx - back
    # This iteration's noise: candidate 0 churns the step, 1 re-noises a back-step and 2
    # redraws a restart (one vmapped draw, so the generator is compiled once).
    eps_step, eps_back, eps_restart = jnp.moveaxis(
        schedule.candidates_normal(ekeys, jnp.arange(3), shape), 1, 0)
    x_back = jnp.where(
        row(ln.idx == 0, ln.x), t[0] * eps_back,
        ln.x + edm.per_row(jnp.sqrt(t[idx_back] ** 2 - t[ln.idx] ** 2), ln.x) * eps_back)
    done = active & accept & (ln.idx == n)
    stepping = active & accept & (ln.idx < n)
    rejected = active & ~accept
    # Accepted and not finished: one EDM step from level idx to idx + 1. The step (and its
    # Heun stage) is evaluated only when some lane needs it, e.g. never at batch 1 after a
    # rejection or when the sample is done.
    k = jnp.minimum(ln.idx, n - 1)
    x_step = lax.cond(jnp.any(stepping), lambda: take_step(ln.x, k, eps_step, labels, stepping),
                      lambda: ln.x)
    x = jnp.where(row(stepping, ln.x), x_step, jnp.where(row(rejected, ln.x), x_back, ln.x))
    idx = jnp.where(stepping, ln.idx + 1, jnp.where(rejected, idx_back, ln.idx))
    test = jnp.where(stepping, test_at(idx, True), jnp.where(rejected, test_at(idx, False),
                                                             ln.test))
    nfe_add = jnp.where(stepping, step_nfe[k], 0)
    ln = ln._replace(
        x=x, idx=idx, test=test, lr_prev=jnp.where(stepping, d, ln.lr_prev),
        events=ln.events + active, nfe_run=ln.nfe_run + nfe_add, nfe=ln.nfe + nfe_add,
        tests=ln.tests + taken, accepts=ln.accepts + (taken & accept))
    # max_iter: restart samples that could no longer finish within the budget.
    restart = active & ~done & (ln.nfe_run + remaining[ln.idx] > cfg.max_iter)
    zeros = jnp.zeros_like(ln.idx)
    ln = ln._replace(
        x=jnp.where(row(restart, ln.x), t[0] * eps_restart, ln.x),
        idx=jnp.where(restart, 0, ln.idx), nfe_run=jnp.where(restart, 0, ln.nfe_run),
        test=jnp.where(restart, test_at(zeros, False), ln.test),
        restarts=ln.restarts + restart)
    # Emit finished samples to their rows and refill their lanes with the next samples.
    out, out_stats = emit(out, out_stats, ln, jnp.where(done, ln.sample, batch), True)
    new_sample = next_sample + jnp.cumsum(done) - 1
    new_sample = jnp.where(new_sample < batch, new_sample, -1)
    refill = fresh(new_sample)
    ln = jax.tree.map(lambda a, b: jnp.where(row(done, a), b, a), ln, refill)
    return ln, out, out_stats, next_sample + jnp.sum(done), loop + 1

  def cond(state):
    ln, _, _, _, loop = state
    return jnp.any(ln.sample >= 0) & (loop < max_loops)

  ln = fresh(jnp.arange(lanes))
  out = jnp.zeros((batch,) + tuple(shape), jnp.float32)
  out_stats = dict(edm.cost_stats(batch, 0), accept_rate=jnp.zeros([batch]),
                   restarts=jnp.zeros([batch], jnp.int32), finished=jnp.zeros([batch], bool))
  ln, out, out_stats, _, _ = lax.while_loop(
      cond, body, (ln, out, out_stats, jnp.asarray(lanes), jnp.asarray(0)))
  # Samples cut off by max_loops: their current state and stats, marked unfinished.
  return emit(out, out_stats, ln, jnp.where(ln.sample >= 0, ln.sample, batch), False)


def diffrs_sampler(denoiser, discriminator=None, *, shape, **settings) -> Callable:
  """Registry factory: ``diffrs_sampler(denoiser, discriminator, shape=..., thresholds=...)``."""
  if discriminator is None:
    raise ValueError('diffrs sampler: a discriminator is required (got None)')
  return edm.make_sampler(diffrs_sample, _parse, denoiser, discriminator, shape=shape, **settings)
