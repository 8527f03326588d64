"""ADM's encoder half-UNet (``EncoderUNetModel``, Dhariwal & Nichol 2021) in Flax.

This is the noisy ImageNet classifier that Discriminator Guidance (Kim et al. 2023)
uses twice: its trunk, frozen, as a feature extractor (``feature=True``: 512x8x8 at
32x32), and a small copy of it as the discriminator head on those features
(``out_channels=1``, optionally class conditional).

Layout is NHWC. Submodule names follow the PyTorch state-dict keys with the indices
joined by ``_`` (``input_blocks.1.0.in_layers.0`` -> ``input_blocks_1_0/in_layers_0``),
which is what ``checkpoints_convert.dg`` relies on.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

def group_norm32(x: Array, name: str) -> Array:
  """ADM's GroupNorm32: 32 groups, eps 1e-5, computed in float32, cast back.

  Call inside a compact method; creates the ``nn.GroupNorm`` submodule ``name``.
  """
  y = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=jnp.float32,
                   use_fast_variance=False, name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


def timestep_embedding(timesteps: Array, dim: int, max_period: float = 10000.) -> Array:
  """Sinusoidal embedding ``[cos, sin]`` of (fractional) timesteps [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1) -> nn.Conv:
  """PyTorch-style convolution: symmetric zero padding ``kernel // 2``."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def _avg_pool2(x: Array) -> Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _attention(q: Array, k: Array, v: Array) -> Array:
  """Softmax attention over tokens; q, k, v are [B, T, heads, ch] -> [B, T, heads*ch].

  q and k are each scaled by ``ch^-1/4`` before the product (ADM's fp16-friendly form);
  the softmax runs in float32.
  """
  scale = q.shape[-1] ** -0.25
  w = jnp.einsum('bthc,bshc->bhts', q * scale, k * scale)
  w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(q.dtype)
  a = jnp.einsum('bhts,bshc->bthc', w, v)
  return a.reshape(a.shape[0], a.shape[1], -1)


class ResBlock(nn.Module):
  """Residual block with timestep conditioning; optionally halves the resolution."""

  out_channels: int
  use_scale_shift_norm: bool = False
  down: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    h = nn.silu(group_norm32(x, 'in_layers_0'))
    if self.down:  # resample before the conv, on both paths (ADM resblock_updown).
      h, x = _avg_pool2(h), _avg_pool2(x)
    h = _conv(self.out_channels, 3, self.dtype, 'in_layers_2')(h)

    n_emb = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb_out = nn.Dense(n_emb, dtype=self.dtype, name='emb_layers_1')(nn.silu(emb))
    emb_out = emb_out.astype(h.dtype)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = group_norm32(h, 'out_layers_0') * (1 + scale) + shift
    else:
      h = group_norm32(h + emb_out, 'out_layers_0')
    h = _conv(self.out_channels, 3, self.dtype, 'out_layers_3')(nn.silu(h))

    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, 'skip_connection')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Self-attention over spatial positions (ADM's legacy head order).

  The 3C qkv channels are split heads-first: channel ``head*3*ch + j*ch + c`` holds
  q (j=0), k (j=1) or v (j=2) of head ``head``.
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hgt, wid, c = x.shape
    ch = c // self.num_heads
    tokens = x.reshape(b, hgt * wid, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(group_norm32(tokens, 'norm'))
    qkv = qkv.reshape(b, hgt * wid, self.num_heads, 3, ch)
    h = _attention(qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :])
    h = nn.Dense(c, dtype=self.dtype, name='proj_out')(h)
    return (tokens + h).reshape(b, hgt, wid, c)


class AttentionPool2d(nn.Module):
  """CLIP-style attention pooling: the mean token attends to all positions.

  The mean over positions is prepended as token 0, a learned positional embedding
  ([HW+1, C]) is added, and token 0 of the attention output is projected. qkv is
  split qkv-first (channel ``j*C + head*ch + c``).
  """

  spatial_dim: int
  num_head_channels: int
  output_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hgt, wid, c = x.shape
    num_heads = c // self.num_head_channels
    pos = self.param('positional_embedding',
                     lambda key, shape: jax.random.normal(key, shape) / c ** 0.5,
                     (self.spatial_dim ** 2 + 1, c))
    tokens = x.reshape(b, hgt * wid, c)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    tokens = tokens + pos.astype(tokens.dtype)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv_proj')(tokens)
    qkv = qkv.reshape(b, -1, 3, num_heads, self.num_head_channels)
    h = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return nn.Dense(self.output_dim, dtype=self.dtype, name='c_proj')(h[:, 0])


class EncoderUNetModel(nn.Module):
  """ADM half-UNet classifier: timestep-conditioned trunk plus an attention-pool head.

  ADM's other poolings ('adaptive', 'spatial') are not ported: no DG checkpoint uses them.

  Attributes:
    image_size: input resolution (square).
    in_channels: input channels (3 for images, 512 for the DG head on features).
    model_channels: base width.
    out_channels: logits of the pooling head.
    num_res_blocks: residual blocks per resolution.
    attention_resolutions: downsampling rates ``ds`` (1, 2, 4, ...) that get attention;
      ``create_classifier`` derives them as ``image_size // res`` from "32,16,8".
    channel_mult: width multiplier per resolution.
    num_heads: attention heads, used when ``num_head_channels == -1``.
    num_head_channels: channels per attention head (-1: use ``num_heads``).
    use_scale_shift_norm: FiLM-style ``norm(h) * (1 + scale) + shift`` conditioning.
    resblock_updown: downsample with a ResBlock instead of a strided conv.
    num_classes: rows of the label embedding; 0 for an unconditional model (the DG
      conditional head has 1000, indexed by ``argmax`` of the one-hot label).
    dtype: compute dtype of convs, dense layers and attention (params stay float32;
      normalisation and softmax run in float32).
  """

  image_size: int
  in_channels: int
  model_channels: int
  out_channels: int
  num_res_blocks: int
  attention_resolutions: Sequence[int]
  channel_mult: Sequence[float] = (1, 2, 4, 8)
  num_heads: int = 1
  num_head_channels: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  num_classes: int = 0
  dtype: Dtype = jnp.float32

  def _heads(self, channels: int) -> int:
    if self.num_head_channels == -1:
      return self.num_heads
    if channels % self.num_head_channels:
      raise ValueError(f'EncoderUNetModel: {channels} channels are not divisible by '
                       f'num_head_channels={self.num_head_channels}')
    return channels // self.num_head_channels

  @nn.compact
  def __call__(self, x: Array, timesteps: Array, class_labels: Optional[Array] = None,
               feature: bool = False) -> Array:
    """Applies the encoder.

    Args:
      x: [B, H, W, in_channels] input.
      timesteps: [B] diffusion time in [0, 1]; multiplied by 999 as in the reference.
      class_labels: [B, num_labels] one-hot (argmax is taken) or [B] integer labels;
        required iff ``num_classes > 0``.
      feature: return the trunk's output [B, H/ds, W/ds, C] instead of the logits.

    Returns:
      [B, out_channels] float32 logits, or the float32 features if ``feature``.
    """
    emb_dim = 4 * self.model_channels
    emb = timestep_embedding(timesteps * 999., self.model_channels)
    emb = nn.Dense(emb_dim, name='time_embed_0')(emb)
    emb = nn.Dense(emb_dim, name='time_embed_2')(nn.silu(emb))
    if self.num_classes:
      if class_labels is None:
        raise ValueError('EncoderUNetModel: the model is class conditional '
                         f'(num_classes={self.num_classes}) but class_labels is None')
      idx = class_labels if class_labels.ndim == 1 else jnp.argmax(class_labels, axis=1)
      emb = emb + nn.Embed(self.num_classes, emb_dim, name='label_emb')(idx)

    res = lambda **kw: ResBlock(use_scale_shift_norm=self.use_scale_shift_norm,
                                dtype=self.dtype, **kw)
    attn = lambda ch, name: AttentionBlock(self._heads(ch), dtype=self.dtype, name=name)

    ch = int(self.channel_mult[0] * self.model_channels)
    h = _conv(ch, 3, self.dtype, 'input_blocks_0_0')(x.astype(self.dtype))
    block, ds = 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * self.model_channels)
        h = res(out_channels=ch, name=f'input_blocks_{block}_0')(h, emb)
        if ds in self.attention_resolutions:
          h = attn(ch, f'input_blocks_{block}_1')(h)
        block += 1
      if level != len(self.channel_mult) - 1:
        if self.resblock_updown:
          h = res(out_channels=ch, down=True, name=f'input_blocks_{block}_0')(h, emb)
        else:
          h = _conv(ch, 3, self.dtype, f'input_blocks_{block}_0', stride=2)(h)
        block += 1
        ds *= 2

    h = res(out_channels=ch, name='middle_block_0')(h, emb)
    h = attn(ch, 'middle_block_1')(h)
    h = res(out_channels=ch, name='middle_block_2')(h, emb)
    h = h.astype(jnp.float32)
    if feature:
      return h

    h = nn.silu(group_norm32(h, 'out_0'))
    if self.num_head_channels == -1:
      raise ValueError('EncoderUNetModel: the attention pool needs num_head_channels')
    out = AttentionPool2d(self.image_size // ds, self.num_head_channels, self.out_channels,
                          dtype=self.dtype, name='out_2')(h)
    return out.astype(jnp.float32)
