"""Converts an EDM network pickle (``edm-*.pkl``, ``network-snapshot-*.pkl``) to isir_jax.

    python -m checkpoints_convert.edm --src edm-cifar10-32x32-uncond-vp.pkl \\
        --dst models/edm-cifar10-32x32-uncond-vp

The pickle is read by the restricted reader (no torch, nothing from the file is
executed). The ``ema`` network's preconditioner (VP/VE/iDDPM/EDM) and U-Net
(SongUNet/DhariwalUNet) become the architecture config; every tensor is renamed to
the Flax tree (``model.enc.16x16_block0.conv0.weight`` ->
``params/model/enc_16x16_block0/conv0/kernel``, OIHW -> HWIO). Every architecture
value is checked against its rule (``PRECOND_RULES``, ``MODEL_RULES``) before the
module is built; the result must match ``jax.eval_shape`` of the module's init key
for key and shape for shape, and the buffers that the Flax modules compute
(resampling filters, iDDPM's levels, VP's sigma range) must match the file, before
anything is written.
"""

import dataclasses
import math
import os

from absl import app
from absl import flags
import jax
import numpy as np

from checkpoints_convert import common
from checkpoints_convert import reader
from checkpoints_convert.common import ConversionError, Rule
from checkpoints_convert.reader import (ModuleRecord, get_network, main_guard,
                                        read_network_pickle)
from isir_jax import denoiser
from isir_jax.networks import layers
from isir_jax.networks import precond

FAMILY = 'edm'
# Preconditioner attributes that define the Flax module (besides the shared three).
_PRECOND_FIELDS = {
    'VPPrecond': ('beta_d', 'beta_min', 'M', 'epsilon_t'),
    'VEPrecond': ('sigma_min', 'sigma_max'),
    'iDDPMPrecond': ('C_1', 'C_2', 'M'),
    'EDMPrecond': ('sigma_min', 'sigma_max', 'sigma_data'),
}
_SHARED_FIELDS = ('img_resolution', 'img_channels', 'label_dim')
# Longer lists than any rule allows are not copied (their rule refuses them).
_MAX_LIST = 16
_SIGMA = Rule(float, 0, math.inf)
# Type and range of every architecture value a file may carry. The bounds keep
# jax.eval_shape's tracing small (it grows with levels and blocks, not with widths).
PRECOND_RULES = {
    'img_resolution': Rule(int, 1, 4096), 'img_channels': Rule(int, 1, 64),
    'label_dim': Rule(int, 0, 100_000), 'beta_d': Rule(float, 0, 1e3),
    'beta_min': Rule(float, 0, 1e3), 'M': Rule(int, 1, 100_000), 'epsilon_t': Rule(float, 0, 1),
    'sigma_min': _SIGMA, 'sigma_max': _SIGMA, 'sigma_data': Rule(float, 1e-6, 1e6),
    'C_1': Rule(float, 0, 1), 'C_2': Rule(float, 0, 1),
}
MODEL_RULES = {
    'img_resolution': Rule(int, 1, 4096), 'in_channels': Rule(int, 1, 64),
    'out_channels': Rule(int, 1, 64), 'label_dim': Rule(int, 0, 100_000),
    'augment_dim': Rule(int, 0, 64), 'model_channels': Rule(int, 1, 4096),
    'channel_mult': Rule(int, 1, 64, length=(1, 8)), 'channel_mult_emb': Rule(int, 1, 64),
    'num_blocks': Rule(int, 0, 32), 'attn_resolutions': Rule(int, 1, 4096, length=(0, 16)),
    'dropout': Rule(float, 0, 1), 'label_dropout': Rule(float, 0, 1),
    'embedding_type': Rule(str, choices=('positional', 'fourier')),
    'channel_mult_noise': Rule(int, 1, 64),
    'encoder_type': Rule(str, choices=('standard', 'skip', 'residual')),
    'decoder_type': Rule(str, choices=('standard', 'skip')),
    'resample_filter': Rule(float, 1e-6, 1e6, length=(1, 16)),
}


def _bare(class_name: str) -> str:
  return class_name.rsplit('.', 1)[-1]


def _scalar(value):
  return value.item() if isinstance(value, np.generic) else value


