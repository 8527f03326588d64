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
import functools
import math
import os
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isir_jax.samplers import checks, churn, edm, schedule, weights

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
  step, = checks.parse_settings('diffrs warm-up', settings, edm.StepSettings)
  t = step.sigmas(denoiser)
  batch = keys.shape[0]
  first = jnp.arange(1)
  x0 = edm.initial_candidates(keys, first, t[0], shape)[:, 0]
  d = lambda x, k: discriminator.log_ratio(x, edm.full_rows(t[k], batch), class_labels)
  log_ratios = jnp.zeros([batch, step.num_steps + 1]).at[:, 0].set(d(x0, 0))

  def body(carry, i, heun):
    state, log_r = carry
    draw, x0_prev = edm.proposals(denoiser, state, keys, i, t, class_labels, step, heun)
    x = draw(first)[:, 0]
    return (x, x0_prev), log_r.at[:, i + 1].set(d(x, i + 1))

  return edm.run_steps(body, (edm.initial_state(x0, step), log_ratios), step)[1]


def thresholds_from_log_ratios(log_ratios, rej_percentile: float) -> Thresholds:
  """Quantile thresholds from warm-up log ratios [S, n + 1] (linear interpolation, as torch),
  clipped at 0 as DiffRS does."""
  log_r = np.asarray(log_ratios, np.float64)
  if not 0.0 <= rej_percentile <= 1.0:
    raise ValueError(f'diffrs: rej_percentile must be in [0, 1], got {rej_percentile}')
  m = np.quantile(log_r, rej_percentile, axis=0)
  m2 = np.concatenate([[0.0], np.quantile(np.diff(log_r, axis=1), rej_percentile, axis=0)])
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
  """DiffRS settings. The thresholds are given as arrays, or as warm-up log ratios and the
  quantile to take of them (what `estimate_thresholds` does)."""
  thresholds: Union[Thresholds, tuple, dict, None] = None   # arrays (io.load_thresholds reads files)
  warmup_log_ratios: Any = None         # [S, n + 1] warm-up log ratios (instead of thresholds)
  rej_percentile: Optional[float] = None  # their quantile giving the thresholds
  backsteps: int = 1
  min_backsteps: int = 0
  max_backsteps: Optional[int] = None   # default: num_steps
  max_iter: int = 999999
  slots: Optional[int] = None           # lanes; default: the batch size
  max_loops: Optional[int] = None       # safety cap on loop iterations
  step_stats: bool = False              # also report tests and accepts per level

  def load(self, num_steps: int) -> Thresholds:
    """The thresholds [n + 1] each, from ``thresholds`` or the warm-up log ratios."""
    if self.warmup_log_ratios is not None or self.rej_percentile is not None:
      return self._from_warmup(num_steps)
    th = self.thresholds
    if th is None:
      raise ValueError('diffrs: thresholds are required (diffrs.estimate_thresholds, or '
                       'io.load_thresholds of an npz from io.save_thresholds), or '
                       'warmup_log_ratios with rej_percentile')
    if isinstance(th, (str, bytes, os.PathLike)):
      raise TypeError(f'diffrs: thresholds must be arrays (log_ratio, increment), got the path '
                      f'{th!r}; read the file with isir_jax.io.load_thresholds')
    if isinstance(th, tuple) and len(th) == 2 and isinstance(th[0], Thresholds):
      raise TypeError('diffrs: thresholds got the pair (thresholds, warm-up log ratios) that '
                      'estimate_thresholds returns; pass its first element, '
                      'thresholds=estimate_thresholds(...)[0]')
    th = Thresholds(**th) if isinstance(th, dict) else Thresholds(*th)
    th = Thresholds(*(np.asarray(v, np.float32) for v in th))
    for name, v in zip(Thresholds._fields, th):
      if v.shape != (num_steps + 1,):
        raise ValueError(f'diffrs: thresholds.{name} must have num_steps + 1 = '
                         f'{num_steps + 1} entries, got shape {v.shape}')
    return th

  def _from_warmup(self, num_steps: int) -> Thresholds:
    if self.thresholds is not None:
      raise ValueError('diffrs: give thresholds, or warmup_log_ratios with rej_percentile, '
                       'not both')
    if self.warmup_log_ratios is None or self.rej_percentile is None:
      raise ValueError(
          'diffrs: rej_percentile and warmup_log_ratios go together (the thresholds are the '
          'rej_percentile quantile of the warm-up log ratios [S, num_steps + 1], '
          'estimate_thresholds(...)[1]); got '
          f'{"rej_percentile" if self.warmup_log_ratios is None else "warmup_log_ratios"} alone')
    log_r = np.asarray(self.warmup_log_ratios)
    if log_r.ndim != 2 or log_r.shape[1] != num_steps + 1:
      raise ValueError(f'diffrs: warmup_log_ratios must have shape [S, num_steps + 1 = '
                       f'{num_steps + 1}], got {log_r.shape}')
    return thresholds_from_log_ratios(log_r, self.rej_percentile)


