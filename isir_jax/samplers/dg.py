"""Discriminator Guidance, EDM-G++ (Kim et al. 2023): the EDM step with a discriminator term.

The Euler direction becomes ``d + w1 g / t_hat`` and (optionally) the Heun direction
``d' + w2 g' / t_next``, where ``g = -sigma^2 grad_x log_ratio`` is the discriminator's
`guidance`, applied per sample where ``time_min <= tau(sigma) <= time_max`` (`windowed_guidance`:
the one place the window is applied).

Boosting, as in the seed's ``generate.py``: each sample carries the log ratio of its most
recent first-order guidance evaluation (``+inf`` before the first, and for samples outside
the guidance window, where the reference reports 1e7). On steps ``i % 5 == 0`` the samples
whose carried log ratio is negative are churned with ``S_churn = 4`` (and ``S_noise = 1``);
on steps ``i % 2 == 0`` the guidance of samples whose *current* log ratio is negative is
doubled. Deviation from the reference: the window is applied per sample, not to the batch.

DG keeps EDM's churned step (``proposal='churn'``): the guidance term modifies the ODE
direction, which the shared-mean kernels do not have.
"""

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from isir_jax import vpsde
from isir_jax.samplers import checks, churn, edm, schedule

Array = jax.Array

# Boosting constants of the reference (generate.py).
_BOOST_CHURN, _BOOST_NOISE, _BOOST_CHURN_PERIOD, _BOOST_WEIGHT_PERIOD = 4.0, 1.0, 5, 2


@dataclasses.dataclass(frozen=True)
class DGSettings:
  dg_weight_1st_order: float = 2.0
  dg_weight_2nd_order: float = 0.0
  time_min: float = 0.01
  time_max: float = 1.0
  boosting: bool = False


def _parse(settings: dict) -> tuple[edm.StepSettings, DGSettings]:
  step, dg = checks.parse_settings('dg', settings, edm.StepSettings, DGSettings)
  if step.proposal != 'churn':
    raise ValueError(f"dg: guidance acts on EDM's churned step; proposal must be 'churn', got "
                     f'{step.proposal!r}')
  return step, dg


def _off(weight) -> bool:
  """Whether a guidance weight is a concrete 0 (a traced weight may act: it is applied)."""
  return checks.concrete(weight) and weight == 0


def windowed_guidance(discriminator, x: Array, sigma: Array, class_labels: Optional[Array],
                      time_min, time_max) -> tuple[Array, Array, Array]:
  """The discriminator's `guidance` inside DG's time window, per sample.

  Args:
    discriminator: a `Discriminator`.
    x: states [R, ...] at noise levels ``sigma`` [R].
    class_labels: [R, label_dim] or None.
    time_min, time_max: the window of VP times (`vpsde.in_window`).

  Returns:
    ``(g, log_ratio, inside)``: ``g`` exactly zero outside the window, the log ratio of
    every row, and the window mask [R]. When the whole batch is outside, the discriminator
    is not evaluated at all (``g`` and the log ratio are then zero).
  """
  inside = vpsde.in_window(sigma, time_min, time_max)

  def evaluate():
    g, log_ratio = discriminator.guidance(x, sigma, class_labels)
    return jnp.where(churn.per_row(inside, g), g, 0.), log_ratio

  g, log_ratio = lax.cond(
      jnp.any(inside), evaluate,
      lambda: (jnp.zeros(x.shape, jnp.float32), jnp.zeros(x.shape[:1], jnp.float32)))
  return g, log_ratio, inside


