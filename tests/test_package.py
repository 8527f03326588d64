"""The installed package: the wheel ships the digits assets, `pretrained.digits` loads them."""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from configs import digits as digits_config
from isir_jax import pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a wheel is built from (pyproject.toml's packages, its readme).
SOURCES = ('pyproject.toml', 'README.md', 'isir_jax', 'checkpoints_convert')


def _files(directory: str) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(directory)
          for f in files}


def test_wheel_ships_the_digits_assets(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for name in SOURCES:   # a copy, so that the build leaves nothing in the checkout
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy(path, src / name)
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w',
                  str(tmp_path / 'dist'), str(src)], check=True, timeout=300)
  (wheel,) = (tmp_path / 'dist').glob('isir_jax-*.whl')
  names = set(zipfile.ZipFile(wheel).namelist())
  assets = _files(pretrained.ASSETS)
  assert len(assets) > 50 and assets <= names, sorted(assets - names)[:10]
  assert {'isir_jax/pretrained.py', 'isir_jax/adapters.py',
          'isir_jax/samplers/checks.py'} <= names


def test_pretrained_digits_draw_and_score():
  m = pretrained.digits('skew')
  assert m.shape == (8, 8, 1) and m.recommended == 'isir_scaled'
  keys = jax.random.split(jax.random.key(0), 4)
  images, stats = jax.jit(m.sampler('edm', num_steps=4))(keys)
  assert images.shape == (4, 8, 8, 1) and np.isfinite(np.asarray(images)).all()
  assert int(stats['nfe'][0]) == 7
  assert m.feature_net.predict(np.asarray(images)).shape == (4,)
  assert m.settings['diffrs']['thresholds'].log_ratio.shape == (19,)
  with pytest.raises(ValueError, match="method must be one of .*got 'ddim'"):
    m.sampler('ddim')
  with pytest.raises(ValueError, match="testbed must be one of .*got 'mnist'"):
    pretrained.digits('mnist')


def test_the_demo_config_reads_the_packaged_settings():
  config = digits_config.get_config()
  assert config.demo.samplers.to_dict() == pretrained.method_settings('skew')
  assert config.demo.samplers.dg.dg_weight_1st_order == pretrained.TUNED['skew']['dg'][
      'dg_weight_1st_order']
  assert config.model.denoiser == os.path.join(pretrained.model_dir('skew'), 'denoiser')


def test_cited_documents_are_in_the_repository():
  """The design document is the repository's own: nothing cites one that is not here."""
  cited = set()
  for directory, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('workdir', 'build')]
    for name in files:
      if name.endswith(('.py', '.md', '.sh', '.toml', 'Makefile')):
        text = open(os.path.join(directory, name), encoding='utf-8').read()
        assert 'DESIGN' + '.md' not in text, os.path.join(directory, name)
        cited |= set(re.findall(r'\bdocs/[\w./-]+\.md\b', text))
  assert 'docs/design.md' in cited
  assert all(os.path.isfile(os.path.join(ROOT, path)) for path in cited), cited
