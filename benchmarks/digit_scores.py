"""The scores of one set of generated digits, against real digits the feature net never saw.

Which real digits each committed model trained on (``isir_jax/train``):
  feature net (classes, FD and precision/recall features)   digits 0..1499; 1500..1796 held out
  noisy classifier (the discriminators' frozen trunk)       all 1,797
  discriminator heads                                       all 1,797 but a random 10% (early
                                                            stopping), on top of that trunk
  denoisers                                                 all 1,797 (digits-skew: resampled)
No real digit is unseen by both the feature net and the discriminators (their trunk saw all),
so the reference is the feature net's held-out split, digits 1500..1796 (297): FD-digits'
statistics, precision and recall, and the classifier's accuracy are measured on it. `floor`
scores real digits of the training split (0..1499) like a sampler's output: what a perfect
sampler would get at the same count. The class-frequency error's target stays the label
frequencies of all 1,797 digits (labels, not a model).
"""

import dataclasses

import ml_collections
import numpy as np

from isir_jax import fid_math
from isir_jax.train import digits_data
from isir_jax.train import feature_net as feature_net_lib

K_NEAREST = 3   # k of the k-NN manifolds of precision and recall (Kynkaanniemi et al. 2019)
METRICS = ('class_error', 'fd', 'precision', 'recall')   # the metrics of the verdicts


@dataclasses.dataclass
class Reference:
  """The feature net and the real digits the scores compare with."""
  net: feature_net_lib.FeatureNet
  frequencies: np.ndarray        # [10] label frequencies of all real digits
  heldout_features: np.ndarray   # [297, D] features of the held-out split
  heldout_stats: tuple           # (mu, sigma) of those features
  all_stats: tuple               # (mu, sigma) of all 1,797 digits (config.demo.ref_stats)
  heldout_accuracy: float        # the feature net's accuracy on the held-out split
  train_images: np.ndarray       # the feature net's training split (the floor's digits)


def reference(config: ml_collections.ConfigDict) -> Reference:
  """The `Reference` of a digits config (``config.demo.feature_net``, ``config.data.path``)."""
  net = feature_net_lib.load_feature_net(config.demo.feature_net)
  images, labels = digits_data.load_digits(config.data.path)
  train, _ = digits_data.split(images, labels, train=True)
  heldout, heldout_labels = digits_data.split(images, labels, train=False)
  feats = net.features(heldout)
  accuracy = float(np.mean(net.predict(heldout) == heldout_labels))
  return Reference(net, digits_data.class_frequencies(labels), feats,
                   fid_math.feature_statistics(feats),
                   fid_math.load_stats(config.demo.ref_stats, dim=feats.shape[1]), accuracy,
                   train)


def score(images: np.ndarray, ref: Reference) -> dict:
  """Class-frequency error, FD-digits (held-out and all-digits references), precision and
  recall of generated digits [N, 8, 8, 1] in [-1, 1]."""
  feats = ref.net.features(images)
  stats = fid_math.feature_statistics(feats)
  precision, recall = fid_math.precision_recall(ref.heldout_features, feats, K_NEAREST)
  return dict(
      class_error=digits_data.class_frequency_error(ref.net.predict(images), ref.frequencies),
      fd=fid_math.frechet_distance(*stats, *ref.heldout_stats),
      fd_all=fid_math.frechet_distance(*stats, *ref.all_stats),
      precision=precision, recall=recall)


def floor(ref: Reference, num: int, seed: int) -> dict:
  """`score` of ``num`` real digits of the training split (without replacement, at most
  all 1,500), drawn by ``seed``: the scores of a perfect sampler at this count."""
  rng = np.random.default_rng(seed)
  idx = rng.choice(len(ref.train_images), min(num, len(ref.train_images)), replace=False)
  return score(ref.train_images[idx], ref)
