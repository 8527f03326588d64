"""Hostile inputs: no file or --dst makes a converter crash, hang, exhaust or write.

Every case runs in a subprocess under RLIMIT_AS/RLIMIT_CPU and asserts the contract
of a refusal: exit 2, exactly one ``error:`` line and nothing else on stderr, nothing
written or deleted, bounded wall time, and a peak RSS (``ru_maxrss`` from
``os.wait4``) within a margin of a trivial refusal's. Reader attacks run against the
reader alone (no jax import, ~0.3 s each); converter attacks run many to one
process; the CLI contract (``--dst``, dg and inception entry points) one per process.
The files come from tests/generators/hostile_cases.py.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import pytest

from checkpoints_convert import common
from checkpoints_convert import edm
from checkpoints_convert import reader
from generators import hostile_cases as hc
from isir_jax import checkpoints
import test_reader

REPO = pathlib.Path(__file__).parent.parent
EDM_FIXTURE = REPO / 'tests' / 'data' / 'edm' / 'ddpmpp_vp.pkl'
DG_DATA = REPO / 'tests' / 'data' / 'dg'
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'OPENBLAS_NUM_THREADS': '1',
       'PYTHONPATH': str(REPO)}
KILL_AFTER_S = 60          # wall clock, and RLIMIT_CPU
WALL_BOUND_S = 30          # asserted per process
READER_AS, CLI_AS = 1 << 30, 4 << 30
READER_MARGIN_MIB, CLI_MARGIN_MIB = 96, 384
READ = ('import sys\n'
        'from checkpoints_convert import reader\n'
        'path = sys.argv[1]\n'
        'read = reader.read_network_pickle if path.endswith(".pkl") else reader.read_state_dict\n'
        'reader.main_guard(read)(path)\n')


@dataclasses.dataclass
class Run:
  rc: int
  stdout: str
  stderr: str
  wall_s: float
  peak_mib: float


# Sets the limits, then becomes the command (no preexec_fn: the test process runs jax threads).
LIMITED = ('import os, resource, sys\n'
           'for limit, value in ((resource.RLIMIT_AS, int(sys.argv[1])), '
           '(resource.RLIMIT_CPU, int(sys.argv[2]))):\n'
           '  resource.setrlimit(limit, (value, value))\n'
           'os.execv(sys.argv[3], sys.argv[3:])\n')


def run_limited(argv: list, address_space: int, cwd=REPO, env=None) -> Run:
  """Runs ``argv`` under address-space and CPU limits; returns its own peak RSS."""
  argv = [sys.executable, '-c', LIMITED, str(address_space), str(KILL_AFTER_S), *argv]
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env={**ENV, **(env or {})}, stdout=out, stderr=err)
    timer = threading.Timer(KILL_AFTER_S, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    out.seek(0)
    err.seek(0)
    return Run(proc.returncode, out.read().decode(errors='replace'),
               err.read().decode(errors='replace'), wall, usage.ru_maxrss / 1024)


def run_reader(path) -> Run:
  return run_limited([sys.executable, '-c', READ, str(path)], READER_AS)


def run_cli(module: str, *args, cwd=REPO, env=None) -> Run:
  return run_limited([sys.executable, '-m', f'checkpoints_convert.{module}', *map(str, args)],
                     CLI_AS, cwd, env)


def snapshot(root) -> dict:
  """Every path under ``root`` (links not followed) with its type, size and mtime."""
  out = {}
  for base, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(base, name)
      st = os.lstat(path)
      out[os.path.relpath(path, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
  return out


def assert_refused(run: Run, expected: str, baseline: float, margin: float) -> str:
  """Exit 2, one ``error:`` line (nothing else on stderr or stdout), bounded time and memory."""
  lines = run.stderr.splitlines()
  assert run.rc == 2, run.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), run.stderr[-2000:]
  assert expected in lines[0], lines[0]
  assert lines[0].isprintable() and len(lines[0]) < 2100
  assert run.stdout == ''
  assert run.wall_s < WALL_BOUND_S
  assert run.peak_mib < baseline + margin, (run.peak_mib, baseline)
  return lines[0]


@pytest.fixture(scope='module')
def reader_baseline(tmp_path_factory) -> float:
  """Peak RSS of the reader refusing a missing file."""
  run = run_reader(tmp_path_factory.mktemp('base') / 'absent.pkl')
  assert run.rc == 2 and 'no such file' in run.stderr
  return run.peak_mib


@pytest.fixture(scope='module')
def cli_baseline() -> float:
  """Peak RSS of the EDM converter refusing an empty --dst (it imports jax and flax)."""
  run = run_cli('edm', '--src', EDM_FIXTURE, '--dst', '')
  assert run.rc == 2, run.stderr
  return run.peak_mib


# ---------------------------------------------------------------------------
# The reader alone: out-of-bounds views, BUILD, blow-ups, hash and repr bombs, deep
# nesting, memo abuse, huge lengths, complex dtypes, message injection.


@pytest.mark.parametrize('name', sorted(hc.reader_cases()))
def test_reader_refuses(tmp_path, reader_baseline, name):
  file_name, data, expected = hc.reader_cases()[name]
  path = tmp_path / file_name
  path.write_bytes(data)
  before = snapshot(tmp_path)
  line = assert_refused(run_reader(path), expected, reader_baseline, READER_MARGIN_MIB)
  assert '\x1b' not in line
  assert snapshot(tmp_path) == before


def test_nothing_leaks_between_two_reads(tmp_path):
  """A file that tries to rebind a storage class cannot change how the next file reads."""
  rebind = tmp_path / 'rebind.pkl'
  rebind.write_bytes(hc.marker_rebind())
  with pytest.raises(reader.CheckpointError, match='BUILD on a _StorageType is not allowed'):
    reader.read_network_pickle(str(rebind))
  with np.load(os.path.join(test_reader.DATA, 'expected.npz')) as npz:
    wanted = test_reader.section({k: npz[k] for k in npz.files}, 'sd/')
  for path in test_reader.STATE_DICTS.values():
    test_reader.assert_same_arrays(reader.read_state_dict(path), wanted)


# Cuts the file to a third and restores it, over and over, until killed.
CUT = ('import os, sys\n'
       'path = sys.argv[1]\n'
       'data = open(path, "rb").read()\n'
       'while True:\n'
       '  os.truncate(path, len(data) // 3)\n'
       '  with open(path, "r+b") as f:\n'
       '    f.write(data)\n')
READ_MANY = ('import sys\n'
             'from checkpoints_convert import reader\n'
             'for _ in range(20):\n'
             '  try:\n'
             '    reader.read_state_dict(sys.argv[1])\n'
             '  except reader.CheckpointError as e:\n'
             '    assert "truncated" in str(e), str(e)\n')


def test_source_cut_while_read(tmp_path):
  """A file cut underneath the reader is read whole or refused as truncated, never a signal."""
  path = tmp_path / 'sd.pt'
  path.write_bytes(hc.large_state_dict(1 << 22))
  cutter = subprocess.Popen([sys.executable, '-c', CUT, str(path)])
  try:
    run = run_limited([sys.executable, '-c', READ_MANY, str(path)], READER_AS)
  finally:
    cutter.kill()
    cutter.wait()
  assert run.rc == 0, (run.rc, run.stderr[-2000:])
  assert run.wall_s < WALL_BOUND_S


# ---------------------------------------------------------------------------
# The EDM converter: bad configuration values, names and buffers, all in one process.


BATCH = '''
import contextlib, io, json, sys, time
from checkpoints_convert import edm
edm.define_flags()
results = {}
for name, src, dst in json.loads(sys.argv[1]):
  err, out, start = io.StringIO(), io.StringIO(), time.monotonic()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    try:
      edm.FLAGS(['edm', f'--src={src}', f'--dst={dst}'])
      edm.main([])
      code = 0
    except SystemExit as e:
      code = e.code
  results[name] = dict(code=code, stderr=err.getvalue(), stdout=out.getvalue(),
                       seconds=time.monotonic() - start)
print(json.dumps(results))
'''


def test_edm_converter_refuses_bad_values(tmp_path, cli_baseline):
  jobs = []
  for name, (fixture, mutate, _) in hc.EDM_CASES.items():
    src = tmp_path / f'{name}.pkl'
    src.write_bytes(hc.edm_network(fixture, mutate))
    jobs.append((name, str(src), str(tmp_path / 'out' / name)))
  # The valid case replaces a previous converter output (its marker lists exactly what is
  # there); the sibling file stays.
  previous = tmp_path / 'out' / 'valid'
  (previous / 'params').mkdir(parents=True)
  (previous / 'params' / 'old').write_text('old')
  (previous / 'config.json').write_text('{}')
  (previous / common.MARKER_NAME).write_text(json.dumps(
      {'written': {'config.json': 2, 'params': 'dir', 'params/old': 3}}))
  (tmp_path / 'out' / 'sibling.txt').write_text('keep')

  run = run_limited([sys.executable, '-c', BATCH, json.dumps(jobs)], CLI_AS)
  assert run.rc == 0 and run.stderr == '', run.stderr[-3000:]
  assert run.wall_s < 2 * WALL_BOUND_S
  assert run.peak_mib < cli_baseline + CLI_MARGIN_MIB, (run.peak_mib, cli_baseline)
  results = json.loads(run.stdout)
  for name, (_, _, expected) in hc.EDM_CASES.items():
    result, dst = results[name], tmp_path / 'out' / name
    assert result['seconds'] < WALL_BOUND_S, name
    lines = result['stderr'].splitlines()
    if expected is None:
      assert result['code'] == 0 and result['stdout'].count('\n') == 1, (name, result)
      assert sorted(os.listdir(dst)) == ['config.json', common.MARKER_NAME, 'params'], name
      continue
    assert result['code'] == 2 and result['stdout'] == '', (name, result)
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], (
        name, lines)
    assert lines[0].isprintable(), name
    assert not os.path.lexists(dst), name
  assert (tmp_path / 'out' / 'sibling.txt').read_text() == 'keep'
  assert sorted(os.listdir(tmp_path / 'out')) == ['nan_weight', 'sibling.txt', 'valid']
  assert not (previous / 'params' / 'old').exists()
  nan_lines = results['nan_weight']['stderr'].splitlines()
  assert len(nan_lines) == 1 and nan_lines[0].startswith('warning: ') and (
      '1 non-finite values in 1 tensors' in nan_lines[0])
  # The re-pickled fixture converts to exactly the fixture's own weights.
  params, _ = checkpoints.load_model(str(previous))
  want, _ = edm.convert(str(EDM_FIXTURE))
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert len(leaves) == len(jax.tree_util.tree_leaves(want))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         params, want)


# ---------------------------------------------------------------------------
# --dst: refused before the input is read; nothing written or deleted.


def _dst_cases(tmp: pathlib.Path) -> dict:
  """name -> (--dst, extra flags, expected text); builds what each case needs in ``tmp``."""
  (tmp / 'other').mkdir()
  (tmp / 'other' / 'notes.txt').write_text('mine')
  (tmp / 'afile').write_text('x')
  (tmp / 'layout' / 'params').mkdir(parents=True)
  (tmp / 'layout' / 'config.json').write_text('{}')
  (tmp / 'layout' / 'params' / 'my_notes.txt').write_text('mine')
  (tmp / 'empty').mkdir()
  os.symlink(tmp / 'empty', tmp / 'link')
  os.symlink(tmp / 'nowhere', tmp / 'dangling')
  if os.geteuid() == 0:   # root writes anywhere but to pseudo file systems
    unwritable = '/proc/isir-hostile/model'
  else:
    (tmp / 'ro').mkdir(mode=0o500)
    unwritable = tmp / 'ro' / 'model'
  src = tmp / 'in' / 'net.pkl'
  return {
      'empty': ('', (), '--dst is empty'),
      'dot': ('.', (), 'is the working directory or one of its parents'),
      'root': ('/', (), 'is the working directory or one of its parents'),
      'contains_src': (tmp / 'in', (), f'is or contains the input {src}'),
      'is_src': (src, (), f'is or contains the input {src}'),
      'non_model_dir': (tmp / 'other', (), "is a non-empty directory that is not a converter's "
                        "output (what its converted.json lists); it holds 'notes.txt'; pass "
                        '--overwrite'),
      # The layout of a model directory, but not written by a converter: a user's files.
      'model_layout_with_notes': (tmp / 'layout', (), "it holds 'config.json', 'params', "
                                  "'params/my_notes.txt'; pass --overwrite"),
      'non_utf8': (tmp / os.fsdecode(b'out\xff'), (), 'is not valid UTF-8'),
      'existing_file': (tmp / 'afile', (), 'exists and is not a directory'),
      'symlink': (tmp / 'link', (), 'is a symbolic link'),
      'dangling_symlink': (tmp / 'dangling', (), 'is a symbolic link'),
      'below_file': (tmp / 'afile' / 'model', (), 'which is not a directory'),
      'unwritable': (unwritable, (), 'cannot create files in'),
      # --overwrite allows replacing a directory, but a refused input deletes nothing.
      'overwrite_hostile_src': (tmp / 'other', ('--overwrite',), 'BUILD on a _Storage'),
  }


DST_CASES = ('empty', 'dot', 'root', 'contains_src', 'is_src', 'non_model_dir',
             'model_layout_with_notes', 'non_utf8', 'existing_file', 'symlink',
             'dangling_symlink', 'below_file', 'unwritable', 'overwrite_hostile_src')


@pytest.mark.parametrize('case', DST_CASES)
def test_dst_refused_before_reading(tmp_path, cli_baseline, case):
  work = tmp_path / 'work'
  work.mkdir()
  (work / 'keep.txt').write_text('keep')
  (tmp_path / 'in').mkdir()
  cases = _dst_cases(tmp_path)
  assert sorted(cases) == sorted(DST_CASES)
  dst, extra, expected = cases[case]
  src = tmp_path / 'in' / 'net.pkl'
  if case == 'overwrite_hostile_src':
    src.write_bytes(hc.reader_cases()['build_on_storage'][1])
  else:
    shutil.copy(EDM_FIXTURE, src)
  before = snapshot(tmp_path)
  run = run_cli('edm', '--src', src, '--dst', dst, *extra, cwd=work)
  assert_refused(run, expected, cli_baseline, CLI_MARGIN_MIB)
  assert snapshot(tmp_path) == before
  if case == 'root':
    assert not [n for n in os.listdir('/') if n.startswith('.probe-') or '.tmp-' in n]


# ---------------------------------------------------------------------------
# The other converters share the entry point: same contract.


def test_dg_refuses_empty_dst_and_hostile_classifier(tmp_path, cli_baseline):
  with open(DG_DATA / 'arch.json') as f:
    arch = [f'--{k}={v}' for k, v in json.load(f).items()]
  before = snapshot(tmp_path)
  run = run_cli('dg', f'--classifier={DG_DATA / "classifier.pt"}', '--dst=', *arch)
  assert_refused(run, '--dst is empty', cli_baseline, CLI_MARGIN_MIB)
  hostile = tmp_path / 'classifier.pt'
  hostile.write_bytes(hc.reader_cases()['oob_zip_record'][1])
  before = snapshot(tmp_path)
  run = run_cli('dg', f'--classifier={hostile}', f'--dst={tmp_path / "out"}', *arch)
  assert_refused(run, 'storage record data/0 holds 16 bytes', cli_baseline, CLI_MARGIN_MIB)
  assert snapshot(tmp_path) == before


def test_dg_refuses_undecodable_input_path(tmp_path, cli_baseline):
  """A path with a non-UTF-8 byte: one escaped line, even with a strict UTF-8 stdout."""
  with open(DG_DATA / 'arch.json') as f:
    arch = [f'--{k}={v}' for k, v in json.load(f).items()]
  src = tmp_path / os.fsdecode(b'classifier\xff.pt')
  shutil.copy(DG_DATA / 'classifier.pt', src)
  before = snapshot(tmp_path)
  run = run_cli('dg', f'--classifier={src}', f'--dst={tmp_path / "out"}', *arch,
                env={'PYTHONIOENCODING': 'utf-8'})
  line = assert_refused(run, 'is not valid UTF-8', cli_baseline, CLI_MARGIN_MIB)
  assert 'classifier\\udcff.pt' in line
  assert snapshot(tmp_path) == before


def test_written_model_is_loaded_back(tmp_path):
  """A model that does not load back as converted is refused, and nothing is left behind."""
  params = {'params': {'dense': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}}}
  config = {'family': 'test'}
  (tmp_path / 'keep.txt').write_text('keep')
  before = snapshot(tmp_path)
  loaders = {
      'loads back different from the conversion ([\'params\'][\'dense\'][\'kernel\'] '
      'holds other values)': lambda d: jax.tree_util.tree_map(lambda x: x + 1, params),
      'loads back different from the conversion (missing key': lambda d: {},
      'does not load (ValueError: no such family)': lambda d: (_ for _ in ()).throw(
          ValueError('no such family')),
  }
  for expected, load in loaders.items():
    with pytest.raises(common.ConversionError, match=re.escape(expected)):
      common.write_model(str(tmp_path / 'new' / 'model'), params, config, [], load)
    assert snapshot(tmp_path) == before
  common.write_model(str(tmp_path / 'model'), params, config, [], lambda d: params)
  assert common.foreign_entries(str(tmp_path / 'model')) == []


def test_inception_escapes_injected_names(tmp_path, cli_baseline):
  src = tmp_path / 'evil.pth'
  src.write_bytes(hc.state_dict_with_key('fc.weight\n\x1b[2Jerror: all good'))
  before = snapshot(tmp_path)
  run = run_cli('inception', '--src', src, '--dst', tmp_path / 'out')
  line = assert_refused(run, "tensor name 'fc.weight\\n\\x1b[2Jerror: all good' is not identifiers",
                        cli_baseline, CLI_MARGIN_MIB)
  assert '\x1b' not in run.stderr and line.count('error:') == 2  # the injected text, escaped
  assert snapshot(tmp_path) == before
  run = run_cli('inception', '--src', src, '--dst', tmp_path)
  assert_refused(run, 'is or contains the input', cli_baseline, CLI_MARGIN_MIB)
  assert snapshot(tmp_path) == before
