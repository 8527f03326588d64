"""The one place that knows about devices and hosts.

Sampling is data parallel: a global batch of per-sample keys is split over the
processes (contiguous slices), and each process splits its slice over its local
devices with ``jax.pmap``. Sample ``i`` of a run is drawn from
``fold_in(key(seed), i)`` and a sampler's output for a sample depends only on its
key, so the images do not depend on the batch size or on the device count.
A batch that does not divide evenly is padded with the keys of the following
indices and the padded outputs are dropped.
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

# Streams derived from the run's key beside the samples' own keys fold_in(key(seed), i):
# class labels and warm-up runs (DiffRS thresholds). Sample indices stay below both.
LABEL_STREAM = 2**32 - 1
WARMUP_STREAM = 2**32 - 2


def initialize(distributed: bool) -> None:
  """Joins the multi-host job (``jax.distributed.initialize``) when asked.

  Args:
    distributed: ``config.distributed``; the coordinator address, process count and
      process id come from the environment (TPU pods and SLURM fill them in).
  """
  if distributed:
    jax.distributed.initialize()


def is_main_process() -> bool:
  """Whether this process writes files and logs progress (process 0)."""
  return jax.process_index() == 0


def describe() -> str:
  """One line naming the processes and devices this run uses."""
  return (f'process {jax.process_index()} of {jax.process_count()}, '
          f'{jax.local_device_count()} local / {jax.device_count()} global devices '
          f'({jax.devices()[0].platform})')


def broadcast_from_main(mask: np.ndarray) -> np.ndarray:
  """Process 0's value of a boolean array on every process (the workdir may be host-local)."""
  if jax.process_count() == 1:
    return mask
  return np.asarray(multihost_utils.broadcast_one_to_all(mask))


def base_key(seed: int, stream: Optional[int] = None) -> jax.Array:
  """``key(seed)``, or the derived ``fold_in(key(seed), stream)`` of a side stream."""
  key = jax.random.key(seed)
  return key if stream is None else jax.random.fold_in(key, stream)


def sample_keys(base: jax.Array, indices: np.ndarray) -> jax.Array:
  """Returns the keys ``fold_in(base, i)`` of the global sample indices."""
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def sample_labels(base: jax.Array, indices: np.ndarray, label_dim: int,
                  class_idx: int = -1) -> np.ndarray:
  """Returns one-hot class labels [len(indices), label_dim] for the sample indices.

  Args:
    base: the key whose samples get labels; label ``i`` is uniform, drawn from
      ``fold_in(fold_in(base, LABEL_STREAM), i)``.
    indices: global sample indices.
    label_dim: number of classes.
    class_idx: a fixed class for every sample, or -1 for random classes.
  """
  if class_idx >= 0:
    classes = np.full(len(indices), class_idx)
  else:
    keys = sample_keys(jax.random.fold_in(base, LABEL_STREAM), indices)
    classes = jax.vmap(lambda k: jax.random.randint(k, (), 0, label_dim))(keys)
  return np.eye(label_dim, dtype=np.float32)[np.asarray(classes)]


class ShardedSampler:
  """Runs a per-sample sampler on a fixed global batch over all devices and hosts.

  The global batch of ``batch_size`` samples is split into contiguous per-process
  slices of ``ceil(batch_size / process_count)`` samples, each padded to a multiple
  of the local device count; every call has the same shapes, so it compiles once.
  """

  def __init__(self, sample_fn: Callable[..., Any], batch_size: int):
    """Args:
      sample_fn: ``sample_fn(keys, class_labels) -> outputs`` (a pytree of per-sample
        arrays, e.g. ``(images, stats)``), pure, each row a function of its key only.
      batch_size: the global number of samples per call.
    """
    if batch_size < 1:
      raise ValueError(f'batch size must be >= 1, got {batch_size}')
    self.batch_size = batch_size
    self.per_process = math.ceil(batch_size / jax.process_count())
    self.per_device = math.ceil(self.per_process / jax.local_device_count())
    self.padding = self.per_device * jax.local_device_count() * jax.process_count() - batch_size
    self._pmapped = jax.pmap(sample_fn)

  def __call__(self, base: jax.Array, start: int,
               class_labels: Optional[np.ndarray]) -> Any:
    """Samples the global indices ``start .. start + batch_size - 1``.

    Args:
      base: the run's key (`base_key`); sample ``i`` gets ``fold_in(base, i)``.
      start: the global index of the first sample.
      class_labels: one-hot labels [batch_size, label_dim] of these samples, or None.

    Returns:
      The sampler's outputs (``(images, stats)``) as numpy arrays with ``batch_size``
      rows, on every process.
    """
    n_local = jax.local_device_count()
    first = start + jax.process_index() * self.per_process
    rows = self.per_device * n_local
    keys = sample_keys(base, np.arange(first, first + rows))
    keys = keys.reshape(n_local, self.per_device)
    labels = None
    if class_labels is not None:
      # Padding rows repeat the last label; their outputs are dropped.
      local = np.arange(first - start, first - start + rows)
      labels = class_labels[np.minimum(local, len(class_labels) - 1)]
      labels = labels.reshape(n_local, self.per_device, -1)
    out = jax.tree_util.tree_map(
        lambda a: np.asarray(a).reshape((rows,) + a.shape[2:])[:self.per_process],
        self._pmapped(keys, labels))
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:self.batch_size], out)
