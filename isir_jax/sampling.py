"""One sampling path from a config: models, sampler binding, thresholds, keys, labels, checks.

`Sampler` is what ``main.py --mode=sample``, the digits demo and the quality benchmark
draw through: prepared once from a config (models loaded and checked, DiffRS thresholds
resolved or warmed up, the sampler bound and sharded over all devices), it compiles
and then draws any range of global sample indices. Sample ``i`` comes from
``fold_in(key(config.seed), i)`` with its class label from the run's label stream, so the
same config and indices give the same images whoever draws them.
"""

import dataclasses
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
from isir_jax import denoiser as denoiser_lib
from isir_jax import discriminator as disc_lib
from isir_jax import io
from isir_jax import parallel
from isir_jax import samplers
from isir_jax import testbed
from isir_jax.samplers import diffrs
from isir_jax.samplers import edm
from isir_jax.samplers import weights

# config.sampler keys that the driver consumes; the rest go to the sampler factory.
DRIVER_SAMPLER_KEYS = ('name', 'rej_percentile', 'warmup_samples', 'thresholds')
DIFFRS_THRESHOLDS_NAME = 'diffrs_thresholds.npz'   # warm-up result, reused on resume
# Per-sample sampler statistics reported in log lines and tables, with their labels.
_LOGGED_STATS = (('nfe', 'NFE/sample'), ('disc_evals', 'disc evals'),
                 ('disc_grads', 'disc grads'), ('ess', 'ESS'), ('accept_rate', 'accept'),
                 ('ancestors', 'ancestors/group'))


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


def load_models(config: ml_collections.ConfigDict,
                with_discriminator: Optional[bool] = None) -> tuple[Any, Optional[Any]]:
  """Returns ``(denoiser, discriminator or None)`` for ``config.model``.

  The discriminator is loaded when ``with_discriminator`` (default: when
  ``config.sampler`` uses one, i.e. is not EDM).

  Raises:
    RunError: on a missing, unconverted or wrong-family model directory, a bad
      ``config.model.dtype``, or when the networks' conditioning does not match
      ``config.model.conditional``.
  """
  needs_disc = (config.sampler.name != 'edm' if with_discriminator is None
                else with_discriminator)
  if config.model.dtype not in _DTYPES:
    raise RunError(f'config.model.dtype must be one of {sorted(_DTYPES)}, '
                   f'got {config.model.dtype!r}')
  if config.model.kind == 'testbed':
    # The exact 8x8x1 Gaussian-mixture testbed: the wrong mixture's denoiser is the
    # "pretrained model", the exact log density ratio is the discriminator.
    bed = testbed.make_testbed('gmm64')
    denoiser, discriminator = bed.model_denoiser, bed.discriminator
  elif config.model.kind == 'checkpoint':
    _check_model_dir('denoiser', config.model.denoiser)
    if needs_disc:
      _check_model_dir('discriminator', config.model.discriminator)
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


def _check_conditioning(config, denoiser, discriminator) -> None:
  """Refuses a conditional config with unconditional networks, and vice versa."""
  want = bool(config.model.conditional)
  nets = [('denoiser', denoiser.label_dim > 0)]
  if discriminator is not None:
    head = getattr(discriminator, 'head', None)
    nets.append(('discriminator', bool(getattr(head, 'num_classes', 0))))
  for key, conditional in nets:
    if conditional != want:
      path = getattr(config.model, key) or config.model.kind
      raise RunError(
          f'config.model.conditional={want} but config.model.{key}={path} is '
          f'{"" if conditional else "un"}conditional; use the matching network or config')


# ----------------------------------------------------------------------------- sampler


