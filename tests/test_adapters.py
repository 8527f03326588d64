"""Bring your own model: the adapters, the protocol and input checks, the settings messages,
and the README's snippet, on the exact 2-D mixture."""

import contextlib
import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isir_jax import adapters, as_denoiser, as_discriminator, samplers, testbed
from isir_jax.samplers import diffrs

TB = testbed.make_testbed('gmm2')
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')
KEYS = jax.random.split(jax.random.key(0), 4)


def plain_models(with_labels: bool = False):
  """The testbed's model as plain functions, optionally taking (ignored) class labels."""
  if with_labels:
    return (as_denoiser(lambda x, s, c: TB.model_denoiser(x, s), sigma_min=0.002,
                        sigma_max=80.0, label_dim=3),
            as_discriminator(lambda x, s, c: TB.discriminator.log_ratio(x, s)))
  return (as_denoiser(lambda x, s: TB.model_denoiser(x, s), sigma_min=0.002, sigma_max=80.0),
          as_discriminator(lambda x, s: TB.discriminator.log_ratio(x, s)))


def test_readme_snippet_runs_every_sampler_on_plain_functions():
  text = open(README).read()
  section = text[text.index('## Bring your own model'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  assert len([line for line in code.splitlines() if line.strip()]) < 20
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, 'README.md', 'exec'), {})
  shares = {name: float(v) for name, v in re.findall(r'^(\w+) ([\d.]+)$', out.getvalue(), re.M)}
  assert set(shares) == {'edm', 'dg', 'diffrs', 'isir', 'smc'}
  # 512 samples: the model's weight 0.5 (edm), corrected towards the true 0.8.
  assert abs(shares['edm'] - 0.5) < 0.1, shares
  for name in ('dg', 'diffrs', 'isir', 'smc'):
    assert shares[name] > 0.62, shares


def test_adapters_equal_the_protocol_objects():
  den, disc = plain_models()
  x = jax.random.normal(jax.random.key(1), (3,) + TB.shape)
  sigma = jnp.array([0.1, 1.0, 5.0])
  np.testing.assert_array_equal(den(x, sigma), TB.model_denoiser(x, sigma))
  np.testing.assert_array_equal(den(x, 1.0), TB.model_denoiser(x, jnp.ones(3)))
  g, log_r = jax.jit(disc.guidance)(x, sigma)
  g_ref, log_r_ref = TB.discriminator.guidance(x, sigma)
  np.testing.assert_allclose(g, g_ref, rtol=1e-6)
  np.testing.assert_allclose(log_r, log_r_ref, rtol=1e-6)
  # guidance is -sigma^2 grad_x log_ratio, per sample.
  grad = jax.grad(lambda y: TB.discriminator.log_ratio(y, sigma).sum())(x)
  np.testing.assert_allclose(g, -(sigma ** 2)[:, None, None, None] * grad, rtol=1e-5)
  assert jax.tree_util.tree_leaves(den) == [] and jax.tree_util.tree_leaves(disc) == []


def test_functions_with_labels_get_them():
  seen = []
  den = as_denoiser(lambda x, s, c: (seen.append(c.shape), x)[1], sigma_min=0.01,
                    sigma_max=10.0, label_dim=3)
  _, disc = plain_models(with_labels=True)
  labels = jax.nn.one_hot(jnp.arange(4) % 3, 3)
  x, _ = samplers.get_sampler('isir')(den, disc, shape=TB.shape, num_steps=3, S_churn=10.0,
                                      num_candidates=2)(KEYS, labels)
  assert x.shape == (4,) + TB.shape and (8, 3) in seen


def test_adapter_arguments_are_checked():
  with pytest.raises(TypeError, match='label_dim=10 but the function takes no class_labels'):
    as_denoiser(lambda x, s: x, sigma_min=0.002, sigma_max=80.0, label_dim=10)
  with pytest.raises(TypeError, match=r'must take \(x, sigma\)'):
    as_denoiser(lambda x: x, sigma_min=0.002, sigma_max=80.0)
  with pytest.raises(ValueError, match='sigma_min < sigma_max'):
    as_denoiser(lambda x, s: x, sigma_min=1.0, sigma_max=0.5)
  bad = as_discriminator(lambda x, s: x)
  with pytest.raises(ValueError, match=r'a log ratio is one number per sample, shape \(8,\)'):
    samplers.get_sampler('isir')(plain_models()[0], bad, shape=TB.shape, num_steps=3,
                                 S_churn=10.0, num_candidates=2)(KEYS)


