"""EDM's preconditioners around a U-Net: VP, VE, iDDPM and EDM (Karras et al., 2022, Table 1).

Each computes ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` in float32,
whatever the compute dtype of the wrapped network. ``sigma`` may be a scalar or one
value per sample; a conditional network called without labels sees zeros.

The architecture config of a whole denoiser is a JSON-able dict::

    {'class_name': 'VPPrecond', 'kwargs': {...}, 'model': {'class_name': 'SongUNet', 'kwargs': {...}}}

``build_precond`` turns it into a module; the converters write it.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isir_jax.networks.dhariwal_unet import DhariwalUNet
from isir_jax.networks.song_unet import SongUNet

Array = jax.Array


class Precond(nn.Module):
  """Base of the preconditioners: the shared forward pass.

  Subclasses give ``coefficients``, ``sigma_min``/``sigma_max`` and, for discrete
  models, ``round_sigma``. The wrapped ``model`` is a SongUNet or DhariwalUNet.
  """
  model: nn.Module
  img_resolution: int
  img_channels: int
  label_dim: int = 0

  def coefficients(self, sigma: Array) -> tuple[Array, Array, Array, Array]:
    """Returns ``(c_skip, c_out, c_in, c_noise)`` for float32 sigmas [B]."""
    raise NotImplementedError

  def round_sigma(self, sigma: Array) -> Array:
    """Nearest noise level the network supports: the identity for continuous models."""
    return jnp.asarray(sigma)

  def __call__(self, x: Array, sigma: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, train: bool = False) -> Array:
    """Returns the denoised ``D(x; sigma)``.

    Args:
      x: [B, H, W, C] noisy images (EDM scale).
      sigma: scalar or [B] noise levels.
      class_labels: [B, label_dim] (one-hot); None means zeros on a conditional net.
      augment_labels: optional [B, augment_dim] (training with augmentation).
      train: enables dropout in the network.
    Returns:
      [B, H, W, C] float32 denoised images.
    """
    x = jnp.asarray(x, jnp.float32)
    batch = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (batch,))
    if self.label_dim == 0:
      class_labels = None
    elif class_labels is None:
      class_labels = jnp.zeros((batch, self.label_dim), jnp.float32)
    else:
      class_labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, self.label_dim)
    c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
    bcast = lambda c: jnp.reshape(c, (-1, 1, 1, 1))
    model_in = (bcast(c_in) * x).astype(self.model.dtype)
    f_x = self.model(model_in, c_noise, class_labels, augment_labels, train)
    f_x = f_x[..., :self.img_channels].astype(jnp.float32)
    return bcast(c_skip) * x + bcast(c_out) * f_x


def _vp_sigma(beta_d: float, beta_min: float, t: float) -> float:
  """VP noise level at time t, in float32 as EDM computes it (sigma_min = 2^-10 exactly)."""
  f32 = np.float32
  t = f32(t)
  exponent = f32(0.5 * beta_d) * (t * t) + f32(beta_min) * t
  # Correctly rounded float32 exp (numpy's float32 exp is off by one ulp here).
  return float(np.sqrt(f32(np.exp(np.float64(exponent))) - f32(1)))


class VPPrecond(Precond):
  """Variance-preserving preconditioning (DDPM++ / Song et al. VP SDE)."""
  beta_d: float = 19.9
  beta_min: float = 0.1
  M: int = 1000
  epsilon_t: float = 1e-5

  @property
  def sigma_min(self) -> float:
    return _vp_sigma(self.beta_d, self.beta_min, self.epsilon_t)

  @property
  def sigma_max(self) -> float:
    return _vp_sigma(self.beta_d, self.beta_min, 1.0)

  def sigma_inv(self, sigma: Array) -> Array:
    """VP time of a noise level: the inverse of ``sigma(t)``."""
    return (jnp.sqrt(self.beta_min ** 2 + 2 * self.beta_d * jnp.log(1 + sigma ** 2))
            - self.beta_min) / self.beta_d

  def coefficients(self, sigma):
    c_in = 1 / jnp.sqrt(sigma ** 2 + 1)
    return jnp.ones_like(sigma), -sigma, c_in, (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
  """Variance-exploding preconditioning (NCSN++ / Song et al. VE SDE)."""
  sigma_min: float = 0.02
  sigma_max: float = 100.0

  def coefficients(self, sigma):
    return jnp.ones_like(sigma), sigma, jnp.ones_like(sigma), jnp.log(0.5 * sigma)


@functools.lru_cache(maxsize=None)
def iddpm_sigma_table(M: int, C_1: float, C_2: float) -> np.ndarray:  # pylint: disable=invalid-name
  """The M + 1 discrete noise levels ``u_j`` of iDDPM (EDM Table 1), float32, decreasing.

  ``u_M = 0`` and ``u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1)`` with
  the cosine schedule ``abar(j) = sin(pi/2 j / M / (C_2 + 1))^2``, evaluated in float32
  operation by operation as EDM does.
  """
  f32 = np.float32

  def alpha_bar(j):
    return np.square(np.sin(f32(0.5 * np.pi) * f32(j) / f32(M) / f32(C_2 + 1)))

  u = np.zeros(M + 1, np.float32)
  for j in range(M, 0, -1):
    ratio = np.maximum(alpha_bar(j - 1) / alpha_bar(j), f32(C_1))
    u[j - 1] = np.sqrt((u[j] * u[j] + f32(1)) / ratio - f32(1))
  u.setflags(write=False)
  return u


class iDDPMPrecond(Precond):  # pylint: disable=invalid-name
  """Improved-DDPM preconditioning over a discrete set of ``M`` noise levels.

  The network sees the index of the nearest level (``c_noise``); ``c_in`` and
  ``c_out`` use the unrounded sigma, as in EDM. The wrapped model outputs
  ``2 * img_channels`` channels (mean and variance); only the first half is used.
  """
  C_1: float = 0.001  # pylint: disable=invalid-name
  C_2: float = 0.008  # pylint: disable=invalid-name
  M: int = 1000

  @property
  def u(self) -> np.ndarray:
    return iddpm_sigma_table(self.M, self.C_1, self.C_2)

  @property
  def sigma_min(self) -> float:
    return float(self.u[self.M - 1])

  @property
  def sigma_max(self) -> float:
    return float(self.u[0])

  def _index(self, sigma: Array) -> Array:
    sigma = jnp.asarray(sigma).astype(jnp.float32)
    return jnp.argmin(jnp.abs(sigma[..., None] - jnp.asarray(self.u)), axis=-1)

  def round_sigma(self, sigma: Array) -> Array:
    sigma = jnp.asarray(sigma)
    return jnp.asarray(self.u)[self._index(sigma)].astype(sigma.dtype)

  def coefficients(self, sigma):
    c_in = 1 / jnp.sqrt(sigma ** 2 + 1)
    c_noise = (self.M - 1 - self._index(sigma)).astype(jnp.float32)
    return jnp.ones_like(sigma), -sigma, c_in, c_noise


class EDMPrecond(Precond):
  """EDM's own preconditioning (Karras et al., 2022, Sec. 5)."""
  sigma_min: float = 0.0
  sigma_max: float = float('inf')
  sigma_data: float = 0.5

  def coefficients(self, sigma):
    sd2 = self.sigma_data ** 2
    c_skip = sd2 / (sigma ** 2 + sd2)
    c_out = sigma * self.sigma_data / jnp.sqrt(sigma ** 2 + sd2)
    c_in = 1 / jnp.sqrt(sd2 + sigma ** 2)
    return c_skip, c_out, c_in, jnp.log(sigma) / 4


