"""``python -m benchmarks.speed``: the flags, and the sections they select (see the package)."""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax

from benchmarks.speed import networks, sampling
from benchmarks.speed.models import Models
from benchmarks.speed.reference import Reference
from benchmarks.speed.report import Report, command_line, machine_info
from benchmarks.speed.timing import rss_mb

FLAGS = flags.FLAGS
flags.DEFINE_list('sections', ['peak', 'denoiser', 'discriminator', 'samplers', 'memory', 'bf16'],
                  'What to measure.')
flags.DEFINE_list('batch_sizes', ['1', '8', '64'], 'Batch sizes of the denoiser timings.')
flags.DEFINE_list('disc_batch_sizes', ['1', '8'], 'Batch sizes of the discriminator timings.')
flags.DEFINE_list('samplers', ['edm', 'dg', 'diffrs', 'isir'], 'Samplers to time.')
flags.DEFINE_list('sampler_batch_sizes', ['1'], 'Batch sizes of the sampler timings.')
flags.DEFINE_list('reference_samplers', ['edm', 'dg', 'isir'],
                  'Samplers also timed in the reference (edm needs --reference_checkout, dg and '
                  'isir also --seed_checkout).')
flags.DEFINE_list('dtypes', ['float32'], 'Network compute dtypes of the sampler timings '
                  '(float32, bfloat16); the reference runs float32 only.')
flags.DEFINE_integer('sampler_steps', 18, 'Steps of EDM, DG and DiffRS (18 = 35 NFE).')
flags.DEFINE_integer('isir_steps', 2, 'Steps of ISIR (each costs 2 (N + (K-1)(N-1)) NFE).')
flags.DEFINE_integer('isir_candidates', 5, 'ISIR N.')
flags.DEFINE_integer('isir_iterations', 5, 'ISIR K.')
flags.DEFINE_float('isir_churn', 10., 'S_churn of the ISIR proposals (> 0: stochastic).')
flags.DEFINE_integer('candidate_chunk', None, 'ISIR candidates per network call (None: all).')
flags.DEFINE_list('memory_candidates', ['5', '20'], 'ISIR N values of the memory check.')
flags.DEFINE_integer('repeats', 3, 'Timed repetitions per measurement (median reported).')
flags.DEFINE_float('budget_s', 90., 'Stop repeating a measurement once one side has used this.')
flags.DEFINE_integer('matmul_size', 2048, 'Size of the square matmul timed as the peak.')
flags.DEFINE_bool('quick', False, 'Smaller batches and step counts (a few minutes).')
flags.DEFINE_bool('tiny', False, 'Tiny networks: exercises the code path only (tests, CPU).')
flags.DEFINE_string('reference_checkout', None, 'NVlabs/edm checkout: time its SongUNet too.')
flags.DEFINE_string('seed_checkout', None, 'ISIR_Diffusion checkout: time its discriminator, '
                    'DG and ISIR samplers too (needs --reference_checkout).')
flags.DEFINE_string('reference_python', sys.executable, 'Python with torch for the reference.')
flags.DEFINE_integer('threads', os.cpu_count(), 'torch threads (JAX uses every core).')
flags.DEFINE_string('output', 'benchmarks/results/speed.md', 'Markdown report ("" for none).')
flags.DEFINE_integer('seed', 0, 'Seed of the weights and inputs.')
flags.DEFINE_string('compilation_cache', None, 'Persistent XLA compilation cache directory '
                    '(a second run then skips compiling; "compile s" shows the cache hit).')

_QUICK = dict(batch_sizes=['1', '8'], disc_batch_sizes=['1', '4'], sampler_steps=6,
              memory_candidates=['5', '10'], repeats=3)


def main(argv):
  del argv
  if FLAGS.quick:
    for name, value in _QUICK.items():
      if not FLAGS[name].present:
        FLAGS[name].value = value
  if FLAGS.compilation_cache:
    jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache)
  start = time.time()
  report = Report(FLAGS.output)
  report.add('# Speed benchmark', '',
             f'Command: `{command_line(sys.argv[1:])}`', '',
             f'- run at {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start))}',
             *machine_info())
  models = Models(FLAGS.tiny, FLAGS.seed)
  count = lambda tree: sum(v.size for v in jax.tree_util.tree_leaves(tree)) / 1e6
  report.add(f'- random weights (re-drawn, docs/design.md "Fixtures and parity"): denoiser '
             f'{count(models.den_params):.2f}M params, discriminator (classifier + head) '
             f'{count(models.disc_params):.2f}M')
  with tempfile.TemporaryDirectory() as workdir:
    ref = None
    if FLAGS.reference_checkout:
      ref = Reference(FLAGS.reference_python, FLAGS.reference_checkout, FLAGS.seed_checkout,
                      FLAGS.threads, workdir)
      report.add(f'- reference: PyTorch {ref.info["torch"]} with {ref.info["threads"]} threads '
                 'in a worker process, repetitions interleaved with JAX')
    report.add('')
    sections = {'peak': lambda: networks.section_peak(report, ref),
                'denoiser': lambda: networks.section_denoiser(report, models, ref),
                'discriminator': lambda: networks.section_discriminator(report, models, ref),
                'samplers': lambda: sampling.section_samplers(report, models, ref),
                'memory': lambda: sampling.section_memory(report, models),
                'bf16': lambda: networks.section_bf16(report, models)}
    unknown = sorted(set(FLAGS.sections) - set(sections))
    if unknown:
      raise app.UsageError(f'--sections: unknown {unknown}; expected some of {sorted(sections)}')
    for name in FLAGS.sections:
      sections[name]()
    report.add('## Process memory', '', f'- JAX process peak RSS: {rss_mb():.0f} MB')
    if ref:
      report.add(f'- reference worker peak RSS: {ref.maxrss_mb:.0f} MB')
      ref.close()
  report.add(f'- load average at end: {os.getloadavg()[0]:.1f}; wall time '
             f'{(time.time() - start) / 60:.1f} min')


if __name__ == '__main__':
  app.run(main)
