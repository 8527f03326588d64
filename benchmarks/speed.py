"""Speed and memory of the networks and samplers on the published CIFAR-10 configurations.

Random (re-drawn) weights in the published architectures: the EDM cifar10 DDPM++ VP
denoiser (SongUNet, 56M parameters) and DG's discriminator (the ADM 32x32 classifier as a
frozen feature extractor plus the depth-2 head). Writes ``benchmarks/results/speed.md``:

    python -m benchmarks.speed                      # JAX only
    python -m benchmarks.speed --quick              # smaller batches and step counts
    python -m benchmarks.speed --reference_checkout=PATH/edm --seed_checkout=PATH/ISIR_Diffusion
        [--reference_python=PATH/venv/bin/python]   # + PyTorch reference, side by side

With a reference checkout, every PyTorch timing runs in a worker process
(`benchmarks/reference_worker.py`, torch + numpy only, by default in this interpreter) and the
repetitions are interleaved with the JAX ones (JAX, torch, JAX, torch, ...) on the same
inputs; the tables report medians, so a busy machine affects both sides alike.

Timed: the jitted, AOT-compiled JAX functions (compile time excluded and reported apart);
FLOPs from XLA's cost analysis of the compiled network; the matmul peak is a large
``jnp.dot`` timed in the same interleaved rounds. Samplers are timed at the step counts of
the flags (ISIR at K=5, N=5 is 2 (N + (K-1)(N-1)) = 42 NFE per step, so it uses few steps).
"""

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_convert import dg as dg_convert
from isir_jax import discriminator as dg_lib
from isir_jax import samplers
from isir_jax.denoiser import Denoiser
from isir_jax.networks import precond
from isir_jax.samplers import isir

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

Array = jax.Array
MB = 2 ** 20
_QUICK = dict(batch_sizes=['1', '8'], disc_batch_sizes=['1', '4'], sampler_steps=6,
              memory_candidates=['5', '10'], repeats=3)


# --- Models: the published architectures with re-drawn random weights. ----------------------

def denoiser_config(tiny: bool) -> dict:
  """EDM's cifar10 DDPM++ VP network (train.py --arch=ddpmpp --precond=vp); tiny: 3 blocks."""
  unet = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=0,
              model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
              dropout=0.13, embedding_type='positional', channel_mult_noise=1,
              encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
  if tiny:
    unet.update(model_channels=16, channel_mult=[1, 2], num_blocks=1)
  return {'class_name': 'VPPrecond', 'kwargs': dict(img_resolution=32, img_channels=3,
                                                    label_dim=0),
          'model': {'class_name': 'SongUNet', 'kwargs': unet}}


def reference_kwargs(config: dict) -> dict:
  """The same network as EDM's ``VPPrecond(**kwargs)``."""
  unet = {k: v for k, v in config['model']['kwargs'].items()
          if k not in ('img_resolution', 'in_channels', 'out_channels', 'label_dim')}
  return dict(config['kwargs'], model_type='SongUNet', **unet)


def discriminator_arch(tiny: bool) -> dg_convert.Arch:
  """DG's unconditional cifar10 discriminator (classifier_lib: ADM 32x32 + depth-2 head)."""
  if tiny:
    return dg_convert.Arch(classifier_width=32, classifier_depth=1, disc_width=32, disc_depth=1,
                           num_head_channels=16)
  return dg_convert.Arch()


def random_params(abstract: Any, seed: int) -> Any:
  """Random weights of the given shapes, as in the fixtures (DESIGN.md s.7).

  Default initialisations are nearly trivial (zeroed output layers), so every leaf is
  re-drawn: kernels N(0, 1/fan_in), normalisation scales 1 + 0.1 N(0, 1), other vectors
  0.1 N(0, 1). Drawn with numpy from ``jax.eval_shape`` leaves: no init is compiled.
  """
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for path, leaf in leaves:
    z = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) >= 2:
      z /= np.sqrt(np.prod(leaf.shape[:-1]))
    elif 'scale' in jax.tree_util.keystr(path):
      z = 1. + 0.1 * z
    else:
      z = 0.1 * z
    out.append(jnp.asarray(z))
  return jax.tree_util.tree_unflatten(treedef, out)


