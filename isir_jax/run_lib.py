"""What ``main.py`` runs: sampling to npz shards, FID statistics and evaluation.

Each mode is a function ``(config, workdir) -> None``. Every check of the user's
input (model directories, conditioning, workdir, reference statistics) runs before
any sampling or feature extraction and raises `RunError` with a one-line message.
"""

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from isir_jax import checkpoints
from isir_jax import io
from isir_jax import parallel

# config.sampler keys that the driver consumes; the rest go to the sampler factory.
_DRIVER_SAMPLER_KEYS = ('name', 'rej_percentile', 'warmup_samples', 'thresholds')
DIFFRS_THRESHOLDS_NAME = 'diffrs_thresholds.npz'   # warm-up result, reused on resume
# Per-sample sampler statistics reported in the shard log line, with their labels.
_LOGGED_STATS = (('nfe', 'NFE/sample'), ('ess', 'ESS'), ('accept_rate', 'accept'))


# config.model.dtype -> compute dtype of the networks (their weights stay float32).
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class RunError(Exception):
  """A problem with the user's input, reported as one line before any work starts."""


# ----------------------------------------------------------------------------- models


def _check_model_dir(key: str, directory: str) -> None:
  """Checks that ``config.model.<key>`` is a converted model directory."""
  if not directory:
    raise RunError(f'config.model.{key} is empty; set it to a converted model directory')
  if not os.path.isdir(directory):
    raise RunError(f'config.model.{key}={directory}: no such directory')
  if not os.path.isfile(os.path.join(directory, checkpoints.CONFIG_NAME)):
    raise RunError(
        f'config.model.{key}={directory}: not a converted model directory '
        f'(no {checkpoints.CONFIG_NAME}); convert the checkpoint first with '
        'python -m checkpoints_convert.<family>')


def _load(key: str, loader: Callable, directory: str):
  """Runs a model loader, turning its errors (e.g. a wrong model family) into one line."""
  try:
    return loader(directory)
  except (OSError, ValueError, KeyError) as e:
    raise RunError(f'config.model.{key}={directory}: {e}') from None


def _uses_discriminator(config: ml_collections.ConfigDict) -> bool:
  return config.sampler.name != 'edm'


def load_models(config: ml_collections.ConfigDict) -> tuple[Any, Optional[Any]]:
  """Returns ``(denoiser, discriminator or None)`` for ``config.model``.

  Raises:
    RunError: on a missing, unconverted or wrong-family model directory, a bad
      ``config.model.dtype``, or when the networks' conditioning does not match
      ``config.model.conditional``.
  """
  needs_disc = _uses_discriminator(config)
  if config.model.dtype not in _DTYPES:
    raise RunError(f'config.model.dtype must be one of {sorted(_DTYPES)}, '
                   f'got {config.model.dtype!r}')
  if config.model.kind == 'testbed':
    # The exact 8x8x1 Gaussian-mixture testbed: the wrong mixture's denoiser is the
    # "pretrained model", the exact log density ratio is the discriminator.
    from isir_jax import testbed  # pylint: disable=g-import-not-at-top
    bed = testbed.make_testbed('gmm64')
    denoiser, discriminator = bed.model_denoiser, bed.discriminator
  elif config.model.kind == 'checkpoint':
    _check_model_dir('denoiser', config.model.denoiser)
    if needs_disc:
      _check_model_dir('discriminator', config.model.discriminator)
    from isir_jax import denoiser as denoiser_lib  # pylint: disable=g-import-not-at-top
    from isir_jax import discriminator as disc_lib  # pylint: disable=g-import-not-at-top
    dtype = _DTYPES[config.model.dtype]
    denoiser = _load('denoiser', lambda d: denoiser_lib.load_denoiser(d, dtype),
                     config.model.denoiser)
    discriminator = None
    if needs_disc:
      discriminator = _load('discriminator', lambda d: disc_lib.load_discriminator(d, dtype),
                            config.model.discriminator)
  else:
    raise RunError(f"config.model.kind={config.model.kind!r}: expected 'checkpoint' or 'testbed'")
  _check_conditioning(config, denoiser, discriminator if needs_disc else None)
  return denoiser, (discriminator if needs_disc else None)


def _label_dim(denoiser) -> int:
  return int(getattr(denoiser, 'label_dim', 0) or 0)


def _check_conditioning(config, denoiser, discriminator) -> None:
  """Refuses a conditional config with unconditional networks, and vice versa."""
  want = bool(config.model.conditional)
  nets = [('denoiser', _label_dim(denoiser) > 0)]
  if discriminator is not None:
    head = getattr(discriminator, 'head', None)
    nets.append(('discriminator', bool(getattr(head, 'num_classes', 0))))
  for key, conditional in nets:
    if conditional != want:
      path = getattr(config.model, key) or config.model.kind
      raise RunError(
          f'config.model.conditional={want} but config.model.{key}={path} is '
          f'{"" if conditional else "un"}conditional; use the matching network or config')


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


