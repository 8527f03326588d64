"""Golden parity of the Flax EDM networks with the reference, through the converter.

Fixtures (tests/data/edm/, written by tests/generators/make_edm_fixtures.py) are EDM
network pickles of small random-weight configurations and the reference outputs.
Every pickle is converted by ``python -m checkpoints_convert.edm`` in a process where
torch cannot be imported, loaded with ``load_denoiser`` and compared per sample with
``max|jax - torch| <= 1e-4 * (1 + max|torch|)``.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints_convert import edm
from checkpoints_convert.reader import ModuleRecord, read_network_pickle
from isir_jax import checkpoints
from isir_jax.denoiser import Denoiser, load_denoiser
from isir_jax.networks import layers
from isir_jax.networks import precond

DATA = pathlib.Path(__file__).parent / 'data' / 'edm'
CONFIGS = ('ddpmpp_vp', 'ncsnpp_ve', 'adm_edm_cond', 'iddpm_adm', 'ddpmpp_edm_cond')
# XLA's CPU backend optimisations dominate the test time and do not change the numbers.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def run_jit(fn, *args):
  """jax.jit(fn)(*args), compiled with cheap backend options."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


def assert_close(actual, expected):
  """Per sample: max|actual - expected| <= 1e-4 * (1 + max|expected|)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  err = np.abs(actual - expected).reshape(len(expected), -1).max(1)
  tol = 1e-4 * (1 + np.abs(expected).reshape(len(expected), -1).max(1))
  assert np.all(err <= tol), f'error {err} exceeds tolerance {tol}'


def run_python(code: str) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter from the repository root."""
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True,
                        text=True, cwd=pathlib.Path(__file__).parent.parent, timeout=300)


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """Converts every fixture with the CLI in one process that cannot import torch."""
  root = tmp_path_factory.mktemp('edm')
  jobs = [(str(DATA / f'{name}.pkl'), str(root / name)) for name in CONFIGS]
  result = run_python(f"""
      import sys
      sys.modules['torch'] = None  # any 'import torch' now fails
      from checkpoints_convert import edm
      import isir_jax.denoiser
      edm.define_flags()
      for src, dst in {jobs!r}:
        edm.FLAGS(['edm', '--src', src, '--dst', dst])
        edm.main([])
      assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m])
  """)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert len(lines) == len(CONFIGS)
  assert lines[0].startswith('VPPrecond/SongUNet: 45,299 params, resolution 16, label_dim 0')
  return {name: root / name for name in CONFIGS}


@pytest.mark.parametrize('name', CONFIGS)
def test_parity_with_reference(converted, name):
  ref = np.load(DATA / f'{name}.npz')
  den = load_denoiser(str(converted[name]))
  labels = jnp.asarray(ref['labels']) if 'labels' in ref else None
  out = run_jit(lambda x, s: den(x, s, labels), ref['x'], ref['sigma'])
  assert_close(out, ref['out'])
  assert den.sigma_min == pytest.approx(float(ref['sigma_min']), rel=1e-6)
  assert den.sigma_max == pytest.approx(float(ref['sigma_max']), rel=1e-6)
  np.testing.assert_allclose(den.round_sigma(ref['sigma']), ref['round_sigma'], rtol=2e-5)
  assert den.shape == ref['x'].shape[1:]
  assert den.label_dim == (0 if labels is None else labels.shape[1])


def test_scalar_sigma_denoiser_as_jit_argument(converted):
  ref = np.load(DATA / 'iddpm_adm.npz')
  den = load_denoiser(str(converted['iddpm_adm']))
  out = run_jit(lambda d, x: d(x, 1.5), den, ref['x'])
  assert_close(out, ref['out_scalar_sigma'])


def test_missing_labels_mean_zeros(converted):
  ref = np.load(DATA / 'adm_edm_cond.npz')
  den = load_denoiser(str(converted['adm_edm_cond']))
  assert_close(run_jit(lambda x, s: den(x, s), ref['x'], ref['sigma']), ref['out_no_labels'])


@pytest.mark.parametrize('name', ['iddpm_adm', 'ddpmpp_edm_cond'])
def test_augment_labels(converted, name):
  ref = np.load(DATA / f'{name}.npz')
  den = load_denoiser(str(converted[name]))
  labels = ref['labels'] if 'labels' in ref else None
  out = run_jit(lambda x, s, l, a: den(x, s, l, a), ref['x'], ref['sigma'], labels,
                ref['augment_labels'])
  assert_close(out, ref['out_augment'])


def test_bfloat16_compute_stays_close(converted):
  ref = np.load(DATA / 'iddpm_adm.npz')
  den = load_denoiser(str(converted['iddpm_adm']), dtype=jnp.bfloat16)
  assert jax.tree_util.tree_leaves(den.params)[0].dtype == jnp.float32
  out = np.asarray(run_jit(lambda x, s: den(x, s), ref['x'], ref['sigma']))
  assert out.dtype == np.float32
  scale = 1 + np.abs(ref['out']).reshape(len(out), -1).max(1)
  err = np.abs(out - ref['out']).reshape(len(out), -1).max(1)
  assert np.all(err <= 0.05 * scale), err / scale


def test_two_head_attention_block_and_group_cap():
  ref = np.load(DATA / 'unetblock_heads.npz')
  block_state = {k[len('state.'):]: ref[k] for k in ref.files if k.startswith('state.')}
  variables, computed = edm.flax_variables(block_state)
  assert not computed
  block = layers.UNetBlock(32, num_heads=int(ref['num_heads']), adaptive_scale=True)
  assert_close(run_jit(block.apply, variables, ref['x'], ref['emb']), ref['out'])
  norm_state = {k[len('norm.'):]: ref[k] for k in ref.files if k.startswith('norm.')}
  norm_vars, _ = edm.flax_variables(norm_state)
  assert_close(run_jit(layers.GroupNorm().apply, norm_vars, ref['norm_x']), ref['norm_out'])


