"""The bundled digits demo: sample with EDM and ISIR (DG, DiffRS), score FD-digits, print a table.

``python main.py --config=configs/digits.py --mode=demo`` loads the committed models
under ``isir_jax/assets/digits/``, draws ``config.demo.num_samples`` digits with each
method of ``config.demo.methods`` (``configs/digits.py:all`` for all four), writes one
PNG grid per method into the workdir and prints one row per method: FD-digits (Frechet distance of the
clean-digit classifier's features to those of the 1,797 real digits), denoiser
evaluations per sample, and the compile and sampling seconds.

With 64 samples FD-digits is a biased, noisy estimate; the ``data`` row (64 real
digits) shows its floor. ``python -m benchmarks.quality`` compares the methods
with enough samples and seeds to tell them apart.
"""

import dataclasses
import os
import time
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import PIL.Image

from isir_jax import io
from isir_jax import samplers
from isir_jax.train import digits_data
from isir_jax.train import feature_net as feature_net_lib

# Settings the demo consumes itself; the rest of a method's section goes to the sampler.
_DEMO_KEYS = ('name',)
_PNG_SCALE = 4   # nearest-neighbour upscaling of the 8x8 digits in the PNG grids


@dataclasses.dataclass
class Result:
  """One method's run: images and the numbers of the table."""
  method: str
  images: np.ndarray
  fd: float
  nfe: float
  compile_s: float
  sample_s: float
  stats: dict


def sample_keys(seed: int, start: int, count: int) -> jax.Array:
  """Per-sample keys ``fold_in(key(seed), i)`` for ``i = start .. start + count - 1``."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


def class_labels(label_dim: int, start: int, count: int) -> Optional[np.ndarray]:
  """Cyclic one-hot labels ``i % label_dim`` for a conditional model, else None."""
  if not label_dim:
    return None
  return np.eye(label_dim, dtype=np.float32)[np.arange(start, start + count) % label_dim]


def method_settings(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Sampler settings of a demo method; DiffRS gets ``config.demo.diffrs_thresholds``."""
  settings = ml_collections.ConfigDict(config.demo.samplers[method].to_dict())
  if settings.name == 'diffrs':
    settings.thresholds = config.demo.diffrs_thresholds
  return settings


def build_sampler(settings: ml_collections.ConfigDict, denoiser, discriminator) -> Any:
  """The jitted ``sample_fn(keys, class_labels)`` of one method's sampler settings."""
  rest = {k: v for k, v in settings.items() if k not in _DEMO_KEYS}
  rest = {k: tuple(v) if isinstance(v, list) else v for k, v in rest.items()}
  shape = (denoiser.img_resolution, denoiser.img_resolution, denoiser.img_channels)
  disc = discriminator if settings.name != 'edm' else None
  fn = samplers.get_sampler(settings.name)(denoiser, disc, shape=shape, **rest)
  return jax.jit(lambda keys, labels: fn(keys, labels))


def compile_sampler(settings: ml_collections.ConfigDict, denoiser, discriminator,
                    batch: int) -> tuple[Any, float]:
  """Ahead-of-time compiled sampler for batches of ``batch`` and the seconds it took."""
  fn = build_sampler(settings, denoiser, discriminator)
  label_dim = int(getattr(denoiser, 'label_dim', 0) or 0)
  t0 = time.perf_counter()
  compiled = fn.lower(sample_keys(0, 0, batch), class_labels(label_dim, 0, batch)).compile()
  return compiled, time.perf_counter() - t0


def draw(compiled, label_dim: int, seed: int, num_samples: int, batch: int
         ) -> tuple[np.ndarray, dict, float]:
  """Samples ``num_samples`` images (sample i from ``fold_in(key(seed), i)``) in batches.

  Returns:
    ``(images, per-sample stats, seconds)``; raises on non-finite samples.
  """
  images, stats = [], []
  t0 = time.perf_counter()
  for start in range(0, num_samples, batch):
    count = min(batch, num_samples - start)
    x, st = compiled(sample_keys(seed, start, batch), class_labels(label_dim, start, batch))
    images.append(np.asarray(x)[:count])
    stats.append({k: np.asarray(v)[:count] for k, v in st.items()})
  seconds = time.perf_counter() - t0
  images = np.concatenate(images)
  stats = {k: np.concatenate([s[k] for s in stats]) for k in stats[0]}
  finite = np.isfinite(images).reshape(len(images), -1).all(axis=1)
  if not finite.all():
    raise FloatingPointError(f'seed {seed}: {int((~finite).sum())} non-finite samples at '
                             f'indices {np.flatnonzero(~finite)[:20].tolist()}')
  return images, stats, seconds


def run_method(method: str, settings: ml_collections.ConfigDict, denoiser, discriminator,
               net: feature_net_lib.FeatureNet, ref_stats: str, num_samples: int,
               seed: int) -> Result:
  """Samples ``num_samples`` images with one method (one batch) and scores them."""
  compiled, compile_s = compile_sampler(settings, denoiser, discriminator, num_samples)
  label_dim = int(getattr(denoiser, 'label_dim', 0) or 0)
  images, stats, sample_s = draw(compiled, label_dim, seed, num_samples, num_samples)
  fd = feature_net_lib.fd_digits(net, images, ref_stats)
  return Result(method, images, fd, float(stats['nfe'].mean()), compile_s, sample_s, stats)


