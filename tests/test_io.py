"""Shard files: quantisation, grid layout, atomic writes, resume bookkeeping."""

import json
import os

import numpy as np
import PIL.Image
import pytest

from isir_jax import checkpoints
from isir_jax import io


def test_to_uint8_matches_reference_rounding():
  x = np.array([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
  # The reference: (x * 127.5 + 128).clip(0, 255).to(uint8), truncating.
  expected = np.array([0, 0, 64, 128, 255, 255, 255], np.uint8)
  np.testing.assert_array_equal(io.to_uint8(x), expected)
  assert io.to_uint8(x).dtype == np.uint8


def test_image_grid_layout():
  samples = np.arange(5 * 3 * 4 * 1, dtype=np.uint8).reshape(5, 3, 4, 1) + 1
  grid = io.image_grid(samples, padding=2)
  # int(sqrt(5)) = 2 columns, 3 rows, 2-pixel borders around and between images.
  assert grid.shape == (3 * (3 + 2) + 2, 2 * (4 + 2) + 2, 1)
  np.testing.assert_array_equal(grid[2:5, 2:6], samples[0])
  np.testing.assert_array_equal(grid[2:5, 8:12], samples[1])
  np.testing.assert_array_equal(grid[12:15, 2:6], samples[4])
  assert (grid[12:15, 8:12] == 0).all()  # empty slot
  assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()


@pytest.mark.parametrize('channels', [1, 3])
def test_write_and_read_shard(tmp_path, channels):
  rng = np.random.default_rng(0)
  samples = rng.integers(0, 256, (4, 8, 8, channels), dtype=np.uint8)
  labels = np.array([3, 1, 0, 9])
  path = io.write_shard(str(tmp_path), 2, samples, labels)
  assert path == io.shard_path(str(tmp_path), 2)
  got, got_labels = io.read_shard(path)
  np.testing.assert_array_equal(got, samples)
  np.testing.assert_array_equal(got_labels, labels)
  # The grid of 8x8 images, upscaled 4x so that they are readable.
  grid = np.asarray(PIL.Image.open(tmp_path / 'samples_2.png'))
  assert io.png_scale(8, 8) == 4 and io.png_scale(32, 32) == 1
  assert grid.shape[:2] == (4 * (2 * 10 + 2),) * 2
  np.testing.assert_array_equal(grid[::4, ::4].reshape(22, 22, channels),
                                io.image_grid(samples))
  # Only the final files remain: no temporaries.
  assert sorted(os.listdir(tmp_path)) == ['samples_2.npz', 'samples_2.png']
  assert io.complete_shards(str(tmp_path)) == [2]


def test_unconditional_shard_has_no_label(tmp_path):
  path = io.write_shard(str(tmp_path), 0, np.zeros((2, 4, 4, 3), np.uint8))
  with np.load(path) as data:
    assert data.files == ['samples']


def test_write_shard_refuses_float(tmp_path):
  with pytest.raises(ValueError, match='uint8 NHWC'):
    io.write_shard(str(tmp_path), 0, np.zeros((2, 4, 4, 3), np.float32))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / 'samples_0.npz'

  def fail(f):
    f.write(b'partial')
    raise RuntimeError('interrupted')

  with pytest.raises(RuntimeError):
    io.atomic_write(str(target), fail)
  assert os.listdir(tmp_path) == []
  assert io.complete_shards(str(tmp_path)) == []


def test_complete_shards_ignores_temporaries_and_others(tmp_path):
  for name in ['samples_0.npz', 'samples_10.npz', '.tmp-abcsamples_1.npz', 'samples_x.npz',
               'samples_3.png']:
    (tmp_path / name).write_bytes(b'')
  assert io.complete_shards(str(tmp_path)) == [0, 10]


def test_run_config_stored_then_checked(tmp_path):
  config = {'seed': 0, 'sampler': {'name': 'isir', 'N': 4, 'S_max': float('inf')}}
  assert io.check_run_config(str(tmp_path), config) is False
  stored = json.loads((tmp_path / io.RUN_CONFIG_NAME).read_text())
  assert stored['sampler']['N'] == 4
  assert io.check_run_config(str(tmp_path), config) is True
  other = {'seed': 0, 'sampler': {'name': 'isir', 'N': 8, 'S_max': float('inf')}}
  with pytest.raises(ValueError, match=r'differs at: sampler\.N'):
    io.check_run_config(str(tmp_path), other)


def test_check_writable(tmp_path):
  io.check_writable(str(tmp_path / 'new' / 'dir'))
  assert (tmp_path / 'new' / 'dir').is_dir()
  blocker = tmp_path / 'file'
  blocker.write_text('')
  with pytest.raises(OSError, match='is not writable'):
    io.check_writable(str(blocker / 'sub'))


def test_load_model_checks_family_and_shapes(tmp_path):
  params = {'dense': {'kernel': np.zeros((3, 4), np.float32), 'bias': np.zeros(4, np.float32)}}
  checkpoints.save_model(str(tmp_path / 'm'), params, {'family': 'toy'})
  expected = lambda config: params
  got, config = checkpoints.load_model(str(tmp_path / 'm'), 'toy', expected)
  np.testing.assert_array_equal(got['dense']['kernel'], params['dense']['kernel'])
  with pytest.raises(ValueError, match=r"family is 'toy', expected 'edm' or 'other'"):
    checkpoints.load_model(str(tmp_path / 'm'), ('edm', 'other'))
  wider = lambda config: {'dense': {'kernel': np.zeros((3, 5)), 'bias': np.zeros(4)}}
  with pytest.raises(ValueError, match=r"key \['dense'\]\['kernel'\] has shape \(3, 4\), expected "
                                       r"\(3, 5\)"):
    checkpoints.load_model(str(tmp_path / 'm'), 'toy', wider)
  more = lambda config: dict(params, extra={'w': np.zeros(2)})
  with pytest.raises(ValueError, match=r"missing key \['extra'\]\['w'\] \(expected shape \(2,\)\)"):
    checkpoints.load_model(str(tmp_path / 'm'), 'toy', more)
