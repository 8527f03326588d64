"""SongUNet: EDM's reimplementation of DDPM++ and NCSN++ (Song et al., 2021), in Flax.

Module and parameter names follow EDM's ``SongUNet``: ``enc.16x16_block0`` becomes
the submodule ``enc_16x16_block0`` and so on, so the converter only renames.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from isir_jax.networks import layers

Array = jax.Array


class SongUNet(nn.Module):
  """DDPM++ (positional/standard) and NCSN++ (fourier/residual) U-Net.

  Attributes mirror EDM's constructor arguments; ``dtype`` is the compute dtype
  (params stay float32). Dropout is active only when called with ``train=True``
  (needs a ``'dropout'`` rng).
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = 'positional'
  channel_mult_noise: int = 1
  encoder_type: str = 'standard'
  decoder_type: str = 'standard'
  resample_filter: Sequence[int] = (1, 1)
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
    if self.embedding_type not in ('fourier', 'positional'):
      raise ValueError(f'embedding_type: expected fourier|positional, got {self.embedding_type!r}')
    if self.encoder_type not in ('standard', 'skip', 'residual'):
      raise ValueError(f'encoder_type: expected standard|skip|residual, got {self.encoder_type!r}')
    if self.decoder_type not in ('standard', 'skip'):
      raise ValueError(f'decoder_type: expected standard|skip, got {self.decoder_type!r}')
    dt = self.dtype
    silu = nn.silu
    emb_channels = self.model_channels * self.channel_mult_emb
    noise_channels = self.model_channels * self.channel_mult_noise
    init = ('xavier_uniform', 1.0, 0.0)
    init_zero = ('xavier_uniform', 1e-5, 0.0)
    init_attn = ('xavier_uniform', float(np.sqrt(0.2)), 0.0)

    def block(features, name, attention=False, **kwargs):
      return layers.UNetBlock(
          features, num_heads=1 if attention else 0, dropout=self.dropout,
          skip_scale=float(np.sqrt(0.5)), eps=1e-6, resample_filter=tuple(self.resample_filter),
          resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
          init_attn=init_attn, dtype=dt, name=name, **kwargs)

    def conv(features, kernel, name, **kwargs):
      return layers.Conv2d(features, kernel, resample_filter=tuple(self.resample_filter),
                           init=init, dtype=dt, name=name, **kwargs)

    # Mapping: noise embedding with halves swapped to [sin, cos].
    if self.embedding_type == 'positional':
      emb = layers.positional_embedding(noise_labels, noise_channels, endpoint=True)
    else:
      emb = layers.FourierEmbedding(noise_channels, name='map_noise')(noise_labels)
    emb = jnp.concatenate([emb[:, noise_channels // 2:], emb[:, :noise_channels // 2]], axis=1)
    if self.label_dim:
      labels = layers.drop_labels(self, class_labels, self.label_dropout, train)
      emb = emb + layers.Linear(noise_channels, init=init, dtype=dt, name='map_label')(
          labels * np.sqrt(self.label_dim))
    if self.augment_dim and augment_labels is not None:
      emb = emb + layers.Linear(noise_channels, use_bias=False, init=init, dtype=dt,
                                name='map_augment')(augment_labels)
    emb = silu(layers.Linear(emb_channels, init=init, dtype=dt, name='map_layer0')(emb))
    emb = silu(layers.Linear(emb_channels, init=init, dtype=dt, name='map_layer1')(emb))

    # Encoder.
    skips = []
    aux = x
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      prefix = f'enc_{res}x{res}'
      if level == 0:
        x = conv(self.model_channels, 3, f'{prefix}_conv')(x)
        skips.append(x)
      else:
        cout = x.shape[-1]
        x = block(cout, f'{prefix}_down', down=True)(x, emb, train)
        if self.encoder_type == 'skip':
          aux = conv(aux.shape[-1], 0, f'{prefix}_aux_down', down=True)(aux)
          x = x + conv(cout, 1, f'{prefix}_aux_skip')(aux)
        elif self.encoder_type == 'residual':
          # NCSN++ progressive input: the image pyramid joins the trunk with 1/sqrt(2).
          x = aux = (x + conv(cout, 3, f'{prefix}_aux_residual', down=True,
                              fused_resample=True)(aux)) / np.sqrt(2)
        skips.append(x)
      for idx in range(self.num_blocks):
        x = block(self.model_channels * mult, f'{prefix}_block{idx}',
                  attention=res in self.attn_resolutions)(x, emb, train)
        skips.append(x)

    # Decoder.
    aux = None
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
        attention = idx == self.num_blocks and res in self.attn_resolutions
        x = block(self.model_channels * mult, f'{prefix}_block{idx}',
                  attention=attention)(x, emb, train)
      if self.decoder_type == 'skip' or level == 0:
        # Output head at this resolution; 'skip' sums heads over the pyramid.
        if self.decoder_type == 'skip' and level < last:
          aux = conv(self.out_channels, 0, f'{prefix}_aux_up', up=True)(aux)
        tmp = layers.GroupNorm(eps=1e-6, dtype=dt, name=f'{prefix}_aux_norm')(x)
        tmp = layers.Conv2d(self.out_channels, 3, init=init_zero, dtype=dt,
                            name=f'{prefix}_aux_conv')(silu(tmp))
        aux = tmp if aux is None else tmp + aux
    return aux
