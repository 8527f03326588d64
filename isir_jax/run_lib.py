"""What ``main.py`` runs: sampling to npz shards, FID statistics and evaluation.

Each mode is a function ``(config, workdir) -> None``. Every check of the user's
input (model directories, conditioning, workdir, reference statistics) runs before
any sampling or feature extraction and raises `RunError` with a one-line message.
"""

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from isir_jax import fid
from isir_jax import io
from isir_jax import parallel
from isir_jax import sampling
from isir_jax import testbed
from isir_jax.sampling import RunError


# ----------------------------------------------------------------------------- sample


def run_config(config: ml_collections.ConfigDict) -> dict:
  """The settings that determine the samples, stored in the workdir for resume checks.

  ``num_samples`` is left out, so that a rerun with a larger count extends the set.
  """
  return {
      'seed': config.seed,
      'model': config.model.to_dict(),
      'sampler': config.sampler.to_dict(),
      'batch_size': config.sample.batch_size,
      'class_idx': config.sample.class_idx if config.model.conditional else -1,
  }


def _check_sample_config(config: ml_collections.ConfigDict) -> None:
  if config.sample.batch_size < 1:
    raise RunError(f'config.sample.batch_size must be >= 1, got {config.sample.batch_size}')
  if config.sample.num_samples < 1:
    raise RunError(f'config.sample.num_samples must be >= 1, got {config.sample.num_samples}')
  if config.sample.num_samples >= parallel.WARMUP_STREAM:
    raise RunError(f'config.sample.num_samples must be < 2^32 - 2, got {config.sample.num_samples}')
  if config.sampler.name == 'diffrs' and config.sampler.thresholds and not os.path.isfile(
      config.sampler.thresholds):
    raise RunError(f'config.sampler.thresholds={config.sampler.thresholds}: no such file')


def _check_workdir(workdir: str) -> None:
  try:
    io.check_writable(workdir)
  except OSError as e:
    raise RunError(str(e)) from None


def _shard_sizes(config) -> list[int]:
  n, b = config.sample.num_samples, config.sample.batch_size
  return [min(b, n - k * b) for k in range(math.ceil(n / b))]


def _complete(workdir: str, k: int, size: int) -> bool:
  """Whether shard ``k`` exists with ``size`` images (a smaller last shard is redone)."""
  samples, _ = io.read_shard(io.shard_path(workdir, k))
  return len(samples) == size


