"""DG discriminator: converter checks, parity with the reference, time window.

Golden data: tests/data/dg/, written by tests/generators/make_dg_fixtures.py from the
reference ``classifier_lib.get_grad_log_ratio`` on re-drawn random weights (reduced
16x16 classifier; the unconditional head is the conditional one without its label
embedding). Compiles are the cost here, so each jitted function is built once.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_convert import dg as convert_dg
from checkpoints_convert.reader import read_state_dict
from isir_jax import discriminator, vpsde
from isir_jax.samplers import dg
from isir_jax.train import trainers

DATA = os.path.join(os.path.dirname(__file__), 'data', 'dg')
CLASSIFIER = os.path.join(DATA, 'classifier.pt')
HEAD = os.path.join(DATA, 'discriminator_cond.pt')


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(os.path.join(DATA, 'golden.npz')))


@pytest.fixture(scope='module')
def arch_flags():
  with open(os.path.join(DATA, 'arch.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def states():
  cond = read_state_dict(HEAD)
  uncond = {k: v for k, v in cond.items() if k != 'label_emb.weight'}
  return read_state_dict(CLASSIFIER), {'cond': cond, 'uncond': uncond}


def _discriminator(states, arch_flags, head, time_map):
  classifier, heads = states
  arch = convert_dg.Arch(**arch_flags, cond=head == 'cond', time_map=time_map)
  params, config = convert_dg.convert(classifier, heads[head], arch)
  return discriminator.DGDiscriminator.from_config(
      jax.tree_util.tree_map(jnp.asarray, params), config)


def _assert_log_ratio(got, ref):
  np.testing.assert_array_less(np.abs(np.asarray(got) - ref), 1e-4 * (1 + np.abs(ref)))


def _assert_guidance(got, ref):
  assert np.abs(ref).max() > 0.1  # The fixture is not trivial.
  np.testing.assert_array_less(np.abs(np.asarray(got) - ref), 1e-3 * (1 + np.abs(ref).max()))


@pytest.fixture(scope='module')
def uncond_guidance(states, arch_flags):
  """Jitted guidance of the unconditional head, linear VP time, in DG's time window (traced)."""
  d = _discriminator(states, arch_flags, 'uncond', 'linear')
  return jax.jit(lambda x, s, lo, hi: dg.windowed_guidance(d, x, s, None, lo, hi)[:2])


def test_vp_time_map():
  sigma = jnp.array([0.002, 0.05, 1., 80.])
  tau = vpsde.vp_time(sigma)
  # tau inverts sigma^2 = exp(0.5 (b1-b0) tau^2 + b0 tau) - 1, and mean = 1/sqrt(1+sigma^2).
  log1p_s2 = 0.5 * (vpsde.BETA_MAX - vpsde.BETA_MIN) * tau ** 2 + vpsde.BETA_MIN * tau
  np.testing.assert_allclose(np.expm1(log1p_s2), sigma ** 2, rtol=1e-4)
  np.testing.assert_allclose(vpsde.vp_mean(tau), 1 / np.sqrt(1 + sigma ** 2), rtol=1e-5)
  # The cosine time has the same alpha_bar on the iDDPM cosine schedule, and t_cos(0) = 0.
  s = vpsde.COSINE_S
  t_cos = vpsde.cosine_time(tau)
  ratio = np.cos((t_cos + s) / (1 + s) * np.pi / 2) / np.cos(s / (1 + s) * np.pi / 2)
  np.testing.assert_allclose(ratio, vpsde.vp_mean(tau), rtol=1e-4)
  assert abs(float(vpsde.cosine_time(jnp.zeros(())))) < 1e-6


def test_uncond_guidance_and_log_ratio_match_reference(uncond_guidance, golden):
  g, log_ratio = uncond_guidance(golden['x'], golden['sigma'], 0.01, 1.0)
  _assert_guidance(g, golden['uncond_32_guidance'])
  _assert_log_ratio(log_ratio, golden['uncond_32_log_ratio'])
  _assert_log_ratio(log_ratio, golden['uncond_32_log_only'])


def test_time_window_is_per_sample(uncond_guidance, golden):
  x, sigma, ref = golden['x'], golden['sigma'], golden['uncond_32_guidance']
  tau = np.asarray(vpsde.vp_time(jnp.asarray(sigma)))
  lo, hi = 0.05, 0.5
  inside = (tau >= lo) & (tau <= hi)
  assert inside.any() and not inside.all()
  g, log_ratio = uncond_guidance(x, sigma, lo, hi)
  g = np.asarray(g)
  assert np.all(g[~inside] == 0.)                      # exactly zero outside,
  _assert_guidance(g[inside], ref[inside])             # untouched inside (not batch-gated),
  _assert_log_ratio(log_ratio, golden['uncond_32_log_only'])  # log ratio always computed.
  g_none, _ = uncond_guidance(x, sigma, 2.0, 3.0)
  assert np.all(np.asarray(g_none) == 0.)


def test_cond_cosine_guidance_matches_reference(states, arch_flags, golden):
  d = _discriminator(states, arch_flags, 'cond', 'cosine')
  g, log_ratio = jax.jit(d.guidance)(golden['x'], golden['sigma'], golden['labels'])
  _assert_guidance(g, golden['cond_64_guidance'])
  _assert_log_ratio(log_ratio, golden['cond_64_log_ratio'])