def test_iddpm_levels_match_reference_buffer():
  net = read_network_pickle(str(DATA / 'iddpm_adm.pkl'))['ema']
  stored = net.state_dict()['u']
  u = precond.iddpm_sigma_table(1000, 0.001, 0.008)
  assert u.shape == stored.shape == (1001,)
  # Float32 recursion as in EDM; torch's float32 sin differs in the last bit at places.
  np.testing.assert_allclose(u, stored, rtol=2e-5, atol=0)
  assert u[-1] == 0 and np.all(np.diff(u) < 0)


def test_vp_sigma_min_is_float32_value():
  vp = precond.VPPrecond(model=None, img_resolution=8, img_channels=1)   # EDM's defaults
  assert vp.sigma_min == 2.0 ** -10


def test_structure_mismatch_names_the_key():
  variables, config = edm.convert(str(DATA / 'ddpmpp_vp.pkl'))
  module = precond.build_precond(config['module'])
  expected = edm.expected_shapes(module)
  key = 'params/model/enc_16x16_conv/kernel'
  assert expected[key] == (3, 3, 3, 8)
  broken = jax.tree_util.tree_map(lambda a: a, variables)
  broken['params']['model']['enc_16x16_conv']['kernel'] = np.zeros((3, 3, 3, 9), np.float32)
  with pytest.raises(edm.ConversionError, match=rf'key {key} has shape \(3, 3, 3, 9\), '
                                                r'expected \(3, 3, 3, 8\)'):
    edm.check_structure(broken, expected, 'f.pkl')
  broken['params']['model']['enc_16x16_conv']['kernel'] = np.zeros((3, 3, 3, 8), np.float32)
  del broken['params']['model']['map_layer1']['bias']
  with pytest.raises(edm.ConversionError, match='missing key params/model/map_layer1/bias'):
    edm.check_structure(broken, expected, 'f.pkl')
  # A config that disagrees with the tensors (a wider model) is caught as well.
  config['module']['model']['kwargs']['model_channels'] = 16
  wider = edm.expected_shapes(precond.build_precond(config['module']))
  with pytest.raises(edm.ConversionError, match=r'f\.pkl: key params/model/\S+ has shape'):
    edm.check_structure(variables, wider, 'f.pkl')


@pytest.mark.parametrize('name', ['edm-cifar10-32x32-cond-vp', 'edm-cifar10-32x32-uncond-ve',
                                  'edm-ffhq-64x64-uncond-vp', 'edm-imagenet-64x64-cond-adm'])
def test_published_architectures_convert_shape_for_shape(name):
  """Full-size structure check on the reference's state-dict shapes (no weights)."""
  with open(DATA / 'published_shapes.json') as f:
    ref = json.load(f)[name]
  model = ModuleRecord(ref['model_class_name'], {}, ref['model_init_kwargs'])
  net = ModuleRecord(ref['class_name'], {**ref['attrs'], '_modules': {'model': model}})
  config = edm.module_config(net, name)
  module = precond.build_precond(config)
  state = {k: np.broadcast_to(np.float32(0), shape) for k, shape in ref['shapes'].items()}
  variables, computed = edm.flax_variables(state)
  edm.check_structure(variables, edm.expected_shapes(module), name)
  assert all(k.endswith('resample_filter') for k in computed)
  num_params = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables['params']))
  assert num_params == ref['num_params']  # torch parameters; Fourier freqs are buffers
  assert module.sigma_min == pytest.approx(ref['attrs']['sigma_min'], rel=1e-6)


def test_computed_buffers_must_match_the_file():
  path = str(DATA / 'ddpmpp_vp.pkl')
  net = read_network_pickle(path)['ema']
  config = edm.module_config(net, path)
  module = precond.build_precond(config)
  key = 'model.enc.8x8_down.conv0.resample_filter'
  good = {key: net.state_dict()[key]}
  edm.check_computed(module, config, good, net, path)
  wrong = {key: layers.resample_kernel([1, 3, 3, 1])[None, None]}
  with pytest.raises(edm.ConversionError, match=rf'{key} differs from resample_filter=\[1, 1\]'):
    edm.check_computed(module, config, wrong, net, path)
  net.state['sigma_min'] = 0.002
  with pytest.raises(edm.ConversionError, match='sigma_min=0.002 in the file'):
    edm.check_computed(module, config, good, net, path)


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
  data = (DATA / 'ddpmpp_vp.pkl').read_bytes()
  assert data.count(b'VPPrecond') == 1
  src = tmp_path / 'renamed.pkl'
  src.write_bytes(data.replace(b'VPPrecond', b'XPPrecond'))
  dst = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'checkpoints_convert.edm', f'--src={src}', f'--dst={dst}'],
      capture_output=True, text=True, cwd=pathlib.Path(__file__).parent.parent, timeout=300)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert lines == [f"error: {src}: network class 'XPPrecond' is not supported "
                   '(expected one of VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)']
  assert not dst.exists() and os.listdir(tmp_path) == ['renamed.pkl']


def test_from_module_without_disk_matches_loaded(converted):
  params, config = checkpoints.load_model(str(converted['ddpmpp_edm_cond']))
  den = Denoiser.from_module(precond.build_precond(config['module']), params)
  loaded = load_denoiser(str(converted['ddpmpp_edm_cond']))
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: np.array_equal(a, b), den.params, loaded.params))
  assert leaves and all(leaves)
  assert den.sigma_min == 0.002 and den.sigma_max == 80.0
