"""FID: Inception parity with pytorch-fid, the converter's checks, input pipeline, scores.

The network fixture (tests/generators/make_inception_fixtures.py) is pytorch-fid's
FID Inception with re-drawn random weights at 1/16 of the width (the full
network's state dict would be 95 MB); the full-width structure is checked against
the recorded key/shape list of the real state dict.
"""

import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import scipy.stats

from checkpoints_convert import inception as convert_inception
from checkpoints_convert.reader import CheckpointError, read_state_dict
from isir_jax import fid
from isir_jax import io
from isir_jax import fid_math
from isir_jax.networks.inception import Classifier

DATA = os.path.join(os.path.dirname(__file__), 'data', 'inception')
PTH = os.path.join(DATA, 'fid_inception_w16.pth')
REF = os.path.join(DATA, 'fid_inception_w16.npz')
DIV = 16


@pytest.fixture(scope='module')
def ref():
  with np.load(REF) as d:
    assert int(d['width_divisor']) == DIV
    return {k: d[k] for k in ('images', 'pool3', 'logits')}


@pytest.fixture(scope='module')
def state():
  return read_state_dict(PTH)


@pytest.fixture(scope='module')
def net(tmp_path_factory, state):
  """The fixture network converted to disk and loaded back, as a user gets it."""
  directory = str(tmp_path_factory.mktemp('inception') / 'model')
  convert_inception.convert_file(PTH, directory, width_divisor=DIV)
  return fid.InceptionFID.load(directory, batch_size=2, output_bias=True)


def _rel_err(a, b):
  return np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max()


# --- Network parity and conversion. ---

def test_network_matches_pytorch_fid(net, ref):
  # 299x299 inputs: the legacy resize is the identity, so this is the network on
  # (x - 128) / 128, against pytorch-fid's float64 forward.
  features, logits = net(ref['images'])
  assert features.shape == ref['pool3'].shape and logits.shape == ref['logits'].shape
  assert _rel_err(features, ref['pool3']) < 1e-4
  assert _rel_err(logits, ref['logits']) < 1e-4
  assert np.abs(ref['pool3']).max() > 1   # the re-drawn weights give non-trivial features


def test_classifier_output_bias():
  features = jnp.asarray(np.random.default_rng(0).standard_normal([3, 8]), jnp.float32)
  with_bias, without = Classifier(True), Classifier(False)
  variables = {'params': {'kernel': jnp.ones([8, fid.NUM_CLASSES]),
                          'bias': jnp.arange(fid.NUM_CLASSES, dtype=jnp.float32)}}
  diff = with_bias.apply(variables, features) - without.apply(variables, features)
  want = np.broadcast_to(np.arange(fid.NUM_CLASSES), diff.shape)
  np.testing.assert_allclose(diff, want, atol=1e-5)


def test_full_width_structure_matches_real_state_dict():
  with open(os.path.join(DATA, 'full_state_dict_shapes.json')) as f:
    real = {k: tuple(v) for k, v in json.load(f).items() if not k.endswith('num_batches_tracked')}
  layout = convert_inception.expected_layout(width_divisor=1)
  assert {k: shape for k, (_, shape) in layout.items()} == real
  assert real['fc.weight'] == (1008, 2048)


def test_converter_names_wrong_shape(state):
  bad = dict(state)
  bad['Mixed_6b.branch7x7_2.conv.weight'] = np.zeros([8, 8, 7, 1], np.float32)
  with pytest.raises(CheckpointError, match=r'key Mixed_6b\.branch7x7_2\.conv\.weight has shape '
                     r'\(8, 8, 7, 1\), expected \(8, 8, 1, 7\)'):
    convert_inception.convert(bad, DIV, source='bad.pth')


def test_converter_names_missing_and_unexpected_keys(state):
  bad = {k: v for k, v in state.items() if k != 'Mixed_7c.branch_pool.bn.running_var'}
  bad['AuxLogits.fc.weight'] = np.zeros([1008, 768], np.float32)
  with pytest.raises(CheckpointError) as err:
    convert_inception.convert(bad, DIV, source='bad.pth')
  msg = str(err.value)
  assert msg.startswith('bad.pth: ')
  assert 'missing key Mixed_7c.branch_pool.bn.running_var (expected shape (12,))' in msg
  assert 'unexpected key AuxLogits.fc.weight with shape (1008, 768)' in msg


