"""Interfaces the samplers consume: a denoiser and a time-dependent discriminator.

Samplers depend only on these protocols, so the exact Gaussian-mixture testbed, the
converted EDM networks and the trained demo models are interchangeable.
Images are NHWC float32 on the EDM scale (data in [-1, 1]) at every boundary. Plain functions
become these objects with `isir_jax.as_denoiser` and `isir_jax.as_discriminator`; a sampler
checks the members it reads when it is built (`isir_jax.samplers.checks`).
"""

from typing import Optional, Protocol

import jax

Array = jax.Array


class Denoiser(Protocol):
  """EDM denoiser ``D(x; sigma)`` with its noise-level range, image shape and classes."""

  sigma_min: float
  sigma_max: float
  shape: tuple[int, int, int]   # (H, W, C)
  label_dim: int                # number of classes; 0 for an unconditional network

  def __call__(self, x: Array, sigma: Array,
               class_labels: Optional[Array] = None) -> Array:
    """Returns the denoised estimate of ``x`` [B, H, W, C] at noise ``sigma`` [B]."""

  def round_sigma(self, sigma: Array) -> Array:
    """Maps sigma to the nearest level the network supports (identity for most)."""


class Discriminator(Protocol):
  """Time-dependent discriminator: ``exp(log_ratio)`` ~ p_data,sigma / p_model,sigma."""

  def log_ratio(self, x: Array, sigma: Array,
                class_labels: Optional[Array] = None) -> Array:
    """Returns the log density ratio [B] of ``x`` [B, H, W, C] at noise ``sigma`` [B]."""

  def guidance(self, x: Array, sigma: Array, class_labels: Optional[Array] = None
               ) -> tuple[Array, Array]:
    """Returns the DG correction ``g`` (shape of ``x``) and the log ratio [B].

    ``g = -sigma^2 * grad_x log_ratio`` (DG's ``-(sigma^2 * mean) * grad_{mean x}``);
    samplers add ``w * g / sigma`` to the ODE direction ``(x - D(x)) / sigma`` where DG's
    time window holds (the DG sampler applies it, `isir_jax.vpsde.in_window`).
    """
