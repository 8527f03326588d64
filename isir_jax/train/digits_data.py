"""The bundled handwritten-digits data set of the demo (8x8, 10 classes).

The images are the UCI "Optical Recognition of Handwritten Digits" test set as
scikit-learn ships it (``sklearn.datasets.load_digits``: 1,797 images of 8x8
pixels, 17 grey levels 0..16). Source: E. Alpaydin, C. Kaynak, UCI Machine
Learning Repository, 1998, https://doi.org/10.24432/C50P49 (CC BY 4.0).

The demo works at the native 8x8 resolution: upsampling to 16x16 would only add
interpolated pixels, cost 4x the compute per network call on a 2-core CPU, and
hand the Frechet distance features nothing new to see.

``python -m isir_jax.train.digits_data`` rebuilds the committed npz from
scikit-learn; everything else reads the npz and needs no scikit-learn.
"""

import os

from absl import app
from absl import flags
import numpy as np

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         'assets', 'digits')
DATA_PATH = os.path.join(ASSET_DIR, 'digits.npz')
NUM_CLASSES = 10
MAX_LEVEL = 16.0
# Images [NUM_TEST:] of the file are the held-out split of the clean-digit classifier.
NUM_TEST = 297
# digits-skew: classes 0-4 drawn 4x as often as 5-9 (frequencies 0.16 and 0.04).
SKEW_WEIGHTS = (4, 4, 4, 4, 4, 1, 1, 1, 1, 1)


def load_digits(path: str = DATA_PATH) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(images, labels)``: float32 [1797, 8, 8, 1] in [-1, 1] and int32 [1797]."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path}: digits data not found; rebuild it with python -m isir_jax.train.digits_data')
  with np.load(path) as f:
    levels, labels = f['levels'], f['labels']
  images = levels.astype(np.float32) * (2.0 / MAX_LEVEL) - 1.0
  return images[..., None], labels.astype(np.int32)


def split(images: np.ndarray, labels: np.ndarray, train: bool):
  """Returns the train (first 1500) or held-out (last 297) part of the digits."""
  n = images.shape[0] - NUM_TEST
  return (images[:n], labels[:n]) if train else (images[n:], labels[n:])


def class_resample(labels: np.ndarray, class_weights, seed: int = 0) -> np.ndarray:
  """Indices into ``labels`` whose class frequencies are exactly ``class_weights / sum``.

  The digits-skew training set: class ``c`` gets ``class_weights[c] * m`` indices with
  ``m`` the smallest class count, cycling through a random permutation of the class's
  images (weight 1 takes a random subset of ``m``, weight 4 uses each image about 4
  times). Shuffled; a pure function of (labels, weights, seed).

  Args:
    labels: int [N] class labels.
    class_weights: one non-negative int per class, e.g. ``SKEW_WEIGHTS``.
    seed: seeds the permutations.

  Returns:
    int [m * sum(class_weights)] indices.
  """
  weights = np.asarray(class_weights)
  counts = np.bincount(labels, minlength=len(weights))
  if (weights.ndim != 1 or len(weights) != len(counts) or np.any(weights < 0)
      or np.any(weights != np.round(weights)) or weights.sum() == 0):
    raise ValueError(f'class_weights must be {len(counts)} non-negative ints (not all 0), '
                     f'got {class_weights!r}')
  rng = np.random.default_rng(seed)
  m = int(counts.min())
  parts = []
  for c, w in enumerate(weights.astype(int)):
    members = rng.permutation(np.flatnonzero(labels == c))
    parts.append(np.resize(members, w * m))  # cycles through the permutation
  return rng.permutation(np.concatenate(parts))


def class_frequencies(labels: np.ndarray) -> np.ndarray:
  """Relative class frequencies [NUM_CLASSES] of int labels."""
  return np.bincount(labels, minlength=NUM_CLASSES) / max(len(labels), 1)


def class_frequency_error(labels: np.ndarray, reference: np.ndarray) -> float:
  """Total-variation distance ``0.5 sum |p - q|`` between the class histogram of ``labels``
  and the reference frequencies (the digits-skew testbed's metric)."""
  return float(0.5 * np.abs(class_frequencies(labels) - np.asarray(reference)).sum())


def build(path: str = DATA_PATH) -> None:
  """Writes the digits as uint8 grey levels 0..16 (``levels``) and ``labels`` to ``path``."""
  from sklearn.datasets import load_digits as sklearn_digits  # pylint: disable=g-import-not-at-top
  d = sklearn_digits()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez_compressed(path, levels=d.images.astype(np.uint8),
                      labels=d.target.astype(np.uint8))


def main(_):
  out = flags.FLAGS.out
  build(out)
  images, labels = load_digits(out)
  print(f'wrote {out}: images {images.shape} in [{images.min()}, {images.max()}], '
        f'labels {np.bincount(labels).tolist()}')


if __name__ == '__main__':
  flags.DEFINE_string('out', DATA_PATH, 'Where to write the digits npz.')
  app.run(main)
