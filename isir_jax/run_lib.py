"""What ``main.py`` runs: sampling to npz shards, FID statistics and evaluation.

Each mode is a function ``(config, workdir) -> None``. Every check of the user's
input (model directories, conditioning, workdir, reference statistics) runs before
any sampling or feature extraction and raises `RunError` with a one-line message.
"""

import json
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from isir_jax import io
from isir_jax import parallel

# config.sampler keys that the driver consumes; the rest go to the sampler factory.
_DRIVER_SAMPLER_KEYS = ('name', 'warmup_batches')
# Per-sample sampler statistics reported in the shard log line, with their labels.
_LOGGED_STATS = (('nfe', 'NFE/sample'), ('ess', 'ESS'), ('accept_rate', 'accept'))


class RunError(Exception):
  """A problem with the user's input, reported as one line before any work starts."""


# ----------------------------------------------------------------------------- models


def _check_model_dir(key: str, directory: str) -> None:
  """Checks that ``config.model.<key>`` is a converted model directory."""
  if not directory:
    raise RunError(f'config.model.{key} is empty; set it to a converted model directory')
  if not os.path.isdir(directory):
    raise RunError(f'config.model.{key}={directory}: no such directory')
  if not os.path.isfile(os.path.join(directory, 'config.json')):
    raise RunError(
        f'config.model.{key}={directory}: not a converted model directory (no config.json); '
        'convert the checkpoint first with python -m checkpoints_convert.<family>')


def _uses_discriminator(config: ml_collections.ConfigDict) -> bool:
  return config.sampler.name != 'edm'


def load_models(config: ml_collections.ConfigDict) -> tuple[Any, Optional[Any]]:
  """Returns ``(denoiser, discriminator or None)`` for ``config.model``.

  Raises:
    RunError: on a missing or unconverted model directory, or when the networks'
      conditioning does not match ``config.model.conditional``.
  """
  needs_disc = _uses_discriminator(config)
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
    denoiser = denoiser_lib.load_denoiser(config.model.denoiser)
    discriminator = None
    if needs_disc:
      from isir_jax import discriminator as disc_lib  # pylint: disable=g-import-not-at-top
      discriminator = disc_lib.load_discriminator(config.model.discriminator)
  else:
    raise RunError(f"config.model.kind={config.model.kind!r}: expected 'checkpoint' or 'testbed'")
  _check_conditioning(config, denoiser, discriminator if needs_disc else None)
  return denoiser, (discriminator if needs_disc else None)


def _check_conditioning(config, denoiser, discriminator) -> None:
  """Refuses a conditional config with unconditional networks, and vice versa."""
  want = bool(config.model.conditional)
  nets = [('denoiser', int(getattr(denoiser, 'label_dim', 0) or 0) > 0)]
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
  if config.sample.num_samples >= parallel.LABEL_STREAM:
    raise RunError(f'config.sample.num_samples must be < 2^32 - 1, got {config.sample.num_samples}')


def _check_workdir(workdir: str) -> None:
  try:
    io.check_writable(workdir)
  except OSError as e:
    raise RunError(str(e)) from None


def make_sample_fn(config: ml_collections.ConfigDict, denoiser, discriminator,
                   workdir: str) -> Callable:
  """Builds ``sample_fn(keys, class_labels) -> (images, stats)`` from ``config.sampler``."""
  from isir_jax import samplers  # pylint: disable=g-import-not-at-top
  settings = {k: v for k, v in config.sampler.items() if k not in _DRIVER_SAMPLER_KEYS}
  shape = (denoiser.img_resolution, denoiser.img_resolution, denoiser.img_channels)
  factory = samplers.get_sampler(config.sampler.name)
  try:
    sample_fn = factory(denoiser, discriminator, shape=shape, **settings)
  except (TypeError, ValueError) as e:
    raise RunError(f'config.sampler ({config.sampler.name}): {e}') from None
  return lambda keys, class_labels: sample_fn(keys, class_labels)


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
  label_dim = int(getattr(denoiser, 'label_dim', 0) or 0)
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
  if not todo:
    return
  sampler = parallel.ShardedSampler(make_sample_fn(config, denoiser, discriminator, workdir),
                                    config.sample.batch_size)
  if sampler.padding and main:
    logging.warning('batch size %d is not a multiple of %d devices x %d processes: '
                    '%d padded samples per batch are computed and dropped',
                    config.sample.batch_size, jax.local_device_count(), jax.process_count(),
                    sampler.padding)
  for k in tqdm(todo, desc='shards', disable=not main):
    start = k * config.sample.batch_size
    indices = np.arange(start, start + config.sample.batch_size)
    labels = None
    if label_dim:
      labels = parallel.sample_labels(config.seed, indices, label_dim, config.sample.class_idx)
    t0 = time.time()
    images, stats = sampler(config.seed, start, labels)
    elapsed = time.time() - t0
    size = sizes[k]
    images = images[:size]
    finite = np.isfinite(images).reshape(size, -1).all(axis=1)
    if not finite.all():
      bad = (start + np.flatnonzero(~finite)).tolist()
      raise RunError(f'shard {k}: {len(bad)} non-finite samples at global indices '
                     f'{bad[:20]}{" ..." if len(bad) > 20 else ""}; shard not saved')
    if main:
      io.write_shard(workdir, k, io.to_uint8(images),
                     None if labels is None else labels[:size].argmax(axis=1))
      logging.info('shard %d: %d images, %.1f img/s%s, %s', k, size, size / elapsed,
                   ' (incl. compilation)' if k == todo[0] else '',
                   _stats_line({key: v[:size] for key, v in stats.items()}))


# ----------------------------------------------------------------------------- FID


def fid_stats(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Computes the FID statistics of ``config.fid.dataset`` into ``workdir/fid_stats.npz``."""
  raise RunError('fid_stats: not available yet (isir_jax.fid pending)')


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Scores the samples in ``workdir`` against ``config.fid.ref_stats`` (FID, IS)."""
  raise RunError('eval: not available yet (isir_jax.fid pending)')
