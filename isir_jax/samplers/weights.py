"""Non-finite importance weights, recorded per sample inside jitted samplers.

A NaN or infinite discriminator log ratio cannot be weighted or tested. Inside ``jit`` a
sampler cannot raise, so it records, per sample, the first noise level ``k`` (the log ratio
evaluated at ``t_k``; 0 is the initial latent) at which a log weight it used was not finite,
in the stat `STAT` (`NONE` = -1 when all were finite). The driver
(`isir_jax.sampling.check_samples`) refuses such samples with a message naming the level and
the samples' global indices. Draws mask the non-finite entries (`drawable`), so that they are
never picked silently.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

STAT = 'nonfinite_level'
NONE = -1


def nonfinite_rows(log_w: Array, active=True) -> Array:
  """[B] bool: row b of ``log_w`` [B, ...] holds a non-finite entry where ``active``."""
  bad = ~jnp.isfinite(log_w) & active
  return jnp.any(bad.reshape(bad.shape[0], -1), axis=1)


def record_first(first: Array, level, bad: Array) -> Array:
  """``first`` [B] (`NONE` where nothing was recorded yet) with ``level`` set where ``bad``."""
  return jnp.where((first == NONE) & bad, jnp.asarray(level, first.dtype), first)


def initial(batch: int) -> Array:
  """The record before any log weight: `NONE` for each of ``batch`` samples (int32 [B])."""
  return jnp.full([batch], NONE, jnp.int32)


def drawable(log_w: Array) -> Array:
  """Log weights for a categorical draw: non-finite entries get zero weight (-inf)."""
  return jnp.where(jnp.isfinite(log_w), log_w, -jnp.inf)
