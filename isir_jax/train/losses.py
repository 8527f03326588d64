"""Training losses: EDM denoising, the noisy classifier, and DG's discriminator BCE.

Each loss is a pure function of params, a batch and a key; the trainers close over
the Flax modules and hand the result to ``isir_jax.train.loop.train``.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from isir_jax import vpsde

Array = jax.Array


def edm_loss(denoise: Callable[[Array, Array, Optional[Array]], Array], images: Array,
             key: Array, class_labels: Optional[Array] = None, p_mean: float = -1.2,
             p_std: float = 1.2, sigma_data: float = 0.5) -> Array:
  """EDM's training loss (Karras et al. 2022, Eq. 2 with Table 1's choices).

  ``ln sigma ~ N(p_mean, p_std^2)``, weight ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``,
  loss ``lambda * |D(y + sigma n; sigma) - y|^2``, averaged over pixels and batch.

  Args:
    denoise: ``(x, sigma [B], class_labels) -> D(x; sigma)`` (the preconditioned net).
    images: clean images [B, H, W, C] in [-1, 1].
    key: PRNG key for sigma and the noise.
    class_labels: optional [B, label_dim] one-hot labels.
  """
  k_sigma, k_noise = jax.random.split(key)
  b = images.shape[0]
  sigma = jnp.exp(p_mean + p_std * jax.random.normal(k_sigma, (b,)))
  weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
  noisy = images + sigma[:, None, None, None] * jax.random.normal(k_noise, images.shape)
  err = (denoise(noisy, sigma, class_labels) - images) ** 2
  return jnp.mean(weight[:, None, None, None] * err)


def _antiderivative(t):
  """``log(exp(int_0^t beta) - 1)``: antiderivative of the likelihood-weighting density."""
  ib = vpsde.integral_beta(t)
  return jnp.log(-jnp.expm1(-ib)) + ib


def sample_vp_time(key: Array, batch: int, importance: bool = True,
                   t_min: float = 1e-5, t_max: float = 1.0) -> Array:
  """VP diffusion times [B] for training on perturbed inputs.

  With ``importance`` (DG's ``get_diffusion_time``), tau has density proportional to
  ``beta(t) / (1 - exp(-int_0^t beta))`` on [t_min, t_max] (the likelihood weighting of
  Song et al. 2021), drawn by inverting its CDF; otherwise tau is uniform.
  """
  u = jax.random.uniform(key, (batch,))
  if not importance:
    return t_min + (t_max - t_min) * u
  lo = _antiderivative(jnp.float32(t_min))
  z = _antiderivative(jnp.float32(t_max)) - lo
  # int_0^tau beta = log(1 + exp(z u + lo)); solve the quadratic in tau.
  return vpsde.time_of_integral(jnp.logaddexp(0.0, z * u + lo))


def perturb_vp(images: Array, tau: Array, key: Array) -> Array:
  """VP forward marginal ``mean(tau) x + std(tau) eps`` of images [B, H, W, C]."""
  mean = vpsde.vp_mean(tau)[:, None, None, None]
  std = jnp.sqrt(1.0 - mean ** 2)
  return mean * images + std * jax.random.normal(key, images.shape)


def noisy_classifier_loss(logits_fn: Callable[[Array, Array], Array], images: Array,
                          labels: Array, key: Array, importance: bool = False
                          ) -> tuple[Array, dict]:
  """Cross-entropy of a time-dependent classifier on VP-perturbed images.

  The role of ADM's noisy classifier: its trunk becomes the frozen feature extractor
  of the discriminator. ADM trains it at uniform times (the default here).

  Args:
    logits_fn: ``(x_vp, tau) -> logits [B, classes]``.
    images: clean images [B, H, W, C] in [-1, 1].
    labels: integer labels [B].
    key: PRNG key.
    importance: draw tau by DG's importance sampling instead of uniformly.
  """
  k_t, k_n = jax.random.split(key)
  tau = sample_vp_time(k_t, images.shape[0], importance)
  logits = logits_fn(perturb_vp(images, tau, k_n), tau)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, {'acc': jnp.mean(logits.argmax(-1) == labels)}


def discriminator_loss(logit_fn: Callable[[Array, Array, Optional[Array]], Array],
                       images: Array, is_real: Array, key: Array,
                       class_labels: Optional[Array] = None, importance: bool = True
                       ) -> tuple[Array, dict]:
  """DG's discriminator objective (Kim et al. 2023, ``train.py``).

  Binary cross-entropy of real (1) versus generated (0) images, perturbed at an
  importance-sampled VP time; the logit is the log density ratio the samplers use.

  Args:
    logit_fn: ``(x_vp, tau, class_labels) -> logit [B]``.
    images: real and generated images [B, H, W, C] in [-1, 1].
    is_real: [B] 1.0 for data, 0.0 for model samples.
    key: PRNG key.
    class_labels: optional [B, label_dim] one-hot condition.
    importance: DG's importance-sampled tau (True) or uniform tau.
  """
  k_t, k_n = jax.random.split(key)
  tau = sample_vp_time(k_t, images.shape[0], importance)
  logit = logit_fn(perturb_vp(images, tau, k_n), tau, class_labels)
  loss = optax.sigmoid_binary_cross_entropy(logit, is_real).mean()
  return loss, {'acc': jnp.mean((logit > 0) == (is_real > 0.5))}


def importance_time_density(tau: Array, t_min: float = 1e-5, t_max: float = 1.0) -> Array:
  """Density of ``sample_vp_time(importance=True)`` at tau (for tests)."""
  z = _antiderivative(jnp.float32(t_max)) - _antiderivative(jnp.float32(t_min))
  return vpsde.beta(tau) / (-jnp.expm1(-vpsde.integral_beta(tau))) / z