def test_converter_cli_errors(tmp_path):
  # The 1/16-width file is not the real network: one 'error:' line, exit 2, nothing written.
  dst = tmp_path / 'out'
  cmd = [sys.executable, '-m', 'checkpoints_convert.inception', '--src', PTH, '--dst', str(dst)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  assert proc.returncode == 2, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]   # above it: only absl/JAX start-up logging
  assert last.startswith('error: ') and 'Traceback' not in proc.stderr
  assert 'key Conv2d_1a_3x3.conv.weight has shape (2, 3, 3, 3), expected (32, 3, 3, 3)' in last
  assert not dst.exists()
  with pytest.raises(CheckpointError, match=r'nope\.pth: no such file'):
    convert_inception.convert_file(str(tmp_path / 'nope.pth'), str(dst))


def test_load_rejects_other_model_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a converted model directory'):
    fid.InceptionFID.load(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({'family': 'edm', 'module': {}}))
  with pytest.raises(ValueError, match="family is 'edm', expected 'inception_fid'"):
    fid.InceptionFID.load(str(tmp_path))


# --- Statistics over image streams. ---

def test_compute_statistics_streams_and_truncates(net, ref):
  rng = np.random.default_rng(1)
  images = np.concatenate([ref['images'], rng.integers(0, 256, [3, 299, 299, 3], dtype=np.uint8)])
  features, logits = net(images)
  # Uneven input batches, regrouped to the net's batch size; only the first 4 used.
  stream = iter([images[:1], images[1:4], images[4:]])
  mu, sigma, got_logits = fid.compute_statistics(net, stream, num=4, with_logits=True,
                                                 progress=False)
  want_mu, want_sigma = fid_math.feature_statistics(features[:4])
  np.testing.assert_allclose(mu, want_mu, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, want_sigma, rtol=1e-9, atol=1e-9)
  np.testing.assert_array_equal(got_logits, logits[:4])
  assert mu.dtype == sigma.dtype == np.float64
  with pytest.raises(ValueError, match='found 5 images, but expected at least 6'):
    fid.compute_statistics(net, iter([images]), num=6, progress=False)


def test_images_must_be_uint8_nhwc(net):
  features, logits = net(np.zeros([0, 8, 8, 3], np.uint8))
  assert features.shape == (0, 2048 // DIV) and logits.shape == (0, 1008)
  with pytest.raises(ValueError, match=r'uint8 NHWC .* got float32 of shape \[2, 8, 8, 3\]'):
    net(np.zeros([2, 8, 8, 3], np.float32))


def test_iter_image_files_folder_and_zip(tmp_path):
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, [3, 6, 6, 3], dtype=np.uint8)
  (tmp_path / 'imgs' / 'sub').mkdir(parents=True)
  names = ['sub/b.png', 'a.png', 'c.png']    # sorted path order: a, c, sub/b
  for name, img in zip(names, images):
    Image.fromarray(img).save(tmp_path / 'imgs' / name)
  with zipfile.ZipFile(tmp_path / 'imgs.zip', 'w') as z:
    for name in names:
      z.write(tmp_path / 'imgs' / name, name)
  for source in (tmp_path / 'imgs', tmp_path / 'imgs.zip'):
    got = np.concatenate(list(io.iter_image_files(str(source), batch_size=2)))
    np.testing.assert_array_equal(got, images[[1, 2, 0]])


def test_iter_npz_images_in_shard_order(tmp_path):
  for k in (10, 2, 0):
    np.savez(tmp_path / f'samples_{k}.npz', samples=np.full([1, 4, 4, 3], k, np.uint8))
  assert [int(b[0, 0, 0, 0]) for b in io.iter_npz_images(str(tmp_path))] == [0, 2, 10]
  np.savez(tmp_path / 'other.npz', x=np.zeros(1))
  with pytest.raises(ValueError, match=r"other\.npz: no 'samples' array"):
    next(io.iter_npz_images([str(tmp_path / 'other.npz')]))


# --- Input pipeline: resize and normalisation. ---

@pytest.mark.parametrize('shape', [(2, 32, 32, 3), (1, 20, 28, 1), (1, 299, 299, 3)])
def test_preprocess_matches_numpy_reference(shape):
  images = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
  got = np.asarray(jax.jit(fid.preprocess)(images))
  want = fid_math.normalize_pixels(fid_math.resize_bilinear_legacy(images))
  if shape[-1] == 1:
    want = np.repeat(want, 3, axis=-1)
  assert got.shape == (shape[0], 299, 299, 3)
  assert np.abs(got * 128 - want * 128).max() < 1e-4     # 1e-4 on the [0, 255] pixel scale
  if shape[1] == 299:
    np.testing.assert_array_equal(want, (images.astype(np.float32) - 128) / 128)


