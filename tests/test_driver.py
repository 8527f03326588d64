"""The driver end to end: device/batch invariance, SIGKILL resume, FID plumbing, bad input.

Runs go through ``python main.py`` in subprocesses, as a user would, on the tiny exact
testbed config (several host devices simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count``; one persistent XLA cache shared by
the subprocesses). Input checks that need no subprocess call ``run_lib`` directly.
Converted models come from the repository's random-weight EDM and DG fixtures.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isir_jax import checkpoints
from isir_jax import fid
from isir_jax import io
from isir_jax import run_lib
from isir_jax import sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import cifar10 as cifar10_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import testbed as testbed_config  # pylint: disable=g-import-not-at-top,wrong-import-position

# Stochastic EDM on the tiny testbed: every step draws noise from the sample's own key,
# and it compiles in seconds (the ISIR test below is the slow one).
CONFIG_ARG = 'edm,tiny'
CONFIG = f'configs/testbed.py:{CONFIG_ARG}'
CHURN = 5.0
BASE_FLAGS = (f'--config.sampler.S_churn={CHURN}',)


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA cache for this file's subprocesses: identical programs compile once."""
  global _CACHE_DIR
  _CACHE_DIR = str(tmp_path_factory.mktemp('xla_cache'))
  yield
  _CACHE_DIR = None


_CACHE_DIR = None


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  if _CACHE_DIR:
    env.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _args(workdir, *flags, config=CONFIG) -> list[str]:
  base = BASE_FLAGS if config == CONFIG else ()
  return [sys.executable, 'main.py', f'--config={config}', f'--workdir={workdir}', *base, *flags]


def run_main(workdir, *flags, devices=1, config=CONFIG) -> subprocess.CompletedProcess:
  return subprocess.run(_args(workdir, *flags, config=config), cwd=ROOT, env=_env(devices),
                        capture_output=True, text=True, timeout=300)


def load_run(workdir) -> np.ndarray:
  """All samples of a workdir, in global sample order."""
  paths = io.shard_paths(str(workdir))
  assert paths, f'no shards in {workdir}'
  return np.concatenate([io.read_shard(p)[0] for p in paths])


# The reference run: 64 samples in 32 shards of 2 on one device, uninterrupted.
RUN_FLAGS = ('--config.sample.num_samples=64', '--config.sample.batch_size=2')


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_device')
  result = run_main(workdir, *RUN_FLAGS)
  assert result.returncode == 0, result.stderr
  return workdir


def test_reference_run_output(reference_run):
  assert io.complete_shards(str(reference_run)) == list(range(32))
  samples = load_run(reference_run)
  assert samples.dtype == np.uint8 and samples.shape == (64, 8, 8, 1)
  assert len({s.tobytes() for s in samples}) > 48  # per-sample keys (a few saturate to 0)
  assert os.path.isfile(reference_run / 'samples_0.png')
  assert os.path.isfile(reference_run / io.RUN_CONFIG_NAME)


@pytest.mark.parametrize('devices,batch_size', [(4, 8), (4, 3)])
def test_samples_independent_of_devices_and_batch(reference_run, tmp_path, devices, batch_size):
  # batch 3 on 4 devices: every batch is padded to 4 and the padding dropped.
  result = run_main(tmp_path, '--config.sample.num_samples=64',
                    f'--config.sample.batch_size={batch_size}', devices=devices)
  assert result.returncode == 0, result.stderr
  assert f'{devices} local / {devices} global devices' in result.stderr
  np.testing.assert_array_equal(load_run(tmp_path), load_run(reference_run))


def test_isir_independent_of_batch_padding(tmp_path):
  """The recommended ISIR setting on 4 devices: batch 3 (padded to 4) against batch 4.

  Both runs compile the same program (one sample per device), so the second one hits the
  compilation cache; device-count invariance itself is covered by the test above.
  """
  config = 'configs/testbed.py:isir_stochastic,tiny'
  for batch_size in (3, 4):
    result = run_main(tmp_path / f'{batch_size}', f'--config.sample.batch_size={batch_size}',
                      devices=4, config=config)
    assert result.returncode == 0, result.stderr
    # N = K = 2, 4 steps: churn acts at steps 1 and 2 only (S_min 0.01, S_max 50), each 2 Heun
    # NFE x 3 proposals and 3 discriminator calls; step 0 (t = 80) is one plain Heun step and the
    # last (Euler, t < S_min) one plain evaluation: 2 + 12 + 1 NFE; the initial latent's i-SIR
    # adds 3 discriminator calls: 6 + 3.
    assert 'ESS' in result.stderr and 'NFE/sample 15, disc evals 9' in result.stderr
  np.testing.assert_array_equal(load_run(tmp_path / '3'), load_run(tmp_path / '4'))