def example_inputs(module: Precond) -> tuple:
  """Smallest ``(x, sigma, class_labels, augment_labels)`` that create every parameter.

  ``module.init(key, *example_inputs(module))`` gives freshly initialised variables
  (EDM's initialisation), including the optional label and augmentation layers.
  """
  r, c = module.img_resolution, module.img_channels
  x = jnp.zeros((1, r, r, c), jnp.float32)
  sigma = jnp.ones((1,), jnp.float32)
  labels = jnp.zeros((1, module.label_dim), jnp.float32) if module.label_dim else None
  augment_dim = getattr(module.model, 'augment_dim', 0)
  augment = jnp.zeros((1, augment_dim), jnp.float32) if augment_dim else None
  return x, sigma, labels, augment


PRECONDS = {cls.__name__: cls for cls in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)}
MODELS = {cls.__name__: cls for cls in (SongUNet, DhariwalUNet)}


def _freeze(value):
  """JSON lists -> tuples, so that module attributes are hashable (jit-static)."""
  return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def build_precond(config: dict, dtype: Any = jnp.float32) -> Precond:
  """Builds a preconditioned network from its architecture config.

  Args:
    config: ``{'class_name', 'kwargs', 'model': {'class_name', 'kwargs'}}`` as above.
    dtype: compute dtype of the U-Net (e.g. ``jnp.bfloat16``); params stay float32.
  Returns:
    The (unbound) Flax module.
  """
  name, model_name = config['class_name'], config['model']['class_name']
  if name not in PRECONDS:
    raise ValueError(f'class_name: expected one of {sorted(PRECONDS)}, got {name!r}')
  if model_name not in MODELS:
    raise ValueError(f'model.class_name: expected one of {sorted(MODELS)}, got {model_name!r}')
  model_kwargs = {k: _freeze(v) for k, v in config['model']['kwargs'].items()}
  model = MODELS[model_name](**model_kwargs, dtype=dtype)
  kwargs = {k: _freeze(v) for k, v in config['kwargs'].items()}
  return PRECONDS[name](model=model, **kwargs)
