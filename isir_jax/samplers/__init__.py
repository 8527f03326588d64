"""Jitted samplers over the `Denoiser` / `Discriminator` protocols: EDM, DG, DiffRS, ISIR, SMC.

    from isir_jax import samplers, testbed
    tb = testbed.make_testbed('gmm2')
    sample_fn = samplers.get_sampler('isir')(tb.model_denoiser, tb.discriminator, shape=tb.shape,
                                             num_steps=18, S_churn=40, num_candidates=16,
                                             num_iterations=4)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(1000))
    images, stats = jax.jit(sample_fn)(keys)     # stats: nfe, ess, ess_initial

Every factory has the signature ``factory(denoiser, discriminator=None, *, shape, **settings)``
and returns the pure ``sample_fn(keys, class_labels=None, latents=None) -> (images, stats)``,
with one key per sample. Settings: `edm.StepSettings` (num_steps, sigma_min, sigma_max, rho,
noise_levels, solver, S_churn, S_min, S_max, S_noise, proposal, eta) plus each method's own
(see its factory). Stats hold the per-sample cost counts 'nfe', 'disc_evals', 'disc_grads'
(`edm.cost_stats`). The pure ``*_sample`` functions take the models as arguments; models are
checked against `isir_jax.types` (plain functions: `isir_jax.as_denoiser`,
`isir_jax.as_discriminator`), inputs and settings by `checks`.
"""

from typing import Callable

from isir_jax.samplers.diffrs import (Thresholds, diffrs_sample, diffrs_sampler,
                                      estimate_thresholds)
from isir_jax.samplers.dg import dg_sample, dg_sampler
from isir_jax.samplers.churn import edm_step
from isir_jax.samplers.edm import StepSettings, edm_sample, edm_sampler
from isir_jax.samplers.isir import (adaptive_schedule, isir_sample, isir_sample_schedule,
                                    isir_sampler)
from isir_jax.samplers.smc import smc_sample, smc_sampler

_REGISTRY = {
    'edm': edm_sampler,
    'dg': dg_sampler,
    'diffrs': diffrs_sampler,
    'isir': isir_sampler,
    'smc': smc_sampler,
}

__all__ = [
    'StepSettings', 'Thresholds', 'adaptive_schedule', 'dg_sample', 'dg_sampler',
    'diffrs_sample', 'diffrs_sampler', 'edm_sample', 'edm_sampler', 'edm_step',
    'estimate_thresholds', 'get_sampler', 'isir_sample', 'isir_sample_schedule', 'isir_sampler',
    'smc_sample', 'smc_sampler',
]


def get_sampler(name: str) -> Callable:
  """The factory of sampler ``name`` (one of 'edm', 'dg', 'diffrs', 'isir', 'smc')."""
  if name not in _REGISTRY:
    raise ValueError(f'samplers: unknown sampler {name!r}; expected one of {sorted(_REGISTRY)}')
  return _REGISTRY[name]