def test_smc_independent_of_devices_and_batch_at_whole_groups(tmp_path):
  """SMC resamples within groups of 2 (tiny config): 8 samples in batches of 8 on one
  device equal batches of 4 on two devices, and a run killed after its first shard resumes
  to the same samples."""
  config = 'configs/testbed.py:smc,tiny'
  runs = {'one': ('--config.sample.batch_size=8', 1), 'two': ('--config.sample.batch_size=4', 2)}
  for name, (flag, devices) in runs.items():
    result = run_main(tmp_path / name, '--config.sample.num_samples=8', flag, devices=devices,
                      config=config)
    assert result.returncode == 0, result.stderr
    assert 'ancestors/group' in result.stderr
  np.testing.assert_array_equal(load_run(tmp_path / 'one'), load_run(tmp_path / 'two'))
  os.remove(tmp_path / 'two' / 'samples_1.npz')
  resumed = run_main(tmp_path / 'two', '--config.sample.num_samples=8',
                     '--config.sample.batch_size=4', devices=2, config=config)
  assert resumed.returncode == 0 and '1 of 2 shards to generate' in resumed.stderr
  np.testing.assert_array_equal(load_run(tmp_path / 'one'), load_run(tmp_path / 'two'))


@pytest.mark.parametrize('sample,devices,message', [
    (dict(batch_size=3), 1, r'config.sample.batch_size=3 is not a multiple of 2'),
    (dict(batch_size=2), 2, r'config.sample.batch_size on 2 devices=2 is not a multiple of 4'),
    (dict(batch_size=4, num_samples=7), 1, r'config.sample.num_samples=7 is not a multiple of 2'),
])
def test_smc_refuses_to_split_a_group(tmp_path, sample, devices, message):
  config = testbed_config.get_config('smc,tiny')
  config.sample.update(sample)
  with pytest.raises(run_lib.RunError, match=message):
    sampling.check_groups(config, devices)
  if devices == 1:   # the driver checks before it samples
    with pytest.raises(run_lib.RunError, match=message):
      run_lib.sample(config, str(tmp_path))
    assert not io.complete_shards(str(tmp_path))


# A process of a multi-host job, as TPU pods or SLURM would start it (explicit coordinator).
_WORKER = """
import sys
import jax
sys.path.insert(0, {root!r})
jax.distributed.initialize({address!r}, num_processes=2, process_id=int(sys.argv[1]))
from configs import testbed
from isir_jax import run_lib
from isir_jax import sampling
config = testbed.get_config({arg!r})
config.sampler.S_churn = {churn}
config.sample.num_samples, config.sample.batch_size = 64, 3
run_lib.sample(config, {workdir!r})
"""


