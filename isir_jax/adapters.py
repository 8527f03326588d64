"""Bring your own model: plain functions as a `types.Denoiser` and a `types.Discriminator`.

    den = as_denoiser(lambda x, sigma: my_denoiser(x, sigma), sigma_min=0.002, sigma_max=80.)
    disc = as_discriminator(lambda x, sigma: my_log_ratio(x, sigma))
    sample_fn = samplers.get_sampler('dg')(den, disc, shape=(1, 1, 2))

The functions take ``x`` [B, *shape] on the EDM scale and ``sigma`` [B] (a scalar sigma is
broadcast to [B] before the call), optionally ``class_labels`` [B, label_dim] as a third
positional argument, and may be jitted or close over weights. The wrappers are pytrees
without leaves (the function is static), so they pass through ``jax.jit`` as arguments.
"""

import inspect
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def _takes_labels(fn: Callable, what: str) -> bool:
  """Whether ``fn`` takes a third positional argument (class_labels) besides (x, sigma)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):   # no signature (some builtins): the two-argument form
    return False
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return True
  if len(positional) < 2:
    raise TypeError(f'{what}: the function must take (x, sigma) or (x, sigma, class_labels), '
                    f'got the signature {inspect.signature(fn)}')
  return len(positional) >= 3


def _rows(x: Array, sigma) -> Array:
  """``sigma`` as float32 [B] for ``x`` [B, ...]."""
  return jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])


def _call(fn: Callable, takes_labels: bool, x: Array, sigma: Array,
          class_labels: Optional[Array]):
  return fn(x, sigma, class_labels) if takes_labels else fn(x, sigma)


@flax.struct.dataclass
class FunctionDenoiser:
  """A function ``D(x, sigma[, class_labels])`` with the members of `types.Denoiser`."""
  fn: Callable = flax.struct.field(pytree_node=False)
  sigma_min: float = flax.struct.field(pytree_node=False)
  sigma_max: float = flax.struct.field(pytree_node=False)
  shape: Optional[tuple] = flax.struct.field(pytree_node=False)
  label_dim: int = flax.struct.field(pytree_node=False)
  takes_labels: bool = flax.struct.field(pytree_node=False)

  def __call__(self, x: Array, sigma: Array, class_labels: Optional[Array] = None) -> Array:
    """``D(x; sigma)`` [B, *shape] for x [B, *shape], sigma () or [B]."""
    out = _call(self.fn, self.takes_labels, x, _rows(x, sigma), class_labels)
    if tuple(out.shape) != tuple(x.shape):
      raise ValueError(f'as_denoiser: the function returned shape {tuple(out.shape)} for x of '
                       f'shape {tuple(x.shape)}; a denoiser returns the denoised x, shaped like x')
    return out

  def round_sigma(self, sigma: Array) -> Array:
    """Every noise level is supported (identity)."""
    return jnp.asarray(sigma)


def as_denoiser(fn: Callable, *, sigma_min: float, sigma_max: float,
                shape: Optional[tuple] = None, label_dim: int = 0) -> FunctionDenoiser:
  """Wraps a denoiser function as a `types.Denoiser`.

  Args:
    fn: ``fn(x, sigma)`` or ``fn(x, sigma, class_labels)`` returning ``E[x0 | x]`` shaped like
      ``x`` [B, *shape]; sigma is [B].
    sigma_min, sigma_max: the noise range the model supports (the samplers clamp theirs to it).
    shape: the sample shape (H, W, C), for code that reads it from the model (the driver);
      the samplers take it as an argument.
    label_dim: number of classes of a conditional model (0: unconditional); a conditional
      model's ``fn`` must take ``class_labels``.

  Returns:
    A `FunctionDenoiser`.
  """
  takes_labels = _takes_labels(fn, 'as_denoiser')
  if label_dim and not takes_labels:
    raise TypeError(f'as_denoiser: label_dim={label_dim} but the function takes no '
                    'class_labels; give it the signature fn(x, sigma, class_labels)')
  if not 0 < sigma_min < sigma_max:
    raise ValueError(f'as_denoiser: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, '
                     f'sigma_max={sigma_max}')
  return FunctionDenoiser(fn, float(sigma_min), float(sigma_max),
                          None if shape is None else tuple(shape), int(label_dim), takes_labels)


def guidance_from_log_ratio(log_ratio: Callable[[Array], Array], x: Array, sigma: Array
                            ) -> tuple[Array, Array]:
  """DG's correction ``g = -sigma^2 grad_x log_ratio`` and the log ratio, by one vjp.

  Args:
    log_ratio: ``x -> log ratio [B]`` at fixed sigma and labels (samples independent).
    x: states [B, ...].
    sigma: noise levels [B].

  Returns:
    ``(g, log_ratio)``: g like ``x``, the log ratio [B].
  """
  log_r, vjp = jax.vjp(log_ratio, x)
  (grad,) = vjp(jnp.ones_like(log_r))
  return -(sigma ** 2).reshape((-1,) + (1,) * (x.ndim - 1)) * grad, log_r


@flax.struct.dataclass
class FunctionDiscriminator:
  """A log-ratio function with the members of `types.Discriminator` (guidance by autodiff)."""
  fn: Callable = flax.struct.field(pytree_node=False)
  takes_labels: bool = flax.struct.field(pytree_node=False)

  def log_ratio(self, x: Array, sigma: Array, class_labels: Optional[Array] = None) -> Array:
    """``log p_data,sigma(x) - log p_model,sigma(x)`` estimate [B]."""
    out = _call(self.fn, self.takes_labels, x, _rows(x, sigma), class_labels)
    if tuple(out.shape) != tuple(x.shape[:1]):
      raise ValueError(f'as_discriminator: the function returned shape {tuple(out.shape)} for '
                       f'x of shape {tuple(x.shape)}; a log ratio is one number per sample, '
                       f'shape ({x.shape[0]},)')
    return out

  def guidance(self, x: Array, sigma: Array, class_labels: Optional[Array] = None
               ) -> tuple[Array, Array]:
    """``(-sigma^2 grad_x log_ratio, log_ratio)``: DG's correction (`types.Discriminator`)."""
    sigma = _rows(x, sigma)
    return guidance_from_log_ratio(lambda y: self.log_ratio(y, sigma, class_labels), x, sigma)


def as_discriminator(log_ratio_fn: Callable) -> FunctionDiscriminator:
  """Wraps a log density-ratio function as a `types.Discriminator`.

  Args:
    log_ratio_fn: ``fn(x, sigma)`` or ``fn(x, sigma, class_labels)`` returning the estimate
      [B] of ``log p_data,sigma(x) / p_model,sigma(x)``; differentiable in ``x`` for DG.

  Returns:
    A `FunctionDiscriminator` whose ``guidance`` is ``-sigma^2 grad_x log_ratio`` (DG's
    convention, `types.Discriminator.guidance`).
  """
  return FunctionDiscriminator(log_ratio_fn, _takes_labels(log_ratio_fn, 'as_discriminator'))
