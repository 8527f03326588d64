"""The published CIFAR-10 architectures with re-drawn random weights."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_convert import dg as dg_convert
from isir_jax import discriminator as disc_lib
from isir_jax.denoiser import Denoiser
from isir_jax.networks import precond


def denoiser_config(tiny: bool) -> dict:
  """EDM's cifar10 DDPM++ VP network (train.py --arch=ddpmpp --precond=vp); tiny: 3 blocks."""
  unet = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0,
              model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
              dropout=0.13, embedding_type='positional', channel_mult_noise=1,
              encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
  if tiny:
    unet.update(model_channels=16, channel_mult=[1, 2], num_blocks=1)
  return {'class_name': 'VPPrecond', 'kwargs': dict(img_resolution=32, img_channels=3,
                                                    label_dim=0),
          'model': {'class_name': 'SongUNet', 'kwargs': unet}}


def reference_kwargs(config: dict) -> dict:
  """The same network as EDM's ``VPPrecond(**kwargs)``."""
  unet = {k: v for k, v in config['model']['kwargs'].items()
          if k not in ('img_resolution', 'in_channels', 'out_channels', 'label_dim')}
  return dict(config['kwargs'], model_type='SongUNet', **unet)


def discriminator_arch(tiny: bool) -> dg_convert.Arch:
  """DG's unconditional cifar10 discriminator (classifier_lib: ADM 32x32 + depth-2 head)."""
  if tiny:
    return dg_convert.Arch(classifier_width=32, classifier_depth=1, disc_width=32, disc_depth=1,
                           num_head_channels=16)
  return dg_convert.Arch()


def random_params(abstract: Any, seed: int) -> Any:
  """Random weights of the given shapes, as in the fixtures (docs/design.md,
  "Fixtures and parity").

  Default initialisations are nearly trivial (zeroed output layers), so every leaf is
  re-drawn: kernels N(0, 1/fan_in), normalisation scales 1 + 0.1 N(0, 1), other vectors
  0.1 N(0, 1). Drawn with numpy from ``jax.eval_shape`` leaves: no init is compiled.
  """
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for path, leaf in leaves:
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) >= 2:
      z /= np.sqrt(np.prod(leaf.shape[:-1]))
    elif 'scale' in jax.tree_util.keystr(path):
      z = 1. + 0.1 * z
    else:
      z = 0.1 * z
    out.append(jnp.asarray(z))
  return jax.tree_util.tree_unflatten(treedef, out)


class Models:
  """The two networks' configs and float32 params (built on first use), per compute dtype."""

  def __init__(self, tiny: bool, seed: int):
    self.config, self.arch = denoiser_config(tiny), discriminator_arch(tiny)
    self.seed = seed
    self._den_params = self._disc_params = None
    self._disc = self.arch.discriminator()   # abstract: modules and settings, no params

  @property
  def den_params(self) -> Any:
    if self._den_params is None:
      module = precond.build_precond(self.config)
      abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros([1, 32, 32, 3]),
                                jnp.ones([1]))
      self._den_params = random_params(abstract, self.seed)
    return self._den_params

  @property
  def disc_params(self) -> Any:
    if self._disc_params is None:
      abstract = disc_lib.init_params(self._disc.encoder, self._disc.head, jax.random.key(0),
                                    abstract=True)
      self._disc_params = random_params(abstract, self.seed + 1)
    return self._disc_params

  def denoiser(self, dtype=jnp.float32) -> Denoiser:
    return Denoiser.from_module(precond.build_precond(self.config, dtype=dtype), self.den_params)

  def discriminator(self, dtype=jnp.float32) -> disc_lib.DGDiscriminator:
    return disc_lib.DGDiscriminator.from_config(self.disc_params, self._disc.to_config(), dtype)