def _parse(settings: dict) -> tuple[edm.StepSettings, DiffRSSettings, Thresholds]:
  step, cfg = checks.parse_settings('diffrs', settings, edm.StepSettings, DiffRSSettings)
  if step.proposal == 'dpmpp_2m_sde':
    raise ValueError("diffrs: proposal='dpmpp_2m_sde' needs the previous step's denoiser "
                     "output, undefined after a back-step; use 'churn' or 'ancestral'")
  if cfg.backsteps < 0 or cfg.min_backsteps < 0:
    raise ValueError(f'diffrs: backsteps and min_backsteps must be >= 0, got '
                     f'{cfg.backsteps}, {cfg.min_backsteps}')
  return step, cfg, cfg.load(step.num_steps)


class _Lanes(NamedTuple):
  sample: Array      # [S] output row of the lane's sample, -1 when idle
  x: Array           # [S, ...] state at level idx
  idx: Array         # [S] level k (state at t_k)
  test: Array        # [S] pending test: 0 none, 1 increment, 2 absolute
  log_r_prev: Array  # [S] d at the state the last step started from
  events: Array      # [S] loop iterations of this sample so far (its key stream)
  nfe_run: Array     # [S] denoiser evaluations since the last (re)start
  nfe: Array         # [S] all denoiser evaluations of the sample
  tests: Array       # [S] tests taken
  accepts: Array     # [S] tests accepted
  restarts: Array    # [S] max_iter restarts
  nonfinite: Array   # [S] first level with a non-finite log ratio (weights.NONE: none)
  level_tests: Array    # [S, n + 1] tests taken at each level
  level_accepts: Array  # [S, n + 1] tests accepted at each level


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the lane operations of one `diffrs_sample` call read: models, inputs, tables."""
  denoiser: Any
  discriminator: Any
  keys: Array                     # [B] per-sample keys
  class_labels: Optional[Array]
  latents: Optional[Array]
  shape: tuple
  step: edm.StepSettings
  cfg: DiffRSSettings
  t: Array                        # [n + 1] noise levels
  m_abs: Array                    # [n + 1] thresholds M_k
  m_inc: Array                    # [n + 1] thresholds M2_k
  step_nfe: Array                 # [n] denoiser evaluations of step k
  remaining: Array                # [n + 1] evaluations still needed from level k
  c_mean: Array                   # [n] shared-mean coefficients (ancestral kernel)
  s_mean: Array

  @classmethod
  def create(cls, denoiser, discriminator, keys, class_labels, latents, shape, step, cfg, th):
    t = step.sigmas(denoiser)
    nfe = step.nfe_table()
    c_mean, _, s_mean = (jnp.asarray(v) for v in step.mean_coefficients(t))
    return cls(denoiser, discriminator, keys, class_labels, latents, tuple(shape), step, cfg,
               t, jnp.asarray(th.log_ratio), jnp.asarray(th.increment), jnp.asarray(nfe),
               jnp.asarray(np.cumsum(nfe[::-1])[::-1].tolist() + [0]), c_mean, s_mean)

  @property
  def n(self) -> int:
    return self.step.num_steps

  @property
  def batch(self) -> int:
    return self.keys.shape[0]

  def test_at(self, k: Array, after_step: bool) -> Array:
    """The pending test of lanes arriving at level k: after a step or a back-step."""
    cfg = self.cfg
    max_b = self.n if cfg.max_backsteps is None else cfg.max_backsteps
    testable = (cfg.backsteps > 0) & (k > cfg.min_backsteps) & (k <= max_b)
    if after_step:
      return jnp.where(testable, 1, 0)
    return jnp.where(testable | ((k == 0) & (cfg.min_backsteps == 0)), 2, 0)


def _rows(mask: Array, x: Array) -> Array:
  """A per-lane mask broadcast against x [S, ...]."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _fresh(run: _Run, sample: Array) -> _Lanes:
  """Lane state of new samples (their first prior draw); ``sample`` -1 gives idle lanes."""
  s = jnp.clip(sample, 0, run.batch - 1)
  x = edm.initial_candidates(run.keys[s], jnp.arange(1), run.t[0], run.shape,
                             None if run.latents is None else run.latents[s])[:, 0]
  zeros = jnp.zeros_like(sample)
  levels = jnp.zeros(sample.shape + (run.n + 1,), sample.dtype)
  return _Lanes(sample, x, zeros, run.test_at(zeros, False), jnp.zeros(sample.shape), zeros,
                zeros, zeros, zeros, zeros, zeros, jnp.full_like(sample, weights.NONE), levels,
                levels)


