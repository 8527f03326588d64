"""Clean-digit classifier whose penultimate features define FD-digits.

FD-digits is the Frechet distance between Gaussian fits of these features for
generated and real digits: the demo's stand-in for FID, which needs Inception
and 299x299 images. The network is a small CNN trained on the clean 8x8 digits.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from isir_jax import checkpoints
from isir_jax import fid_math
from isir_jax.train import digits_data
from isir_jax.train import loop

FAMILY = 'digits_feature_net'


class DigitFeatureNet(nn.Module):
  """Three 3x3 convolutions (8x8 -> 4x4 -> 2x2), a feature layer and a linear classifier."""
  channels: Sequence[int] = (32, 64, 64)
  feature_dim: int = 32
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, features: bool = False) -> jax.Array:
    """Returns logits [B, num_classes], or the features [B, feature_dim] if ``features``."""
    for i, ch in enumerate(self.channels):
      x = nn.silu(nn.Conv(ch, (3, 3), strides=1 if i == 0 else 2)(x))
    h = nn.silu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
    return h if features else nn.Dense(self.num_classes)(h)


def loss_fn(module: DigitFeatureNet, params, batch: dict, key: jax.Array):
  """Cross-entropy of the clean digits, with a one-pixel random shift as augmentation."""
  shift = jax.random.randint(key, (2,), -1, 2)
  x = jnp.roll(batch['image'], shift, axis=(1, 2))
  logits = module.apply({'params': params}, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
  return loss, {'acc': (logits.argmax(-1) == batch['label']).mean()}


class FeatureNet:
  """A trained DigitFeatureNet: features and class predictions of NHWC digits in [-1, 1]."""

  def __init__(self, module: DigitFeatureNet, params):
    self.module, self.params = module, params
    self._features = jax.jit(lambda p, x: module.apply({'params': p}, x, features=True))
    self._logits = jax.jit(lambda p, x: module.apply({'params': p}, x))

  def features(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Returns float64 features [N, feature_dim]; images are clipped to [-1, 1] first."""
    images = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
    out = [np.asarray(self._features(self.params, images[i:i + batch_size]))
           for i in range(0, images.shape[0], batch_size)]
    return np.concatenate(out).astype(np.float64)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Returns the predicted digit [N] of NHWC images."""
    return np.asarray(self._logits(self.params, np.clip(images, -1.0, 1.0))).argmax(-1)


def load_feature_net(directory: str) -> FeatureNet:
  """Loads a feature net written by ``train_feature_net``."""
  params, config = checkpoints.load_model(directory, FAMILY)
  return FeatureNet(DigitFeatureNet(**config['module']), params)


def train_feature_net(out_dir: str, workdir: Optional[str], *, num_steps: int = 2000,
                      batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
                      log_every: int = 100,
                      channels: Sequence[int] = (32, 64, 64), feature_dim: int = 32,
                      data_path: str = digits_data.DATA_PATH) -> list[dict]:
  """Trains the clean-digit classifier on the first 1500 digits and saves it to ``out_dir``.

  Returns:
    The logged training metrics per ``log_every`` steps; the last entry also holds
    ``test_accuracy`` on the 297 held-out digits.
  """
  images, labels = digits_data.load_digits(data_path)
  train_x, train_y = digits_data.split(images, labels, train=True)
  test_x, test_y = digits_data.split(images, labels, train=False)
  module = DigitFeatureNet(channels=tuple(channels), feature_dim=feature_dim,
                           num_classes=digits_data.NUM_CLASSES)
  params = module.init(jax.random.key(seed), train_x[:1])['params']
  state, history = loop.train(
      lambda p, b, k: loss_fn(module, p, b, k), params,
      {'image': train_x, 'label': train_y},
      optimizer=loop.make_optimizer(lr), num_steps=num_steps, batch_size=batch_size,
      workdir=workdir, seed=seed, log_every=log_every, desc='feature_net')
  net = FeatureNet(module, state.params)
  test_acc = float((net.predict(test_x) == test_y).mean())
  config = {'family': FAMILY, 'module': {'channels': list(channels), 'feature_dim': feature_dim,
                                         'num_classes': digits_data.NUM_CLASSES},
            'test_accuracy': test_acc, 'num_steps': num_steps}
  loop.save_model(out_dir, state.params, config)
  history[-1]['test_accuracy'] = test_acc
  return history


def reference_stats(net: FeatureNet, images: np.ndarray, path: str) -> None:
  """Writes the feature statistics (``mu``, ``sigma``, EDM's npz format) of ``images``."""
  fid_math.save_stats(path, *fid_math.feature_statistics(net.features(images)))


def fd_digits(net: FeatureNet, images: np.ndarray, ref_stats: str) -> float:
  """FD-digits: Frechet distance of the features of ``images`` to the reference stats."""
  feats = net.features(images)
  mu_ref, sigma_ref = fid_math.load_stats(ref_stats, dim=feats.shape[1])
  return fid_math.frechet_distance(*fid_math.feature_statistics(feats), mu_ref, sigma_ref)