def test_two_processes_equal_one(reference_run, tmp_path):
  """Two processes x 2 devices (batch 3 padded to 4 global rows) against one process."""
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  code = _WORKER.format(root=ROOT, address=f'localhost:{port}', arg=CONFIG_ARG, churn=CHURN,
                        workdir=str(tmp_path))
  procs = [subprocess.Popen([sys.executable, '-c', code, str(i)], cwd=ROOT, env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  for proc in procs:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
  np.testing.assert_array_equal(load_run(tmp_path), load_run(reference_run))


def test_resume_after_sigkill(reference_run, tmp_path):
  proc = subprocess.Popen(_args(tmp_path, *RUN_FLAGS), cwd=ROOT, env=_env(1),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  first = tmp_path / 'samples_0.npz'
  deadline = time.time() + 120
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.001)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  kept = io.complete_shards(str(tmp_path))
  assert 0 in kept and len(kept) < 32, f'the kill did not interrupt the run: {kept}'

  resumed = run_main(tmp_path, *RUN_FLAGS)
  assert resumed.returncode == 0, resumed.stderr
  assert f'{32 - len(kept)} of 32 shards to generate' in resumed.stderr
  assert '(resumed)' in resumed.stderr
  assert io.complete_shards(str(tmp_path)) == list(range(32))
  assert not glob.glob(str(tmp_path / '.tmp-*'))  # stale temporaries removed
  np.testing.assert_array_equal(load_run(tmp_path), load_run(reference_run))


@pytest.mark.parametrize('module,arg', [
    (module, f'{method}{flags}')
    for module, flag_sets in ((cifar10_config, ('', ',cond', ',tiny', ',cond,tiny')),
                              (testbed_config, ('', ',tiny')))
    for method in ('edm', 'dg', 'diffrs', 'isir', 'isir_stochastic', 'smc')
    for flags in flag_sets])
def test_every_config_builds_its_sampler(module, arg):
  """Each config's sampler settings are accepted by the sampler factory (no compile)."""
  from isir_jax import samplers  # pylint: disable=g-import-not-at-top
  from isir_jax import testbed  # pylint: disable=g-import-not-at-top
  from isir_jax.samplers import diffrs  # pylint: disable=g-import-not-at-top
  config = module.get_config(arg)
  assert config.model.conditional == ('cond' in arg)
  assert config.sampler.name == arg.split(',')[0].split('_')[0]
  if 'tiny' in arg:
    assert config.sample.num_samples <= 8
  settings = {k: v for k, v in config.sampler.items() if k not in sampling.DRIVER_SAMPLER_KEYS}
  if config.sampler.name == 'diffrs':
    zeros = np.zeros(config.sampler.num_steps + 1, np.float32)
    settings['thresholds'] = diffrs.Thresholds(zeros, zeros)
  bed = testbed.make_testbed('gmm64')
  samplers.get_sampler(config.sampler.name)(bed.model_denoiser, bed.discriminator,
                                            shape=bed.shape, **settings)


@pytest.mark.parametrize('config,override,path,value', [
    ('configs/cifar10.py:isir_stochastic', 'sampler.candidate_chunk=None',
     'sampler.candidate_chunk', None),
    ('configs/cifar10.py:isir_stochastic', 'sampler.candidate_chunk=3',
     'sampler.candidate_chunk', 3),
    ('configs/cifar10.py:dg', 'train.discriminator.patience=4', 'train.discriminator.patience', 4),
    ('configs/digits.py', 'train.denoiser.class_weights=None', 'train.denoiser.class_weights',
     None),
    ('configs/digits.py:natural', 'train.denoiser.class_weights=(1,2,3,4,5,1,2,3,4,5)',
     'train.denoiser.class_weights', (1, 2, 3, 4, 5, 1, 2, 3, 4, 5))])
def test_fields_documented_as_optional_accept_none_on_the_command_line(config, override, path,
                                                                       value):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['main.py', f'--config={os.path.join(ROOT, config)}', f'--config.{override}']
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  got = flag_values.config
  for name in path.split('.'):
    got = got[name]
  assert got == value


def test_sample_mode_logs_only_the_project_and_writes_readable_grids(tmp_path):
  """Orbax's and XLA's INFO lines are left out; the 8x8 digits' PNG grid is upscaled."""
  result = run_main(tmp_path, '--mode=sample', config='configs/digits.py:edm,tiny')
  assert result.returncode == 0, result.stderr
  records = re.findall(r'[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] (.*)', result.stderr)
  assert any(text.startswith('shard 0: 4 images') for _, text in records), result.stderr
  assert {source for source, _ in records} <= {'main.py', 'run_lib.py', 'sampling.py'}, records
  import PIL.Image  # pylint: disable=g-import-not-at-top
  assert PIL.Image.open(tmp_path / 'samples_0.png').size == (4 * 22, 4 * 22)


def test_bad_config_argument():
  with pytest.raises(ValueError, match=r'configs/cifar10.py: bad config argument .*foo'):
    cifar10_config.get_config('isir,foo')


def _fails_with(result: subprocess.CompletedProcess, message: str) -> None:
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, result.stderr


def test_missing_checkpoint(tmp_path):
  result = run_main(tmp_path / 'run', f'--config.model.denoiser={tmp_path}/nowhere',
                    config='configs/cifar10.py:edm,tiny')
  _fails_with(result, f'config.model.denoiser={tmp_path}/nowhere: no such directory')
  assert not io.complete_shards(str(tmp_path / 'run'))


def test_unwritable_workdir(tmp_path):
  (tmp_path / 'file').write_text('')
  result = run_main(tmp_path / 'file' / 'run')
  _fails_with(result, 'is not writable')


# The remaining checks call run_lib in-process (same code path as main.py, minus startup).


def _config(**sample):
  config = testbed_config.get_config(CONFIG_ARG)
  config.sampler.S_churn = CHURN
  config.sample.update(sample)
  return config


def test_unconverted_checkpoint(tmp_path):
  (tmp_path / 'raw').mkdir()
  config = cifar10_config.get_config('edm,tiny')
  config.model.denoiser = str(tmp_path / 'raw')
  with pytest.raises(run_lib.RunError, match=r'raw: not a converted model directory \(no config.json\)'):
    run_lib.sample(config, str(tmp_path / 'run'))


def test_conditional_config_with_unconditional_network(tmp_path):
  config = _config()
  config.model.conditional = True
  with pytest.raises(run_lib.RunError, match='config.model.conditional=True but '
                     'config.model.denoiser=testbed is unconditional'):
    run_lib.sample(config, str(tmp_path))
  assert not io.complete_shards(str(tmp_path))


def test_bad_batch_size(tmp_path):
  with pytest.raises(run_lib.RunError, match='config.sample.batch_size must be >= 1, got 0'):
    run_lib.sample(_config(batch_size=0), str(tmp_path))


def test_non_finite_samples_are_not_saved(tmp_path):
  # A huge churn noise overflows float32 in the denoiser.
  config = _config()
  config.sampler.S_noise = 1e30
  with pytest.raises(run_lib.RunError, match=r'shard 0: 4 non-finite samples at global '
                     r'indices \[0, 1, 2, 3\]; shard not saved'):
    run_lib.sample(config, str(tmp_path))
  assert not io.complete_shards(str(tmp_path))


# --- FID: sample -> fid_stats -> eval with a random-weight Inception. ---

INCEPTION_DIV = 16  # 1/16 of the real widths: the FID topology in seconds


@pytest.fixture(scope='module')
def tiny_inception(tmp_path_factory):
  """A random-weight FID Inception in the converted layout (plumbing only, no parity)."""
  from isir_jax.networks.inception import InceptionV3FID  # pylint: disable=g-import-not-at-top
  module = InceptionV3FID(width_divisor=INCEPTION_DIV)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if 'kernel' in name:
      return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if 'var' in name or 'scale' in name:
      return (1 + 0.1 * rng.random(leaf.shape)).astype(np.float32)
    return (0.1 * rng.normal(size=leaf.shape)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  directory = str(tmp_path_factory.mktemp('inception') / 'model')
  checkpoints.save_model(directory, variables,
                         {'family': fid.FAMILY, 'module': {'width_divisor': INCEPTION_DIV}})
  return directory


def test_sample_fid_stats_eval(reference_run, tiny_inception, tmp_path):
  fid_flags = (f'--config.fid.inception={tiny_inception}', '--config.fid.batch_size=16')
  stats = run_main(tmp_path, '--mode=fid_stats', f'--config.fid.dataset={reference_run}',
                   *fid_flags)
  assert stats.returncode == 0, stats.stderr
  ref = tmp_path / 'fid_stats.npz'
  with np.load(ref) as data:
    dim = fid.FEATURE_DIM // INCEPTION_DIV
    assert data['mu'].shape == (dim,) and data['sigma'].shape == (dim, dim)

  result = run_main(reference_run, '--mode=eval', f'--config.fid.ref_stats={ref}', *RUN_FLAGS,
                    *fid_flags)
  assert result.returncode == 0, result.stderr
  assert 'FID ' in result.stderr and 'Inception Score' in result.stderr
  scores = json.loads((reference_run / 'eval.json').read_text())
  assert scores['num_samples'] == 64
  # The same 64 images on both sides: the distance is zero up to sqrtm round-off.
  with np.load(ref) as data:
    assert abs(scores['fid']) < 1e-6 * np.trace(data['sigma']) + 1e-6
  assert scores['inception_score'] >= 1.0
  with np.load(reference_run / 'eval_stats.npz') as ours, np.load(ref) as theirs:
    np.testing.assert_allclose(ours['mu'], theirs['mu'], rtol=1e-12)


def test_eval_refuses_stats_of_wrong_shape(reference_run, tiny_inception, tmp_path):
  bad = tmp_path / 'bad.npz'
  np.savez(bad, mu=np.zeros(7), sigma=np.eye(7))
  config = _config(num_samples=64, batch_size=2)
  config.fid.inception = tiny_inception
  config.fid.ref_stats = str(bad)
  with pytest.raises(run_lib.RunError, match=r'config.fid.ref_stats: .*bad.npz'):
    run_lib.evaluate(config, str(reference_run))


def test_eval_refuses_incomplete_workdir(reference_run, tiny_inception):
  config = _config(num_samples=128, batch_size=2)
  config.fid.inception = tiny_inception
  config.fid.ref_stats = 'unused.npz'
  with pytest.raises(run_lib.RunError, match=r'lacks 32 of the 64 shards of '
                     r'config.sample.num_samples=128 \(first: samples_32.npz\)'):
    run_lib.evaluate(config, str(reference_run))


def test_rerun_extends_the_set_and_refuses_other_configs(tmp_path):
  run_lib.sample(_config(num_samples=6, batch_size=4), str(tmp_path))
  assert io.complete_shards(str(tmp_path)) == [0, 1]
  first = load_run(tmp_path)
  assert len(first) == 6
  run_lib.sample(_config(num_samples=8, batch_size=4), str(tmp_path))
  extended = load_run(tmp_path)
  assert len(extended) == 8
  np.testing.assert_array_equal(extended[:6], first)  # the short last shard was redone
  config = _config(num_samples=8, batch_size=4)
  config.sampler.S_churn = 1.0
  with pytest.raises(run_lib.RunError, match=r'written by a different sampling config '
                     r'\(differs at: sampler.S_churn\)'):
    run_lib.sample(config, str(tmp_path))


def test_diffrs_thresholds_estimated_once(tmp_path):
  config = 'configs/testbed.py:diffrs,tiny'
  first = run_main(tmp_path, '--config.sample.num_samples=4', config=config)
  assert first.returncode == 0, first.stderr
  assert 'DiffRS thresholds from 8 warm-up samples written' in first.stderr
  assert 'accept' in first.stderr
  path = tmp_path / sampling.DIFFRS_THRESHOLDS_NAME
  with np.load(path) as data:
    assert data['warmup_log_ratios'].shape == (8, 5)  # 8 samples x (4 steps + 1) levels
    saved = data['log_ratio'].copy()
  second = run_main(tmp_path, '--config.sample.num_samples=8', config=config)
  assert second.returncode == 0, second.stderr
  assert 'warm-up' not in second.stderr and '1 of 2 shards to generate' in second.stderr
  with np.load(path) as data:
    np.testing.assert_array_equal(data['log_ratio'], saved)


class _LabelRecorder:
  """A discriminator wrapper recording, at run time, the classes of the labels it is given."""

  def __init__(self, inner):
    self.inner, self.classes = inner, []

  def log_ratio(self, x, sigma, class_labels=None):
    jax.debug.callback(lambda c: self.classes.extend(np.asarray(c).tolist()),
                       jnp.argmax(class_labels, axis=1))
    return self.inner.log_ratio(x, sigma)


def test_diffrs_warmup_keeps_the_fixed_class(tmp_path):
  """A fixed-class conditional run warms its thresholds up on that class (as upstream)."""
  from isir_jax import testbed  # pylint: disable=g-import-not-at-top
  tb = testbed.make_testbed('gmm64')
  config = testbed_config.get_config('diffrs,tiny')
  config.model.conditional = True
  config.sample.class_idx = 3
  denoiser = testbed.MixtureDenoiser(tb.model, tb.shape, label_dim=10)
  disc = _LabelRecorder(tb.discriminator)
  sampling.warmup_thresholds(config, denoiser, disc)
  jax.effects_barrier()
  assert disc.classes and set(disc.classes) == {3}


# --- Converted EDM networks (the repository's random-weight fixtures, 16x16 / 8x8). ---


@pytest.fixture(scope='module')
def edm_dirs(tmp_path_factory):
  """The unconditional and the class-conditional fixture networks, converted as a user does."""
  dirs = {}
  for name in ('ddpmpp_vp', 'ddpmpp_edm_cond'):
    dst = tmp_path_factory.mktemp('models') / name
    result = subprocess.run(
        [sys.executable, '-m', 'checkpoints_convert.edm', f'--src=tests/data/edm/{name}.pkl',
         f'--dst={dst}'], cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    dirs[name] = str(dst)
  return dirs


def test_conditional_network_samples_with_labels(edm_dirs, tmp_path):
  result = run_main(tmp_path, f'--config.model.denoiser={edm_dirs["ddpmpp_edm_cond"]}',
                    config='configs/cifar10.py:edm,cond,tiny')
  assert result.returncode == 0, result.stderr
  labels = []
  for samples, shard_labels in map(io.read_shard, io.shard_paths(str(tmp_path))):
    assert samples.shape == (4, 8, 8, 3) and samples.dtype == np.uint8
    assert shard_labels is not None and shard_labels.shape == (4,)
    labels.append(shard_labels)
  labels = np.concatenate(labels)
  assert ((labels >= 0) & (labels < 10)).all() and len(set(labels.tolist())) > 1


@pytest.mark.parametrize('network,arg,message', [
    ('ddpmpp_vp', 'edm,cond,tiny', 'config.model.conditional=True but config.model.denoiser='
     '{dir} is unconditional'),
    ('ddpmpp_edm_cond', 'edm,tiny', 'config.model.conditional=False but config.model.denoiser='
     '{dir} is conditional'),
])
def test_conditioning_mismatch(edm_dirs, tmp_path, network, arg, message):
  config = cifar10_config.get_config(arg)
  config.model.denoiser = edm_dirs[network]
  with pytest.raises(run_lib.RunError, match=re.escape(message.format(dir=edm_dirs[network]))):
    run_lib.sample(config, str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.fixture(scope='module')
def dg_cond_dir(tmp_path_factory):
  """The repository's DG fixture (16x16 classifier + class-conditional head), converted."""
  from checkpoints_convert import dg as convert_dg  # pylint: disable=g-import-not-at-top
  from checkpoints_convert.reader import read_state_dict  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'tests', 'data', 'dg', 'arch.json')) as f:
    arch = convert_dg.Arch(**json.load(f), cond=True)
  params, config = convert_dg.convert(
      read_state_dict(os.path.join(ROOT, 'tests', 'data', 'dg', 'classifier.pt')),
      read_state_dict(os.path.join(ROOT, 'tests', 'data', 'dg', 'discriminator_cond.pt')), arch)
  directory = str(tmp_path_factory.mktemp('models') / 'dg_cond')
  checkpoints.save_model(directory, params, config)
  return directory


def test_unconditional_config_with_conditional_discriminator(edm_dirs, dg_cond_dir, tmp_path):
  config = cifar10_config.get_config('dg,tiny')
  config.model.denoiser = edm_dirs['ddpmpp_vp']
  config.model.discriminator = dg_cond_dir
  with pytest.raises(run_lib.RunError, match=re.escape(
      f'config.model.conditional=False but config.model.discriminator={dg_cond_dir} is '
      'conditional')):
    run_lib.sample(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_wrong_model_family(dg_cond_dir, tmp_path):
  config = cifar10_config.get_config('edm,tiny')
  config.model.denoiser = dg_cond_dir
  with pytest.raises(run_lib.RunError, match=re.escape(
      f"config.model.denoiser={dg_cond_dir}: ") + ".*family is 'dg_discriminator', expected 'edm'"):
    run_lib.sample(config, str(tmp_path))


def test_model_dtype(edm_dirs, tmp_path):
  config = cifar10_config.get_config('edm,tiny')
  config.model.denoiser = edm_dirs['ddpmpp_vp']
  config.model.dtype = 'bfloat16'
  denoiser, _ = sampling.load_models(config)
  assert denoiser.module.model.dtype == jnp.bfloat16
  config.model.dtype = 'float16'
  with pytest.raises(run_lib.RunError, match=r"config.model.dtype must be one of \['bfloat16', "
                     r"'float32'\], got 'float16'"):
    run_lib.sample(config, str(tmp_path))