def test_missing_protocol_members_are_named_when_the_sampler_is_built():
  den, disc = plain_models()
  with pytest.raises(TypeError, match='denoiser .* lacks sigma_min, sigma_max, round_sigma .*'
                                      'as_denoiser'):
    samplers.get_sampler('edm')(lambda x, s: x, shape=TB.shape)
  with pytest.raises(TypeError, match='dg sampler: the discriminator .* lacks guidance .*'
                                      'as_discriminator'):
    samplers.get_sampler('dg')(den, TB.discriminator.log_ratio, shape=TB.shape)
  with pytest.raises(TypeError, match='isir sampler: the discriminator .* lacks log_ratio'):
    samplers.get_sampler('isir')(den, lambda x, s: s, shape=TB.shape, S_churn=1.0)
  for name in ('dg', 'diffrs', 'isir', 'smc'):
    with pytest.raises(ValueError, match=f'{name} sampler: a discriminator is required'):
      samplers.get_sampler(name)(den, None, shape=TB.shape)


@pytest.mark.parametrize('name,settings', [
    ('edm', {}), ('dg', {}), ('isir', dict(S_churn=1.0)), ('smc', dict(S_churn=1.0)),
    ('diffrs', dict(thresholds=diffrs.Thresholds(np.zeros(19), np.zeros(19))))])
def test_unknown_settings_list_the_valid_names(name, settings):
  den, disc = plain_models()
  with pytest.raises(TypeError, match=rf"{name} sampler: unknown settings \['num_stepz'\]; "
                                      r"'num_stepz': did you mean 'num_steps'\?; valid settings: "
                                      r'S_churn, .*num_steps'):
    samplers.get_sampler(name)(den, disc, shape=TB.shape, num_stepz=4, **settings)


def test_bad_inputs_get_clear_messages():
  den, disc = plain_models()
  fn = samplers.get_sampler('dg')(den, disc, shape=TB.shape, num_steps=3)
  for key in (jax.random.key(0), jax.random.PRNGKey(0)):
    with pytest.raises(ValueError, match='keys must be \\[B\\] keys, one per sample, got a '
                                         'single key; e.g. jax.random.split'):
      fn(key)
  with pytest.raises(ValueError, match='keys must be .* got an array of shape \\(4,\\)'):
    fn(jnp.arange(4.0))
  cond = samplers.get_sampler('edm')(plain_models(with_labels=True)[0], shape=TB.shape)
  with pytest.raises(ValueError, match=r'one-hot \[B, label_dim\] = \[4, 3\], got shape \(4,\) '
                                       r'\(class indices\?\); use jax.nn.one_hot'):
    cond(KEYS, jnp.arange(4))
  with pytest.raises(ValueError, match=r'class_labels must have shape \[4, 3\]'):
    cond(KEYS, jnp.zeros((4, 10)))
  with pytest.raises(ValueError, match=r'latents must have shape \[B, \*shape\] = \(4, 1, 1, 2\)'):
    cond(KEYS, None, jnp.zeros((4, 2)))


def test_diffrs_thresholds_forms():
  den, disc = plain_models()
  step = dict(num_steps=4)
  th, log_r = samplers.estimate_thresholds(den, disc, KEYS, shape=TB.shape, rej_percentile=0.8,
                                           **step)
  factory = samplers.get_sampler('diffrs')
  with pytest.raises(TypeError, match=r'pair \(thresholds, warm-up log ratios\) .* '
                                      r'thresholds=estimate_thresholds\(...\)\[0\]'):
    factory(den, disc, shape=TB.shape, thresholds=(th, log_r), **step)
  with pytest.raises(ValueError, match='rej_percentile and warmup_log_ratios go together'):
    factory(den, disc, shape=TB.shape, rej_percentile=0.8, **step)
  with pytest.raises(ValueError, match='not both'):
    factory(den, disc, shape=TB.shape, thresholds=th, warmup_log_ratios=log_r,
            rej_percentile=0.8, **step)
  # Warm-up log ratios and their quantile give the thresholds estimate_thresholds gives.
  a = jax.jit(factory(den, disc, shape=TB.shape, thresholds=th, **step))(KEYS)
  b = jax.jit(factory(den, disc, shape=TB.shape, warmup_log_ratios=log_r, rej_percentile=0.8,
                      **step))(KEYS)
  np.testing.assert_array_equal(a[0], b[0])


def test_guidance_from_log_ratio_is_per_sample():
  x = jax.random.normal(jax.random.key(2), (2, 1, 1, 2))
  sigma = jnp.array([0.5, 2.0])
  g, log_r = adapters.guidance_from_log_ratio(lambda y: jnp.sum(y ** 2, (1, 2, 3)), x, sigma)
  np.testing.assert_allclose(g, -(sigma ** 2)[:, None, None, None] * 2 * x, rtol=1e-6)
  np.testing.assert_allclose(log_r, jnp.sum(x ** 2, (1, 2, 3)), rtol=1e-6)
