"""isir_jax: discriminator-corrected diffusion sampling (EDM, DG, DiffRS, ISIR) in JAX.

Public entry points are imported lazily, so that light modules of the package (the
numpy-only FID math, the converters' readers) import without pulling in JAX.
"""

import importlib

_LAZY = {
    'as_denoiser': 'isir_jax.adapters',
    'as_discriminator': 'isir_jax.adapters',
    'load_denoiser': 'isir_jax.denoiser',
    'load_discriminator': 'isir_jax.discriminator',
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  if name in ('adapters', 'fid', 'networks', 'pretrained', 'samplers', 'testbed'):
    return importlib.import_module(f'isir_jax.{name}')
  raise AttributeError(f'module isir_jax has no attribute {name!r}')
