"""The bundled digits demo: the correction made visible on a learned model with a known error.

``python main.py`` (``--config=configs/digits.py``, mode ``demo``) samples the digits-skew
denoiser, trained on digits whose classes 0-4 are 4x as frequent as 5-9, with every
method of ``config.demo.methods`` and prints one row per method: the class-frequency
error (total-variation distance of the sample's predicted class histogram to the real
one; plain EDM inherits about 0.3 from its training set) with its bootstrap standard
error, FD-digits when the sample is large enough for it to mean something, the cost
per sample, and the compile and sampling seconds. Each method writes a PNG grid of its
digits sorted by predicted class, so the eye sees the class balance change.

Every method draws through `isir_jax.sampling.Sampler`, the path of
``main.py --mode=sample``: same keys, labels, thresholds and checks.
``python -m benchmarks.quality`` compares the methods over seeds with confidence intervals.
"""

import dataclasses
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np

from isir_jax import io
from isir_jax import sampling
from isir_jax.train import digits_data
from isir_jax.train import feature_net as feature_net_lib

_BOOTSTRAP = 1000  # resamples behind the class-frequency error's standard error


@dataclasses.dataclass
class Result:
  """One method's run: images, predicted classes and the numbers of the table."""
  method: str
  images: np.ndarray
  classes: np.ndarray
  class_error: float
  class_error_se: float
  fd: float            # nan below config.demo.min_fd_samples
  stats: dict
  compile_s: float
  sample_s: float


def method_config(config: ml_collections.ConfigDict, method: str, *,
                  seed: int | None = None, batch_size: int | None = None
                  ) -> ml_collections.ConfigDict:
  """``config`` with ``config.sampler`` = the demo method's settings (DiffRS with the
  committed thresholds), the demo's sample count as batch, optionally another seed."""
  out = ml_collections.ConfigDict(config.to_dict())
  settings = ml_collections.ConfigDict(config.demo.samplers[method].to_dict())
  if settings.name == 'diffrs':
    settings.thresholds = config.demo.diffrs_thresholds
  out.sampler = settings
  out.name = f'{config.name}-{method}'
  out.sample.num_samples = config.demo.num_samples
  out.sample.batch_size = batch_size or config.demo.num_samples
  if seed is not None:
    out.seed = seed
  return out


def load_models(config: ml_collections.ConfigDict):
  """(denoiser, discriminator, feature net) of the demo config, with one-line errors."""
  return (*sampling.load_models(config, with_discriminator=True),
          feature_net_lib.load_feature_net(config.demo.feature_net))


def reference_frequencies(config: ml_collections.ConfigDict) -> np.ndarray:
  """Class frequencies of the real digits: the target of the class-frequency error."""
  return digits_data.class_frequencies(digits_data.load_digits(config.data.path)[1])


def class_error(classes: np.ndarray, reference: np.ndarray, seed: int = 0
                ) -> tuple[float, float]:
  """Class-frequency error of predicted classes and its bootstrap standard error."""
  err = digits_data.class_frequency_error(classes, reference)
  rng = np.random.default_rng(seed)
  boot = [digits_data.class_frequency_error(rng.choice(classes, len(classes)), reference)
          for _ in range(_BOOTSTRAP)]
  return err, float(np.std(boot, ddof=1))


def save_grid(path: str, images: np.ndarray, order: np.ndarray | None = None) -> None:
  """Writes EDM-scale images (in ``order``) as one upscaled PNG grid (`io.save_grid`)."""
  images = images if order is None else images[order]
  io.save_grid(path, io.to_uint8(images))


def run_method(config: ml_collections.ConfigDict, method: str, models, net, reference,
               workdir: str) -> Result:
  """Samples the demo's digits with one method through the driver's `Sampler`; scores them."""
  cfg = method_config(config, method)
  sampler = sampling.Sampler(cfg, models, workdir)
  compile_s = sampler.compile()
  t0 = time.perf_counter()
  images, stats, _ = sampler.draw(0, cfg.sample.num_samples, progress=f'sampling {method}')
  sample_s = time.perf_counter() - t0
  return score(config, method, images, net, reference, stats, compile_s, sample_s)


