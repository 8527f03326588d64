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