def test_legacy_resize_has_no_half_pixel_shift():
  # Output pixel i samples source coordinate i * in / out: for 32 -> 299 the first
  # output pixels equal the corner input pixel and pixel 299/32*k lands on source k
  # only without the half-pixel shift of align_corners=False in TF2 / torch.
  x = np.arange(32, dtype=np.float32).reshape(1, 1, 32, 1).repeat(32, axis=1)
  out = fid_math.resize_bilinear_legacy(x)[0, 0, :, 0]
  np.testing.assert_allclose(out, np.minimum(np.arange(299) * 32 / 299, 31), atol=1e-4)
  m = fid_math.legacy_resize_matrix(32)
  np.testing.assert_allclose(m.sum(1), 1, atol=1e-6)


# --- Frechet distance and Inception Score. ---

def test_frechet_distance_of_identical_stats_is_zero():
  f = np.random.default_rng(3).standard_normal([500, 16])
  mu, sigma = fid_math.feature_statistics(f)
  assert abs(fid_math.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_distance_closed_form_commuting_covariances():
  # Shared eigenvectors: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(4)
  q = scipy.stats.ortho_group.rvs(12, random_state=5)
  a, b = rng.uniform(0.1, 3, 12), rng.uniform(0.1, 3, 12)
  mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
  got = fid_math.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert abs(got - want) < 1e-9 * want


def test_frechet_distance_shape_errors():
  with pytest.raises(ValueError, match=r'sigma2 has shape \[3, 2\], expected \[3, 3\]'):
    fid_math.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.zeros([3, 2]))


def test_inception_score_closed_forms():
  # Uniform predictions: p(y|x) = p(y), score 1. Confident predictions spread evenly
  # over k classes: KL = log k, score k.
  assert fid_math.inception_score(np.zeros([10, 5]))[0] == pytest.approx(1.0)
  k = 7
  logits = np.full([4 * k, 10], -1e3)
  logits[np.arange(4 * k), np.arange(4 * k) % k] = 0
  mean, std = fid_math.inception_score(logits, num_splits=4)
  assert mean == pytest.approx(k) and std == pytest.approx(0, abs=1e-9)
  # Two classes, one image sure (p, 1-p), the other (1-p, p): marginal uniform.
  p = 0.8
  lg = np.log([[p, 1 - p], [1 - p, p]])
  kl = p * np.log(2 * p) + (1 - p) * np.log(2 * (1 - p))
  assert fid_math.inception_score(lg)[0] == pytest.approx(np.exp(kl), rel=1e-12)


# --- Statistics files (EDM .npz layout). ---

def test_stats_roundtrip_and_accumulation(tmp_path):
  f = np.random.default_rng(6).standard_normal([40, 5])
  acc = fid_math.StatsAccumulator(5)
  for part in np.split(f, [3, 17, 30]):
    acc.add(part)
  mu, sigma = acc.finalize()
  np.testing.assert_allclose(mu, f.mean(0), atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), atol=1e-12)
  path = str(tmp_path / 'sub' / 'stats.npz')
  fid_math.save_stats(path, mu, sigma)
  with np.load(path) as d:
    assert sorted(d.files) == ['mu', 'sigma']
  got_mu, got_sigma = fid_math.load_stats(path, dim=5)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)


def test_load_stats_errors(tmp_path):
  path = str(tmp_path / 'ref.npz')
  np.savez(path, mu=np.zeros(2048), sigma=np.zeros([2048, 2047]))
  with pytest.raises(ValueError, match=r'ref\.npz: expected mu \[2048\] and sigma \[2048, 2048\], '
                     r'got mu \[2048\] and sigma \[2048, 2047\]'):
    fid_math.load_stats(path)
  np.savez(path, mu=np.zeros(4))
  with pytest.raises(ValueError, match=r"ref\.npz: missing key\(s\) \['sigma'\]"):
    fid_math.load_stats(path)
  with pytest.raises(FileNotFoundError, match='absent.npz: statistics file not found'):
    fid_math.load_stats(str(tmp_path / 'absent.npz'))
