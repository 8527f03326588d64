"""Noise-level schedule, stochastic churn and per-sample key streams shared by all samplers.

Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based Generative Models",
eq. 5 (time steps) and Alg. 2 (churn). Keys: every random draw of sample ``b`` is derived from
its own key ``keys[b]`` with ``fold_in``, never from the batch, so a sample does not depend
on the batch it is computed in.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# fold_in indices under a sample's key. Step i uses fold_in(key, i) (i < _LATENT_STREAM);
# the initial latent lives in its own stream, out of reach of any step index.
_LATENT_STREAM = 1 << 30
# Under a step's key: stream 0 draws the proposal noise of candidate c (fold_in again by c),
# stream 1 draws the i-SIR / rejection choices of iteration k (fold_in again by k),
# stream 2 the SMC resampling of a group (under its first sample's step key).
_NOISE = 0
_CHOICE = 1
_RESAMPLE = 2


def sigma_range(denoiser, sigma_min: float, sigma_max: float) -> tuple[float, float]:
  """Clamps the requested range to what the network supports (as EDM's generate.py)."""
  return max(sigma_min, float(denoiser.sigma_min)), min(sigma_max, float(denoiser.sigma_max))


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                  round_sigma: Callable[[Array], Array]) -> Array:
  """Karras time steps ``t_0 > ... > t_{n-1}`` passed through ``round_sigma``, then ``t_n = 0``.

  Args:
    num_steps: number of steps ``n`` (>= 2).
    sigma_min, sigma_max: range, already clamped to the network's (see `sigma_range`).
    rho: the schedule exponent (7 in EDM).
    round_sigma: the denoiser's ``round_sigma``.

  Returns:
    float32 [n + 1] noise levels, the last one 0.
  """
  if num_steps < 2:
    raise ValueError(f'samplers: num_steps must be >= 2, got {num_steps}')
  i = np.arange(num_steps, dtype=np.float64)
  # EDM eq. 5, computed in float64 as the reference does.
  t = (sigma_max ** (1 / rho) + i / (num_steps - 1) *
       (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  t = round_sigma(jnp.asarray(t, jnp.float32))
  return jnp.concatenate([jnp.asarray(t, jnp.float32), jnp.zeros([1], jnp.float32)])


def churn_gamma(t_cur: Array, S_churn, num_steps: int, S_min: float, S_max: float) -> Array:
  """EDM Alg. 2 line 4: ``min(S_churn / n, sqrt(2) - 1)`` where ``S_min <= t <= S_max``, else 0.

  ``S_churn`` may be a per-row array (DG boosting raises it for some samples).
  """
  gamma = jnp.minimum(jnp.asarray(S_churn, jnp.float32) / num_steps, np.sqrt(2.0) - 1)
  inside = (t_cur >= S_min) & (t_cur <= S_max)
  return jnp.where(inside, gamma, 0.0).astype(jnp.float32)


def step_key(key: Array, step) -> Array:
  """The key of one sample for reverse step ``step``."""
  return jax.random.fold_in(key, step)


def latent_key(key: Array) -> Array:
  """The key of one sample for its initial latent(s)."""
  return jax.random.fold_in(key, _LATENT_STREAM)


def candidate_normal(key: Array, candidate, shape) -> Array:
  """Standard normal noise of ``candidate`` under a step (or latent) key of one sample."""
  k = jax.random.fold_in(jax.random.fold_in(key, _NOISE), candidate)
  return jax.random.normal(k, shape, jnp.float32)


def choice_key(key: Array, iteration) -> Array:
  """Key for the random choice (resampling / acceptance) of ``iteration`` under a step key."""
  return jax.random.fold_in(jax.random.fold_in(key, _CHOICE), iteration)


def resample_key(key: Array) -> Array:
  """Key for resampling a group of particles, under the step key of the group's first sample."""
  return jax.random.fold_in(key, _RESAMPLE)


def candidates_normal(keys: Array, candidates: Array, shape) -> Array:
  """``candidate_normal`` of each of the [c] candidates under each of the [B] keys: [B, c, *shape]."""
  return jax.vmap(lambda k: jax.vmap(lambda c: candidate_normal(k, c, shape))(candidates))(keys)


def check_latents(latents: Array, batch: int, shape) -> Array:
  """Validates user latents [B, *shape] and returns them as float32."""
  expected = (batch,) + tuple(shape)
  if tuple(latents.shape) != expected:
    raise ValueError(f'samplers: latents must have shape {expected}, got {tuple(latents.shape)}')
  return jnp.asarray(latents, jnp.float32)