def warmup_thresholds(config: ml_collections.ConfigDict, denoiser, discriminator
                      ) -> tuple[diffrs.Thresholds, np.ndarray]:
  """DiffRS thresholds from a warm-up: ``config.sampler.warmup_samples`` plain trajectories
  from the run's warm-up key stream (independent of the samples' keys, with the run's
  classes), sharded like the samples; the ``rej_percentile`` quantiles of their log ratios.

  Returns:
    ``(thresholds, log ratios [warmup_samples, num_steps + 1])``.
  """
  settings = {k: v for k, v in config.sampler.items() if k not in DRIVER_SAMPLER_KEYS}
  step = dataclasses.asdict(edm.split_settings(settings)[0])
  shape = denoiser.shape
  warmup = parallel.ShardedSampler(
      lambda models, keys, labels: diffrs.warmup_log_ratios(*models, keys, labels,
                                                            shape=shape, **step),
      config.sample.batch_size, (denoiser, discriminator))
  base = parallel.base_key(config.seed, parallel.WARMUP_STREAM)
  num_classes = denoiser.label_dim
  log_ratios = []
  num = config.sampler.warmup_samples
  for start in tqdm(range(0, num, config.sample.batch_size), desc='diffrs warm-up',
                    disable=not parallel.is_main_process()):
    indices = np.arange(start, start + config.sample.batch_size)
    # The run's classes: a fixed class_idx gets thresholds of that class (as DiffRS).
    labels = (parallel.sample_labels(base, indices, num_classes, config.sample.class_idx)
              if num_classes else None)
    log_ratios.append(warmup(base, start, labels))
  log_ratios = np.concatenate(log_ratios)[:num]
  return diffrs.thresholds_from_log_ratios(log_ratios, config.sampler.rej_percentile), log_ratios


def _diffrs_thresholds(config, denoiser, discriminator, workdir: str):
  """DiffRS thresholds: ``config.sampler.thresholds``, the workdir's, or a warm-up run
  (`warmup_thresholds`, saved in the workdir for a resumed run)."""
  if config.sampler.thresholds:
    # An input file, like the checkpoints (its existence is checked early).
    try:
      return diffrs.Thresholds(*io.load_thresholds(config.sampler.thresholds))
    except (OSError, ValueError) as e:
      raise RunError(f'config.sampler.thresholds: {e}') from None
  main = parallel.is_main_process()
  path = os.path.join(workdir, DIFFRS_THRESHOLDS_NAME)
  if parallel.broadcast_from_main(np.array([main and os.path.isfile(path)]))[0]:
    # Written by this workdir's config (check_run_config); the workdir may be host-local.
    zeros = np.zeros(config.sampler.num_steps + 1, np.float32)
    stored = io.load_thresholds(path) if main else (zeros, zeros)
    return diffrs.Thresholds(*(parallel.broadcast_from_main(np.asarray(a, np.float32))
                               for a in stored))
  thresholds, log_ratios = warmup_thresholds(config, denoiser, discriminator)
  if main:
    io.save_thresholds(path, thresholds, log_ratios)
    logging.info('DiffRS thresholds from %d warm-up samples written to %s',
                 len(log_ratios), path)
  return thresholds


def make_sample_fn(config: ml_collections.ConfigDict, denoiser, discriminator,
                   workdir: str) -> Callable:
  """Builds ``sample_fn(models, keys, class_labels) -> (images, stats)`` from ``config.sampler``.

  ``models`` is ``(denoiser, discriminator)``, passed at call time so that the weights
  are arguments of the compiled program. The settings are checked here, once.
  """
  settings = {k: v for k, v in config.sampler.items() if k not in DRIVER_SAMPLER_KEYS}
  shape = denoiser.shape
  factory = samplers.get_sampler(config.sampler.name)
  try:
    if config.sampler.name == 'diffrs':
      settings['thresholds'] = _diffrs_thresholds(config, denoiser, discriminator, workdir)
    factory(denoiser, discriminator, shape=shape, **settings)
  except (TypeError, ValueError) as e:
    raise RunError(f'config.sampler ({config.sampler.name}): {e}') from None
  return lambda models, keys, class_labels: factory(*models, shape=shape, **settings)(
      keys, class_labels)


def check_groups(config: ml_collections.ConfigDict, devices: int) -> None:
  """SMC resamples within groups of ``config.sampler.group_size`` consecutive samples: a batch,
  a device's shard of it and the sample count must hold whole groups, or samples would
  depend on how the run is split. One `RunError` line otherwise."""
  if config.sampler.name != 'smc':
    return
  size = config.sampler.get('group_size', 1)
  counts = (('config.sample.batch_size', config.sample.batch_size, size),
            (f'config.sample.batch_size on {devices} devices', config.sample.batch_size,
             size * devices),
            ('config.sample.num_samples', config.sample.num_samples, size))
  for name, value, multiple in counts:
    if value % multiple:
      raise RunError(f'{name}={value} is not a multiple of {multiple}: SMC groups of '
                     f'config.sampler.group_size={size} consecutive samples must not be split '
                     f'(batch and per-device shard sizes, and the sample count, must be '
                     f'multiples of the group size)')


