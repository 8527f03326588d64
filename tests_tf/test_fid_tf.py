"""isir_jax.fid_math against TensorFlow: TF1 legacy resize, tensorflow-gan's FID and IS."""

import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_gan as tfgan

from isir_jax import fid_math


def test_no_jax_needed():
  assert 'jax' not in sys.modules


SHAPES = [(2, 32, 32, 3), (1, 64, 48, 3), (1, 17, 23, 1), (1, 299, 299, 3)]


@pytest.mark.parametrize('shape', SHAPES)
def test_resize_matches_tf1_resize_bilinear(shape):
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  want = tf.compat.v1.image.resize_bilinear(images.astype(np.float32), [299, 299],
                                            align_corners=False).numpy()
  got = fid_math.resize_bilinear_legacy(images)
  assert np.abs(got - want).max() < 1e-4
  rh = fid_math.legacy_resize_matrix(shape[1]).astype(np.float64)
  rw = fid_math.legacy_resize_matrix(shape[2]).astype(np.float64)
  as_matmul = np.einsum('oh,bhwc,pw->bopc', rh, images.astype(np.float64), rw, optimize=True)
  assert np.abs(as_matmul - want).max() < 1e-4
  if shape[1] != 299:
    # The half-pixel resize (TF2, torch align_corners=False) is measurably different.
    half_pixel = tf.image.resize(images.astype(np.float32), [299, 299], 'bilinear').numpy()
    assert np.abs(half_pixel - want).max() > 1


def _activations(rng, n, d, shift, scale):
  mix = rng.standard_normal([d, d]) / np.sqrt(d)
  return (rng.standard_normal([n, d]) @ mix) * scale + shift


@pytest.mark.parametrize('d', [16, 128])
def test_frechet_distance_matches_tfgan(d):
  rng = np.random.default_rng(d)
  a = _activations(rng, 4 * d + 100, d, 0.0, 1.0)
  b = _activations(rng, 4 * d + 50, d, 0.3, 1.5)
  want = float(tfgan.eval.frechet_classifier_distance_from_activations(
      tf.constant(a), tf.constant(b)))
  got = fid_math.frechet_distance(*fid_math.feature_statistics(a), *fid_math.feature_statistics(b))
  assert abs(got - want) <= 1e-4 * abs(want)


@pytest.mark.parametrize('scale', [1.0, 8.0])
def test_inception_score_matches_tfgan(scale):
  logits = np.random.default_rng(1).standard_normal([500, fid_math.NUM_CLASSES]) * scale
  want = float(tfgan.eval.classifier_score_from_logits(tf.constant(logits)))
  got, _ = fid_math.inception_score(logits)
  assert want > 1.5
  assert abs(got - want) <= 1e-4 * want
