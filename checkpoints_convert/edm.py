"""Converts an EDM network pickle (``edm-*.pkl``, ``network-snapshot-*.pkl``) to isir_jax.

    python -m checkpoints_convert.edm --src edm-cifar10-32x32-uncond-vp.pkl \\
        --dst models/edm-cifar10-32x32-uncond-vp

The pickle is read by the restricted reader (no torch, nothing from the file is
executed). The ``ema`` network's preconditioner (VP/VE/iDDPM/EDM) and U-Net
(SongUNet/DhariwalUNet) become the architecture config; every tensor is renamed to
the Flax tree (``model.enc.16x16_block0.conv0.weight`` ->
``params/model/enc_16x16_block0/conv0/kernel``, OIHW -> HWIO). The result must
match ``jax.eval_shape`` of the module's init key for key and shape for shape, and
the buffers that the Flax modules compute (resampling filters, iDDPM's levels, VP's
sigma range) must match the file, before anything is written.
"""

import dataclasses
import os

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from checkpoints_convert.reader import (CheckpointError, ModuleRecord, get_network, main_guard,
                                        read_network_pickle)
from isir_jax import checkpoints
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


class ConversionError(CheckpointError):
  """The network in the file does not fit the Flax architecture (one-line message)."""


def _bare(class_name: str) -> str:
  return class_name.rsplit('.', 1)[-1]


def _plain(value):
  """Numbers, strings and (nested) lists only, so that the config is JSON."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def module_config(net: ModuleRecord, path: str) -> dict:
  """Architecture config (see ``precond.build_precond``) of a preconditioned EDM network.

  Args:
    net: the ``ema`` network record.
    path: the file, for messages.
  Returns:
    ``{'class_name', 'kwargs', 'model': {'class_name', 'kwargs'}}``.
  """
  name = _bare(net.class_name)
  if name not in _PRECOND_FIELDS:
    raise ConversionError(f'{path}: network class {net.class_name!r} is not supported '
                          f'(expected one of {", ".join(_PRECOND_FIELDS)})')
  kwargs = {}
  for field in _SHARED_FIELDS + _PRECOND_FIELDS[name]:
    value = net.state.get(field, net.init_kwargs.get(field))
    if value is None:
      raise ConversionError(f'{path}: {name} has no attribute {field!r}')
    kwargs[field] = _plain(value)

  model = net.submodule('model')
  model_name = _bare(model.class_name)
  if model_name not in precond.MODELS:
    raise ConversionError(f'{path}: model class {model.class_name!r} is not supported '
                          f'(expected one of {", ".join(precond.MODELS)})')
  fields = {f.name for f in dataclasses.fields(precond.MODELS[model_name])} - {
      'dtype', 'parent', 'name'}
  model_kwargs = dict(model.init_kwargs)
  if not model_kwargs:
    raise ConversionError(f'{path}: {model_name} has no recorded init kwargs')
  unknown = sorted(set(model_kwargs) - fields)
  if unknown:
    raise ConversionError(f'{path}: {model_name} option {unknown[0]!r}='
                          f'{model_kwargs[unknown[0]]!r} is not supported')
  return {'class_name': name, 'kwargs': kwargs,
          'model': {'class_name': model_name,
                    'kwargs': {k: _plain(v) for k, v in model_kwargs.items()}}}


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
    if leaf in ('resample_filter', 'u'):
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
      raise ConversionError(f'{what}: unexpected tensor {key!r} with shape {value.shape} '
                            '(not a parameter of an EDM layer)')
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
  """Raises ConversionError naming the first key whose presence or shape differs."""
  actual = _flat_shapes(variables)
  for key, shape in expected.items():
    if key not in actual:
      raise ConversionError(f'{what}: missing {key} (expected shape {shape})')
    if actual[key] != shape:
      raise ConversionError(f'{what}: {key} has shape {actual[key]}, expected {shape}')
  for key, shape in actual.items():
    if key not in expected:
      raise ConversionError(f'{what}: unexpected {key} with shape {shape}')


def check_computed(module, config: dict, computed: dict, net: ModuleRecord, what: str) -> None:
  """The buffers and constants the Flax modules compute must equal the file's."""
  taps = config['model']['kwargs'].get('resample_filter', [1, 1])
  kernel = layers.resample_kernel(taps)
  for key, value in computed.items():
    if key.endswith('resample_filter'):
      if value.shape[-2:] != kernel.shape or not np.allclose(value.reshape(kernel.shape), kernel):
        raise ConversionError(f'{what}: {key} differs from resample_filter={taps}')
    elif key == 'u':
      u = module.u
      if value.shape != u.shape or not np.allclose(value, u, rtol=1e-4, atol=0):
        raise ConversionError(f'{what}: iDDPM levels u differ from C_1={module.C_1}, '
                              f'C_2={module.C_2}, M={module.M} (max rel. difference '
                              f'{np.max(np.abs(value - u) / np.maximum(u, 1e-30)):.3g})')
  for field in ('sigma_min', 'sigma_max'):
    stored = net.state.get(field)
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
  module = precond.build_precond(config['module'])
  variables, computed = flax_variables(net.state_dict(), path)
  check_structure(variables, expected_shapes(module), path)
  check_computed(module, config['module'], computed, net, path)
  return variables, config


def summary(variables: dict, config: dict) -> str:
  """One line: classes, parameter count, resolution, label_dim."""
  n = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables.get('params', {})))
  m = config['module']
  return (f"{m['class_name']}/{m['model']['class_name']}: {n:,} params, resolution "
          f"{m['kwargs']['img_resolution']}, label_dim {m['kwargs']['label_dim']}")


FLAGS = flags.FLAGS


def _define_flags():
  """CLI flags, defined only when run as a script (importers keep a clean flag set)."""
  flags.DEFINE_string('src', None, 'EDM network pickle (.pkl).')
  flags.DEFINE_string('dst', None, 'Output model directory (config.json + params/).')


@main_guard
def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's progress logs; we print one line.
  if not FLAGS.src or not FLAGS.dst:
    raise CheckpointError('both --src FILE.pkl and --dst DIR are required')
  variables, config = convert(FLAGS.src)
  checkpoints.save_model(FLAGS.dst, variables, config)
  print(f'{summary(variables, config)} -> {FLAGS.dst}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
