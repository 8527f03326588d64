"""FID and Inception Score math in numpy/scipy only (no JAX).

This module is what the TensorFlow cross-checks (``tests_tf/``) import in a venv
without JAX, so it must stay importable with numpy and scipy alone. It holds:

* the TF1 "legacy" bilinear resize of the 2015-12-05 Inception graph
  (``align_corners=False`` without half-pixel centres), as a gather-based numpy
  reference and as the per-axis interpolation matrix that ``isir_jax.fid`` applies
  on device;
* feature statistics accumulated in float64 (EDM ``fid.py``'s estimator);
* statistics files in EDM's ``.npz`` layout (``mu`` [D], ``sigma`` [D, D]);
* the Frechet distance (Heusel et al. 2017) as EDM computes it;
* the Inception Score (Salimans et al. 2016) from classifier logits;
* precision and recall of k-NN feature manifolds (Kynkaanniemi et al. 2019).
"""

import os
import tempfile

import numpy as np
import scipy.linalg
import scipy.special

FEATURE_DIM = 2048    # pool3 features of the FID Inception.
NUM_CLASSES = 1008    # logits of the 2015-12-05 graph (1000 ImageNet classes + 8 unused).
INPUT_SIZE = 299      # the graph resizes every input to 299x299.


# ---------------------------------------------------------------------------
# TF1 legacy bilinear resize.