def save_grid(path: str, images: np.ndarray, scale: int = _PNG_SCALE) -> None:
  """Writes EDM-scale images as one PNG grid, upscaled ``scale`` times (nearest)."""
  grid = io.image_grid(io.to_uint8(images))
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  img = PIL.Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                         PIL.Image.NEAREST)
  io.atomic_write(path, lambda f: img.save(f, format='PNG'))


def format_table(rows: list[Result], data_fd: float, num_samples: int) -> str:
  """The demo's table as aligned text."""
  lines = [f'{"method":<18} {"FD-digits":>9} {"NFE/sample":>10} {"compile s":>9} '
           f'{"sample s":>8}  extra',
           f'{"data (real)":<18} {data_fd:>9.2f} {0:>10} {"-":>9} {"-":>8}  '
           f'{num_samples} random real digits: the floor (and noise) of FD-digits at this count']
  for r in rows:
    extra = []
    if 'ess' in r.stats:
      extra.append(f'ESS {float(np.mean(r.stats["ess"])):.2f}')
    if 'accept_rate' in r.stats:
      extra.append(f'accept {float(np.mean(r.stats["accept_rate"])):.2f}')
    lines.append(f'{r.method:<18} {r.fd:>9.2f} {r.nfe:>10.1f} {r.compile_s:>9.1f} '
                 f'{r.sample_s:>8.1f}  {", ".join(extra)}')
  return '\n'.join(lines)


def load_models(config: ml_collections.ConfigDict):
  """(denoiser, discriminator, feature net) of the demo config."""
  from isir_jax import denoiser as denoiser_lib  # pylint: disable=g-import-not-at-top
  from isir_jax import discriminator as disc_lib  # pylint: disable=g-import-not-at-top
  for key in ('denoiser', 'discriminator'):
    path = getattr(config.model, key)
    if not os.path.isfile(os.path.join(path, 'config.json')):
      raise FileNotFoundError(f'config.model.{key}={path}: no trained model there; train it '
                              f'with main.py --config=configs/digits.py --mode=train_{key}')
  return (denoiser_lib.load_denoiser(config.model.denoiser),
          disc_lib.load_discriminator(config.model.discriminator),
          feature_net_lib.load_feature_net(config.demo.feature_net))


def data_fd(config: ml_collections.ConfigDict, net, num_samples: int) -> float:
  """FD-digits of ``num_samples`` random real digits (the floor of the estimate)."""
  images, _ = digits_data.load_digits(config.data.path)
  idx = np.random.default_rng(config.seed).choice(len(images), num_samples, replace=False)
  return feature_net_lib.fd_digits(net, images[idx], config.demo.ref_stats)


def demo(config: ml_collections.ConfigDict, workdir: str) -> list[Result]:
  """Runs every method of ``config.demo.methods``; writes PNG grids and prints the table."""
  if config.demo.xla_cache:
    # A rerun of the demo loads its compiled samplers instead of compiling them again.
    jax.config.update('jax_compilation_cache_dir', config.demo.xla_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  denoiser, discriminator, net = load_models(config)
  os.makedirs(workdir, exist_ok=True)
  n = config.demo.num_samples
  rows = []
  for method in config.demo.methods:
    logging.info('demo: sampling %d digits with %s', n, method)
    r = run_method(method, method_settings(config, method), denoiser, discriminator, net,
                   config.demo.ref_stats, n, config.seed)
    save_grid(os.path.join(workdir, f'digits_{method}.png'), r.images)
    rows.append(r)
  table = format_table(rows, data_fd(config, net, n), n)
  print(table)
  print(f'PNG grids: {os.path.join(workdir, "digits_<method>.png")}')
  with open(os.path.join(workdir, 'demo_table.txt'), 'w') as f:
    f.write(table + '\n')
  return rows


def diffrs_thresholds(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Estimates the demo's DiffRS thresholds from an EDM warm-up and writes them.

  ``config.demo.warmup_samples`` plain samples (keys from ``seed + 1``, disjoint from
  the demo's) record the log ratio at every level; the ``config.demo.rej_percentile``
  quantiles become the thresholds, saved to ``config.demo.diffrs_thresholds``.
  """
  del workdir  # the thresholds are an asset of the config
  from isir_jax.samplers import diffrs  # pylint: disable=g-import-not-at-top
  denoiser, discriminator, _ = load_models(config)
  settings = config.demo.samplers.diffrs
  step = {k: settings[k] for k in ('num_steps', 'sigma_min', 'sigma_max', 'rho')}
  shape = (denoiser.img_resolution, denoiser.img_resolution, denoiser.img_channels)
  n = config.demo.warmup_samples
  labels = class_labels(int(getattr(denoiser, 'label_dim', 0) or 0), 0, n)
  thresholds, log_ratios = diffrs.estimate_thresholds(
      denoiser, discriminator, sample_keys(config.seed + 1, 0, n), labels, shape=shape,
      rej_percentile=config.demo.rej_percentile, **step)
  diffrs.save_thresholds(config.demo.diffrs_thresholds, thresholds, log_ratios)
  logging.info('DiffRS thresholds from %d warm-up samples: M %s, M2 %s', n,
               np.round(thresholds.log_ratio, 2).tolist(),
               np.round(thresholds.increment, 2).tolist())