def _test(run: _Run, ln: _Lanes, ekeys: Array, labels: Optional[Array]
          ) -> tuple[Array, Array]:
  """DiffRS acceptance of every lane's current state, one discriminator call.

  Returns ``(d, accept)``: the log ratio [S] and whether the pending test passed (lanes with
  no pending test accept, and so do lanes whose d is or was not finite: they cannot be
  tested, and are recorded and refused instead of being rejected until a loop cap).
  """
  d = run.discriminator.log_ratio(ln.x, run.t[ln.idx], labels)
  log_u = jnp.log(jax.vmap(lambda k: jax.random.uniform(schedule.choice_key(k, 0)))(ekeys))
  margin = jnp.where(ln.test == 1, d - ln.log_r_prev - run.m_inc[ln.idx],
                     d - run.m_abs[ln.idx])
  untestable = ~jnp.isfinite(d) | (ln.nonfinite != weights.NONE)
  return d, (ln.test == 0) | (log_u < margin) | untestable


def _back_step(run: _Run, ln: _Lanes, eps: Array) -> tuple[Array, Array]:
  """Re-noises every lane back ``backsteps`` levels (to a prior redraw at level 0).

  Returns the states and levels ``(x, idx)`` of the lanes after the back-step.
  """
  t = run.t
  idx = ln.idx - jnp.minimum(run.cfg.backsteps, ln.idx)
  x = jnp.where(_rows(ln.idx == 0, ln.x), t[0] * eps,
                ln.x + churn.per_row(jnp.sqrt(t[idx] ** 2 - t[ln.idx] ** 2), ln.x) * eps)
  return x, idx


def _step(run: _Run, x: Array, k: Array, eps: Array, labels: Optional[Array],
          stepping: Array) -> Array:
  """One step of every lane from its level k to k + 1 (the Heun stage where it steps)."""
  step, t = run.step, run.t
  t_cur, t_next = t[k], t[k + 1]
  if step.shared_mean:
    m, _ = edm.shared_mean(run.denoiser, x, None, t_cur, run.c_mean[k], None, labels)
    return m + churn.per_row(run.s_mean[k], x) * eps if step.stochastic else m
  args = (run.denoiser, x, t_cur, t_next, eps if step.stochastic else None, labels)
  kwargs = dict(gamma=step.gamma(t_cur), S_noise=step.S_noise)
  if step.heun:
    return churn.edm_step_rows(*args, heun=(k + 1 < run.n) & stepping, **kwargs)
  return churn.edm_step(*args, heun=False, **kwargs)[0]


def _restart_over_budget(run: _Run, ln: _Lanes, eps: Array, done: Array) -> _Lanes:
  """max_iter: restarts from noise the samples that could no longer finish within it."""
  restart = (ln.sample >= 0) & ~done & (ln.nfe_run + run.remaining[ln.idx] > run.cfg.max_iter)
  zeros = jnp.zeros_like(ln.idx)
  return ln._replace(
      x=jnp.where(_rows(restart, ln.x), run.t[0] * eps, ln.x),
      idx=jnp.where(restart, 0, ln.idx), nfe_run=jnp.where(restart, 0, ln.nfe_run),
      test=jnp.where(restart, run.test_at(zeros, False), ln.test),
      restarts=ln.restarts + restart)


