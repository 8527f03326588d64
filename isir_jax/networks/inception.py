"""The FID variant of Inception-v3 (TF graph ``inception-2015-12-05``) in Flax.

FID (Heusel et al. 2017) is defined by the features of one specific network: the
TensorFlow Inception-v3 graph of 2015-12-05. Its blocks differ from the usual
Inception-v3 (Szegedy et al. 2016) in two ways, which pytorch-fid's
``FIDInceptionA/C/E_1/E_2`` reproduce and this port follows:

* the 3x3 average pools inside blocks A, C and E_1 average over the valid
  (unpadded) pixels only (TF ``SAME`` pooling, torch ``count_include_pad=False``);
* the pool branch of the last block (``Mixed_7c``, E_2) is a 3x3 *max* pool.

Every convolution is bias-free, followed by batch norm (eps 0.001, inference mode,
running statistics in the ``batch_stats`` collection) and a ReLU. Submodule names
equal the torch state-dict names (``Mixed_5b.branch1x1.conv``), which the converter
``checkpoints_convert.inception`` relies on. Inputs are NHWC, 299x299, already
normalised to the graph's ``(x - 128) / 128`` (see ``isir_jax.fid``).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Array = Any

FEATURE_DIM = 2048
NUM_CLASSES = 1008


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm(eps=1e-3, running stats) -> ReLU."""
  features: int
  kernel_size: int | Sequence[int] = 1
  stride: int = 1
  padding: int | Sequence[int] = 0
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=self.stride,
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_valid(x: Array) -> Array:
  """3x3/1 average pool over the unpadded pixels only (TF SAME pooling)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool(x: Array, stride: int) -> Array:
  """3x3 max pool: stride 2 unpadded (reductions), stride 1 padded (``Mixed_7c``)."""
  pad = 'VALID' if stride == 2 else ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=pad)


class _Block(nn.Module):
  """Base of the Inception blocks: convolutions with widths divided by ``width_divisor``."""
  width_divisor: int = 1
  precision: Any = None

  def conv(self, name: str, features: int, kernel_size=1, stride: int = 1, padding=0) -> nn.Module:
    return BasicConv(features // self.width_divisor, kernel_size, stride, padding,
                     precision=self.precision, name=name)


class InceptionA(_Block):
  """35x35 block (``Mixed_5b..d``): 1x1, 5x5, double 3x3 and pool branches."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = self.conv('branch1x1', 64)(x)
    b5 = self.conv('branch5x5_1', 48)(x)
    b5 = self.conv('branch5x5_2', 64, 5, padding=2)(b5)
    b3 = self.conv('branch3x3dbl_1', 64)(x)
    b3 = self.conv('branch3x3dbl_2', 96, 3, padding=1)(b3)
    b3 = self.conv('branch3x3dbl_3', 96, 3, padding=1)(b3)
    bp = self.conv('branch_pool', self.pool_features)(_avg_pool_valid(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """35x35 -> 17x17 reduction (``Mixed_6a``)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = self.conv('branch3x3', 384, 3, stride=2)(x)
    bd = self.conv('branch3x3dbl_1', 64)(x)
    bd = self.conv('branch3x3dbl_2', 96, 3, padding=1)(bd)
    bd = self.conv('branch3x3dbl_3', 96, 3, stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(_Block):
  """17x17 block with factorised 7x7 convolutions (``Mixed_6b..e``)."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    b1 = self.conv('branch1x1', 192)(x)
    b7 = self.conv('branch7x7_1', c7)(x)
    b7 = self.conv('branch7x7_2', c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv('branch7x7_3', 192, (7, 1), padding=(3, 0))(b7)
    bd = self.conv('branch7x7dbl_1', c7)(x)
    bd = self.conv('branch7x7dbl_2', c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv('branch7x7dbl_3', c7, (1, 7), padding=(0, 3))(bd)
    bd = self.conv('branch7x7dbl_4', c7, (7, 1), padding=(3, 0))(bd)
    bd = self.conv('branch7x7dbl_5', 192, (1, 7), padding=(0, 3))(bd)
    bp = self.conv('branch_pool', 192)(_avg_pool_valid(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """17x17 -> 8x8 reduction (``Mixed_7a``)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = self.conv('branch3x3_1', 192)(x)
    b3 = self.conv('branch3x3_2', 320, 3, stride=2)(b3)
    b7 = self.conv('branch7x7x3_1', 192)(x)
    b7 = self.conv('branch7x7x3_2', 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv('branch7x7x3_3', 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv('branch7x7x3_4', 192, 3, stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(_Block):
  """8x8 block with split 1x3/3x1 outputs (``Mixed_7b``: avg pool, ``Mixed_7c``: max pool)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = self.conv('branch1x1', 320)(x)
    b3 = self.conv('branch3x3_1', 384)(x)
    b3 = jnp.concatenate([self.conv('branch3x3_2a', 384, (1, 3), padding=(0, 1))(b3),
                          self.conv('branch3x3_2b', 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv('branch3x3dbl_1', 448)(x)
    bd = self.conv('branch3x3dbl_2', 384, 3, padding=1)(bd)
    bd = jnp.concatenate([self.conv('branch3x3dbl_3a', 384, (1, 3), padding=(0, 1))(bd),
                          self.conv('branch3x3dbl_3b', 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    pooled = _max_pool(x, 1) if self.max_pool else _avg_pool_valid(x)
    bp = self.conv('branch_pool', 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
  """Inception-v3 of the 2015-12-05 TF graph, returning pool3 features and logits.

  Attributes:
    output_bias: add the classifier bias to the logits. The original Inception
      Score code (improved-GAN) and StyleGAN-ADA's metric take the softmax of
      ``pool3 @ W`` without it; the converted weights hold the bias either way.
    width_divisor: divides every convolution's width (1 for the real network;
      tests run the exact topology at a fraction of the width).
    precision: ``jax.lax.Precision`` of the convolutions and the classifier
      (None: the backend default, e.g. TF32 on recent NVIDIA GPUs).
  """
  output_bias: bool = True
  width_divisor: int = 1
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    """Args: x [B, 299, 299, 3] normalised. Returns (pool3 [B, 2048], logits [B, 1008])."""
    div, prec = self.width_divisor, self.precision
    stem = lambda name, f, k, **kw: BasicConv(f // div, k, precision=prec, name=name, **kw)
    blk = dict(width_divisor=div, precision=prec)
    x = stem('Conv2d_1a_3x3', 32, 3, stride=2)(x)      # 149x149
    x = stem('Conv2d_2a_3x3', 32, 3)(x)                # 147x147
    x = stem('Conv2d_2b_3x3', 64, 3, padding=1)(x)     # 147x147
    x = _max_pool(x, 2)                                # 73x73
    x = stem('Conv2d_3b_1x1', 80, 1)(x)                # 73x73
    x = stem('Conv2d_4a_3x3', 192, 3)(x)               # 71x71
    x = _max_pool(x, 2)                                # 35x35
    x = InceptionA(pool_features=32, name='Mixed_5b', **blk)(x)
    x = InceptionA(pool_features=64, name='Mixed_5c', **blk)(x)
    x = InceptionA(pool_features=64, name='Mixed_5d', **blk)(x)
    x = InceptionB(name='Mixed_6a', **blk)(x)          # 17x17
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(channels_7x7=c7, name=name, **blk)(x)
    x = InceptionD(name='Mixed_7a', **blk)(x)          # 8x8
    x = InceptionE(max_pool=False, name='Mixed_7b', **blk)(x)
    x = InceptionE(max_pool=True, name='Mixed_7c', **blk)(x)
    features = jnp.mean(x, axis=(1, 2))                # pool3
    logits = Classifier(self.output_bias, precision=prec, name='fc')(features)
    return features, logits


class Classifier(nn.Module):
  """The 1008-way softmax layer's logits ``f @ W (+ b)``; ``b`` is always a parameter."""
  output_bias: bool = True
  precision: Any = None

  @nn.compact
  def __call__(self, features: Array) -> Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (features.shape[-1], NUM_CLASSES))
    bias = self.param('bias', nn.initializers.zeros, (NUM_CLASSES,))
    logits = jnp.dot(features, kernel, precision=self.precision)
    return logits + bias if self.output_bias else logits
