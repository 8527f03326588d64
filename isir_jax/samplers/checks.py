"""What every sampler checks, once and in the same words: models, inputs and settings.

* `sample_function` marks a sampler's pure ``*_sample`` function with its registry name and
  the discriminator member it calls; the marked function checks the models against the
  protocols of `isir_jax.types` and the shapes of its keys, labels and latents before it
  traces anything, and `edm.make_sampler` runs the model checks when a sampler is built.
* `parse_settings` turns a sampler's keyword settings into its dataclasses and names the
  valid settings (and the likely intended one) when a name is unknown.

A mistake therefore surfaces as one message that names the sampler, the argument and the
expected and actual value, not as an ``AttributeError`` or a vmap rank error at trace time.
"""

import dataclasses
import difflib
import functools
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# Members of a `types.Denoiser` the samplers read (``shape`` and ``label_dim`` are read by the
# driver; the samplers take the shape as an argument).
DENOISER_MEMBERS = ('__call__', 'sigma_min', 'sigma_max', 'round_sigma')
# The discriminator members a sampler may call.
DISCRIMINATOR_MEMBERS = ('log_ratio', 'guidance')


def _missing(obj, members) -> list[str]:
  return [m for m in members if not (callable(obj) if m == '__call__' else hasattr(obj, m))]


def _describe(obj) -> str:
  return getattr(obj, '__qualname__', None) or type(obj).__name__


def concrete(value) -> bool:
  """Whether a setting is a concrete value rather than traced (under ``jit`` or ``vmap``), so
  that Python may branch on it."""
  return not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(value))


def check_models(name: str, denoiser, discriminator, uses: Optional[str]) -> None:
  """Checks the models of sampler ``name`` against the protocols, naming every missing member.

  Args:
    name: the sampler's registry name (for the message).
    denoiser: the model of ``D(x; sigma)``.
    discriminator: the discriminator, or None.
    uses: the discriminator member the sampler calls ('log_ratio' or 'guidance'), or None
      for a sampler without a discriminator.

  Raises:
    ValueError: the sampler needs a discriminator and got None.
    TypeError: a model lacks members of its protocol (all of them are listed).
  """
  missing = _missing(denoiser, DENOISER_MEMBERS)
  if missing:
    raise TypeError(
        f'{name} sampler: the denoiser ({_describe(denoiser)}) lacks {", ".join(missing)} of '
        'the Denoiser protocol (isir_jax/types.py: __call__(x, sigma, class_labels), '
        'sigma_min, sigma_max, round_sigma); wrap a function fn(x, sigma) or '
        'fn(x, sigma, class_labels) with isir_jax.as_denoiser(fn, sigma_min=..., '
        'sigma_max=...)')
  if uses is None:
    return
  if discriminator is None:
    raise ValueError(f'{name} sampler: a discriminator is required (got None)')
  missing = _missing(discriminator, (uses,))
  if missing:
    hint = ('isir_jax.as_discriminator(d.log_ratio)' if hasattr(discriminator, 'log_ratio')
            else 'isir_jax.as_discriminator(log_ratio_fn)')
    raise TypeError(
        f'{name} sampler: the discriminator ({_describe(discriminator)}) lacks '
        f'{", ".join(missing)} of the Discriminator protocol (isir_jax/types.py: '
        f'log_ratio(x, sigma, class_labels) -> [B]; guidance(x, sigma, class_labels) -> '
        f'(-sigma^2 grad_x log_ratio, log_ratio)); wrap a log-ratio function fn(x, sigma) or '
        f'fn(x, sigma, class_labels) with {hint}, which derives guidance by autodiff')


def check_keys(name: str, keys) -> int:
  """Checks that ``keys`` hold one key per sample; returns the batch size B."""
  keys = jnp.asarray(keys) if not hasattr(keys, 'shape') else keys
  typed = jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key)
  raw = jnp.issubdtype(keys.dtype, jnp.unsignedinteger)   # key data as a last axis
  batch_ndim = 1 if typed else 2
  if not (typed or raw) or keys.ndim != batch_ndim:
    what = (f'an array of shape {tuple(keys.shape)} and dtype {keys.dtype}'
            if not (typed or raw) or keys.ndim != batch_ndim - 1 else 'a single key')
    raise ValueError(
        f'{name} sampler: keys must be [B] keys, one per sample, got {what}; e.g. '
        'jax.random.split(key, B) or jax.vmap(lambda i: jax.random.fold_in(key, i))'
        '(jnp.arange(B))')
  return keys.shape[0]


