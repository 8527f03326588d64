"""The EDM sampler (Karras et al. 2022, Alg. 2) and the one step function all samplers share.

`edm_step` is the single parametrised reverse step: churn, Euler, optional Heun correction,
optional discriminator-guidance terms. EDM, DG, DiffRS and the ISIR proposals all call it.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isir_jax.samplers import schedule

Array = jax.Array
# guide(x, sigma) -> (correction added to the ODE direction d, auxiliary output).
Guide = Callable[[Array, Array], tuple[Array, Any]]


def per_row(v: Array, x: Array) -> Array:
  """Broadcasts a per-row [R] (or scalar) value or mask against x [R, ...]."""
  v = jnp.asarray(v)
  v = v if v.dtype == bool else v.astype(x.dtype)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Static settings of the EDM discretisation and step (names as in EDM's generate.py)."""
  num_steps: int = 18
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  solver: str = 'heun'
  S_churn: float = 0.0
  S_min: float = 0.0
  S_max: float = float('inf')
  S_noise: float = 1.0

  def __post_init__(self):
    if self.solver not in ('heun', 'euler'):
      raise ValueError(f"samplers: solver must be 'heun' or 'euler', got {self.solver!r}")
    if self.num_steps < 2:
      raise ValueError(f'samplers: num_steps must be >= 2, got {self.num_steps}')
    if self.S_churn < 0:
      raise ValueError(f'samplers: S_churn must be >= 0, got {self.S_churn}')

  @property
  def heun(self) -> bool:
    return self.solver == 'heun'

  @property
  def stochastic(self) -> bool:
    """Whether the step draws noise (churn acts at some noise level)."""
    return self.S_churn > 0 and self.S_noise != 0 and self.S_min <= self.S_max

  def sigmas(self, denoiser) -> Array:
    """The [n + 1] noise levels ``t_0 .. t_{n-1}, 0`` for this denoiser."""
    lo, hi = schedule.sigma_range(denoiser, self.sigma_min, self.sigma_max)
    return schedule.karras_sigmas(self.num_steps, lo, hi, self.rho, denoiser.round_sigma)

  def gamma(self, t_cur: Array, S_churn=None) -> Array:
    return schedule.churn_gamma(t_cur, self.S_churn if S_churn is None else S_churn,
                                self.num_steps, self.S_min, self.S_max)

  def nfe(self, step: int) -> int:
    """Denoiser evaluations of one step: 2 with Heun, 1 for Euler and for the last step."""
    return 2 if self.heun and step < self.num_steps - 1 else 1

  def total_nfe(self, proposals=None) -> int:
    """Denoiser evaluations of a run, with ``proposals[i]`` step evaluations at step i."""
    per = np.ones(self.num_steps, int) if proposals is None else np.asarray(proposals)
    return int(sum(int(per[i]) * self.nfe(i) for i in range(self.num_steps)))


def split_settings(settings: dict) -> tuple[StepSettings, dict]:
  """Separates the `StepSettings` fields from a sampler's other settings."""
  names = {f.name for f in dataclasses.fields(StepSettings)}
  step = StepSettings(**{k: v for k, v in settings.items() if k in names})
  return step, {k: v for k, v in settings.items() if k not in names}


def edm_step(denoiser, x: Array, t_cur: Array, t_next: Array, eps: Optional[Array],
             class_labels: Optional[Array] = None, *, gamma: Array, S_noise=1.0,
             heun=True, guide1: Optional[Guide] = None,
             guide2: Optional[Guide] = None) -> tuple[Array, Any]:
  """One EDM reverse step per row, from ``t_cur`` to ``t_next`` (EDM Alg. 2, lines 4-8).

  Args:
    denoiser: the `Denoiser`.
    x: current states [R, ...].
    t_cur, t_next: per-row noise levels [R].
    eps: standard normal churn noise like ``x``, or None for a deterministic step.
    class_labels: [R, label_dim] or None.
    gamma: per-row churn factor [R] (`StepSettings.gamma`).
    S_noise: churn noise inflation, scalar or [R].
    heun: static bool; a traced scalar bool (the correction sits under a ``lax.cond``, so
      the denoiser appears once per solver stage in the program); or a per-row bool [R]
      (rows with ``t_next = 0`` must be False: their correction is computed at a dummy
      level and discarded; skipped when every row is False).
    guide1: DG term at ``(x_hat, t_hat)``, added to the Euler direction (EDM-G++).
    guide2: DG term at ``(x_next, t_next)``, added to the Heun direction.

  Returns:
    ``(x_next, aux)`` with ``aux`` the auxiliary output of ``guide1`` (None without it).
  """
  # Churn: raise the noise level to t_hat and add the matching noise (lines 4-6).
  t_hat = denoiser.round_sigma(t_cur + gamma * t_cur)
  if eps is None:
    x_hat = x
  else:
    x_hat = x + per_row(jnp.sqrt(jnp.maximum(t_hat ** 2 - t_cur ** 2, 0.0)) * S_noise, x) * eps
  # Euler step (line 7-8).
  d = (x_hat - denoiser(x_hat, t_hat, class_labels)) / per_row(t_hat, x)
  aux = None
  if guide1 is not None:
    delta, aux = guide1(x_hat, t_hat)
    d = d + delta
  x_next = x_hat + per_row(t_next - t_hat, x) * d
  if heun is False:
    return x_next, aux

  def correct(t2):
    # Heun correction (lines 9-11).
    d2 = (x_next - denoiser(x_next, t2, class_labels)) / per_row(t2, x)
    if guide2 is not None:
      d2 = d2 + guide2(x_next, t2)[0]
    return x_hat + per_row(t_next - t_hat, x) * (0.5 * d + 0.5 * d2)

  if heun is True:
    return correct(t_next), aux
  heun = jnp.asarray(heun)
  if heun.ndim == 0:
    # One flag for all rows (the step index of a scan): evaluate only the branch taken.
    return lax.cond(heun, correct, lambda _: x_next, t_next), aux
  # Rows without the correction get a safe dummy level and their result is discarded; no
  # evaluation at all when no row needs it.
  return lax.cond(
      jnp.any(heun),
      lambda: jnp.where(per_row(heun, x), correct(jnp.where(heun, t_next, 1.0)), x_next),
      lambda: x_next), aux


