"""Times the reference PyTorch code on request, for `benchmarks/speed.py` (torch + numpy only).

Runs in whatever Python has torch (``speed.py --reference_python``), imports the reference
checkouts given on the command line, and answers one JSON request per stdin line with one
JSON line on stdout, so that ``speed.py`` can interleave JAX and PyTorch repetitions
(A, B, A, B) on the same machine. Nothing here reimplements the reference: it builds the
reference modules and calls the reference sampler functions.

    python benchmarks/reference_worker.py --edm_checkout=PATH [--seed_checkout=PATH] --threads=2

Requests (arrays travel as ``.npy`` paths, images NHWC float32 as in isir_jax):
    {"op": "denoiser", "kwargs": {...SongUNet/VPPrecond kwargs...}, "x": p, "sigma": p}
    {"op": "discriminator", "arch": {...}, "x": p, "sigma": p, "grad": bool}
    {"op": "edm" | "dg", "latents": p, "num_steps": n, ...}
    {"op": "isir", "batch": B, "num_steps": n, "num_candidates": N, "num_iterations": K,
     "S_churn": c}
Every reply holds ``seconds`` (the timed call only) and ``maxrss_mb`` (process peak so far).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
import types

import numpy as np
import torch


def _load(name: str, path: str) -> types.ModuleType:
  """Imports the file ``path`` as module ``name`` (two checkouts both have a generate.py)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _passthrough(iterable, *args, **kwargs):
  del args, kwargs
  return iterable


def _unavailable(*args, **kwargs):
  del args, kwargs
  raise NotImplementedError('reference_worker: image writing is not available here')


def _stub_missing(name: str, **attributes) -> None:
  """Registers a stand-in for a missing (or broken) import the timed code does not need.

  The reference scripts import TensorFlow and torchvision for writing image files, and
  tqdm for progress bars; none of them is part of what is timed.
  """
  try:
    importlib.import_module(name)
  except Exception:  # pylint: disable=broad-except  (torchvision raises RuntimeError)
    parent, _, child = name.rpartition('.')
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    if parent:
      setattr(sys.modules[parent], child, module)


def _nchw(path: str) -> torch.Tensor:
  return torch.from_numpy(np.load(path)).permute(0, 3, 1, 2).contiguous()


def _maxrss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.