def check_labels(name: str, class_labels, batch: int, label_dim: Optional[int]) -> None:
  """Checks one-hot labels [B, label_dim] (``label_dim`` None: any width)."""
  if class_labels is None:
    return
  shape = tuple(class_labels.shape)
  width = '' if not label_dim else f' (label_dim = {label_dim})'
  if len(shape) == 1:
    raise ValueError(
        f'{name} sampler: class_labels must be one-hot [B, label_dim] = [{batch}, '
        f'{label_dim or "label_dim"}], got shape {shape} (class indices?); use '
        f'jax.nn.one_hot(labels, {label_dim or "label_dim"})')
  if len(shape) != 2 or shape[0] != batch or (label_dim and shape[1] != label_dim):
    raise ValueError(f'{name} sampler: class_labels must have shape [{batch}, '
                     f'{label_dim or "label_dim"}] (one per key){width}, got {shape}')


def check_latents(name: str, latents, batch: int, shape) -> None:
  """Checks standard normal latents [B, *shape]."""
  if latents is None:
    return
  expected = (batch,) + tuple(shape)
  if tuple(latents.shape) != expected:
    raise ValueError(f'{name} sampler: latents must have shape [B, *shape] = {expected}, '
                     f'got {tuple(latents.shape)}')


def sample_function(name: str, uses: Optional[str]) -> Callable[[Callable], Callable]:
  """Decorator of a sampler's ``*_sample`` function: input and protocol checks at trace time.

  The function's signature is ``(denoiser, [discriminator,] keys, class_labels=None,
  latents=None, *, shape, **settings)``, the discriminator present when ``uses`` is not None.
  The decorated function records ``name`` and ``uses`` (read by `edm.make_sampler`).

  Args:
    name: the registry name, used in messages.
    uses: 'log_ratio' or 'guidance' (the member the sampler calls), or None.
  """
  if uses is not None and uses not in DISCRIMINATOR_MEMBERS:
    raise ValueError(f'sample_function: uses must be one of {DISCRIMINATOR_MEMBERS} or None, '
                     f'got {uses!r}')

  def decorate(fn: Callable) -> Callable:
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args, **kwargs):
      bound = signature.bind(*args, **kwargs)
      bound.apply_defaults()
      a = bound.arguments
      check_models(name, a['denoiser'], a.get('discriminator'), uses)
      batch = check_keys(name, a['keys'])
      check_labels(name, a['class_labels'], batch, getattr(a['denoiser'], 'label_dim', None))
      check_latents(name, a['latents'], batch, a['shape'])
      return fn(*args, **kwargs)

    checked.sampler_name, checked.uses = name, uses
    return checked

  return decorate


def parse_settings(name: str, settings: dict, *classes: type) -> tuple[Any, ...]:
  """Builds one instance of each settings dataclass from keyword ``settings``.

  Every name must be a field of exactly one of ``classes``; an unknown name raises with the
  valid names and the closest match.

  Args:
    name: the sampler's name, for the message.
    settings: the keyword settings.
    *classes: the settings dataclasses, e.g. ``(edm.StepSettings, ISIRSettings)``.

  Returns:
    One instance per class, in order.
  """
  fields = [{f.name for f in dataclasses.fields(cls)} for cls in classes]
  valid = sorted(set().union(*fields))
  unknown = sorted(set(settings) - set(valid))
  if unknown:
    guesses = {u: difflib.get_close_matches(u, valid, n=1) for u in unknown}
    hint = ''.join(f'; {u!r}: did you mean {g[0]!r}?' for u, g in guesses.items() if g)
    raise TypeError(f'{name} sampler: unknown settings {unknown}{hint}; valid settings: '
                    f'{", ".join(valid)}')
  return tuple(cls(**{k: v for k, v in settings.items() if k in f})
               for cls, f in zip(classes, fields))
