"""Frechet Inception Distance and Inception Score with the TF 2015-12-05 Inception.

Reproduces EDM's ``fid.py``: uint8 images go through the TF graph's own input
pipeline (TF1 legacy bilinear resize to 299x299, then ``(x - 128) / 128``), the
FID Inception (``isir_jax.networks.inception``) gives pool3 features, whose mean
and covariance are accumulated in float64 and compared with the Frechet distance.

Typical use::

    net = InceptionFID.load('checkpoints/inception')     # converted weights
    mu, sigma = compute_statistics(net, io.iter_npz_images('workdir/samples'), num=50000)
    fid = frechet_distance(mu, sigma, *load_stats('cifar10-32x32.npz'))

The numpy-only parts (resize reference, statistics files, scores) live in
``isir_jax.fid_math`` and are re-exported here.
"""

from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from isir_jax import checkpoints
from isir_jax import parallel
from isir_jax.fid_math import (  # noqa: F401 (re-exported: the driver imports them from here)
    FEATURE_DIM, INPUT_SIZE, NUM_CLASSES, StatsAccumulator, feature_statistics, frechet_distance,
    inception_score, legacy_resize_matrix, load_stats, resize_bilinear_legacy, save_stats)
from isir_jax.networks.inception import InceptionV3FID

FAMILY = 'inception_fid'


def preprocess(images: jax.Array) -> jax.Array:
  """The TF graph's input pipeline: uint8 NHWC -> normalised [B, 299, 299, 3] float32.

  Grayscale images are repeated to 3 channels (as EDM does). The TF1 legacy
  bilinear resize (no half-pixel centres) is applied as two interpolation-matrix
  products per image, in full float32 precision.
  """
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  rh = jnp.asarray(legacy_resize_matrix(x.shape[1], INPUT_SIZE))
  rw = jnp.asarray(legacy_resize_matrix(x.shape[2], INPUT_SIZE))
  x = jnp.einsum('oh,bhwc,pw->bopc', rh, x, rw, precision=jax.lax.Precision.HIGHEST)
  return (x - 128.0) / 128.0


class InceptionFID:
  """The FID Inception with its weights, a jitted feature function and a batch size.

  Calling it on uint8 images [N, H, W, C] (C in {1, 3}) returns pool3 features
  [N, 2048] and logits [N, 1008] as numpy float32. Batches are padded to
  ``batch_size`` so one compiled program serves every call, and are split over
  the local devices when ``batch_size`` divides evenly among them.
  """

  def __init__(self, module: InceptionV3FID, variables: Any, batch_size: int = 250):
    self.module = module
    self.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    self.batch_size = batch_size
    self.feature_dim = FEATURE_DIM // module.width_divisor
    self._sharding = parallel.local_batch_sharding(batch_size)
    self._apply = jax.jit(lambda v, x: module.apply(v, preprocess(x)))

  @classmethod
  def load(cls, directory: str, *, batch_size: int = 250, output_bias: bool = False,
           precision: Any = None) -> 'InceptionFID':
    """Loads weights converted by ``python -m checkpoints_convert.inception``.

    Args:
      directory: the converted model directory.
      batch_size: images per device program (a multiple of the local device count
        shards the batch over the devices).
      output_bias: add the classifier bias to the logits. False (default) matches the
        original Inception Score code and StyleGAN-ADA, which use ``pool3 @ W``.
      precision: ``jax.lax.Precision`` for the network (None: backend default).
    """
    variables, config = checkpoints.load_model(directory, FAMILY)
    module = InceptionV3FID(output_bias=output_bias, precision=precision, **config['module'])
    return cls(module, variables, batch_size)

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(features [N, 2048], logits [N, 1008])`` of uint8 images [N, H, W, C]."""
    feats = [np.zeros([0, self.feature_dim], np.float32)]
    logits = [np.zeros([0, NUM_CLASSES], np.float32)]
    for f, l in self._batched(images):
      feats.append(np.asarray(f))
      logits.append(np.asarray(l))
    return np.concatenate(feats), np.concatenate(logits)

  def _batched(self, images: np.ndarray) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Dispatches fixed-size batches, yielding device results trimmed to the real images."""
    images = _check_images(images)
    for start in range(0, images.shape[0], self.batch_size):
      chunk = images[start:start + self.batch_size]
      n = chunk.shape[0]
      if n < self.batch_size:
        pad = np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      x = jax.device_put(chunk, self._sharding) if self._sharding else chunk
      f, l = self._apply(self.variables, x)
      yield f[:n], l[:n]


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError('FID expects uint8 NHWC images with 1 or 3 channels, '
                     f'got {images.dtype} of shape {list(images.shape)}')
  return images


def compute_statistics(net: InceptionFID, images: Iterable[np.ndarray], *,
                       num: int | None = None, with_logits: bool = False,
                       progress: bool = True) -> tuple[np.ndarray, ...]:
  """Mean and covariance of pool3 features over a stream of uint8 image batches.

  Args:
    net: the FID Inception.
    images: iterable of uint8 [B, H, W, C] arrays of any batch sizes (e.g.
      ``iter_npz_images``); their images are taken in order.
    num: use exactly the first ``num`` images (error if fewer); None uses all.
    with_logits: also return the logits of every image (for the Inception Score).
    progress: show a tqdm progress bar.

  Returns:
    ``(mu [2048], sigma [2048, 2048])`` in float64, plus ``logits [N, 1008]``
    float32 when ``with_logits``.
  """
  acc = StatsAccumulator(net.feature_dim)
  all_logits = []
  with tqdm.tqdm(total=num, unit='img', desc='inception', disable=not progress) as bar:
    pending = None   # one batch in flight: the host accumulates while the device computes
    for chunk in _rechunk(images, net.batch_size, num):
      result = next(net._batched(chunk))
      if pending is not None:
        _consume(pending, acc, all_logits if with_logits else None, bar)
      pending = result
    if pending is not None:
      _consume(pending, acc, all_logits if with_logits else None, bar)
  if num is not None and acc.count < num:
    raise ValueError(f'found {acc.count} images, but expected at least {num}')
  mu, sigma = acc.finalize()
  if with_logits:
    return mu, sigma, np.concatenate(all_logits)
  return mu, sigma


def _consume(result, acc: StatsAccumulator, all_logits: list | None, bar) -> None:
  features, logits = result
  acc.add(np.asarray(features))
  if all_logits is not None:
    all_logits.append(np.asarray(logits))
  bar.update(features.shape[0])


def _rechunk(images: Iterable[np.ndarray], size: int, num: int | None) -> Iterator[np.ndarray]:
  """Regroups a stream of image batches into batches of ``size`` (the last may be smaller)."""
  buffer, buffered, taken = [], 0, 0
  for batch in images:
    batch = _check_images(batch)
    if num is not None:
      batch = batch[:num - taken]
    taken += batch.shape[0]
    buffer.append(batch)
    buffered += batch.shape[0]
    while buffered >= size:
      joined = np.concatenate(buffer)
      yield joined[:size]
      buffer, buffered = [joined[size:]], buffered - size
    if num is not None and taken >= num:
      break
  if buffered:
    yield np.concatenate(buffer)


