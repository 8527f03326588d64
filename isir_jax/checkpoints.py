"""Model checkpoints on disk: orbax params beside the architecture config as JSON.

Layout of a model directory::

    DIR/config.json   {"family": ..., "module": {...architecture kwargs...}, ...}
    DIR/params/       orbax PyTree checkpoint of the Flax params

The config is what a loader needs to rebuild the module; the converters and the
trainers write this layout, ``load_denoiser``/``load_discriminator`` read it.
"""

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_NAME = 'config.json'
PARAMS_NAME = 'params'


def save_model(directory: str, params: Any, config: dict) -> None:
  """Writes ``params`` and ``config`` to ``directory``, replacing it atomically.

  The model is written to a temporary sibling first and renamed into place, so an
  interrupted save never leaves a half-written directory behind.
  """
  directory = os.path.abspath(directory)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.tmp-' + os.path.basename(directory) + '-', dir=parent)
  try:
    params = jax.tree_util.tree_map(np.asarray, params)
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, PARAMS_NAME), params)
    with open(os.path.join(tmp, CONFIG_NAME), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_config(directory: str) -> dict:
  """Reads the architecture config of a model directory, with a clear error if absent."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{directory}: not a converted model directory (no {CONFIG_NAME}); '
        'convert the checkpoint first with python -m checkpoints_convert.<family>')
  with open(path) as f:
    return json.load(f)


def load_model(directory: str, family: str | tuple[str, ...] | None = None,
               expected: Optional[Callable[[dict], Any]] = None) -> tuple[Any, dict]:
  """Returns ``(params, config)`` of a model directory written by ``save_model``.

  Args:
    directory: the model directory.
    family: the accepted ``config['family']`` value(s) (None: any).
    expected: ``config -> abstract params`` (e.g. ``jax.eval_shape`` of the module's
      init): the stored params must have the same keys and shapes.

  Raises:
    FileNotFoundError: no ``config.json``.
    ValueError: another family, or params whose tree differs from ``expected`` (the
      message names the first key that differs and both shapes).
  """
  config = load_config(directory)
  families = (family,) if isinstance(family, str) else family
  if families is not None and config.get('family') not in families:
    raise ValueError(f'{directory}/{CONFIG_NAME}: family is {config.get("family")!r}, expected '
                     f'{" or ".join(repr(f) for f in families)}')
  with ocp.PyTreeCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(os.path.abspath(directory), PARAMS_NAME))
  if expected is not None:
    problem = tree_difference(expected(config), params)
    if problem:
      raise ValueError(f'{directory}/{PARAMS_NAME}: {problem} (does config.json match the '
                       'params?)')
  return params, config


def tree_difference(expected: Any, actual: Any) -> Optional[str]:
  """The first difference between two trees of arrays (keys, then shapes), or None."""
  flat = lambda tree: {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf
                       in jax.tree_util.tree_flatten_with_path(tree)[0]}
  want, have = flat(expected), flat(actual)
  for key in sorted(set(want) | set(have)):
    if key not in have:
      return f'missing key {key} (expected shape {want[key]})'
    if key not in want:
      return f'unexpected key {key} with shape {have[key]}'
    if want[key] != have[key]:
      return f'key {key} has shape {have[key]}, expected {want[key]}'
  return None
