"""The VP-SDE (Song et al. 2021) in which DG's discriminators were trained, on the EDM scale.

Linear schedule ``beta(tau) = b0 + tau (b1 - b0)``; the marginal at VP time ``tau`` is
``mean(tau) x + std(tau) eps`` with ``mean = exp(-int_0^tau beta / 2)``. An EDM state at
noise ``sigma`` is the VP state at the ``tau`` with ``sigma^2 = 1 / mean^2 - 1``, divided by
``mean``. One module for the samplers (DG's guidance window), the discriminator (its input
and time) and the trainers (perturbation and time sampling).
"""

import math

import jax
import jax.numpy as jnp

Array = jax.Array

# Linear schedule of score_sde / DG, and iDDPM's cosine offset s (Nichol & Dhariwal 2021).
BETA_MIN = 0.1
BETA_MAX = 20.
COSINE_S = 0.008


def beta(tau: Array) -> Array:
  """The noise rate ``beta(tau)``."""
  return BETA_MIN + tau * (BETA_MAX - BETA_MIN)


def integral_beta(tau: Array) -> Array:
  """``int_0^tau beta = 0.5 (b1 - b0) tau^2 + b0 tau``."""
  return 0.5 * tau ** 2 * (BETA_MAX - BETA_MIN) + tau * BETA_MIN


def time_of_integral(integral: Array) -> Array:
  """Inverse of `integral_beta`: the ``tau >= 0`` with ``int_0^tau beta = integral``."""
  db = BETA_MAX - BETA_MIN
  return (-BETA_MIN + jnp.sqrt(BETA_MIN ** 2 + 2. * db * integral)) / db


def vp_time(sigma: Array) -> Array:
  """VP time ``tau`` whose marginal has the EDM noise level ``sigma``.

  Solves ``sigma^2 = exp(int_0^tau beta) - 1`` for ``tau``.
  """
  return time_of_integral(jnp.log1p(sigma ** 2))


def vp_mean(tau: Array) -> Array:
  """VP marginal mean coefficient ``sqrt(alpha_bar(tau))`` (= 1/sqrt(1+sigma^2))."""
  return jnp.exp(-0.25 * tau ** 2 * (BETA_MAX - BETA_MIN) - 0.5 * tau * BETA_MIN)


def cosine_time(tau: Array) -> Array:
  """Time of the cosine schedule (Nichol & Dhariwal 2021) with the same ``alpha_bar``.

  ADM's 64x64 classifier was trained on the cosine schedule:
  ``sqrt(alpha_bar(t)) = cos((t+s)/(1+s) pi/2) / sqrt(f0)``, ``f0 = cos(s/(1+s) pi/2)^2``.
  """
  sqrt_f0 = math.cos(COSINE_S / (1. + COSINE_S) * math.pi / 2.)
  angle = jnp.arccos(sqrt_f0 * vp_mean(tau))
  return (1. + COSINE_S) * 2. / math.pi * angle - COSINE_S


def in_window(sigma: Array, time_min: float, time_max: float) -> Array:
  """Per-row bool: ``time_min <= tau(sigma) <= time_max`` (DG's guidance window)."""
  tau = vp_time(sigma)
  return (tau >= time_min) & (tau <= time_max)
