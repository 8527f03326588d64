"""Sections on the networks: the matmul peak, the denoiser, the discriminator, bfloat16."""

import dataclasses
from typing import Callable, Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.speed.models import Models, reference_kwargs
from benchmarks.speed.reference import Reference
from benchmarks.speed.report import Report, ratio, reps
from benchmarks.speed.sampling import compile_sampler
from benchmarks.speed.timing import compile_fn, interleave, med, timed

FLAGS = flags.FLAGS
Array = jax.Array


def random_inputs(batch: int, key: Array, sigma_min: float = 0.002
                  ) -> tuple[Array, Array]:
  """Noisy images x = y + sigma n (y ~ U[-1, 1]) at log-uniform sigmas in [sigma_min, 80]."""
  k1, k2, k3 = jax.random.split(key, 3)
  sigma = jnp.exp(jax.random.uniform(k1, [batch], minval=np.log(sigma_min),
                                     maxval=np.log(80.)))
  y = jax.random.uniform(k2, [batch, 32, 32, 3], minval=-1., maxval=1.)
  return y + sigma[:, None, None, None] * jax.random.normal(k3, y.shape), sigma


def matmul_run(size: int) -> tuple[Callable[[], float], float]:
  """A timing function of a ``size``^2 float32 ``jnp.dot`` and its FLOPs."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size), np.float32))
  c = compile_fn(jnp.dot, a, a)
  return (lambda: timed(c.fn)), 2. * size ** 3


def section_peak(report: Report, ref: Optional[Reference]):
  run, flops = matmul_run(FLAGS.matmul_size)
  runs = {'jnp.dot': run}
  if ref:
    runs['torch @'] = lambda: ref.request('matmul', size=FLAGS.matmul_size)['seconds']
  report.add(f'## Matmul peak ({FLAGS.matmul_size}x{FLAGS.matmul_size} float32)', '')
  row = report.table(['', 'GFLOP/s (median)', 'best', 'reps'])
  for name, t in interleave(runs, max(FLAGS.repeats, 5), FLAGS.budget_s).items():
    row(name, flops / med(t) / 1e9, flops / min(t) / 1e9, len(t))
  report.add('')


def section_denoiser(report: Report, models: Models, ref: Optional[Reference]):
  den = models.denoiser()
  report.add('## Denoiser D(x; sigma) (cifar10 DDPM++ VP, float32)', '',
             'Each round runs JAX, the reference (if any) and the '
             f'{FLAGS.matmul_size}^2 `jnp.dot` once; medians over rounds. "of peak" is the '
             'JAX FLOP rate (XLA cost analysis FLOPs / median time) over the matmul median of '
             'the same rounds. Reps: JAX/matmul[/torch].', '')
  mm_run, mm_flops = matmul_run(FLAGS.matmul_size)
  row = report.table(['batch', 'JAX img/s', 'torch img/s', 'speed-up', 'GFLOP/img (XLA)',
                      'JAX GFLOP/s', 'matmul GFLOP/s', 'of peak', 'XLA temp MB', 'compile s',
                      'reps'])
  for b in map(int, FLAGS.batch_sizes):
    x, sigma = random_inputs(b, jax.random.key(FLAGS.seed + b))
    c = compile_fn(lambda p, x, s: den.module.apply(p, x, s), den.params, x, sigma)
    runs = {'jax': lambda c=c: timed(c.fn), 'matmul': mm_run}
    if ref:
      req = dict(kwargs=reference_kwargs(models.config), x=ref.array('x', x),
                 sigma=ref.array('sigma', sigma))
      runs['torch'] = lambda req=req: ref.request('denoiser', **req)['seconds']
    t = interleave(runs, FLAGS.repeats, FLAGS.budget_s)
    jax_s, torch_s = med(t['jax']), med(t.get('torch', []))
    gflops, mm = c.flops / jax_s / 1e9, mm_flops / med(t['matmul']) / 1e9
    row(b, b / jax_s, b / torch_s, ratio(torch_s, jax_s), c.flops / b / 1e9, gflops, mm,
        gflops / mm, c.temp_mb, c.compile_s, reps(t))
  report.add('')


def section_discriminator(report: Report, models: Models, ref: Optional[Reference]):
  disc = models.discriminator()
  report.add('## Discriminator (ADM 32x32 classifier features + DG head, float32)', '',
             '`log_ratio`: one forward pass (ISIR, DiffRS); `guidance`: forward and backward '
             '(DG). The reference is the seed\'s `classifier_lib.get_grad_log_ratio` '
             '(log_only / log=True). Reps: JAX[/torch].', '')
  row = report.table(['batch', 'call', 'JAX img/s', 'torch img/s', 'speed-up',
                      'GFLOP/img (XLA)', 'JAX GFLOP/s', 'XLA temp MB', 'compile s', 'reps'])
  for b in map(int, FLAGS.disc_batch_sizes):
    # sigma >= 0.05 keeps every VP time in DG's window [0.01, 1]: the reference skips the
    # whole batch's gradient when one sample is outside it.
    x, sigma = random_inputs(b, jax.random.key(FLAGS.seed + 100 + b), sigma_min=0.05)
    for kind in ('log_ratio', 'guidance'):
      c = compile_fn(lambda d, x, s, kind=kind: getattr(d, kind)(x, s), disc, x, sigma)
      runs = {'jax': lambda c=c: timed(c.fn)}
      if ref and ref.has_seed and not FLAGS.tiny:
        req = dict(arch=dataclasses.asdict(models.arch), x=ref.array('x', x),
                   sigma=ref.array('sigma', sigma), grad=kind == 'guidance')
        runs['torch'] = lambda req=req: ref.request('discriminator', **req)['seconds']
      t = interleave(runs, FLAGS.repeats, FLAGS.budget_s)
      jax_s, torch_s = med(t['jax']), med(t.get('torch', []))
      row(b, kind, b / jax_s, b / torch_s, ratio(torch_s, jax_s), c.flops / b / 1e9,
          c.flops / jax_s / 1e9, c.temp_mb, c.compile_s, reps(t))
  report.add('')


def max_rel_dev(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def section_bf16(report: Report, models: Models):
  b = 8
  x, sigma = random_inputs(b, jax.random.key(FLAGS.seed + 11))
  steps = min(FLAGS.sampler_steps, 6)
  report.add('## bfloat16 network compute: effect on outputs (same weights and inputs)', '',
             'max |out_bf16 - out_fp32| / max |out_fp32|. Convolutions, dense layers and '
             'attention run in bfloat16 with float32 params; normalisation, softmax, '
             'preconditioning and the sampler state stay float32. Speeds are for this CPU '
             '(bf16 pays off on GPU/TPU).', '')
  row = report.table(['output', 'max rel. deviation', 'fp32 img/s', 'bf16 img/s', 'reps'])
  fp32, bf16 = jnp.float32, jnp.bfloat16
  den = {d: models.denoiser(d) for d in (fp32, bf16)}
  comp = {d: compile_fn(lambda p, x, s, m=den[d].module: m.apply(p, x, s), den[d].params, x,
                        sigma) for d in (fp32, bf16)}
  dev = max_rel_dev(comp[bf16].fn(), comp[fp32].fn())
  t = interleave({d: lambda c=c: timed(c.fn) for d, c in comp.items()}, FLAGS.repeats,
                 FLAGS.budget_s)
  row(f'denoiser D(x; sigma), batch {b}', dev, b / med(t[fp32]), b / med(t[bf16]), reps(t))
  out = {d: jax.jit(lambda m, x, s: m.log_ratio(x, s))(models.discriminator(d), x, sigma)
         for d in (fp32, bf16)}
  row(f'discriminator log ratio, batch {b}', max_rel_dev(out[bf16], out[fp32]), '', '', '')
  out = {d: compile_sampler('edm', models, d, 2, dict(num_steps=steps)).fn()[0]
         for d in (fp32, bf16)}
  row(f'EDM sample, {steps} Heun steps, batch 2', max_rel_dev(out[bf16], out[fp32]), '', '',
      '')
  report.add('')