def _diffrs_thresholds(config, denoiser, discriminator, workdir: str, settings: dict):
  """DiffRS thresholds: ``config.sampler.thresholds``, the workdir's, or a warm-up run.

  The warm-up samples ``config.sampler.warmup_samples`` plain trajectories from the
  run's warm-up key stream (independent of the samples' keys), sharded like the
  samples, and takes the ``rej_percentile`` quantiles of their log ratios.
  """
  from isir_jax.samplers import diffrs, edm  # pylint: disable=g-import-not-at-top
  if config.sampler.thresholds:
    return config.sampler.thresholds   # an input file, like the checkpoints (checked early)
  main = parallel.is_main_process()
  path = os.path.join(workdir, DIFFRS_THRESHOLDS_NAME)
  if parallel.broadcast_from_main(np.array([main and os.path.isfile(path)]))[0]:
    # Written by this workdir's config (check_run_config); the workdir may be host-local.
    zeros = np.zeros(config.sampler.num_steps + 1, np.float32)
    stored = diffrs.load_thresholds(path) if main else diffrs.Thresholds(zeros, zeros)
    return diffrs.Thresholds(*(parallel.broadcast_from_main(np.asarray(a, np.float32))
                               for a in stored))
  step = dataclasses.asdict(edm.split_settings(settings)[0])
  shape = (denoiser.img_resolution, denoiser.img_resolution, denoiser.img_channels)
  warmup = parallel.ShardedSampler(
      lambda models, keys, labels: diffrs.warmup_log_ratios(*models, keys, labels,
                                                            shape=shape, **step),
      config.sample.batch_size, (denoiser, discriminator))
  base = parallel.base_key(config.seed, parallel.WARMUP_STREAM)
  label_dim = _label_dim(denoiser)
  log_ratios = []
  num = config.sampler.warmup_samples
  for start in tqdm(range(0, num, config.sample.batch_size), desc='diffrs warm-up',
                    disable=not main):
    indices = np.arange(start, start + config.sample.batch_size)
    labels = (parallel.sample_labels(base, indices, label_dim, config.sample.class_idx)
              if label_dim else None)
    log_ratios.append(warmup(base, start, labels))
  log_ratios = np.concatenate(log_ratios)[:num]
  thresholds = diffrs.thresholds_from_log_ratios(log_ratios, config.sampler.rej_percentile)
  if main:
    diffrs.save_thresholds(path, thresholds, log_ratios)
    logging.info('DiffRS thresholds from %d warm-up samples written to %s', num, path)
  return thresholds


def make_sample_fn(config: ml_collections.ConfigDict, denoiser, discriminator,
                   workdir: str) -> Callable:
  """Builds ``sample_fn(models, keys, class_labels) -> (images, stats)`` from ``config.sampler``.

  ``models`` is ``(denoiser, discriminator)``, passed at call time so that the weights
  are arguments of the compiled program. The settings are checked here, once.
  """
  from isir_jax import samplers  # pylint: disable=g-import-not-at-top
  settings = {k: v for k, v in config.sampler.items() if k not in _DRIVER_SAMPLER_KEYS}
  shape = (denoiser.img_resolution, denoiser.img_resolution, denoiser.img_channels)
  factory = samplers.get_sampler(config.sampler.name)
  try:
    if config.sampler.name == 'diffrs':
      settings['thresholds'] = _diffrs_thresholds(config, denoiser, discriminator, workdir,
                                                  settings)
    factory(denoiser, discriminator, shape=shape, **settings)
  except (TypeError, ValueError) as e:
    raise RunError(f'config.sampler ({config.sampler.name}): {e}') from None
  return lambda models, keys, class_labels: factory(*models, shape=shape, **settings)(
      keys, class_labels)


def _shard_sizes(config) -> list[int]:
  n, b = config.sample.num_samples, config.sample.batch_size
  return [min(b, n - k * b) for k in range(math.ceil(n / b))]


def _complete(workdir: str, k: int, size: int) -> bool:
  """Whether shard ``k`` exists with ``size`` images (a smaller last shard is redone)."""
  samples, _ = io.read_shard(io.shard_path(workdir, k))
  return len(samples) == size


def _stats_line(stats: dict) -> str:
  parts = []
  for key, label in _LOGGED_STATS:
    if key in stats:
      parts.append(f'{label} {float(np.mean(stats[key])):.3g}')
  return ', '.join(parts)


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
  denoiser, discriminator = load_models(config)
  label_dim = _label_dim(denoiser)
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
    _generate(config, workdir, todo, sizes, denoiser, discriminator)
  if main and config.model.kind == 'testbed':
    _log_testbed_weights(workdir, len(sizes))