def _plain(value):
  """A config value as JSON: numpy scalars become numbers, a list of them a list.

  One level only: every architecture value is a scalar or a list of scalars, and a
  nested (perhaps shared, deep) structure is left as it is, for its rule to refuse.
  """
  if isinstance(value, (list, tuple)) and len(value) <= _MAX_LIST:
    return [_scalar(v) for v in value]
  return _scalar(value)


def module_config(net: ModuleRecord, path: str) -> dict:
  """Architecture config (see ``precond.build_precond``) of a preconditioned EDM network.

  Args:
    net: the ``ema`` network record.
    path: the file, for messages.
  Returns:
    ``{'class_name', 'kwargs', 'model': {'class_name', 'kwargs'}}``, every value
    checked against ``PRECOND_RULES`` / ``MODEL_RULES``.
  Raises:
    ConversionError: an unsupported class or option, a missing attribute, or a value
      of the wrong type or range.
  """
  name = _bare(net.class_name)
  if name not in _PRECOND_FIELDS:
    raise ConversionError(f'{path}: network class {reader.brief(net.class_name)} is not supported '
                          f'(expected one of {", ".join(_PRECOND_FIELDS)})')
  kwargs = {}
  for field in _SHARED_FIELDS + _PRECOND_FIELDS[name]:
    value = net.state.get(field, net.init_kwargs.get(field))
    if value is None:
      raise ConversionError(f'{path}: {name} has no attribute {field!r}')
    kwargs[field] = _plain(value)
  common.check_values(kwargs, PRECOND_RULES, f'{path}: {name}')

  model = net.submodule('model')
  model_name = _bare(model.class_name)
  if model_name not in precond.MODELS:
    raise ConversionError(f'{path}: model class {reader.brief(model.class_name)} is not supported '
                          f'(expected one of {", ".join(precond.MODELS)})')
  fields = {f.name for f in dataclasses.fields(precond.MODELS[model_name])} - {
      'dtype', 'parent', 'name'}
  model_kwargs = {k: _plain(v) for k, v in model.init_kwargs.items()}
  if not model_kwargs:
    raise ConversionError(f'{path}: {model_name} has no recorded init kwargs')
  common.check_values(model_kwargs, {k: r for k, r in MODEL_RULES.items() if k in fields},
                      f'{path}: {model_name}')
  return {'class_name': name, 'kwargs': kwargs,
          'model': {'class_name': model_name, 'kwargs': model_kwargs}}


def flax_variables(state_dict: dict[str, np.ndarray],
                   what: str = 'state dict') -> tuple[dict, dict[str, np.ndarray]]:
  """Renames a torch state dict of EDM modules to a Flax variables tree.

  ``enc``/``dec`` ModuleDict entries join their parent (``enc_16x16_conv``); 4-D conv
  weights become HWIO ``kernel``, 2-D linear weights ``[in, out]`` ``kernel``,
  1-D (GroupNorm) weights ``scale``. NCSN++'s Fourier ``freqs`` go to the
  ``'buffers'`` collection.

  Args:
    state_dict: torch name -> array.
    what: the file, for messages.
  Returns:
    ``(variables, computed)``: the tree, and the buffers that the Flax modules
    compute themselves (``resample_filter``, ``u``) keyed by torch name, to check.
  """
  variables, computed = {}, {}
  for key, value in state_dict.items():
    parts = key.split('.')
    leaf, path = parts[-1], []
    for part in parts[:-1]:
      if path and path[-1] in ('enc', 'dec'):
        path[-1] = f'{path[-1]}_{part}'
      else:
        path.append(part)
    value = np.asarray(value, np.float32)
    if (leaf == 'resample_filter' and path) or key == 'u':
      computed[key] = value
      continue
    if leaf == 'freqs':
      collection = 'buffers'
    elif leaf == 'weight':
      collection = 'params'
      if value.ndim == 4:
        leaf, value = 'kernel', value.transpose(2, 3, 1, 0)
      elif value.ndim == 2:
        leaf, value = 'kernel', value.T
      else:
        leaf = 'scale'
    elif leaf == 'bias':
      collection = 'params'
    else:
      raise ConversionError(f'{what}: unexpected tensor {reader.brief(key, 120)} with shape '
                            f'{value.shape} (not a parameter of an EDM layer)')
    node = variables.setdefault(collection, {})
    for part in path:
      node = node.setdefault(part, {})
    node[leaf] = value
  return variables, computed


