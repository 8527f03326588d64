"""The driver's sharded jit (``parallel.ShardedSampler``) against a plain ``jax.pmap``.

Both run EDM sampling with a SongUNet (CIFAR-10 layout by default, random weights) over
all local devices. The pmap closes over the denoiser, as a sampler closure naturally
does, so its weights become constants of the program; the driver passes them as
replicated arguments. Prints compile time, steady-state img/s and the largest
difference between the two sets of images (expected 0: same keys, same per-device code).

  python -m benchmarks.sharding                        # CIFAR-10 size (for a GPU host)
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python -m benchmarks.sharding --model_channels=16 --batch=8 --steps=4   # CPU
"""

import time

import jax
import numpy as np
from absl import app
from absl import flags

from isir_jax import denoiser as denoiser_lib
from isir_jax import parallel
from isir_jax.networks import precond
from isir_jax.samplers import edm

_CHANNELS = flags.DEFINE_integer('model_channels', 128, 'SongUNet width (128: EDM CIFAR-10).')
_BATCH = flags.DEFINE_integer('batch', 256, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 18, 'EDM sampling steps.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls after the first.')


def _denoiser(model_channels: int) -> denoiser_lib.Denoiser:
  """EDM's CIFAR-10 VP network layout with re-drawn random weights (no init compile)."""
  config = {'class_name': 'VPPrecond',
            'kwargs': dict(img_resolution=32, img_channels=3, label_dim=0, beta_d=19.9,
                           beta_min=0.1, M=1000, epsilon_t=1e-5),
            'model': {'class_name': 'SongUNet',
                      'kwargs': dict(img_resolution=32, in_channels=3, out_channels=3,
                                     label_dim=0, model_channels=model_channels,
                                     channel_mult=[2, 2, 2], channel_mult_noise=1,
                                     attn_resolutions=[16], num_blocks=4, dropout=0.13,
                                     embedding_type='positional', encoder_type='standard',
                                     decoder_type='standard', resample_filter=[1, 1])}}
  module = precond.build_precond(config)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *precond.example_inputs(module))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]) if s.ndim > 1 else 10)
                 ).astype(np.float32), shapes)
  return denoiser_lib.Denoiser.from_module(module, jax.tree_util.tree_map(jax.numpy.asarray,
                                                                          params))


def _time(call, repeats: int) -> tuple[float, float, np.ndarray]:
  t0 = time.time()
  out = np.asarray(call())
  first = time.time() - t0
  t0 = time.time()
  for _ in range(repeats):
    out = np.asarray(call())
  return first, (time.time() - t0) / repeats, out


def main(argv):
  del argv
  den = _denoiser(_CHANNELS.value)
  settings = dict(num_steps=_STEPS.value)
  shape = (32, 32, 3)
  batch, n = _BATCH.value, jax.local_device_count()
  if batch % n:
    raise app.UsageError(f'--batch={batch} must be a multiple of {n} devices here')
  base = parallel.base_key(0)
  keys = parallel.sample_keys(base, np.arange(batch)).reshape(n, batch // n)

  closure = edm.edm_sampler(den, shape=shape, **settings)
  pmapped = jax.pmap(lambda k: closure(k)[0])
  p_first, p_step, p_out = _time(lambda: pmapped(keys).reshape((batch,) + shape),
                                 _REPEATS.value)

  sharded = parallel.ShardedSampler(
      lambda models, k, labels: edm.edm_sampler(models, shape=shape, **settings)(k)[0],
      batch, den)
  s_first, s_step, s_out = _time(lambda: sharded(base, 0, None), _REPEATS.value)

  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}, batch {batch}, '
        f'{_STEPS.value} steps, SongUNet width {_CHANNELS.value}')
  for name, first, step in (('pmap (weights as constants)', p_first, p_step),
                            ('ShardedSampler (jit + shard_map)', s_first, s_step)):
    print(f'  {name:34s} first call {first:7.2f} s   then {batch / step:9.1f} img/s')
  print(f'  max |difference| of the images: {np.abs(p_out - s_out).max():.3g}')


if __name__ == '__main__':
  app.run(main)