def sample(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Generates ``config.sample.num_samples`` images into ``workdir/samples_{k}.npz``.

  Shard ``k`` holds the global samples ``k * batch_size ...``; shards already in the
  workdir (from an interrupted run with the same config) are kept.

  Raises:
    RunError: on bad input (before sampling), or when a shard has non-finite images.
  """
  _check_sample_config(config)
  main = parallel.is_main_process()
  if main:
    _check_workdir(workdir)
  models = sampling.load_models(config)
  label_dim = models[0].label_dim
  if label_dim and not -1 <= config.sample.class_idx < label_dim:
    raise RunError(f'config.sample.class_idx must be -1 (random) or in [0, {label_dim}), '
                   f'got {config.sample.class_idx}')
  if main:
    try:
      resumed = io.check_run_config(workdir, run_config(config))
    except ValueError as e:
      raise RunError(str(e)) from None
  sizes = _shard_sizes(config)
  kept = np.zeros(len(sizes), bool)
  if main:
    io.remove_temporaries(workdir)
    done = set(io.complete_shards(workdir))
    kept[:] = [k in done and _complete(workdir, k, size) for k, size in enumerate(sizes)]
  todo = np.flatnonzero(~parallel.broadcast_from_main(kept)).tolist()
  if main:
    logging.info('%s: %d of %d shards to generate (%d images each)%s', workdir, len(todo),
                 len(sizes), config.sample.batch_size, ' (resumed)' if resumed else '')
  if todo:
    _generate(sampling.Sampler(config, models, workdir), workdir, todo, sizes)
  if main and config.model.kind == 'testbed':
    _log_testbed_weights(workdir, len(sizes))


def _generate(sampler: sampling.Sampler, workdir: str, todo: list[int], sizes: list[int]
              ) -> None:
  """Samples and writes the shards ``todo``, with a progress bar and one line per shard."""
  main = parallel.is_main_process()
  if sampler.sharded.padding and main:
    logging.warning('batch size %d is not a multiple of %d devices: %d padded samples per '
                    'batch are computed and dropped', sampler.batch_size,
                    jax.device_count(), sampler.sharded.padding)
  for k in tqdm(todo, desc='shards', disable=not main):
    start = k * sampler.batch_size
    t0 = time.time()
    try:
      images, stats, labels = sampler.draw(start, sizes[k])
    except RunError as e:
      raise RunError(f'shard {k}: {e}; shard not saved') from None
    elapsed = time.time() - t0
    if main:
      io.write_shard(workdir, k, io.to_uint8(images), labels)
      logging.info('shard %d: %d images, %.1f img/s%s, %s', k, sizes[k], sizes[k] / elapsed,
                   ' (incl. compilation)' if k == todo[0] else '',
                   sampling.format_stats(stats))


def _log_testbed_weights(workdir: str, num_shards: int) -> None:
  """The testbed's score: mixture weights of the samples against the true and model ones."""
  bed = testbed.make_testbed('gmm64')
  samples = np.concatenate([io.read_shard(io.shard_path(workdir, k))[0]
                            for k in range(num_shards)])
  weights = bed.weights((samples.astype(np.float64) - 128) / 127.5)
  logging.info('testbed: component weights of %d samples %s (true %s, model %s), error %.3f',
               len(samples), np.round(weights, 3).tolist(), bed.true.weights.tolist(),
               bed.model.weights.tolist(), np.abs(weights - bed.true.weights).max())


# ----------------------------------------------------------------------------- FID

FID_STATS_NAME = 'fid_stats.npz'      # fid_stats mode: statistics of config.fid.dataset
SAMPLE_STATS_NAME = 'eval_stats.npz'  # eval mode: statistics of the workdir's samples
EVAL_NAME = 'eval.json'               # eval mode: the scores
# Splits of the Inception Score, as the original improved-GAN code reports it.
_IS_SPLITS = 10


def _load_inception(config: ml_collections.ConfigDict):
  """The FID Inception of ``config.fid.inception``, with one-line errors."""
  directory = config.fid.inception
  if not directory:
    raise RunError('config.fid.inception is empty; convert the FID Inception with python -m '
                   'checkpoints_convert.inception --src pt_inception-2015-12-05-6726825d.pth --dst DIR')
  if not os.path.isdir(directory):
    raise RunError(f'config.fid.inception={directory}: no such directory')
  try:
    return fid.InceptionFID.load(directory, batch_size=config.fid.batch_size)
  except (FileNotFoundError, ValueError) as e:
    raise RunError(f'config.fid.inception: {e}') from None


def _dataset_images(dataset: str, batch_size: int):
  """uint8 image batches of a dataset: npz shards (dir or file), or a folder/zip of images."""
  if not os.path.exists(dataset):
    raise RunError(f'config.fid.dataset={dataset}: no such file or directory')
  has_shards = os.path.isdir(dataset) and io.complete_shards(dataset)
  if dataset.endswith('.npz') or has_shards:
    return io.iter_npz_images(dataset)
  try:
    return io.iter_image_files(dataset, batch_size)
  except FileNotFoundError as e:
    raise RunError(f'config.fid.dataset: {e}') from None


def fid_stats(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Computes the FID statistics of ``config.fid.dataset`` into ``workdir/fid_stats.npz``.

  The file has EDM's layout (``mu``, ``sigma``) and serves as ``config.fid.ref_stats``.
  Runs on process 0 (on its local devices); other processes return at once.
  """
  if not parallel.is_main_process():
    return
  if not config.fid.dataset:
    raise RunError('config.fid.dataset is empty; set it to the images to compute reference '
                   'statistics from (a dir of npz shards or images, an npz, or a zip)')
  _check_workdir(workdir)
  net = _load_inception(config)
  images = _dataset_images(config.fid.dataset, config.fid.batch_size)
  mu, sigma = fid.compute_statistics(net, images)
  path = os.path.join(workdir, FID_STATS_NAME)
  fid.save_stats(path, mu, sigma)
  logging.info('statistics of %s written to %s', config.fid.dataset, path)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Scores the first ``config.sample.num_samples`` samples of ``workdir``: FID and IS.

  Writes ``workdir/eval.json`` and the samples' statistics ``workdir/eval_stats.npz``.
  Runs on process 0 (on its local devices); other processes return at once.

  Raises:
    RunError: when the reference statistics are missing or of the wrong shape, or the
      workdir holds fewer samples than asked for or was sampled with another config.
  """
  if not parallel.is_main_process():
    return
  if not config.fid.ref_stats:
    raise RunError('config.fid.ref_stats is empty; set it to reference statistics (mu, sigma), '
                   'e.g. EDM\'s cifar10-32x32.npz or the output of --mode=fid_stats')
  shards = io.complete_shards(workdir)
  if not shards or not os.path.isfile(os.path.join(workdir, io.RUN_CONFIG_NAME)):
    raise RunError(f'--workdir={workdir} holds no samples; run --mode=sample first')
  try:
    io.check_run_config(workdir, run_config(config))
  except ValueError as e:
    raise RunError(str(e)) from None
  num, sizes = config.sample.num_samples, _shard_sizes(config)
  missing = [k for k, size in enumerate(sizes)
             if k not in shards or len(io.read_shard(io.shard_path(workdir, k))[0]) < size]
  if missing:
    raise RunError(f'--workdir={workdir} lacks {len(missing)} of the {len(sizes)} shards of '
                   f'config.sample.num_samples={num} (first: samples_{missing[0]}.npz); '
                   'run --mode=sample to complete it')
  _check_workdir(workdir)
  net = _load_inception(config)
  try:
    mu_ref, sigma_ref = fid.load_stats(config.fid.ref_stats, dim=net.feature_dim)
  except (FileNotFoundError, ValueError) as e:
    raise RunError(f'config.fid.ref_stats: {e}') from None
  images = io.iter_npz_images([io.shard_path(workdir, k) for k in range(len(sizes))])
  mu, sigma, logits = fid.compute_statistics(net, images, num=num, with_logits=True)
  score = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
  is_mean, is_std = fid.inception_score(logits, num_splits=min(_IS_SPLITS, num))
  fid.save_stats(os.path.join(workdir, SAMPLE_STATS_NAME), mu, sigma)
  result = {'fid': float(score), 'inception_score': is_mean, 'inception_score_std': is_std,
            'num_samples': num, 'ref_stats': config.fid.ref_stats}
  text = json.dumps(result, indent=2)
  io.atomic_write(os.path.join(workdir, EVAL_NAME), lambda f: f.write(text.encode()))
  logging.info('FID %.4f, Inception Score %.3f +- %.3f (%d samples against %s)',
               score, is_mean, is_std, num, config.fid.ref_stats)