def _emit(out: Array, out_stats: dict, ln: _Lanes, rows: Array, finished: bool
          ) -> tuple[Array, dict]:
  """Writes the lanes' samples and stats to output ``rows`` (``batch``: dropped)."""
  rate = jnp.where(ln.tests > 0, ln.accepts / jnp.maximum(ln.tests, 1), 1.0)
  new = dict(nfe=ln.nfe, disc_evals=ln.events, disc_grads=jnp.zeros_like(ln.nfe),
             accept_rate=rate, restarts=ln.restarts,
             finished=jnp.full(rows.shape, finished), level_tests=ln.level_tests,
             level_accepts=ln.level_accepts, **{weights.STAT: ln.nonfinite})
  out_stats = {k: v.at[rows].set(new[k].astype(v.dtype), mode='drop')
               for k, v in out_stats.items()}
  return out.at[rows].set(ln.x, mode='drop'), out_stats


def _refill(run: _Run, ln: _Lanes, done: Array, next_sample: Array) -> _Lanes:
  """Gives the lanes of finished samples the next samples of the batch (or idles them)."""
  new_sample = next_sample + jnp.cumsum(done) - 1
  refill = _fresh(run, jnp.where(new_sample < run.batch, new_sample, -1))
  return jax.tree.map(lambda a, b: jnp.where(_rows(done, a), b, a), ln, refill)


def _iteration(run: _Run, state: tuple) -> tuple:
  """One loop iteration: test every lane, then step, back-step or restart it; emit, refill."""
  ln, out, out_stats, next_sample, loop = state
  n, batch = run.n, run.batch
  active = ln.sample >= 0
  s = jnp.clip(ln.sample, 0, batch - 1)
  ekeys = jax.vmap(jax.random.fold_in)(run.keys[s], ln.events)
  labels = None if run.class_labels is None else run.class_labels[s]
  d, accept = _test(run, ln, ekeys, labels)
  taken = active & (ln.test > 0)
  # This iteration's noise: candidate 0 churns the step, 1 re-noises a back-step and 2
  # redraws a restart (one vmapped draw, so the generator is compiled once).
  eps_step, eps_back, eps_restart = jnp.moveaxis(
      schedule.candidates_normal(ekeys, jnp.arange(3), run.shape), 1, 0)
  x_back, idx_back = _back_step(run, ln, eps_back)
  done = active & accept & (ln.idx == n)
  stepping = active & accept & (ln.idx < n)
  rejected = active & ~accept
  # The step (and its Heun stage) is evaluated only when some lane needs it, e.g. never at
  # batch 1 after a rejection or when the sample is done.
  k = jnp.minimum(ln.idx, n - 1)
  x_step = lax.cond(jnp.any(stepping), lambda: _step(run, ln.x, k, eps_step, labels, stepping),
                    lambda: ln.x)
  x = jnp.where(_rows(stepping, ln.x), x_step, jnp.where(_rows(rejected, ln.x), x_back, ln.x))
  idx = jnp.where(stepping, ln.idx + 1, jnp.where(rejected, idx_back, ln.idx))
  test = jnp.where(stepping, run.test_at(idx, True),
                   jnp.where(rejected, run.test_at(idx, False), ln.test))
  nfe_add = jnp.where(stepping, run.step_nfe[k], 0)
  at_level = jax.nn.one_hot(ln.idx, n + 1, dtype=ln.level_tests.dtype)   # tests at level idx
  ln = ln._replace(
      level_tests=ln.level_tests + at_level * taken[:, None],
      level_accepts=ln.level_accepts + at_level * (taken & accept)[:, None],
      x=x, idx=idx, test=test, log_r_prev=jnp.where(stepping, d, ln.log_r_prev),
      events=ln.events + active, nfe_run=ln.nfe_run + nfe_add, nfe=ln.nfe + nfe_add,
      tests=ln.tests + taken, accepts=ln.accepts + (taken & accept),
      nonfinite=weights.record_first(ln.nonfinite, ln.idx, active & ~jnp.isfinite(d)))
  ln = _restart_over_budget(run, ln, eps_restart, done)
  out, out_stats = _emit(out, out_stats, ln, jnp.where(done, ln.sample, batch), True)
  ln = _refill(run, ln, done, next_sample)
  return ln, out, out_stats, next_sample + jnp.sum(done), loop + 1