def test_cond_log_ratio_matches_reference_under_vmap(states, arch_flags, golden):
  d = _discriminator(states, arch_flags, 'cond', 'linear')
  split = lambda a: a.reshape(2, -1, *a.shape[1:])
  log_ratio = jax.jit(jax.vmap(d.log_ratio))(
      split(golden['x']), split(golden['sigma']), split(golden['labels']))
  _assert_log_ratio(log_ratio.reshape(-1), golden['cond_32_log_only'])
  # The label matters (else the conditional path is not exercised).
  assert not np.allclose(golden['cond_32_log_only'], golden['uncond_32_log_only'], atol=1e-3)


def test_prob_clip_is_dg_clipped_log_odds(states, arch_flags):
  d = _discriminator(states, arch_flags, 'uncond', 'linear').replace(prob_clip=1e-5)
  logit = np.linspace(-20., 20., 81)
  p = np.clip(1 / (1 + np.exp(-logit)), 1e-5, 1 - 1e-5)
  np.testing.assert_allclose(d.to_log_ratio(jnp.asarray(logit, jnp.float32)),
                             np.log(p / (1 - p)), rtol=1e-5, atol=1e-4)


def _problems(states, arch_flags, mutate, head='cond'):
  classifier, heads = states
  state = dict(heads[head])
  mutate(state)
  arch = convert_dg.Arch(**arch_flags, cond=True)
  with pytest.raises(convert_dg.ConversionError) as err:
    convert_dg.convert(classifier, state, arch, names=('cls.pt', 'head.pt'))
  return str(err.value)


def test_wrong_shape_is_named(states, arch_flags):
  key = 'input_blocks.1.0.in_layers.2.weight'

  def mutate(s):
    s[key] = np.zeros((16, 32, 3, 3), np.float32)

  msg = _problems(states, arch_flags, mutate)
  assert msg == (f"head.pt: key {key} has shape (16, 32, 3, 3), expected (32, 32, 3, 3); "
                 'check --disc_width')


def test_missing_key_is_named(states, arch_flags):
  msg = _problems(states, arch_flags, lambda s: s.pop('label_emb.weight'))
  emb_shape = (arch_flags['num_classes'], 4 * arch_flags['disc_width'])
  assert msg == (f"head.pt: missing key label_emb.weight (expected shape {emb_shape}); "
                 'check --cond')


def test_extra_key_is_named(states, arch_flags):
  msg = _problems(states, arch_flags,
                  lambda s: s.update({'input_blocks.2.0.in_layers.0.weight': np.ones(32)}))
  assert msg == ("head.pt: unexpected key input_blocks.2.0.in_layers.0.weight with shape "
                 '(32,); check --disc_depth or --image_size (sets the channel multipliers)')


def test_classifier_width_mismatch_names_the_flag(states, arch_flags):
  classifier, heads = states
  arch = convert_dg.Arch(**{**arch_flags, 'classifier_width': 64})
  with pytest.raises(convert_dg.ConversionError, match=r"cls.pt: key input_blocks.0.0.weight "
                     r'has shape \(32, 3, 3, 3\), expected \(64, 3, 3, 3\); check '
                     r'--classifier_width'):
    convert_dg.convert(classifier, heads['uncond'], arch, names=('cls.pt', 'head.pt'))


def _cli(arch_flags, dst, cond, head=HEAD):
  args = [sys.executable, '-m', 'checkpoints_convert.dg', f'--classifier={CLASSIFIER}',
          f'--dst={dst}', f'--cond={cond}'] + ([f'--discriminator={head}'] if head else [])
  args += [f'--{k}={v}' for k, v in arch_flags.items()]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)


def test_cli_converts_and_loads(tmp_path, arch_flags, states):
  dst = str(tmp_path / 'dg')
  res = _cli(arch_flags, dst, cond=True)
  assert res.returncode == 0, res.stderr
  assert res.stdout.startswith('converted ') and res.stdout.count('\n') == 1
  d = discriminator.load_discriminator(dst)
  want = _discriminator(states, arch_flags, 'cond', None)
  assert d.to_config() == want.to_config() and d.head == want.head and d.encoder == want.encoder
  with open(os.path.join(dst, 'config.json')) as f:
    config = json.load(f)
  assert config.pop('source') == {'classifier': 'classifier.pt',
                                  'discriminator': 'discriminator_cond.pt'}
  assert config == d.to_config()
  jax.tree_util.tree_map(np.testing.assert_array_equal, d.params, want.params)


def test_cli_converts_the_classifier_alone(tmp_path, arch_flags, states):
  dst = str(tmp_path / 'classifier')
  res = _cli(arch_flags, dst, cond=False, head=None)
  assert res.returncode == 0, res.stderr
  assert 'classifier only' in res.stdout and res.stdout.count('\n') == 1
  kwargs, params = trainers.load_classifier(dst)
  want = _discriminator(states, arch_flags, 'uncond', None)
  assert discriminator.module_from_config(kwargs) == want.encoder
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, want.params['encoder'])


def test_cli_reports_mismatch_and_writes_nothing(tmp_path, arch_flags):
  dst = tmp_path / 'dg'
  res = _cli(arch_flags, str(dst), cond=False)
  assert res.returncode == 2
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'unexpected key label_emb.weight' in last
  assert '--cond' in last and not dst.exists()


def test_conditional_head_requires_labels(states, arch_flags, golden):
  d = _discriminator(states, arch_flags, 'cond', 'linear')
  with pytest.raises(ValueError, match='class conditional'):
    jax.eval_shape(d.log_ratio, golden['x'], golden['sigma'])
