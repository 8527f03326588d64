"""DhariwalUNet: EDM's reimplementation of ADM (Dhariwal & Nichol, 2021), in Flax.

Module and parameter names follow EDM's ``DhariwalUNet`` (``enc.32x32_block0`` ->
``enc_32x32_block0``). Attention uses ``C // 64`` heads; a block whose width is
below 64 channels therefore has no attention even where requested, as in EDM.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isir_jax.networks import layers

Array = jax.Array

CHANNELS_PER_HEAD = 64


class DhariwalUNet(nn.Module):
  """ADM U-Net with adaptive group-norm scale/shift by the embedding.

  Attributes mirror EDM's constructor arguments; ``dtype`` is the compute dtype
  (params stay float32). Dropout is active only when called with ``train=True``.
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.10
  label_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, train: bool = False) -> Array:
    """Applies the U-Net.

    Args:
      x: [B, H, W, in_channels] input.
      noise_labels: [B] (or [1]) conditioning noise labels ``c_noise``.
      class_labels: [B, label_dim]; required when ``label_dim > 0``.
      augment_labels: optional [B, augment_dim] augmentation labels.
      train: enables dropout.
    Returns:
      [B, H, W, out_channels] output.
    """
    dt = self.dtype
    silu = nn.silu
    emb_channels = self.model_channels * self.channel_mult_emb
    init = ('kaiming_uniform', float(np.sqrt(1 / 3)), float(np.sqrt(1 / 3)))
    init_zero = ('kaiming_uniform', 0.0, 0.0)

    def block(features, name, attention=False, **kwargs):
      return layers.UNetBlock(
          features, num_heads=features // CHANNELS_PER_HEAD if attention else 0,
          dropout=self.dropout, init=init, init_zero=init_zero, dtype=dt, name=name, **kwargs)

    # Mapping: [cos, sin] embedding (no endpoint), label added after the MLP.
    emb = layers.positional_embedding(noise_labels, self.model_channels, endpoint=False)
    if self.augment_dim and augment_labels is not None:
      emb = emb + layers.Linear(self.model_channels, use_bias=False, init=init_zero, dtype=dt,
                                name='map_augment')(augment_labels)
    emb = silu(layers.Linear(emb_channels, init=init, dtype=dt, name='map_layer0')(emb))
    emb = layers.Linear(emb_channels, init=init, dtype=dt, name='map_layer1')(emb)
    if self.label_dim:
      labels = layers.drop_labels(self, class_labels, self.label_dropout, train)
      emb = emb + layers.Linear(
          emb_channels, use_bias=False, dtype=dt, name='map_label',
          init=('kaiming_normal', float(np.sqrt(self.label_dim)), 0.0))(labels)
    emb = silu(emb)

    # Encoder.
    skips = []
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      prefix = f'enc_{res}x{res}'
      if level == 0:
        x = layers.Conv2d(self.model_channels * mult, 3, init=init, dtype=dt,
                          name=f'{prefix}_conv')(x)
      else:
        x = block(x.shape[-1], f'{prefix}_down', down=True)(x, emb, train)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = block(self.model_channels * mult, f'{prefix}_block{idx}',
                  attention=res in self.attn_resolutions)(x, emb, train)
        skips.append(x)

    # Decoder.
    last = len(self.channel_mult) - 1
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      prefix = f'dec_{res}x{res}'
      cout = x.shape[-1]
      if level == last:
        x = block(cout, f'{prefix}_in0', attention=True)(x, emb, train)
        x = block(cout, f'{prefix}_in1')(x, emb, train)
      else:
        x = block(cout, f'{prefix}_up', up=True)(x, emb, train)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
        x = block(self.model_channels * mult, f'{prefix}_block{idx}',
                  attention=res in self.attn_resolutions)(x, emb, train)
    x = layers.GroupNorm(dtype=dt, name='out_norm')(x)
    return layers.Conv2d(self.out_channels, 3, init=init_zero, dtype=dt, name='out_conv')(silu(x))