def format_stats(stats: dict) -> str:
  """The mean of each logged per-sample statistic, as ``NFE/sample 35, ESS 0.9``."""
  parts = []
  for key, label in _LOGGED_STATS:
    if key in stats:
      parts.append(f'{label} {float(np.mean(stats[key])):.3g}')
  return ', '.join(parts)



def check_samples(start: int, images: np.ndarray, stats: dict) -> None:
  """Fails on samples with a non-finite log weight (naming the noise level), non-finite
  images or unfinished (DiffRS loop-capped) samples, naming their global indices (the
  first is ``start``)."""
  if weights.STAT in stats:
    levels = np.asarray(stats[weights.STAT])
    mask = levels != weights.NONE
    if mask.any():
      bad = start + np.flatnonzero(mask)
      first = {int(i): int(k) for i, k in zip(bad[:20], levels[mask][:20])}
      raise RunError(
          f'{len(bad)} samples met a non-finite discriminator log ratio (NaN or inf) and are '
          f'refused, not weighted; global index: noise level k where it first occurred (k = 0 '
          f'the initial latent, else step k-1 -> k): {first}{" ..." if len(bad) > 20 else ""}')
  problems = [('non-finite', ~np.isfinite(images).reshape(len(images), -1).all(axis=1))]
  if 'finished' in stats:
    problems.append(('unfinished (DiffRS max_loops cap)', ~np.asarray(stats['finished'], bool)))
  for what, mask in problems:
    if mask.any():
      bad = (start + np.flatnonzero(mask)).tolist()
      raise RunError(f'{len(bad)} {what} samples at global indices '
                     f'{bad[:20]}{" ..." if len(bad) > 20 else ""}')


class Sampler:
  """A config's sampler, prepared: models, bound settings, thresholds, sharded program.

  ``Sampler(config, models, workdir)`` checks ``config.sampler`` (one `RunError` line on a
  bad setting), resolves DiffRS thresholds (``config.sampler.thresholds``, the workdir's,
  or a warm-up) and shards the sampler over all devices in batches of
  ``config.sample.batch_size``. `draw` then samples any range of global indices.
  """

  def __init__(self, config: ml_collections.ConfigDict, models: tuple[Any, Optional[Any]],
               workdir: str):
    self.config = config
    self.denoiser, self.discriminator = models
    self.label_dim = self.denoiser.label_dim
    self.batch_size = config.sample.batch_size
    self.base = parallel.base_key(config.seed)
    check_groups(config, jax.device_count())
    fn = make_sample_fn(config, self.denoiser, self.discriminator, workdir)
    self.sharded = parallel.ShardedSampler(fn, self.batch_size, models)

  def labels(self, start: int) -> Optional[np.ndarray]:
    """One-hot labels of the batch starting at global index ``start`` (None if unconditional)."""
    if not self.label_dim:
      return None
    indices = np.arange(start, start + self.batch_size)
    return parallel.sample_labels(self.base, indices, self.label_dim,
                                  self.config.sample.class_idx)

  def compile(self) -> float:
    """Compiles the sharded sampler ahead of time; returns the seconds it took."""
    t0 = time.perf_counter()
    self.sharded.compile(self.labels(0))
    return time.perf_counter() - t0

  def draw(self, start: int, count: int, progress: Optional[str] = None
           ) -> tuple[np.ndarray, dict, Optional[np.ndarray]]:
    """Samples the global indices ``start .. start + count - 1``, batch by batch.

    Args:
      start: first global sample index.
      count: number of samples (the last batch is computed whole and trimmed).
      progress: a progress-bar label, or None for no bar.

    Returns:
      ``(images [count, H, W, C] float32 EDM scale, per-sample stats, int labels or None)``.

    Raises:
      RunError: on non-finite or unfinished samples, with their global indices.
    """
    images, stats, labels = [], [], []
    starts = range(start, start + count, self.batch_size)
    main = parallel.is_main_process()
    for first in tqdm(starts, desc=progress, disable=progress is None or not main,
                      leave=False):
      size = min(self.batch_size, start + count - first)
      one_hot = self.labels(first)
      x, st = self.sharded(self.base, first, one_hot)
      images.append(x[:size])
      stats.append({k: np.asarray(v)[:size] for k, v in st.items()})
      if one_hot is not None:
        labels.append(one_hot[:size].argmax(axis=1))
    images = np.concatenate(images)
    stats = {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}
    check_samples(start, images, stats)
    return images, stats, (np.concatenate(labels) if labels else None)
