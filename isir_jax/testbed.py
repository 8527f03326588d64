"""An exact testbed: Gaussian mixtures, where the EDM denoiser and the density ratio are closed-form.

Data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` in ``d`` dimensions. At noise level sigma,
``p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I)`` and the ideal denoiser is

    D(x; sigma) = E[x0 | x] = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),

with ``r_k`` the posterior responsibilities. The "pretrained model" is the exact denoiser of a
*wrong* mixture, and the "discriminator" is the exact ``log p_true,sigma - log p_model,sigma``,
so every sampler's correction can be checked against the known true mixture weights.
The components are far apart compared to their widths, so a sample's component is read off
reliably as the nearest mean (`Testbed.weights`).
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from isir_jax import adapters

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class Mixture:
  """Isotropic Gaussian mixture: means [K, d], stds [K], weights [K] (summing to 1)."""
  means: np.ndarray
  stds: np.ndarray
  weights: np.ndarray

  def _components(self, x: Array, sigma: Array) -> tuple[Array, Array]:
    """Per-component log joint [R, K] and variances [R, K] of flat x [R, d] at sigma [R]."""
    var = jnp.asarray(self.stds, jnp.float32) ** 2 + sigma[:, None] ** 2
    sq = jnp.sum((x[:, None, :] - jnp.asarray(self.means, jnp.float32)) ** 2, axis=-1)
    dim = self.means.shape[1]
    log_joint = (jnp.log(jnp.asarray(self.weights, jnp.float32)) -
                 0.5 * dim * jnp.log(2 * np.pi * var) - 0.5 * sq / var)
    return log_joint, var

  def log_prob(self, x: Array, sigma: Array) -> Array:
    """``log p_sigma(x)`` [R] of flat x [R, d] at sigma [R]."""
    log_joint, _ = self._components(x, sigma)
    return jax.nn.logsumexp(log_joint, axis=-1)

  def denoise(self, x: Array, sigma: Array) -> Array:
    """``E[x0 | x]`` [R, d] of flat x [R, d] at sigma [R]."""
    log_joint, var = self._components(x, sigma)
    resp = jax.nn.softmax(log_joint, axis=-1)
    shrink = jnp.asarray(self.stds, jnp.float32) ** 2 / var            # [R, K]
    mu = jnp.asarray(self.means, jnp.float32)
    post_means = mu + shrink[..., None] * (x[:, None, :] - mu)         # [R, K, d]
    return jnp.sum(resp[..., None] * post_means, axis=1)


def _flat(x: Array, sigma: Array) -> tuple[Array, Array]:
  rows = x.shape[0]
  return x.reshape(rows, -1).astype(jnp.float32), jnp.broadcast_to(
      jnp.asarray(sigma, jnp.float32), (rows,))


@dataclasses.dataclass(frozen=True, eq=False)
class MixtureDenoiser:
  """The exact EDM denoiser of a mixture; satisfies the `Denoiser` protocol."""
  mixture: Mixture
  shape: tuple
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  label_dim: int = 0

  def __call__(self, x: Array, sigma: Array, class_labels: Optional[Array] = None) -> Array:
    del class_labels  # Unconditional.
    xf, s = _flat(x, sigma)
    return self.mixture.denoise(xf, s).reshape(x.shape)

  def round_sigma(self, sigma: Array) -> Array:
    return jnp.asarray(sigma)


@dataclasses.dataclass(frozen=True, eq=False)
class MixtureDiscriminator:
  """The exact log density ratio ``log p_true,sigma - log p_model,sigma``: a `Discriminator`."""
  true: Mixture
  model: Mixture

  def log_ratio(self, x: Array, sigma: Array, class_labels: Optional[Array] = None) -> Array:
    del class_labels
    xf, s = _flat(x, sigma)
    return self.true.log_prob(xf, s) - self.model.log_prob(xf, s)

  def guidance(self, x: Array, sigma: Array, class_labels: Optional[Array] = None
               ) -> tuple[Array, Array]:
    """DG term ``-sigma^2 grad_x log_ratio`` and the log ratio."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    return adapters.guidance_from_log_ratio(lambda y: self.log_ratio(y, sigma, class_labels),
                                            x, sigma)


@dataclasses.dataclass(frozen=True, eq=False)
class Testbed:
  """A true mixture, a wrong model mixture, and the protocol objects built from them."""
  true: Mixture
  model: Mixture
  shape: tuple

  @property
  def true_denoiser(self) -> MixtureDenoiser:
    return MixtureDenoiser(self.true, self.shape)

  @property
  def model_denoiser(self) -> MixtureDenoiser:
    return MixtureDenoiser(self.model, self.shape)

  @property
  def discriminator(self) -> MixtureDiscriminator:
    return MixtureDiscriminator(self.true, self.model)

  def weights(self, samples) -> np.ndarray:
    """Fraction of ``samples`` [B, *shape] nearest to each component mean: [K]."""
    x = np.asarray(samples, np.float64).reshape(len(samples), -1)
    dist = ((x[:, None, :] - self.true.means[None]) ** 2).sum(-1)
    counts = np.bincount(dist.argmin(1), minlength=len(self.true.weights))
    return counts / len(x)

  def weight_error(self, samples) -> float:
    """Largest absolute error of the sample mixture weights against the true ones."""
    return float(np.abs(self.weights(samples) - self.true.weights).max())


def make_testbed(name: str = 'gmm2') -> Testbed:
  """The two standard testbeds.

  'gmm2': d = 2 (image shape (1, 1, 2)), means (-0.5, -0.5) and (0.5, 0.5), std 0.1.
  'gmm64': d = 64 as an 8x8x1 image, means -0.4 and +0.4 in every pixel, std 0.2.
  In both the true weights are (0.2, 0.8) and the model's (0.5, 0.5).
  """
  if name == 'gmm2':
    shape, means, std = (1, 1, 2), np.array([[-0.5, -0.5], [0.5, 0.5]]), 0.1
  elif name == 'gmm64':
    shape, means, std = (8, 8, 1), np.stack([np.full(64, -0.4), np.full(64, 0.4)]), 0.2
  else:
    raise ValueError(f"testbed: name must be 'gmm2' or 'gmm64', got {name!r}")
  stds = np.full(2, std)
  true = Mixture(means, stds, np.array([0.2, 0.8]))
  model = Mixture(means, stds, np.array([0.5, 0.5]))
  return Testbed(true, model, shape)
