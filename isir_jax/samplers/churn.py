"""EDM's churned reverse step (Karras et al. 2022, Alg. 2), in explicit Heun variants.

The step raises the noise level from ``t`` to ``t_hat`` and adds the matching noise (churn),
takes an Euler step to ``t'`` and, optionally, the Heun correction. How the correction is
chosen gives three variants sharing `euler_stage` and `heun_correction`: `edm_step` (a
static choice), `edm_step_scan` (one traced flag: the step index of a scan) and
`edm_step_rows` (a per-row mask: DiffRS lanes at different levels).
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
# guide(x, sigma) -> (correction added to the ODE direction d, auxiliary output).
Guide = Callable[[Array, Array], tuple[Array, Any]]


def per_row(v: Array, x: Array) -> Array:
  """Broadcasts a per-row [R] (or scalar) value or mask against x [R, ...]."""
  v = jnp.asarray(v)
  v = v if v.dtype == bool else v.astype(x.dtype)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


def churn_level(denoiser, t_cur: Array, gamma: Array) -> Array:
  """The raised noise level ``t_hat = round_sigma(t (1 + gamma))`` of a churned step."""
  return denoiser.round_sigma(t_cur + gamma * t_cur)


class EulerStage(NamedTuple):
  """The churn and Euler stage of an EDM step (EDM Alg. 2, lines 4-8), before Heun."""
  x_hat: Array           # churned states at t_hat
  t_hat: Array           # raised noise levels [R]
  d: Array               # Euler direction at (x_hat, t_hat), DG term included
  x_next: Array          # the Euler step's result at t_next
  aux: Any               # auxiliary output of guide1 (None without it)


def euler_stage(denoiser, x: Array, t_cur: Array, t_next: Array, eps: Optional[Array],
                class_labels: Optional[Array] = None, *, gamma: Array, S_noise=1.0,
                guide1: Optional[Guide] = None) -> EulerStage:
  """Churn (lines 4-6) and the Euler step (lines 7-8) of an EDM step, per row.

  Args:
    denoiser: the `Denoiser`.
    x: current states [R, ...].
    t_cur, t_next: per-row noise levels [R].
    eps: standard normal churn noise like ``x``, or None for a deterministic step.
    class_labels: [R, label_dim] or None.
    gamma: per-row churn factor [R] (`StepSettings.gamma`).
    S_noise: churn noise inflation, scalar or [R].
    guide1: DG term at ``(x_hat, t_hat)``, added to the Euler direction (EDM-G++).
  """
  t_hat = churn_level(denoiser, t_cur, gamma)
  if eps is None:
    x_hat = x
  else:
    x_hat = x + per_row(jnp.sqrt(jnp.maximum(t_hat ** 2 - t_cur ** 2, 0.0)) * S_noise, x) * eps
  d = (x_hat - denoiser(x_hat, t_hat, class_labels)) / per_row(t_hat, x)
  aux = None
  if guide1 is not None:
    delta, aux = guide1(x_hat, t_hat)
    d = d + delta
  return EulerStage(x_hat, t_hat, d, x_hat + per_row(t_next - t_hat, x) * d, aux)


def heun_correction(denoiser, stage: EulerStage, t_next: Array,
                    class_labels: Optional[Array] = None, guide2: Optional[Guide] = None,
                    t_eval: Optional[Array] = None) -> Array:
  """The Heun correction (EDM Alg. 2, lines 9-11) of an Euler stage.

  ``t_eval`` (default ``t_next``) is the level the second direction is evaluated at; rows
  whose result is discarded may pass a dummy one (their ``t_next`` may be 0).
  """
  t2 = t_next if t_eval is None else t_eval
  x_next = stage.x_next
  d2 = (x_next - denoiser(x_next, t2, class_labels)) / per_row(t2, x_next)
  if guide2 is not None:
    d2 = d2 + guide2(x_next, t2)[0]
  return stage.x_hat + per_row(t_next - stage.t_hat, x_next) * (0.5 * stage.d + 0.5 * d2)


def edm_step(denoiser, x: Array, t_cur: Array, t_next: Array, eps: Optional[Array],
             class_labels: Optional[Array] = None, *, gamma: Array, S_noise=1.0,
             heun: bool = True, guide1: Optional[Guide] = None,
             guide2: Optional[Guide] = None) -> tuple[Array, Any]:
  """One EDM reverse step per row, from ``t_cur`` to ``t_next`` (EDM Alg. 2, lines 4-11).

  Args:
    denoiser, x, t_cur, t_next, eps, class_labels, gamma, S_noise, guide1: as `euler_stage`.
    heun: static: whether to take the Heun correction.
    guide2: DG term at ``(x_next, t_next)``, added to the Heun direction.

  Returns:
    ``(x_next, aux)`` with ``aux`` the auxiliary output of ``guide1`` (None without it).
  """
  stage = euler_stage(denoiser, x, t_cur, t_next, eps, class_labels, gamma=gamma,
                      S_noise=S_noise, guide1=guide1)
  if not heun:
    return stage.x_next, stage.aux
  return heun_correction(denoiser, stage, t_next, class_labels, guide2), stage.aux


def edm_step_scan(denoiser, x: Array, t_cur: Array, t_next: Array, eps: Optional[Array],
                  class_labels: Optional[Array] = None, *, gamma: Array, S_noise=1.0,
                  heun: Optional[Array], guide1: Optional[Guide] = None,
                  guide2: Optional[Guide] = None) -> tuple[Array, Any]:
  """`edm_step` with the Heun correction under one traced flag for all rows.

  ``heun`` is the flag `run_steps` passes (the step index of a scan; None for the Euler
  solver). The correction sits under a ``lax.cond``, so the denoiser appears once per
  solver stage in the program and runs only when the flag holds.
  """
  stage = euler_stage(denoiser, x, t_cur, t_next, eps, class_labels, gamma=gamma,
                      S_noise=S_noise, guide1=guide1)
  if heun is None:
    return stage.x_next, stage.aux
  return lax.cond(heun, lambda: heun_correction(denoiser, stage, t_next, class_labels, guide2),
                  lambda: stage.x_next), stage.aux


def edm_step_rows(denoiser, x: Array, t_cur: Array, t_next: Array, eps: Optional[Array],
                  class_labels: Optional[Array] = None, *, gamma: Array, S_noise=1.0,
                  heun: Array) -> Array:
  """`edm_step` with the Heun correction on the rows of the bool mask ``heun`` [R].

  Rows with ``t_next = 0`` must be False. The other rows are evaluated at a safe dummy level
  and their correction discarded; no evaluation at all when no row needs it.
  """
  stage = euler_stage(denoiser, x, t_cur, t_next, eps, class_labels, gamma=gamma,
                      S_noise=S_noise)
  return lax.cond(
      jnp.any(heun),
      lambda: jnp.where(per_row(heun, x), heun_correction(
          denoiser, stage, t_next, class_labels, t_eval=jnp.where(heun, t_next, 1.0)),
          stage.x_next),
      lambda: stage.x_next)