def expected_shapes(module: precond.Precond) -> dict[str, tuple]:
  """``'collection/path/leaf' -> shape`` of the module's variables, by ``jax.eval_shape``."""
  tree = jax.eval_shape(lambda: module.init(jax.random.key(0), *precond.example_inputs(module)))
  return _flat_shapes(tree)


def _flat_shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(k.key) for k in path): tuple(np.shape(leaf)) for path, leaf in flat}


def check_structure(variables: dict, expected: dict[str, tuple], what: str) -> None:
  """Raises ConversionError naming the keys whose presence or shape differs.

  Keys are the '/'-joined Flax paths; no setting is named (the file carries the config).
  """
  common.check_structure(_flat_shapes(variables), expected, what)


def check_computed(module, config: dict, computed: dict, net: ModuleRecord, what: str) -> None:
  """The buffers and constants the Flax modules compute must equal the file's."""
  taps = config['model']['kwargs'].get('resample_filter', [1, 1])
  kernel = layers.resample_kernel(taps)
  for key, value in computed.items():
    if key.endswith('resample_filter'):
      if (value.shape[-2:] != kernel.shape or value.size != kernel.size
          or not np.allclose(value.reshape(kernel.shape), kernel)):
        raise ConversionError(f'{what}: {key} differs from resample_filter={taps}')
    elif getattr(module, 'u', None) is None:
      raise ConversionError(f'{what}: unexpected buffer u with shape {value.shape} '
                            f'({type(module).__name__} has no discrete noise levels)')
    else:
      u = module.u
      if value.shape != u.shape:
        raise ConversionError(f'{what}: iDDPM levels u have shape {value.shape}, expected '
                              f'{u.shape} (M={module.M})')
      if not np.allclose(value, u, rtol=1e-4, atol=0):
        raise ConversionError(f'{what}: iDDPM levels u differ from C_1={module.C_1}, '
                              f'C_2={module.C_2}, M={module.M} (max rel. difference '
                              f'{np.max(np.abs(value - u) / np.maximum(u, 1e-30)):.3g})')
  for field in ('sigma_min', 'sigma_max'):
    stored = _plain(net.state.get(field))
    if stored is not None:
      common.check_values({field: stored}, PRECOND_RULES, f'{what}: {_bare(net.class_name)}')
    if stored is not None and not np.isclose(getattr(module, field), stored, rtol=1e-5, atol=0):
      raise ConversionError(f'{what}: {field}={stored} in the file, but the config gives '
                            f'{getattr(module, field)}')


def convert(path: str, key: str = 'ema') -> tuple[dict, dict]:
  """Reads an EDM network pickle and returns checked ``(variables, config)``.

  Raises:
    CheckpointError: unreadable or hostile file, no network, or any mismatch.
  """
  net = get_network(read_network_pickle(path), key, path)
  config = {'family': FAMILY, 'source': os.path.basename(path),
            'module': module_config(net, path)}
  module = common.build(lambda: precond.build_precond(config['module']), path)
  expected = common.build(lambda: expected_shapes(module), path)
  variables, computed = flax_variables(net.state_dict(), path)
  check_structure(variables, expected, path)
  check_computed(module, config['module'], computed, net, path)
  return variables, config


def summary(variables: dict, config: dict) -> str:
  """One line: classes, parameter count, resolution, label_dim."""
  n = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables.get('params', {})))
  m = config['module']
  return (f"{m['class_name']}/{m['model']['class_name']}: {n:,} params, resolution "
          f"{m['kwargs']['img_resolution']}, label_dim {m['kwargs']['label_dim']}")


def load(directory: str) -> dict:
  """The variables of a written model, as ``isir_jax.denoiser.load_denoiser`` loads them."""
  return denoiser.load_denoiser(directory).params


FLAGS = flags.FLAGS


def define_flags():
  """CLI flags, defined only when run as a script (importers keep a clean flag set)."""
  flags.DEFINE_string('src', None, 'EDM network pickle (.pkl).')
  common.define_output_flags()


@main_guard
def main(argv):
  del argv
  if not FLAGS.src:
    raise ConversionError('--src FILE.pkl is required')

  def run():
    variables, config = convert(FLAGS.src)
    return variables, config, f'{summary(variables, config)} -> {FLAGS.dst}'

  common.run(run, FLAGS.dst, [FLAGS.src], load, FLAGS.overwrite)


if __name__ == '__main__':
  define_flags()
  app.run(main)