class Worker:
  """Holds the reference modules; builds each network once per configuration."""

  def __init__(self, edm_checkout: str, seed_checkout: str | None):
    sys.path.insert(0, edm_checkout)
    self.networks = importlib.import_module('training.networks')
    self.edm_generate = None
    self.edm_checkout = edm_checkout
    self.seed_checkout = seed_checkout
    self.seed = None
    self.cache = {}

  def _seed(self):
    """The seed's classifier_lib, generate (DG) and isir_code modules."""
    if self.seed is None:
      if not self.seed_checkout:
        raise RuntimeError('this request needs --seed_checkout (the ISIR_Diffusion checkout)')
      sys.path.append(self.seed_checkout)
      _stub_missing('tensorflow')
      _stub_missing('torchvision')
      _stub_missing('torchvision.utils', make_grid=_unavailable, save_image=_unavailable)
      _stub_missing('tqdm', tqdm=_passthrough)
      _stub_missing('tqdm.auto', tqdm=_passthrough)
      self.seed = types.SimpleNamespace(
          classifier_lib=importlib.import_module('classifier_lib'),
          dg=_load('seed_generate', os.path.join(self.seed_checkout, 'generate.py')),
          isir=_load('seed_isir_code', os.path.join(self.seed_checkout, 'isir_code.py')))
    return self.seed

  def denoiser(self, kwargs: dict):
    key = ('denoiser', json.dumps(kwargs, sort_keys=True))
    if key not in self.cache:
      net = self.networks.VPPrecond(**kwargs)
      self.cache[key] = net.eval().requires_grad_(False)
    return self.cache[key]

  def discriminator(self, arch: dict, enable_grad: bool):
    key = ('discriminator', json.dumps(arch, sort_keys=True), enable_grad)
    if key not in self.cache:
      lib = self._seed().classifier_lib
      # Random weights: no checkpoint paths (the reference then keeps its initialisation).
      self.cache[key] = lib.get_discriminator(
          None, None, arch.get('cond', False), arch['image_size'], 'cpu',
          enable_grad=enable_grad, depth=arch['disc_depth'])
    return self.cache[key]

  def handle(self, req: dict) -> dict:
    op = req['op']
    if op == 'denoiser':
      net = self.denoiser(req['kwargs'])
      x, sigma = _nchw(req['x']), torch.from_numpy(np.load(req['sigma']))
      with torch.no_grad():
        start = time.perf_counter()
        out = net(x, sigma)
        seconds = time.perf_counter() - start
      return {'seconds': seconds, 'out_abs_max': float(out.abs().max())}
    if op == 'discriminator':
      seed = self._seed()
      disc = self.discriminator(req['arch'], enable_grad=req['grad'])
      x, sigma = _nchw(req['x']).double(), torch.from_numpy(np.load(req['sigma'])).double()
      res = req['arch']['image_size']
      start = time.perf_counter()
      seed.classifier_lib.get_grad_log_ratio(
          disc, seed.classifier_lib.vpsde(), x, sigma, res, 0.01, 1.0, None,
          log=req['grad'], log_only=not req['grad'])
      return {'seconds': time.perf_counter() - start}
    if op == 'edm':
      if self.edm_generate is None:
        _stub_missing('tqdm', tqdm=_passthrough)
        self.edm_generate = _load('edm_generate', os.path.join(self.edm_checkout, 'generate.py'))
      net = self.denoiser(req['kwargs'])
      latents = _nchw(req['latents'])
      with torch.no_grad():
        start = time.perf_counter()
        self.edm_generate.edm_sampler(net, latents, num_steps=req['num_steps'])
        return {'seconds': time.perf_counter() - start}
    if op == 'dg':
      seed = self._seed()
      net = self.denoiser(req['kwargs'])
      disc = self.discriminator(req['arch'], enable_grad=True)
      latents = _nchw(req['latents'])
      with torch.no_grad():
        start = time.perf_counter()
        seed.dg.edm_sampler(False, 0.01, 1.0, seed.classifier_lib.vpsde(), 2.0, 0.0, disc, net,
                            latents, num_steps=req['num_steps'])
        return {'seconds': time.perf_counter() - start}
    if op == 'isir':
      seed = self._seed()
      net = self.denoiser(req['kwargs'])
      disc = self.discriminator(req['arch'], enable_grad=False)
      batch = req['batch']
      with torch.no_grad(), tempfile.TemporaryDirectory() as outdir:
        start = time.perf_counter()
        # One batch of `batch` samples; img_batch > batch, so the seed writes no image files.
        seed.isir.isir_sampler(
            img_batch=batch + 1, device='cpu', save_type='png', time_min=0.01, time_max=1.0,
            vpsde=seed.classifier_lib.vpsde(), discriminator=disc, net=net, labels=None,
            num_steps=req['num_steps'], S_churn=req['S_churn'], outdir=outdir, class_idx=None,
            batch_size=batch, num_samples=batch, cnt_inner_steps=req['num_iterations'],
            isir_batch=req['num_candidates'])
        return {'seconds': time.perf_counter() - start}
    if op == 'matmul':
      a = torch.ones(req['size'], req['size'])
      start = time.perf_counter()
      a @ a
      return {'seconds': time.perf_counter() - start}
    if op == 'info':
      return {'torch': torch.__version__, 'threads': torch.get_num_threads()}
    raise ValueError(f'reference_worker: unknown op {op!r}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--edm_checkout', required=True, help='NVlabs/edm checkout')
  parser.add_argument('--seed_checkout', default=None, help='ISIR_Diffusion checkout')
  parser.add_argument('--threads', type=int, required=True, help='torch intra-op threads')
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  # Replies go to the original stdout; anything the reference prints goes to stderr.
  replies = os.fdopen(os.dup(sys.stdout.fileno()), 'w', buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  worker = Worker(args.edm_checkout, args.seed_checkout)
  for line in sys.stdin:
    req = json.loads(line)
    try:
      with contextlib.redirect_stdout(sys.stderr):
        reply = worker.handle(req)
      reply['maxrss_mb'] = _maxrss_mb()
    except Exception as e:  # pylint: disable=broad-except
      reply = {'error': f'{type(e).__name__}: {e}'}
    replies.write(json.dumps(reply) + '\n')


if __name__ == '__main__':
  main()