@checks.sample_function('diffrs', uses='log_ratio')
def diffrs_sample(denoiser, discriminator, keys: Array, class_labels: Optional[Array] = None,
                  latents: Optional[Array] = None, *, shape, **settings) -> tuple[Array, dict]:
  """DiffRS sampling (see the module docstring).

  Args:
    denoiser, discriminator: the models (only ``discriminator.log_ratio`` is used).
    keys: [B] per-sample keys.
    class_labels: [B, label_dim] or None.
    latents: optional [B, *shape] first prior draws (later draws come from the keys).
    shape: static image shape.
    **settings: `edm.StepSettings` fields plus thresholds (required, or
      warmup_log_ratios [S, n + 1] with rej_percentile, their quantile), backsteps (1),
      min_backsteps (0), max_backsteps (num_steps), max_iter, slots, max_loops, step_stats.

  Returns:
    images [B, *shape] and stats: the counts of `edm.cost_stats` ('nfe', restarts
    included, 'disc_evals', 'disc_grads' = 0; see the module docstring), 'accept_rate'
    (accepted / taken tests; 1 when none), 'restarts', 'finished' (False only if the
    ``max_loops`` cap stopped the loop first; the stats of such a sample are those so far),
    `weights.STAT` (the first level with a non-finite log ratio, -1 if none) and, with
    ``step_stats``, 'level_tests' and 'level_accepts' [B, num_steps + 1] (tests taken and
    accepted at each level k; the acceptance rate of level k is their ratio).
  """
  step, cfg, th = _parse(settings)
  run = _Run.create(denoiser, discriminator, keys, class_labels, latents, shape, step, cfg, th)
  batch = run.batch
  lanes = min(cfg.slots or batch, batch)
  max_loops = cfg.max_loops or 1000 * run.n * math.ceil(batch / lanes)

  def cond(state):
    ln, _, _, _, loop = state
    return jnp.any(ln.sample >= 0) & (loop < max_loops)

  out = jnp.zeros((batch,) + run.shape, jnp.float32)
  out_stats = dict(edm.cost_stats(batch, 0), accept_rate=jnp.zeros([batch]),
                   restarts=jnp.zeros([batch], jnp.int32), finished=jnp.zeros([batch], bool),
                   **{weights.STAT: weights.initial(batch)})
  if cfg.step_stats:
    out_stats.update(level_tests=jnp.zeros([batch, run.n + 1], jnp.int32),
                     level_accepts=jnp.zeros([batch, run.n + 1], jnp.int32))
  ln, out, out_stats, _, _ = lax.while_loop(
      cond, functools.partial(_iteration, run),
      (_fresh(run, jnp.arange(lanes)), out, out_stats, jnp.asarray(lanes), jnp.asarray(0)))
  # Samples cut off by max_loops: their current state and stats, marked unfinished.
  return _emit(out, out_stats, ln, jnp.where(ln.sample >= 0, ln.sample, batch), False)


def diffrs_sampler(denoiser, discriminator=None, *, shape, **settings) -> Callable:
  """DiffRS's factory: ``diffrs_sampler(denoiser, discriminator, *, shape, **settings)``
  returns ``sample_fn(keys, class_labels=None, latents=None) -> (images, stats)``.

  Settings: `edm.StepSettings` fields plus thresholds (or warmup_log_ratios with
  rej_percentile), backsteps, min_backsteps, max_backsteps, max_iter, slots, max_loops,
  step_stats (`diffrs_sample`). Stats: 'nfe', 'disc_evals', 'disc_grads' = 0, 'accept_rate',
  'restarts', 'finished' (and 'level_tests', 'level_accepts' with step_stats).
  """
  return edm.make_sampler(diffrs_sample, _parse, denoiser, discriminator, shape=shape, **settings)
