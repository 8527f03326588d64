"""Layers shared by EDM's SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM).

Flax ports of the building blocks of EDM's ``training/networks.py`` (Karras et al.,
2022), NHWC throughout. Parameter names follow the PyTorch modules (``conv0``,
``affine``, ``qkv``, ...) so that checkpoint conversion is a renaming plus a
transpose: conv kernels are HWIO, dense kernels ``[in, out]``, GroupNorm ``scale``.

Weight initialisation reproduces EDM's ``weight_init`` modes, so freshly built
networks (e.g. trained in this project) start where EDM's would.
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# An init spec is (mode, weight scale, bias scale), as EDM's init/init_zero dicts.
InitSpec = tuple[str, float, float]
DEFAULT_INIT: InitSpec = ('kaiming_normal', 1.0, 0.0)

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def edm_initializer(mode: str, fan_in: int, fan_out: int, scale: float):
  """Returns an initializer drawing as EDM's ``weight_init(shape, mode, ...) * scale``."""
  uniform = mode.endswith('_uniform')
  if mode.startswith('xavier_'):
    variance = 2.0 / (fan_in + fan_out)
  elif mode.startswith('kaiming_'):
    variance = 1.0 / fan_in
  else:
    raise ValueError(f'init mode: expected xavier_/kaiming_ uniform/normal, got {mode!r}')

  def init(key, shape, dtype=jnp.float32):
    if uniform:  # U(-1, 1) has variance 1/3.
      noise = np.sqrt(3.0) * jax.random.uniform(key, shape, dtype, -1.0, 1.0)
    else:
      noise = jax.random.normal(key, shape, dtype)
    return (scale * np.sqrt(variance)) * noise
  return init


def resample_kernel(taps: Sequence[float]) -> np.ndarray:
  """2-D separable resampling filter ``f f^T / (sum f)^2`` (float32)."""
  f = np.asarray(taps, np.float64)
  return (np.outer(f, f) / f.sum() ** 2).astype(np.float32)


def _filter_axis(x: Array, taps: np.ndarray, axis: int, stride: int, pad: int,
                 dilate: int) -> Array:
  """Correlates every channel of ``x`` with the 1-D ``taps`` along ``axis``.

  The input is zero-dilated by ``dilate`` and zero-padded by ``pad`` on both sides, then
  the taps are applied at ``stride``: a sum of shifted slices, which XLA fuses into one
  elementwise loop (a grouped convolution with one channel per group is slow on CPU).
  """
  config = [(0, 0, 0)] * x.ndim
  config[axis] = (pad, pad, dilate - 1)
  xp = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
  n_out = (xp.shape[axis] - len(taps)) // stride + 1
  out = None
  for t, tap in enumerate(taps):
    term = float(tap) * jax.lax.slice_in_dim(xp, t, t + stride * (n_out - 1) + 1, stride, axis)
    out = term if out is None else out + term
  return out


def _resample(x: Array, taps: np.ndarray, stride: int, pad: int, dilate: int) -> Array:
  """Filters H then W of NHWC ``x`` with the separable filter ``taps taps^T``."""
  for axis in (1, 2):
    x = _filter_axis(x, taps, axis, stride, pad, dilate)
  return x