def _generate(config, workdir: str, todo: list[int], sizes: list[int], denoiser,
              discriminator) -> None:
  """Samples and writes the shards ``todo``, with a progress bar and one line per shard."""
  main = parallel.is_main_process()
  label_dim = _label_dim(denoiser)
  sampler = parallel.ShardedSampler(make_sample_fn(config, denoiser, discriminator, workdir),
                                    config.sample.batch_size, (denoiser, discriminator))
  if sampler.padding and main:
    logging.warning('batch size %d is not a multiple of %d devices: %d padded samples per '
                    'batch are computed and dropped', config.sample.batch_size,
                    jax.device_count(), sampler.padding)
  base = parallel.base_key(config.seed)
  for k in tqdm(todo, desc='shards', disable=not main):
    start = k * config.sample.batch_size
    indices = np.arange(start, start + config.sample.batch_size)
    labels = None
    if label_dim:
      labels = parallel.sample_labels(base, indices, label_dim, config.sample.class_idx)
    t0 = time.time()
    images, stats = sampler(base, start, labels)
    elapsed = time.time() - t0
    size = sizes[k]
    images, stats = images[:size], {key: v[:size] for key, v in stats.items()}
    _check_samples(k, start, images, stats)
    if main:
      io.write_shard(workdir, k, io.to_uint8(images),
                     None if labels is None else labels[:size].argmax(axis=1))
      logging.info('shard %d: %d images, %.1f img/s%s, %s', k, size, size / elapsed,
                   ' (incl. compilation)' if k == todo[0] else '', _stats_line(stats))


def _log_testbed_weights(workdir: str, num_shards: int) -> None:
  """The testbed's score: mixture weights of the samples against the true and model ones."""
  from isir_jax import testbed  # pylint: disable=g-import-not-at-top
  bed = testbed.make_testbed('gmm64')
  samples = np.concatenate([io.read_shard(io.shard_path(workdir, k))[0]
                            for k in range(num_shards)])
  weights = bed.weights((samples.astype(np.float64) - 128) / 127.5)
  logging.info('testbed: component weights of %d samples %s (true %s, model %s), error %.3f',
               len(samples), np.round(weights, 3).tolist(), bed.true.weights.tolist(),
               bed.model.weights.tolist(), np.abs(weights - bed.true.weights).max())


def _check_samples(k: int, start: int, images: np.ndarray, stats: dict) -> None:
  """Fails shard ``k`` on non-finite images or unfinished (DiffRS loop-capped) samples."""
  problems = [('non-finite', ~np.isfinite(images).reshape(len(images), -1).all(axis=1))]
  if 'finished' in stats:
    problems.append(('unfinished (DiffRS max_loops cap)', ~np.asarray(stats['finished'], bool)))
  for what, mask in problems:
    if mask.any():
      bad = (start + np.flatnonzero(mask)).tolist()
      raise RunError(f'shard {k}: {len(bad)} {what} samples at global indices '
                     f'{bad[:20]}{" ..." if len(bad) > 20 else ""}; shard not saved')


# ----------------------------------------------------------------------------- FID

FID_STATS_NAME = 'fid_stats.npz'      # fid_stats mode: statistics of config.fid.dataset
SAMPLE_STATS_NAME = 'eval_stats.npz'  # eval mode: statistics of the workdir's samples
EVAL_NAME = 'eval.json'               # eval mode: the scores
# Splits of the Inception Score, as the original improved-GAN code reports it.
_IS_SPLITS = 10


def _load_inception(config: ml_collections.ConfigDict):
  """The FID Inception of ``config.fid.inception``, with one-line errors."""
  from isir_jax import fid  # pylint: disable=g-import-not-at-top
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
  from isir_jax import fid  # pylint: disable=g-import-not-at-top
  if not os.path.exists(dataset):
    raise RunError(f'config.fid.dataset={dataset}: no such file or directory')
  has_shards = os.path.isdir(dataset) and io.complete_shards(dataset)
  if dataset.endswith('.npz') or has_shards:
    return fid.iter_npz_images(dataset)
  try:
    return fid.iter_image_files(dataset, batch_size)
  except FileNotFoundError as e:
    raise RunError(f'config.fid.dataset: {e}') from None


def fid_stats(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Computes the FID statistics of ``config.fid.dataset`` into ``workdir/fid_stats.npz``.

  The file has EDM's layout (``mu``, ``sigma``) and serves as ``config.fid.ref_stats``.
  Runs on process 0 (on its local devices); other processes return at once.
  """
  from isir_jax import fid  # pylint: disable=g-import-not-at-top
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
  from isir_jax import fid  # pylint: disable=g-import-not-at-top
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
  images = fid.iter_npz_images([io.shard_path(workdir, k) for k in range(len(sizes))])
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