def _legacy_source_coords(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of TF1 ``resize_bilinear`` along one axis.

  TF1 (``align_corners=False``, ``half_pixel_centers=False``) samples output pixel
  ``i`` at source coordinate ``i * in_size / out_size`` (no half-pixel shift),
  in float32 arithmetic, clamping the upper neighbour at the border.

  Returns:
    ``(lower, upper, lerp)``: int64 [out_size], int64 [out_size], float32 [out_size].
  """
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lower_f = np.floor(src)
  lower = np.maximum(lower_f.astype(np.int64), 0)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  lerp = (src - lower_f).astype(np.float32)
  return lower, upper, lerp


def resize_bilinear_legacy(images: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
  """Numpy reference of TF1 ``tf.compat.v1.image.resize_bilinear`` (legacy mode).

  Gathers the two neighbours per axis and interpolates in float32 as TF does:
  ``top + (bottom - top) * lerp`` along columns then rows.

  Args:
    images: [B, H, W, C] array (any real dtype; uint8 images are cast to float32).
    size: output height and width.

  Returns:
    [B, size, size, C] float32.
  """
  x = np.asarray(images, dtype=np.float32)
  if x.ndim != 4:
    raise ValueError(f'resize_bilinear_legacy: expected [B, H, W, C] images, got shape {x.shape}')
  y0, y1, ly = _legacy_source_coords(x.shape[1], size)
  x0, x1, lx = _legacy_source_coords(x.shape[2], size)
  lx = lx[None, None, :, None]
  ly = ly[None, :, None, None]
  top_left, top_right = x[:, y0][:, :, x0], x[:, y0][:, :, x1]
  bot_left, bot_right = x[:, y1][:, :, x0], x[:, y1][:, :, x1]
  top = top_left + (top_right - top_left) * lx
  bottom = bot_left + (bot_right - bot_left) * lx
  return (top + (bottom - top) * ly).astype(np.float32)


def legacy_resize_matrix(in_size: int, out_size: int = INPUT_SIZE) -> np.ndarray:
  """The TF1 legacy bilinear resize along one axis as a matrix.

  ``resized = R_h @ image @ R_w^T`` per channel equals ``resize_bilinear_legacy``
  up to float32 rounding; a matmul is the fast form on accelerators.

  Returns:
    [out_size, in_size] float32, each row holding ``1 - lerp`` and ``lerp``.
  """
  lower, upper, lerp = _legacy_source_coords(in_size, out_size)
  rows = np.arange(out_size)
  m = np.zeros([out_size, in_size], np.float32)
  np.add.at(m, (rows, lower), 1 - lerp)
  np.add.at(m, (rows, upper), lerp)
  return m


def normalize_pixels(x: np.ndarray) -> np.ndarray:
  """The graph's input normalisation: ``(x - 128) / 128`` on [0, 255] pixels."""
  return (np.asarray(x, np.float32) - 128.0) / 128.0


# ---------------------------------------------------------------------------
# Feature statistics.


class StatsAccumulator:
  """Running float64 sums for the mean and covariance of features (EDM ``fid.py``).

  Accumulates ``sum f`` and ``sum f f^T`` so batches can arrive in any grouping;
  ``finalize`` returns the mean and the unbiased (``n - 1``) covariance.
  """

  def __init__(self, dim: int = FEATURE_DIM):
    self.dim = dim
    self.count = 0
    self._sum = np.zeros([dim], np.float64)
    self._sum_outer = np.zeros([dim, dim], np.float64)

  def add(self, features: np.ndarray) -> None:
    """Adds a batch of features [B, dim]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self.dim:
      raise ValueError(f'StatsAccumulator: expected features [B, {self.dim}], got {f.shape}')
    self.count += f.shape[0]
    self._sum += f.sum(0)
    self._sum_outer += f.T @ f

  def finalize(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(mu [dim], sigma [dim, dim])`` in float64."""
    n = self.count
    if n < 2:
      raise ValueError(f'need at least 2 images to compute statistics, got {n}')
    mu = self._sum / n
    sigma = (self._sum_outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(mu, sigma)`` of features [N, D] in float64, as ``StatsAccumulator`` computes them."""
  acc = StatsAccumulator(np.shape(features)[-1])
  acc.add(features)
  return acc.finalize()


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
  """Writes statistics in EDM's ``.npz`` format (``mu``, ``sigma``), atomically."""
  _check_stats(path, np.asarray(mu), np.asarray(sigma), dim=None)
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix='.npz', dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_stats(path: str, dim: int | None = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``(mu, sigma)`` from an EDM-format ``.npz``, validating keys and shapes.

  Args:
    path: the ``.npz`` file (e.g. EDM's ``cifar10-32x32.npz``).
    dim: expected feature dimension; None accepts any consistent ``D``.

  Returns:
    ``(mu [D], sigma [D, D])`` as float64.

  Raises:
    ValueError: naming the file and the expected and actual shapes.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: statistics file not found')
  with np.load(path) as data:
    missing = [k for k in ('mu', 'sigma') if k not in data.files]
    if missing:
      raise ValueError(f'{path}: missing key(s) {missing} (found {sorted(data.files)}); '
                       'expected an EDM-format .npz with mu and sigma')
    mu, sigma = data['mu'], data['sigma']
  _check_stats(path, mu, sigma, dim)
  return mu.astype(np.float64), sigma.astype(np.float64)


def _check_stats(path: str, mu: np.ndarray, sigma: np.ndarray, dim: int | None) -> None:
  d = mu.shape[0] if dim is None and mu.ndim == 1 else dim
  if mu.shape != (d,) or sigma.shape != (d, d):
    raise ValueError(f'{path}: expected mu [{d}] and sigma [{d}, {d}], '
                     f'got mu {list(mu.shape)} and sigma {list(sigma.shape)}')
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'{path}: statistics contain non-finite values')


# ---------------------------------------------------------------------------
# Scores.


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})`` (Heusel et al.
  2017, eq. 6), in float64 with ``scipy.linalg.sqrtm`` of the product, keeping the
  real part, as EDM's ``fid.py`` computes it.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[-1]
  for name, a, shape in (('mu1', mu1, (d,)), ('mu2', mu2, (d,)), ('sigma1', sigma1, (d, d)),
                         ('sigma2', sigma2, (d, d))):
    if a.shape != shape:
      raise ValueError(f'frechet_distance: {name} has shape {list(a.shape)}, '
                       f'expected {list(shape)}')
  mean_term = np.square(mu1 - mu2).sum()
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  return float(np.real(mean_term + np.trace(sigma1 + sigma2 - 2 * covmean)))


def inception_score(logits: np.ndarray, num_splits: int = 1) -> tuple[float, float]:
  """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016).

  Computed in float64 from logits via log-softmax. With ``num_splits > 1`` the
  images are cut into that many equal consecutive parts (the remainder dropped)
  and the mean and standard deviation of the per-part scores are returned, as the
  original improved-GAN code reports them (it used 10 splits).

  Args:
    logits: [N, num_classes] classifier logits.
    num_splits: number of parts.

  Returns:
    ``(mean, std)`` of the score over the parts (std is 0 for one part).
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2:
    raise ValueError(f'inception_score: expected logits [N, classes], got shape {logits.shape}')
  n = logits.shape[0] // num_splits
  if n < 1:
    raise ValueError(f'inception_score: {logits.shape[0]} images for {num_splits} splits')
  log_p = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for part in np.split(log_p[:n * num_splits], num_splits):
    p = np.exp(part)
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(n)   # log p(y)
    kl = (p * (part - log_marginal)).sum(1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Squared Euclidean distances [len(a), len(b)] in float64, clipped at 0."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, batch: int = 1024) -> np.ndarray:
  """Squared distance of each point to its k-th nearest other point of the same set [N].

  The radius of the point's hypersphere in the k-NN manifold estimate (Kynkaanniemi et al.
  2019, eq. 1); a point does not count as its own neighbour.
  """
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or len(f) <= k:
    raise ValueError(f'knn_radii: need features [N, D] with N > k = {k}, got shape {f.shape}')
  radii = []
  for i in range(0, len(f), batch):
    d = _pairwise_sq(f[i:i + batch], f)
    # Column k of the sorted row: index 0 is (at least) the point itself.
    radii.append(np.partition(d, k, axis=1)[:, k])
  return np.concatenate(radii)


def manifold_coverage(points: np.ndarray, support: np.ndarray, radii: np.ndarray,
                      batch: int = 1024) -> float:
  """Fraction of ``points`` inside at least one hypersphere of ``support`` (squared radii)."""
  p = np.asarray(points, np.float64)
  s = np.asarray(support, np.float64)
  inside = [(_pairwise_sq(p[i:i + batch], s) <= radii[None, :]).any(axis=1)
            for i in range(0, len(p), batch)]
  return float(np.concatenate(inside).mean())


def precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019) of features [N, D] and [M, D].

  Precision: the share of generated points inside the k-NN manifold of the real ones (a
  sampler that blurs or invents leaves it); recall: the share of real points inside the
  k-NN manifold of the generated ones (a sampler that collapses onto few modes covers few).

  Returns:
    ``(precision, recall)``, each in [0, 1].
  """
  real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
  if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
    raise ValueError(f'precision_recall: expected features [N, D] and [M, D], got '
                     f'{real.shape} and {generated.shape}')
  precision = manifold_coverage(generated, real, knn_radii(real, k))
  recall = manifold_coverage(real, generated, knn_radii(generated, k))
  return precision, recall
