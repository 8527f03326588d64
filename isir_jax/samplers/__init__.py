"""Jitted samplers over the `Denoiser` / `Discriminator` protocols: EDM, DG, DiffRS, ISIR.

    from isir_jax import samplers
    sample_fn = samplers.get_sampler('isir')(denoiser, discriminator, shape=(32, 32, 3),
                                             num_steps=18, S_churn=10, num_candidates=8)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(B))
    images, stats = jax.jit(sample_fn)(keys)

Every factory has the signature ``factory(denoiser, discriminator=None, *, shape, **settings)``
and returns ``sample_fn(keys, class_labels=None, latents=None) -> (images, stats)``.
"""

from typing import Callable

from isir_jax.samplers.edm import edm_sample, edm_sampler, edm_step, StepSettings

_REGISTRY = {
    'edm': 'isir_jax.samplers.edm:edm_sampler',
    'dg': 'isir_jax.samplers.dg:dg_sampler',
    'diffrs': 'isir_jax.samplers.diffrs:diffrs_sampler',
    'isir': 'isir_jax.samplers.isir:isir_sampler',
}


def get_sampler(name: str) -> Callable:
  """The factory of sampler ``name`` (one of 'edm', 'dg', 'diffrs', 'isir')."""
  if name not in _REGISTRY:
    raise ValueError(f'samplers: unknown sampler {name!r}; expected one of {sorted(_REGISTRY)}')
  import importlib
  module, attr = _REGISTRY[name].split(':')
  return getattr(importlib.import_module(module), attr)