@checks.sample_function('dg', uses='guidance')
def dg_sample(denoiser, discriminator, keys: Array, class_labels: Optional[Array] = None,
              latents: Optional[Array] = None, *, shape, **settings) -> tuple[Array, dict]:
  """EDM-G++ sampling with discriminator guidance (and optional boosting).

  Args:
    denoiser: a `Denoiser`.
    discriminator: a `Discriminator` (its ``guidance`` is called once per step and order).
    keys: [B] per-sample keys (step i's churn noise from ``fold_in(keys[b], i)``).
    class_labels: [B, label_dim] or None.
    latents: optional [B, *shape] standard normal latents.
    shape: static image shape.
    **settings: `edm.StepSettings` fields plus dg_weight_1st_order (2), dg_weight_2nd_order
      (0), time_min (0.01), time_max (1.0), boosting (False).

  Returns:
    images [B, *shape] and stats `edm.cost_stats`: 'nfe', 'disc_grads' (the guidance calls
    that ran: one per step and order where some sample of the batch is inside the window;
    each computes the log ratio with the gradient) and 'disc_evals' = 0.
  """
  step, dg = _parse(settings)
  t = step.sigmas(denoiser)
  batch = keys.shape[0]
  x0 = edm.initial_candidates(keys, jnp.arange(1), t[0], shape, latents)[:, 0]

  def guide(weight, i, boost_weight: bool) -> Optional[Callable]:
    if _off(weight):
      return None

    def fn(x, sigma):
      # Samples outside the window have no guidance and are never boosted.
      g, log_ratio, inside = windowed_guidance(discriminator, x, sigma, class_labels,
                                               dg.time_min, dg.time_max)
      log_ratio = jnp.where(inside, log_ratio, jnp.inf)
      if boost_weight:
        double = (log_ratio < 0) & (i % _BOOST_WEIGHT_PERIOD == 0)
        g = g * churn.per_row(jnp.where(double, 2.0, 1.0), g)
      return weight * g / churn.per_row(sigma, g), (log_ratio, jnp.any(inside))
    return fn

  def calls(ran1, t_next, heun):
    """Guidance calls of a step: the first order's, and the second order's in the Heun stage
    (counted from the window, as the Heun stage's output is only the state)."""
    count = jnp.zeros([], jnp.int32) if ran1 is None else ran1.astype(jnp.int32)
    if not _off(dg.dg_weight_2nd_order) and heun is not None:
      inside = jnp.any(vpsde.in_window(t_next, dg.time_min, dg.time_max))
      count = count + (inside & heun).astype(jnp.int32)
    return count

  def body(carry, i, heun):
    x, log_ratio, grads = carry
    t_cur, t_next = edm.full_rows(t[i], batch), edm.full_rows(t[i + 1], batch)
    S_churn, S_noise = jnp.full([batch], step.S_churn), jnp.full([batch], step.S_noise)
    if dg.boosting:
      boost = (log_ratio < 0) & (i % _BOOST_CHURN_PERIOD == 0)
      S_churn = jnp.where(boost, _BOOST_CHURN, S_churn)
      S_noise = jnp.where(boost, _BOOST_NOISE, S_noise)
    eps = None
    if step.stochastic or dg.boosting:
      skeys = jax.vmap(lambda k: schedule.step_key(k, i))(keys)
      eps = schedule.candidates_normal(skeys, jnp.arange(1), shape)[:, 0]
    x, aux = churn.edm_step_scan(
        denoiser, x, t_cur, t_next, eps, class_labels, gamma=step.gamma(t_cur, S_churn),
        S_noise=S_noise, heun=heun, guide1=guide(dg.dg_weight_1st_order, i, dg.boosting),
        guide2=guide(dg.dg_weight_2nd_order, i, False))
    new_ratio, ran1 = (log_ratio, None) if aux is None else aux
    return x, new_ratio, grads + calls(ran1, t_next, heun)

  x, _, grads = edm.run_steps(
      body, (x0, jnp.full([batch], jnp.inf), jnp.zeros([], jnp.int32)), step)
  return x, edm.cost_stats(batch, step.total_nfe(), disc_grads=grads)


def dg_sampler(denoiser, discriminator=None, *, shape, **settings) -> Callable:
  """DG's factory: ``dg_sampler(denoiser, discriminator, *, shape, **settings)``
  returns ``sample_fn(keys, class_labels=None, latents=None) -> (images, stats)``.

  Settings: `edm.StepSettings` fields plus dg_weight_1st_order, dg_weight_2nd_order,
  time_min, time_max, boosting (`dg_sample`). Stats: 'nfe', 'disc_evals' = 0, 'disc_grads'.
  """
  return edm.make_sampler(dg_sample, _parse, denoiser, discriminator, shape=shape, **settings)