def score(config: ml_collections.ConfigDict, method: str, images: np.ndarray, net, reference,
          stats: dict, compile_s: float = 0.0, sample_s: float = 0.0) -> Result:
  """Predicted classes, class-frequency error +- SE and (from enough samples) FD-digits."""
  classes = net.predict(images)
  err, se = class_error(classes, reference, config.seed)
  fd = (feature_net_lib.fd_digits(net, images, config.demo.ref_stats)
        if len(images) >= config.demo.min_fd_samples else float('nan'))
  return Result(method, images, classes, err, se, fd, stats, compile_s, sample_s)


def format_table(rows: list[Result], data_row: Result, num_samples: int) -> str:
  """The demo's table as aligned text."""
  show_fd = not np.isnan(data_row.fd)
  head = (f'{"method":<18} {"class-freq error":>17} {"classes 0-4":>11}' +
          (f' {"FD-digits":>9}' if show_fd else ''))
  lines = [head + f' {"sample s":>8} {"compile s":>9}  cost per sample, stats']
  for r in [data_row] + rows:
    line = (f'{r.method:<18} {r.class_error:>8.3f} ± {r.class_error_se:.3f} '
            f'{np.mean(r.classes < 5):>11.0%}')
    if show_fd:
      line += f' {r.fd:>9.2f}'
    line += (f' {r.sample_s:>8.1f} {r.compile_s:>9.1f}  {sampling.format_stats(r.stats)}'
             if r.stats else f' {"-":>8} {"-":>9}  real digits (classifier error only)')
    lines.append(line)
  lines.append(f'{num_samples} samples per method (same keys); class-frequency error = total '
               'variation between predicted class histogram and the real digits\' (± bootstrap '
               'SE); classes 0-4 = share of digits predicted 0-4 (classes by the clean-digit '
               'classifier).')
  if not show_fd:
    lines.append('FD-digits is left out: at this sample count its bias and noise exceed the '
                 'differences between methods (python -m benchmarks.quality measures it).')
  return '\n'.join(lines)


def data_result(config: ml_collections.ConfigDict, net, reference, num_samples: int) -> Result:
  """The real digits scored like a method: the floor of both metrics at this count."""
  images, _ = digits_data.load_digits(config.data.path)
  idx = np.random.default_rng(config.seed).choice(len(images), min(num_samples, len(images)),
                                                  replace=False)
  return score(config, 'data (real)', images[idx], net, reference, {})


def demo(config: ml_collections.ConfigDict, workdir: str) -> list[Result]:
  """Runs every method of ``config.demo.methods``; writes PNG grids and prints the table."""
  if config.demo.xla_cache:
    # A rerun of the demo loads its compiled samplers instead of compiling them again.
    jax.config.update('jax_compilation_cache_dir', config.demo.xla_cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  denoiser, discriminator, net = load_models(config)
  reference = reference_frequencies(config)
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for method in config.demo.methods:
    r = run_method(config, method, (denoiser, discriminator), net, reference, workdir)
    order = np.argsort(r.classes[:config.demo.grid_samples], kind='stable')
    save_grid(os.path.join(workdir, f'digits_{method}.png'),
              r.images[:config.demo.grid_samples], order)
    rows.append(r)
  table = format_table(rows, data_result(config, net, reference, config.demo.num_samples),
                       config.demo.num_samples)
  print(table)
  print(f'PNG grids (sorted by predicted class): {os.path.join(workdir, "digits_<method>.png")}')
  io.atomic_write(os.path.join(workdir, 'demo_table.txt'), lambda f: f.write(table.encode()))
  return rows


def diffrs_thresholds(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Estimates the demo model's DiffRS thresholds with the driver's warm-up and writes them
  to ``config.demo.diffrs_thresholds`` (``config.demo.warmup_samples`` EDM samples, the
  ``config.demo.rej_percentile`` quantiles)."""
  cfg = method_config(config, 'diffrs')
  cfg.sampler.thresholds = ''
  cfg.sampler.rej_percentile = config.demo.rej_percentile
  cfg.sampler.warmup_samples = config.demo.warmup_samples
  cfg.sample.batch_size = min(config.demo.warmup_samples, 1000)
  del workdir  # the thresholds are an asset of the config
  denoiser, discriminator = sampling.load_models(cfg)
  thresholds, log_ratios = sampling.warmup_thresholds(cfg, denoiser, discriminator)
  io.save_thresholds(config.demo.diffrs_thresholds, thresholds, log_ratios)
  logging.info('DiffRS thresholds from %d warm-up samples: M %s, M2 %s',
               config.demo.warmup_samples, np.round(thresholds.log_ratio, 2).tolist(),
               np.round(thresholds.increment, 2).tolist())