class Models:
  """The two networks' configs and float32 params (built on first use), per compute dtype."""

  def __init__(self, tiny: bool, seed: int):
    self.config, self.arch = denoiser_config(tiny), discriminator_arch(tiny)
    self.seed = seed
    self._den_params = self._disc_params = None
    self._disc = self.arch.discriminator()   # abstract: modules and settings, no params

  @property
  def den_params(self) -> Any:
    if self._den_params is None:
      module = precond.build_precond(self.config)
      abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros([1, 32, 32, 3]),
                                jnp.ones([1]))
      self._den_params = random_params(abstract, self.seed)
    return self._den_params

  @property
  def disc_params(self) -> Any:
    if self._disc_params is None:
      abstract = dg_lib.init_params(self._disc.encoder, self._disc.head, jax.random.key(0),
                                    abstract=True)
      self._disc_params = random_params(abstract, self.seed + 1)
    return self._disc_params

  def denoiser(self, dtype=jnp.float32) -> Denoiser:
    return Denoiser.from_module(precond.build_precond(self.config, dtype=dtype), self.den_params)

  def discriminator(self, dtype=jnp.float32) -> dg_lib.DGDiscriminator:
    return dg_lib.DGDiscriminator.from_config(self.disc_params, self._disc.to_config(), dtype)


# --- Timing. ------------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def interleave(runs: dict[str, Callable[[], float]], repeats: int, budget_s: float
               ) -> dict[str, list[float]]:
  """Runs each timing function in turn (A, B, A, B, ...); each returns its seconds.

  A side stops repeating once its timings add up to ``budget_s`` (it always runs once).
  """
  times = {name: [] for name in runs}
  for r in range(repeats):
    for name, run in runs.items():
      if r == 0 or sum(times[name]) < budget_s:
        times[name].append(run())
  return times


def med(xs: list[float]) -> float:
  return statistics.median(xs) if xs else float('nan')


@dataclasses.dataclass
class Compiled:
  """An AOT-compiled JAX function with its compile time, FLOPs and memory."""
  fn: Callable
  compile_s: float
  flops: float
  temp_mb: float
  arg_mb: float


def compile_fn(fn: Callable, *args) -> Compiled:
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return Compiled(lambda: compiled(*args), compile_s, float((cost or {}).get('flops', 0.)),
                  mem.temp_size_in_bytes / MB, mem.argument_size_in_bytes / MB)


def rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.


# --- The PyTorch reference, in a worker process. --------------------------------------------

class Reference:
  """Client of `benchmarks/reference_worker.py`: one JSON request and reply per line."""

  def __init__(self, python: str, edm_checkout: str, seed_checkout: Optional[str],
               threads: int, workdir: str):
    self.workdir = workdir
    self.has_seed = bool(seed_checkout)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'reference_worker.py')
    cmd = [python, worker, f'--edm_checkout={edm_checkout}', f'--threads={threads}']
    if seed_checkout:
      cmd.append(f'--seed_checkout={seed_checkout}')
    self.log_path = os.path.join(workdir, 'reference_worker.log')
    self.log = open(self.log_path, 'w')
    # Passive OpenMP waiting: idle torch threads must not spin while JAX runs.
    env = dict(os.environ, OMP_WAIT_POLICY='PASSIVE')
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, env=env)
    self.info = self.request('info')

  def request(self, op: str, **kwargs) -> dict:
    self.proc.stdin.write(json.dumps(dict(kwargs, op=op)) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      self.log.flush()
      with open(self.log_path) as f:
        tail = f.read()[-2000:]
      raise RuntimeError(f'reference worker exited (--reference_python='
                         f'{FLAGS.reference_python}); its log ends:\n{tail}')
    reply = json.loads(line)
    if 'error' in reply:
      raise RuntimeError(f'reference worker, op {op!r}: {reply["error"]}')
    self.maxrss_mb = reply.get('maxrss_mb', float('nan'))
    return reply

  def array(self, name: str, value) -> str:
    path = os.path.join(self.workdir, f'{name}.npy')
    np.save(path, np.asarray(value))
    return path

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)
    self.log.close()