def run_steps(body: Callable, carry, step: StepSettings):
  """Runs ``body(carry, i, heun) -> carry`` for i = 0..n-1 as one ``lax.scan``.

  Steps 0..n-2 use the configured solver, the last step (to ``t_n = 0``) is Euler, so no
  evaluation is wasted at sigma = 0. With Heun, ``heun`` is the traced flag ``i < n - 1``
  (see `edm_step`), so every step, the last included, is traced and compiled once.
  """
  last = step.num_steps - 1
  carry, _ = lax.scan(lambda c, i: (body(c, i, step.heun and i < last), None), carry,
                      jnp.arange(step.num_steps))
  return carry


def full_rows(v: Array, rows: int) -> Array:
  return jnp.full([rows], v, jnp.float32)


def initial_candidates(keys: Array, ids: Array, sigma_max: Array, shape,
                       latents: Optional[Array] = None) -> Array:
  """Initial states ``sigma_max * eps`` [B, c, *shape] of candidates ``ids`` of each sample.

  Candidate 0 is the latent of `edm_sample`; user ``latents`` replace candidate 0.
  """
  eps = schedule.candidates_normal(jax.vmap(schedule.latent_key)(keys), ids, shape)
  if latents is not None:
    latents = schedule.check_latents(latents, keys.shape[0], shape)
    first = (ids == 0).reshape((1, -1) + (1,) * len(shape))
    eps = jnp.where(first, latents[:, None], eps)
  return eps * sigma_max


def propose(denoiser, x: Array, keys: Array, ids: Array, i, t: Array,
            class_labels: Optional[Array], step: StepSettings, heun) -> Array:
  """Candidates ``ids`` [c] of step i from every row of x [B, ...]: [B, c, ...].

  Every candidate starts from the same ``(x_i, t_i)``; candidate c of sample b is churned
  with the noise of ``fold_in(fold_in(fold_in(keys[b], i), 0), c)``. `edm_sample` takes
  candidate 0, ISIR chooses among many.
  """
  batch, count, shape = x.shape[0], ids.shape[0], x.shape[1:]
  rows = batch * count
  eps = None
  if step.stochastic:
    skeys = jax.vmap(lambda k: schedule.step_key(k, i))(keys)
    eps = schedule.candidates_normal(skeys, ids, shape).reshape((rows,) + shape)
  labels = None if class_labels is None else jnp.repeat(class_labels, count, axis=0)
  t_cur, t_next = full_rows(t[i], rows), full_rows(t[i + 1], rows)
  x_new, _ = edm_step(denoiser, jnp.repeat(x, count, axis=0), t_cur, t_next, eps, labels,
                      gamma=step.gamma(t_cur), S_noise=step.S_noise, heun=heun)
  return x_new.reshape((batch, count) + shape)


def edm_sample(denoiser, keys: Array, class_labels: Optional[Array] = None,
               latents: Optional[Array] = None, *, shape, **settings) -> tuple[Array, dict]:
  """EDM sampling: deterministic Heun/Euler ODE, or stochastic with churn (EDM Alg. 2).

  Args:
    denoiser: a `Denoiser` (see isir_jax/types.py).
    keys: [B] keys, one per sample; step i's churn noise is derived from
      ``fold_in(keys[b], i)`` (see `propose`), so a sample does not depend on its batch.
    class_labels: [B, label_dim] one-hot, or None.
    latents: optional [B, *shape] standard normal latents (default: from each key).
    shape: static image shape (H, W, C).
    **settings: `StepSettings` fields (num_steps, sigma_min, sigma_max, rho, solver,
      S_churn, S_min, S_max, S_noise).

  Returns:
    images [B, *shape] (EDM scale, unclipped) and stats {'nfe': [B]}.
  """
  step = _parse(settings)
  t = step.sigmas(denoiser)
  first = jnp.arange(1)
  x0 = initial_candidates(keys, first, t[0], shape, latents)[:, 0]
  body = lambda x, i, heun: propose(denoiser, x, keys, first, i, t, class_labels, step, heun)[:, 0]
  x = run_steps(body, x0, step)
  return x, {'nfe': jnp.full([keys.shape[0]], step.total_nfe(), jnp.int32)}


def make_sampler(sample: Callable, parse: Callable[[dict], Any], denoiser, discriminator=None,
                 *, shape, **settings) -> Callable:
  """Binds a sampler's model(s) and static settings: ``sample_fn(keys, class_labels, latents)``.

  ``parse(settings)`` validates the settings now, so mistakes surface at construction.
  A discriminator is passed on only when given (EDM takes none).
  """
  parse(settings)
  args = (denoiser,) if discriminator is None else (denoiser, discriminator)
  return functools.partial(sample, *args, shape=tuple(shape), **settings)


def _parse(settings: dict) -> StepSettings:
  step, rest = split_settings(settings)
  if rest:
    raise TypeError(f'edm sampler: unknown settings {sorted(rest)}')
  return step


def edm_sampler(denoiser, discriminator=None, *, shape, **settings) -> Callable:
  """Registry factory: ``edm_sampler(denoiser, shape=...)(keys) -> (images, stats)``."""
  del discriminator  # EDM does not use one.
  return make_sampler(edm_sample, _parse, denoiser, shape=shape, **settings)