def upsample(x: Array, taps: Sequence[float]) -> Array:
  """2x upsampling: EDM's ``conv_transpose2d`` by ``4 f f^T / (sum f)^2`` at stride 2,
  padding ``(len(f) - 1) // 2``."""
  g = np.asarray(taps, np.float64)
  k = len(g)
  # A transposed convolution is a convolution of the zero-dilated input with the
  # flipped kernel (the filter is symmetric) and padding k - 1 - pad.
  return _resample(x, 2.0 * g / g.sum(), stride=1, pad=k - 1 - (k - 1) // 2, dilate=2)


def downsample(x: Array, taps: Sequence[float], pad: int) -> Array:
  """2x downsampling: filter with ``f f^T / (sum f)^2`` at stride 2."""
  g = np.asarray(taps, np.float64)
  return _resample(x, g / g.sum(), stride=2, pad=pad, dilate=1)


class Linear(nn.Module):
  """Dense layer with EDM initialisation; kernel ``[in, out]``."""
  features: int
  use_bias: bool = True
  init: InitSpec = DEFAULT_INIT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    mode, w_scale, b_scale = self.init
    fan_in = x.shape[-1]
    kernel = self.param('kernel', edm_initializer(mode, fan_in, self.features, w_scale),
                        (fan_in, self.features))
    y = x.astype(self.dtype) @ kernel.astype(self.dtype)
    if self.use_bias:
      bias = self.param('bias', edm_initializer(mode, fan_in, self.features, b_scale),
                        (self.features,))
      y = y + bias.astype(self.dtype)
    return y


class Conv2d(nn.Module):
  """Convolution with optional 2x up/down resampling by a separable FIR filter.

  ``kernel=0`` gives a parameter-free resampling layer. ``fused_resample`` (down
  only, as NCSN++'s residual encoder uses it) convolves first with the combined
  padding and then filters at stride 2, which differs from the unfused order at
  the borders.
  """
  features: int
  kernel: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[int] = (1, 1)
  fused_resample: bool = False
  init: InitSpec = DEFAULT_INIT
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.up and self.down:
      raise ValueError('Conv2d: up and down are exclusive')
    if self.fused_resample and self.up:
      raise ValueError('Conv2d: fused_resample is implemented for down only')
    x = x.astype(self.dtype)
    cin = x.shape[-1]
    k = self.kernel
    f = self.resample_filter
    w_pad = k // 2
    f_pad = (len(f) - 1) // 2
    w = b = None
    if k:
      mode, w_scale, b_scale = self.init
      fan_in, fan_out = cin * k * k, self.features * k * k
      w = self.param('kernel', edm_initializer(mode, fan_in, fan_out, w_scale),
                     (k, k, cin, self.features)).astype(self.dtype)
      if self.use_bias:
        b = self.param('bias', edm_initializer(mode, fan_in, fan_out, b_scale),
                       (self.features,)).astype(self.dtype)

    def conv(x, pad):
      return jax.lax.conv_general_dilated(
          x, w, (1, 1), ((pad, pad), (pad, pad)), dimension_numbers=_DIMENSION_NUMBERS)

    if self.fused_resample and self.down and k:
      x = downsample(conv(x, w_pad + f_pad), f, pad=0)
    else:
      if self.up:
        x = upsample(x, f)
      if self.down:
        x = downsample(x, f, pad=f_pad)
      if k:
        x = conv(x, w_pad)
    if b is not None:
      x = x + b
    return x


class GroupNorm(nn.Module):
  """Group normalisation with EDM's group rule ``min(num_groups, C // 4)``.

  Statistics are computed in float32 with the two-pass variance, as torch does.
  """
  num_groups: int = 32
  min_channels_per_group: int = 4
  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    groups = min(self.num_groups, c // self.min_channels_per_group)
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    xg = x.astype(jnp.float32).reshape(x.shape[:-1] + (groups, c // groups))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = xg.mean(axes, keepdims=True)
    var = jnp.square(xg - mean).mean(axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


def attention(qkv: Array, num_heads: int) -> Array:
  """Self-attention over the pixels, in EDM's channel layout.

  EDM reshapes the qkv conv output to ``[B * heads, C / heads, 3, HW]``: channel
  ``3 * (h * C/heads + c) + s`` is q, k or v (s = 0, 1, 2) of channel c of head h.
  The softmax is computed in float32.

  Args:
    qkv: [B, H, W, 3C] output of the qkv projection.
    num_heads: number of heads; C must be divisible by it.
  Returns:
    [B, H, W, C] attention output (channel order h * C/heads + c).
  """
  b, h, w, c3 = qkv.shape
  c = c3 // 3
  t = qkv.reshape(b, h * w, num_heads, c // num_heads, 3)
  q, k, v = t[..., 0], t[..., 1], t[..., 2]
  k = k / np.sqrt(c // num_heads)
  logits = jnp.einsum('bqnc,bknc->bnqk', q.astype(jnp.float32), k.astype(jnp.float32))
  weights = jax.nn.softmax(logits, axis=-1).astype(qkv.dtype)
  out = jnp.einsum('bnqk,bknc->bqnc', weights, v)
  return out.reshape(b, h, w, c)


class UNetBlock(nn.Module):
  """EDM's unified residual block (DDPM++, NCSN++ and ADM) with optional attention.

  ``num_heads=0`` disables attention. ``adaptive_scale`` selects ADM's
  scale/shift modulation by the embedding instead of DDPM++'s additive bias.
  """
  features: int
  up: bool = False
  down: bool = False
  num_heads: int = 0
  dropout: float = 0.0
  skip_scale: float = 1.0
  eps: float = 1e-5
  resample_filter: Sequence[int] = (1, 1)
  resample_proj: bool = False
  adaptive_scale: bool = True
  init: InitSpec = DEFAULT_INIT
  init_zero: InitSpec = ('kaiming_normal', 0.0, 0.0)
  init_attn: Optional[InitSpec] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    cin, cout = x.shape[-1], self.features
    resample = dict(up=self.up, down=self.down, resample_filter=self.resample_filter)
    norm = lambda name: GroupNorm(eps=self.eps, dtype=self.dtype, name=name)
    silu = nn.silu

    orig = x
    x = Conv2d(cout, 3, init=self.init, dtype=self.dtype, name='conv0', **resample)(
        silu(norm('norm0')(x)))
    params = Linear(cout * (2 if self.adaptive_scale else 1), init=self.init,
                    dtype=self.dtype, name='affine')(emb)[:, None, None, :].astype(x.dtype)
    if self.adaptive_scale:
      scale, shift = jnp.split(params, 2, axis=-1)
      x = silu(shift + norm('norm1')(x) * (scale + 1))
    else:
      x = silu(norm('norm1')(x + params))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = Conv2d(cout, 3, init=self.init_zero, dtype=self.dtype, name='conv1')(x)

    if cout != cin or self.up or self.down:
      kernel = 1 if self.resample_proj or cout != cin else 0
      orig = Conv2d(cout, kernel, init=self.init, dtype=self.dtype, name='skip',
                    **resample)(orig)
    x = (x + orig) * self.skip_scale

    if self.num_heads:
      init_attn = self.init_attn if self.init_attn is not None else self.init
      qkv = Conv2d(cout * 3, 1, init=init_attn, dtype=self.dtype, name='qkv')(
          norm('norm2')(x))
      a = attention(qkv, self.num_heads)
      x = (Conv2d(cout, 1, init=self.init_zero, dtype=self.dtype, name='proj')(a) + x
           ) * self.skip_scale
    return x


def positional_embedding(x: Array, num_channels: int, max_positions: int = 10000,
                         endpoint: bool = False) -> Array:
  """Sinusoidal embedding ``[cos(x f), sin(x f)]`` with geometric frequencies.

  Args:
    x: [B] positions (noise labels).
    num_channels: output width (even).
    max_positions: the lowest frequency is ``1 / max_positions``.
    endpoint: whether the exponent grid includes 1 (DDPM++) or not (ADM).
  Returns:
    [B, num_channels] embedding, cos half first.
  """
  half = num_channels // 2
  exponents = np.arange(half, dtype=np.float64) / (half - (1 if endpoint else 0))
  freqs = jnp.asarray(((1.0 / max_positions) ** exponents).astype(np.float32))
  angles = x.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)


class FourierEmbedding(nn.Module):
  """Random Fourier features ``[cos(2 pi x f), sin(2 pi x f)]`` (NCSN++).

  The frequencies ``f ~ N(0, scale^2)`` are a fixed buffer, kept in the
  ``'buffers'`` variable collection so that optimisers never touch them.
  """
  num_channels: int
  scale: float = 16.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    freqs = self.variable(
        'buffers', 'freqs',
        lambda: self.scale * jax.random.normal(self.make_rng('params'), (self.num_channels // 2,)))
    angles = x.astype(jnp.float32)[:, None] * (2 * np.pi * freqs.value)[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1)


def drop_labels(module: nn.Module, labels: Array, rate: float, train: bool) -> Array:
  """Zeroes whole label vectors with probability ``rate`` (classifier-free guidance)."""
  if not (train and rate):
    return labels
  keep = jax.random.uniform(module.make_rng('dropout'), (labels.shape[0], 1)) >= rate
  return labels * keep.astype(labels.dtype)
