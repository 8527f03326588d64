"""Improved precision and recall (k-NN manifolds) on cases with a known answer."""

import numpy as np
import pytest

from isir_jax import fid_math


def _cloud(seed: int, n: int = 200, dim: int = 4) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(n, dim))


def test_identical_sets_give_one_and_one():
  x = _cloud(0)
  assert fid_math.precision_recall(x, x.copy()) == (1.0, 1.0)


def test_disjoint_far_sets_give_zero_and_zero():
  x = _cloud(0)
  assert fid_math.precision_recall(x, _cloud(1) + 100.0) == (0.0, 0.0)


def test_collapsed_set_has_high_precision_and_low_recall():
  real = _cloud(0)
  collapsed = real[7] + 1e-3 * _cloud(2, n=50)   # every sample near one real point
  precision, recall = fid_math.precision_recall(real, collapsed)
  assert precision == 1.0 and recall <= 3 / len(real)
  # Shrinking towards the mean (a blur) stays inside the real manifold but covers little of it.
  precision_b, recall_b = fid_math.precision_recall(real, 0.2 * real)
  assert precision_b > 0.9 and recall_b < 0.1


def test_one_dimensional_case_by_hand():
  real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
  gen = np.array([[0.5], [0.6], [5.0]])
  # k = 1. Real squared radii 1, 1, 1, 1, 49: every generated point lies in a real ball (5 in
  # that of 10), precision 1. Generated squared radii 0.01, 0.01, 4.4^2 = 19.36: real 1, 2,
  # 3 lie in the ball of 5, real 0 (0.25 > 0.01) and 10 (25 > 19.36) in none: recall 3/5.
  np.testing.assert_allclose(fid_math.knn_radii(gen, k=1), [0.01, 0.01, 19.36])
  assert fid_math.precision_recall(real, gen, k=1) == pytest.approx((1.0, 0.6))


def test_rejects_mismatched_or_too_small_sets():
  with pytest.raises(ValueError, match=r'expected features \[N, D\] and \[M, D\]'):
    fid_math.precision_recall(np.zeros([5, 2]), np.zeros([5, 3]))
  with pytest.raises(ValueError, match='N > k = 3'):
    fid_math.knn_radii(np.zeros([3, 2]))
