"""DG's time-dependent discriminator: ADM features + a small head, on the EDM sigma scale.

The discriminator ``d(x, sigma)`` is the logit of a classifier of real versus generated
noisy images, so ``exp(d)`` estimates ``p_data,sigma(x) / p_model,sigma(x)`` (Kim et al.
2023, "Refining Generative Process with Discriminator Guidance"). The networks were
trained in the VP-SDE parametrisation (Song et al. 2021), so an EDM state ``x`` at noise
``sigma`` is mapped to VP time ``tau`` and input ``mean(tau) * x`` first.

The guidance window ``[time_min, time_max]`` of DG is not applied here: the DG sampler
applies it, per sample (`isir_jax.samplers.dg.windowed_guidance`); the log ratio is always
the network's.
"""

import dataclasses
import math
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from isir_jax import checkpoints
from isir_jax.vpsde import cosine_time, vp_mean, vp_time
from isir_jax.networks.adm_encoder import EncoderUNetModel

Array = jax.Array

FAMILY = 'dg_discriminator'
CLASSIFIER_FAMILY = 'adm_classifier'   # the ADM noisy classifier alone (encoder kwargs + params)
TIME_MAPS = ('linear', 'cosine')

def module_from_config(kwargs: dict, dtype: Any = jnp.float32) -> EncoderUNetModel:
  """Rebuilds an encoder from its JSON config (lists back to tuples)."""
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  return EncoderUNetModel(**kw, dtype=dtype)


def module_config(module: EncoderUNetModel) -> dict:
  """JSON-ready architecture kwargs of an encoder (inverse of ``module_from_config``)."""
  skip = ('parent', 'name', 'dtype')
  return {f.name: list(v) if isinstance(v := getattr(module, f.name), tuple) else v
          for f in dataclasses.fields(module) if f.name not in skip}


