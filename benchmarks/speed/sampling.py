"""Sections on the samplers: their speed against the reference, and ISIR's memory against N."""

import dataclasses
from typing import Any, Optional

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.speed.models import Models, reference_kwargs
from benchmarks.speed.reference import Reference
from benchmarks.speed.report import Report, ratio, reps
from benchmarks.speed.timing import Compiled, compile_fn, interleave, med, timed
from isir_jax import samplers
from isir_jax.samplers import diffrs, isir

FLAGS = flags.FLAGS


_FROM_FLAG = object()


def sampler_settings(name: str, num_candidates: Optional[int] = None,
                     candidate_chunk: Any = _FROM_FLAG) -> dict:
  """The timed settings of a sampler (the reference scripts' defaults otherwise)."""
  if name == 'isir':
    chunk = FLAGS.candidate_chunk if candidate_chunk is _FROM_FLAG else candidate_chunk
    return dict(num_steps=FLAGS.isir_steps, S_churn=FLAGS.isir_churn,
                num_candidates=num_candidates or FLAGS.isir_candidates,
                num_iterations=FLAGS.isir_iterations, candidate_chunk=chunk)
  settings = dict(num_steps=FLAGS.sampler_steps)
  if name == 'dg':
    settings.update(dg_weight_1st_order=2., dg_weight_2nd_order=0.)
  if name == 'diffrs':
    settings.update(diffrs_thresholds(settings['num_steps']))
  return settings


def diffrs_thresholds(num_steps: int) -> dict:
  """Thresholds that accept every DiffRS test (random weights give no meaningful ones).

  This times DiffRS's floor: one discriminator call per step, no rejections (EDM's NFE).
  """
  low = np.full(num_steps + 1, -1e4, np.float32)
  return {'thresholds': diffrs.Thresholds(log_ratio=low, increment=low)}


def compile_sampler(name: str, models: Models, dtype, batch: int, settings: dict) -> Compiled:
  """Compiles ``get_sampler(name)`` with the models as arguments (not baked-in constants)."""
  factory = samplers.get_sampler(name)

  def sample(den, disc, keys):
    return factory(den, disc, shape=(32, 32, 3), **settings)(keys)

  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(FLAGS.seed), i))(jnp.arange(batch))
  return compile_fn(sample, models.denoiser(dtype), models.discriminator(dtype), keys)


def reference_request(name: str, models: Models, batch: int, settings: dict) -> dict:
  """The worker request that runs the reference's version of a timed sampler."""
  req = dict(kwargs=reference_kwargs(models.config), num_steps=settings['num_steps'])
  if name in ('dg', 'isir'):
    req.update(arch=dataclasses.asdict(models.arch))
  if name == 'isir':
    req.update(batch=batch, S_churn=settings['S_churn'],
               num_candidates=settings['num_candidates'],
               num_iterations=settings['num_iterations'])
  else:
    req.update(latents=jax.random.normal(jax.random.key(FLAGS.seed + 7), (batch, 32, 32, 3)))
  return req


def section_samplers(report: Report, models: Models, ref: Optional[Reference]):
  n, k = FLAGS.isir_candidates, FLAGS.isir_iterations
  report.add(
      '## Samplers', '',
      f'EDM: {FLAGS.sampler_steps} deterministic Heun steps. DG: the same with w1 = 2 (one '
      'discriminator gradient per step). DiffRS: thresholds that accept every test (its '
      f'cheapest case: one discriminator call per step). ISIR: K={k}, N={n}, '
      f'S_churn={FLAGS.isir_churn} (stochastic proposals, which ISIR needs), '
      f'{FLAGS.isir_steps} steps, candidate_chunk={FLAGS.candidate_chunk}; 2 (N + (K-1)(N-1)) '
      f'= {2 * (n + (k - 1) * (n - 1))} NFE per Heun step. References: EDM `generate.'
      'edm_sampler`, the seed\'s `generate.edm_sampler` (DG) and `isir_code.isir_sampler` '
      '(same K, N, S_churn and steps; it also makes N + (K-1) N + 1 discriminator calls per '
      'step where this port makes N + (K-1)(N-1), reusing the pick\'s weight), for the '
      f'samplers in --reference_samplers ({",".join(FLAGS.reference_samplers)}); DiffRS has '
      'no reference timing here. Reps: JAX[/torch].', '')
  row = report.table(['sampler', 'dtype', 'batch', 'steps', 'NFE/img', 'JAX img/s', 'JAX s/img',
                      'torch s/img', 'speed-up', 'JAX ms/NFE', 'XLA temp MB', 'compile s',
                      'reps'])
  settings = {name: sampler_settings(name) for name in FLAGS.samplers}
  # Batch outermost: a run cut short (gpu_check.sh's time limit) has every sampler once.
  for b in map(int, FLAGS.sampler_batch_sizes):
    for name, s in settings.items():
      for dtype_name in FLAGS.dtypes:
        c = compile_sampler(name, models, jnp.dtype(dtype_name), b, s)
        out = {}

        def call(c=c, out=out):
          out['last'] = c.fn()
          return out['last']
        runs = {'jax': lambda call=call: timed(call)}
        if (ref and dtype_name == 'float32' and not FLAGS.tiny
            and name in FLAGS.reference_samplers and (name == 'edm' or ref.has_seed)):
          req = reference_request(name, models, b, s)
          if 'latents' in req:
            req['latents'] = ref.array('latents', req['latents'])
          runs['torch'] = lambda name=name, req=req: ref.request(name, **req)['seconds']
        t = interleave(runs, FLAGS.repeats, FLAGS.budget_s)
        jax_s, torch_s = med(t['jax']), med(t.get('torch', []))
        nfe = float(np.mean(out['last'][1]['nfe']))
        row(name, dtype_name, b, s['num_steps'], nfe, b / jax_s, jax_s / b, torch_s / b,
            ratio(torch_s, jax_s), jax_s / b / nfe * 1e3, c.temp_mb, c.compile_s, reps(t))
  report.add('')


def section_memory(report: Report, models: Models):
  ns = sorted(map(int, FLAGS.memory_candidates))
  chunk = ns[0]
  b = int(FLAGS.sampler_batch_sizes[0])
  report.add('## ISIR memory against N', '',
             f'XLA buffer assignment of the compiled ISIR sampler (batch {b}, K='
             f'{FLAGS.isir_iterations}): temporaries and arguments, all N + (K-1)(N-1) proposals '
             f'of a step in one call or candidate_chunk={chunk} (a `lax.map` over chunks). '
             'Compiled, not run.', '')
  row = report.table(['N', 'proposals per call', 'XLA temp MB', 'arguments MB', 'compile s'])
  for n in ns:
    for ch in (None, chunk):
      if ch is None or ch < isir.num_proposals(n, FLAGS.isir_iterations):
        c = compile_sampler('isir', models, jnp.float32, b,
                            sampler_settings('isir', num_candidates=n, candidate_chunk=ch))
        row(n, ch or isir.num_proposals(n, FLAGS.isir_iterations), c.temp_mb, c.arg_mb,
            c.compile_s)
  report.add('')
