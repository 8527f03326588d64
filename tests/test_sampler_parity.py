"""Deterministic EDM and DG sampling against the reference ``edm_sampler`` of the seed.

Golden data: tests/data/samplers/, written by tests/generators/make_sampler_fixtures.py:
the seed's ``generate.edm_sampler`` (float64 state, float32 networks) with ``S_churn = 0``
on a re-drawn conditional DDPM++ VP network (16x16) and the re-drawn DG discriminator of
tests/data/dg, for 6 and 18 steps. Here both networks go through the converters and
the samplers run in float32; outputs must agree within ``1e-3 * max|ref|``.
"""

import concurrent.futures
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_convert import dg as convert_dg
from checkpoints_convert import edm as convert_edm
from checkpoints_convert.reader import read_state_dict
from isir_jax import checkpoints
from isir_jax import samplers
from isir_jax.denoiser import load_denoiser
from isir_jax.discriminator import load_discriminator
from isir_jax.vpsde import vp_time

DATA = os.path.join(os.path.dirname(__file__), 'data')
RTOL = 1e-3  # Of max|ref|: float32 here against the reference's float64 state.
STEP_KEYS = ('sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise')
DG_KEYS = ('dg_weight_1st_order', 'dg_weight_2nd_order', 'time_min', 'time_max')


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(os.path.join(DATA, 'samplers', 'golden.npz')))


@pytest.fixture(scope='module')
def denoiser(tmp_path_factory):
  """The fixture network through the EDM converter and back from disk."""
  variables, config = convert_edm.convert(os.path.join(DATA, 'samplers', 'ddpmpp_vp_cond.pkl'))
  directory = str(tmp_path_factory.mktemp('edm'))
  checkpoints.save_model(directory, variables, config)
  return load_denoiser(directory)


@pytest.fixture(scope='module')
def discriminator(tmp_path_factory):
  """The DG fixture (classifier + conditional head) through the DG converter and back."""
  with open(os.path.join(DATA, 'dg', 'arch.json')) as f:
    arch = convert_dg.Arch(**json.load(f), cond=True)
  params, config = convert_dg.convert(
      read_state_dict(os.path.join(DATA, 'dg', 'classifier.pt')),
      read_state_dict(os.path.join(DATA, 'dg', 'discriminator_cond.pt')), arch)
  directory = str(tmp_path_factory.mktemp('dg'))
  checkpoints.save_model(directory, params, config)
  return load_discriminator(directory)


def _settings(golden, mode: str, steps: int) -> dict:
  settings = {k: float(golden[k]) for k in STEP_KEYS}
  if mode == 'dg':
    settings.update({k: float(golden[k]) for k in DG_KEYS})
  return dict(settings, num_steps=steps)


def _inputs(golden):
  latents = jnp.asarray(golden['latents'])
  keys = jax.random.split(jax.random.key(0), latents.shape[0])  # Unused: no churn.
  return keys, jnp.asarray(golden['class_labels']), latents


def _lowered(golden, mode: str, steps: int, denoiser, discriminator):
  """The registry sampler ``mode`` on the fixture inputs, lowered (models as arguments)."""
  settings = _settings(golden, mode, steps)
  factory = samplers.get_sampler(mode)

  def run(den, disc, keys, labels, latents):
    sample_fn = factory(den, disc if mode == 'dg' else None, shape=latents.shape[1:], **settings)
    return sample_fn(keys, labels, latents)
  return jax.jit(run).lower(denoiser, discriminator, *_inputs(golden))


@pytest.fixture(scope='module')
def outputs(golden, denoiser, discriminator):
  """Our images and NFE for every run of the fixture, computed once.

  The four programs are compiled in threads (XLA releases the GIL), which saves wall
  time where there are cores to spare.
  """
  runs = [(mode, int(steps)) for steps in golden['steps'] for mode in ('edm', 'dg')]
  lowered = [_lowered(golden, mode, steps, denoiser, discriminator) for mode, steps in runs]
  with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
    compiled = list(pool.map(lambda low: low.compile(), lowered))
  results = {}
  for run, fn in zip(runs, compiled):
    images, stats = fn(denoiser, discriminator, *_inputs(golden))
    results[run] = np.asarray(images, np.float64), np.asarray(stats['nfe'])
  return results


def _max_rel_err(got, ref):
  return np.abs(got - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize('steps', [6, 18])
def test_schedule_matches_reference(golden, denoiser, steps):
  step = samplers.StepSettings(**{k: float(golden[k]) for k in STEP_KEYS}, num_steps=steps)
  t = np.asarray(step.sigmas(denoiser))
  assert t[-1] == 0 and t.shape == (steps + 1,)
  np.testing.assert_allclose(t[:-1], golden[f't_steps_{steps}'], rtol=1e-6)


@pytest.mark.parametrize('steps', [6, 18])
@pytest.mark.parametrize('mode', ['edm', 'dg'])
def test_matches_reference(golden, outputs, mode, steps):
  ref = golden[f'{mode}_{steps}']
  images, nfe = outputs[mode, steps]
  assert images.shape == ref.shape
  assert np.abs(ref).max() > 10  # Re-drawn weights: far from a trivial network.
  err = _max_rel_err(images, ref)
  assert err <= RTOL, f'{mode}, {steps} steps: max|jax - ref| / max|ref| = {err:.2e}'
  np.testing.assert_array_equal(nfe, 2 * steps - 1)


@pytest.mark.parametrize('steps', [6, 18])
def test_guidance_effect_matches_reference(golden, outputs, steps):
  """The DG term itself (dg - edm) agrees, not only the dominant ODE part."""
  ref = golden[f'dg_{steps}'] - golden[f'edm_{steps}']
  got = outputs['dg', steps][0] - outputs['edm', steps][0]
  assert np.abs(ref).max() > 0.5  # The guidance changes the samples.
  err = _max_rel_err(got, ref)
  assert err <= 1e-2, f'{steps} steps: max|jax - ref| / max|ref| of dg - edm = {err:.2e}'


def test_fixture_window_is_unambiguous(golden):
  """No step's VP time is near a window edge, and some steps are outside the window.

  Without churn all samples of a step share ``t_hat``, so the reference's whole-batch
  gate and the per-sample gate here agree on this fixture.
  """
  for steps in golden['steps']:
    tau = np.asarray(vp_time(jnp.asarray(golden[f't_steps_{steps}'], jnp.float32)))
    lo, hi = float(golden['time_min']), float(golden['time_max'])
    assert np.abs(tau / lo - 1).min() > 0.01 and np.abs(tau / hi - 1).min() > 0.01
    assert (tau < lo).any() and ((tau >= lo) & (tau <= hi)).any()