# --- Report. --------------------------------------------------------------------------------

class Report:
  """Markdown lines, echoed to stdout and rewritten to ``path`` as they come.

  Rows are written as soon as they are measured, so a run stopped early (e.g. by the time
  limit of gpu_check.sh) keeps every complete measurement.
  """

  def __init__(self, path: str):
    self.path = path
    self.lines = []

  def add(self, *lines: str):
    for line in lines:
      print(line, flush=True)
      self.lines.append(line)
    if self.path:
      os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
      with open(self.path, 'w') as f:
        f.write('\n'.join(self.lines) + '\n')

  def table(self, header: list[str]) -> Callable[..., None]:
    """Starts a table; returns ``row(*values)``, which adds one row."""
    self.add('| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header))

    def fmt(v):
      if isinstance(v, float):
        return f'{v:.3g}' if abs(v) < 1000 else f'{v:.0f}'
      return str(v)
    return lambda *values: self.add('| ' + ' | '.join(fmt(v) for v in values) + ' |')


def ratio(a: float, b: float) -> float:
  return a / b if b and np.isfinite(b) else float('nan')


# --- Sections. ------------------------------------------------------------------------------

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


def reps(t: dict) -> str:
  return '/'.join(str(len(v)) for v in t.values())


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
  from isir_jax.samplers import diffrs  # pylint: disable=import-outside-toplevel
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
  settings = {}
  for name in FLAGS.samplers:
    try:
      settings[name] = sampler_settings(name)
    except ImportError as e:
      report.add(f'{name}: not available ({e}); not timed.', '')
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


def machine_info() -> list[str]:
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return [f'- machine: {cpu}, {os.cpu_count()} cores; JAX {jax.__version__} on '
          f'{jax.default_backend()} ({jax.devices()[0].device_kind})',
          f'- load average at start: {os.getloadavg()[0]:.1f}']


# Path-valued flags are shown as placeholders in the report (no machine paths in results).
_PLACEHOLDERS = {'reference_checkout': '$EDM_CHECKOUT', 'seed_checkout': '$SEED_CHECKOUT',
                 'reference_python': '$TORCH_PYTHON', 'compilation_cache': '$CACHE_DIR'}


def command_line(args: list[str]) -> str:
  """The command that ran, with the values of path flags replaced by placeholders."""
  out = []
  for arg in args:
    name = arg.lstrip('-').split('=', 1)[0]
    out.append(f'--{name}={_PLACEHOLDERS[name]}' if name in _PLACEHOLDERS and '=' in arg
               else arg)
  return ' '.join(['python -m benchmarks.speed'] + out)


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
  report.add(f'- random weights (re-drawn, DESIGN.md s.7): denoiser {count(models.den_params):.2f}M '
             f'params, discriminator (classifier + head) {count(models.disc_params):.2f}M')
  with tempfile.TemporaryDirectory() as workdir:
    ref = None
    if FLAGS.reference_checkout:
      ref = Reference(FLAGS.reference_python, FLAGS.reference_checkout, FLAGS.seed_checkout,
                      FLAGS.threads, workdir)
      report.add(f'- reference: PyTorch {ref.info["torch"]} with {ref.info["threads"]} threads '
                 'in a worker process, repetitions interleaved with JAX')
    report.add('')
    sections = {'peak': lambda: section_peak(report, ref),
                'denoiser': lambda: section_denoiser(report, models, ref),
                'discriminator': lambda: section_discriminator(report, models, ref),
                'samplers': lambda: section_samplers(report, models, ref),
                'memory': lambda: section_memory(report, models),
                'bf16': lambda: section_bf16(report, models)}
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
