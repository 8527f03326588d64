"""The one place that knows about devices and hosts.

Sampling is data parallel over a 1-D mesh of all devices (all hosts): ``jax.jit`` of a
``jax.shard_map`` that runs the per-sample sampler on each device's slice of the
global batch, with the model weights passed as replicated arguments (not baked into
the program as constants). This is what ``jax.pmap`` itself lowers to since JAX 0.8
(pmap is now implemented with jit + shard_map), written out so that the weights stay
on the devices between calls and multi-host runs need no per-process bookkeeping.

Sample ``i`` of a run is drawn from ``fold_in(key(seed), i)`` and a sampler's output for
a sample depends only on its key, so the images do not depend on the batch size or on
the device count. A batch that does not divide evenly over the devices is padded with
the following indices and the padded outputs are dropped.
"""

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

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


def broadcast_from_main(value: np.ndarray) -> np.ndarray:
  """Process 0's value of an array (same shape everywhere) on every process.

  For what only process 0 reads from the workdir, which may be host-local.
  """
  if jax.process_count() == 1:
    return value
  return np.asarray(multihost_utils.broadcast_one_to_all(value))


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


def _partition(tree: Any) -> tuple[list, Callable[[list], Any]]:
  """Splits a pytree into its array leaves and a function that puts arrays back.

  Array leaves (network weights) become arguments of the compiled program; other
  leaves (modules, settings, unregistered objects such as the testbed's) stay static.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]

  def combine(arrays: list) -> Any:
    it = iter(arrays)
    return treedef.unflatten([next(it) if a else leaf for leaf, a in zip(leaves, is_array)])

  return [leaf for leaf, a in zip(leaves, is_array) if a], combine


def local_batch_sharding(batch_size: int) -> Optional[NamedSharding]:
  """A sharding of the leading (batch) axis over this process's devices, or None when one
  device suffices or ``batch_size`` does not divide among them."""
  devices = jax.local_devices()
  if len(devices) < 2 or batch_size % len(devices):
    return None
  return NamedSharding(jax.sharding.Mesh(np.array(devices), ('batch',)), P('batch'))


class ShardedSampler:
  """Runs a per-sample sampler on a fixed global batch over all devices of all hosts.

  The global batch is padded to a multiple of the device count and split evenly; every
  call has the same shapes, so the program compiles once. Every process calls it with
  the same arguments and gets the whole batch back.
  """

  def __init__(self, sample_fn: Callable[..., Any], batch_size: int, models: Any = None):
    """Args:
      sample_fn: ``sample_fn(models, keys, class_labels) -> outputs`` (a pytree of
        per-sample arrays, e.g. ``(images, stats)``), pure, each row a function of
        its key (and label) only.
      batch_size: the global number of samples per call.
      models: a pytree (e.g. ``(denoiser, discriminator)``) passed to ``sample_fn``;
        its arrays are replicated on every device once.
    """
    if batch_size < 1:
      raise ValueError(f'batch size must be >= 1, got {batch_size}')
    self.batch_size = batch_size
    self.mesh = jax.make_mesh((jax.device_count(),), ('batch',))
    self.rows = math.ceil(batch_size / jax.device_count()) * jax.device_count()
    self.padding = self.rows - batch_size
    arrays, combine = _partition(models)
    self._arrays = jax.device_put(arrays, NamedSharding(self.mesh, P()))
    self._batch = NamedSharding(self.mesh, P('batch'))

    def per_device(arrays, base, indices, labels):
      base = jax.random.wrap_key_data(base)
      keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
      return sample_fn(combine(arrays), keys, labels)

    # No collectives: each device only runs its own samples, so the per-device code needs
    # no varying-axis typing (samplers' scan carries start from unsharded constants).
    self._run = jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                                      in_specs=(P(), P(), P('batch'), P('batch')),
                                      out_specs=P('batch'), check_vma=False))

  def _global(self, rows: np.ndarray) -> jax.Array:
    """The global [self.rows, ...] array of host data, sharded over the batch axis."""
    return jax.make_array_from_callback(rows.shape, self._batch, lambda index: rows[index])

  def _inputs(self, base: jax.Array, start: int, class_labels: Optional[np.ndarray]):
    """The compiled program's arguments for the indices ``start ..``."""
    indices = self._global(np.arange(start, start + self.rows, dtype=np.uint32))
    labels = None
    if class_labels is not None:
      # Padding rows repeat the last label; their outputs are dropped.
      rows = np.minimum(np.arange(self.rows), len(class_labels) - 1)
      labels = self._global(np.asarray(class_labels, np.float32)[rows])
    return self._arrays, jax.random.key_data(base), indices, labels

  def compile(self, class_labels: Optional[np.ndarray] = None) -> None:
    """Compiles the program ahead of the first call (labels: any batch's, or None)."""
    self._run = self._run.lower(*self._inputs(jax.random.key(0), 0, class_labels)).compile()

  def __call__(self, base: jax.Array, start: int,
               class_labels: Optional[np.ndarray]) -> Any:
    """Samples the global indices ``start .. start + batch_size - 1``.

    Args:
      base: the run's key (`base_key`); sample ``i`` gets ``fold_in(base, i)``.
      start: the global index of the first sample.
      class_labels: one-hot labels [batch_size, label_dim] of these samples, or None.

    Returns:
      The sampler's outputs as numpy arrays with ``batch_size`` rows, on every process.
    """
    out = self._run(*self._inputs(base, start, class_labels))
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[:self.batch_size], out)