class DGDiscriminator(flax.struct.PyTreeNode):
  """Frozen ADM feature extractor + DG head, evaluated at EDM noise levels.

  A pytree: the params are leaves (pass the object through ``jax.jit`` or close over
  it), the modules and settings are static. Satisfies ``isir_jax.types.Discriminator``.

  Attributes:
    encoder: the ADM classifier (``feature=True`` gives the head's input).
    head: the discriminator head (``out_channels=1``).
    params: ``{'encoder': ..., 'head': ...}`` Flax ``params`` collections.
    time_map: 'linear' (VP time) or 'cosine' (ADM's 64x64 classifier).
    prob_clip: 0 for the raw logit (the ISIR seed); ``p > 0`` reproduces upstream DG's
      ``log(D / (1 - D))`` with ``D = sigmoid(logit)`` clipped to ``[p, 1 - p]``, i.e.
      the logit clipped to ``+-log((1 - p) / p)`` with zero gradient beyond.
  """

  encoder: EncoderUNetModel = flax.struct.field(pytree_node=False)
  head: EncoderUNetModel = flax.struct.field(pytree_node=False)
  params: Any
  time_map: str = flax.struct.field(pytree_node=False, default='linear')
  prob_clip: float = flax.struct.field(pytree_node=False, default=0.)

  @classmethod
  def from_modules(cls, encoder: EncoderUNetModel, head: EncoderUNetModel, params: Any,
                   config: Optional[dict] = None) -> 'DGDiscriminator':
    """Builds the discriminator without disk (trainers, tests).

    Args:
      encoder: the ADM classifier module.
      head: the head module.
      params: ``{'encoder': params, 'head': params}``.
      config: optional settings ``{'time_map': ..., 'prob_clip': ...}`` (other keys,
        e.g. a full ``to_config()``, are ignored).
    """
    config = config or {}
    time_map = config.get('time_map', 'linear')
    if time_map not in TIME_MAPS:
      raise ValueError(f'time_map={time_map!r}, expected one of {TIME_MAPS}')
    return cls(encoder=encoder, head=head, params=params, time_map=time_map,
               prob_clip=float(config.get('prob_clip', 0.)))

  @classmethod
  def from_config(cls, params: Any, config: dict, dtype: Any = jnp.float32
                  ) -> 'DGDiscriminator':
    """Builds the discriminator from a model directory's ``(params, config)``."""
    return cls.from_modules(module_from_config(config['encoder'], dtype),
                            module_from_config(config['head'], dtype), params, config)

  def to_config(self) -> dict:
    """The ``config.json`` of this discriminator (``save_model(dir, d.params, d.to_config())``)."""
    return {'family': FAMILY, 'encoder': module_config(self.encoder),
            'head': module_config(self.head), 'time_map': self.time_map,
            'prob_clip': self.prob_clip}

  def network_time(self, tau: Array) -> Array:
    """The time the ADM networks take (in [0, 1]; they multiply it by 999)."""
    return cosine_time(tau) if self.time_map == 'cosine' else tau

  def features(self, x_vp: Array, t: Array) -> Array:
    """Frozen ADM features [B, h, w, C] of VP-scaled input ``x_vp`` at network time ``t``."""
    return self.encoder.apply({'params': self.params['encoder']}, x_vp, t, feature=True)

  def head_logit(self, features: Array, t: Array, class_labels: Optional[Array] = None,
                 head_params: Any = None) -> Array:
    """Head logit [B] on ``features``; ``head_params`` overrides the stored ones (training).

    Labels are ignored by an unconditional head (samplers may pass them regardless).
    """
    params = self.params['head'] if head_params is None else head_params
    labels = class_labels if self.head.num_classes else None
    return self.head.apply({'params': params}, features, t, labels)[:, 0]

  def logit(self, x_vp: Array, t: Array, class_labels: Optional[Array] = None) -> Array:
    """Head logit [B] on VP-scaled input ``x_vp`` [B, H, W, C] at network time ``t`` [B]."""
    return self.head_logit(self.features(x_vp, t), t, class_labels)

  def to_log_ratio(self, logit: Array) -> Array:
    """The log ratio the samplers see: the logit, clipped if ``prob_clip > 0``."""
    if self.prob_clip <= 0:
      return logit
    bound = math.log((1. - self.prob_clip) / self.prob_clip)
    return jnp.clip(logit, -bound, bound)

  def _vp_input(self, x: Array, sigma: Array) -> tuple[Array, Array, Array, Array]:
    """Returns (sigma [B], tau [B], mean [B], network time [B])."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    tau = vp_time(sigma)
    return sigma, tau, vp_mean(tau), self.network_time(tau)

  def log_ratio(self, x: Array, sigma: Array, class_labels: Optional[Array] = None
                ) -> Array:
    """Log density ratio ``d(x, sigma)`` [B].

    Args:
      x: [B, H, W, C] unnormalised state on the EDM scale.
      sigma: EDM noise level, scalar or [B].
      class_labels: [B, label_dim] one-hot, for a conditional head.
    """
    _, _, mean, t = self._vp_input(x, sigma)
    x_vp = mean[:, None, None, None] * x.astype(jnp.float32)
    return self.to_log_ratio(self.logit(x_vp, t, class_labels))

  def guidance(self, x: Array, sigma: Array, class_labels: Optional[Array] = None
               ) -> tuple[Array, Array]:
    """DG correction ``g`` and the log ratio, from one backward pass.

    ``g = -(sigma^2 * mean) * grad_{mean x} d = -sigma^2 * grad_x d``; samplers add
    ``w * g / sigma`` to the ODE direction (inside DG's time window, which they apply).

    Args:
      x: [B, H, W, C] unnormalised state on the EDM scale.
      sigma: EDM noise level, scalar or [B].
      class_labels: [B, label_dim] one-hot, for a conditional head.

    Returns:
      ``(g, log_ratio)``: g like ``x`` (float32), log_ratio [B].
    """
    sigma, _, mean, t = self._vp_input(x, sigma)
    x_vp = mean[:, None, None, None] * x.astype(jnp.float32)

    def total(v):
      d = self.to_log_ratio(self.logit(v, t, class_labels))
      return d.sum(), d  # samples are independent: grad of the sum is per-sample.

    (_, d), grad = jax.value_and_grad(total, has_aux=True)(x_vp)
    return (-(sigma ** 2) * mean)[:, None, None, None] * grad, d


def load_discriminator(directory: str, dtype: Any = jnp.float32) -> DGDiscriminator:
  """Loads a discriminator converted by ``checkpoints_convert.dg`` (or trained here).

  Args:
    directory: model directory (``config.json`` + orbax ``params/``).
    dtype: network compute dtype (``jnp.bfloat16`` for faster TPU/GPU compute).
  """
  params, config = checkpoints.load_model(directory, FAMILY)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return DGDiscriminator.from_config(params, config, dtype)


def init_module_params(module: EncoderUNetModel, key: Array) -> Any:
  """Random params of one encoder, every layer included.

  That includes the classifier's pooling head, which ``feature=True`` skips but the
  published checkpoint holds.
  """
  s = module.image_size
  x = jnp.zeros((1, s, s, module.in_channels))
  labels = jnp.zeros((1,), jnp.int32) if module.num_classes else None
  return module.init(key, x, jnp.zeros((1,)), labels)['params']


def init_params(encoder: EncoderUNetModel, head: EncoderUNetModel, key: Array,
                abstract: bool = False) -> Any:
  """``{'encoder', 'head'}`` random params, or with ``abstract`` their ``jax.eval_shape``."""
  def init():
    k_enc, k_head = jax.random.split(key)
    return {'encoder': init_module_params(encoder, k_enc),
            'head': init_module_params(head, k_head)}

  return jax.eval_shape(init) if abstract else init()
