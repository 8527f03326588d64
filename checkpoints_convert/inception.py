"""Converts pytorch-fid's FID Inception weights to isir_jax.

    python -m checkpoints_convert.inception \\
        --src pt_inception-2015-12-05-6726825d.pth --dst models/inception

The ``.pth`` is pytorch-fid's port of the TF graph ``inception-2015-12-05`` (the
network behind every published FID): a torch state dict of torchvision's
Inception-v3 with the FID blocks, 1008-way ``fc`` and no auxiliary head. It is read
without torch, checked key for key and shape for shape against ``jax.eval_shape``
of ``InceptionV3FID``, and written with ``isir_jax.checkpoints.save_model`` as
``{'params': ..., 'batch_stats': ...}``; ``isir_jax.fid.InceptionFID.load`` reads it.
"""

import functools
import os
from typing import Mapping

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_convert import common
from checkpoints_convert.reader import main_guard, read_state_dict
from isir_jax.fid import FAMILY, InceptionFID
from isir_jax.networks.inception import InceptionV3FID

# BatchNorm's step counter carries no weights; the file may or may not hold it.
_IGNORED_SUFFIX = '.num_batches_tracked'
# Flax leaf -> torch parameter / buffer name (batch norm means and variances are buffers).
_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
               'mean': 'running_mean', 'var': 'running_var'}
_RULES = {'width_divisor': common.Rule(int, 1, 64)}


def _to_torch_layout(leaf: str, shape: tuple) -> tuple:
  """Flax shape -> torch shape: conv HWIO -> OIHW, dense [in, out] -> [out, in]."""
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel':
    return (shape[1], shape[0])
  return shape


def _from_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if leaf == 'kernel':
    return value.T
  return value


@functools.lru_cache
def expected_layout(width_divisor: int = 1) -> dict[str, tuple[tuple[str, ...], tuple]]:
  """Torch state-dict keys the module needs: ``{key: (flax path, torch shape)}``.

  Derived from ``jax.eval_shape`` of ``InceptionV3FID.init`` (nothing is computed).
  """
  module = InceptionV3FID(width_divisor=width_divisor)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros([1, 299, 299, 3]))
  layout = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(p.key for p in path)        # (collection, *modules, leaf)
    key = '.'.join(names[1:-1] + (_TORCH_LEAF[names[-1]],))
    layout[key] = (names, _to_torch_layout(names[-1], tuple(leaf.shape)))
  return layout


def convert(state: Mapping[str, np.ndarray], width_divisor: int = 1,
            source: str = '<state dict>') -> dict:
  """Checks a torch state dict against the module and returns Flax variables.

  Raises:
    ConversionError: naming the missing or unexpected keys and the shapes that differ
      (expected and actual, in torch layout).
  """
  common.check_values({'width_divisor': width_divisor}, _RULES, source)
  layout = common.build(lambda: expected_layout(width_divisor), source)
  common.check_structure(
      {k: tuple(np.shape(v)) for k, v in state.items() if not k.endswith(_IGNORED_SUFFIX)},
      {k: shape for k, (_, shape) in layout.items()}, source)
  variables = {}
  for key, (names, _) in layout.items():
    node = variables
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = _from_torch_layout(names[-1], np.asarray(state[key], np.float32))
  return variables


def _read_and_convert(src: str, width_divisor: int) -> tuple[dict, dict]:
  variables = convert(read_state_dict(src), width_divisor, source=src)
  return variables, {'family': FAMILY, 'module': {'width_divisor': width_divisor},
                     'source': os.path.basename(src)}


def convert_file(src: str, dst: str, width_divisor: int = 1, overwrite: bool = False) -> None:
  """Reads ``src`` (torch.save'd state dict), converts it and writes the model to ``dst``.

  ``dst`` is checked (``common.check_dst``) before ``src`` is read, and written atomically.
  """
  common.check_dst(dst, [src], overwrite)
  variables, config = _read_and_convert(src, width_divisor)
  common.write_model(dst, variables, config, [src], load, overwrite)


def load(directory: str) -> dict:
  """The variables of a written model, as ``isir_jax.fid.InceptionFID.load`` loads them."""
  return InceptionFID.load(directory).variables


FLAGS = flags.FLAGS


def define_flags():
  """CLI flags, defined only when run as a script (importers keep a clean flag set)."""
  flags.DEFINE_string('src', None, 'pytorch-fid weights: pt_inception-2015-12-05-6726825d.pth')
  common.define_output_flags()


@main_guard
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  common.run(lambda: (*_read_and_convert(FLAGS.src, 1), f'wrote {FLAGS.dst}'), FLAGS.dst,
             [FLAGS.src], load, FLAGS.overwrite)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['src', 'dst'])
  app.run(main)
