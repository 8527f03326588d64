"""Writes an EDM network pickle with a published checkpoint's architecture, to measure.

    python tests/generators/make_published_size.py /tmp/cifar10-vp.pkl [NAME]

NAME is a key of tests/data/edm/published_shapes.json (default
``edm-cifar10-32x32-cond-vp``: DDPM++, 55.7M parameters). Every tensor of that
architecture's state dict is pickled as EDM's pickles hold it (a persistent object per
module, a storage blob per tensor), with random weights and the resampling filters the
converter recomputes. The file (~220 MB) is for measuring the converter's time and
memory on a full-size input (README, converter section); nothing here is committed.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=wrong-import-position
from hostile_cases import EDM_FIXTURES, _as_tensor  # noqa: E402
from test_reader import dumps, module_state, persistent  # noqa: E402


def _module_tree(shapes: dict, rng: np.random.Generator, taps: list) -> dict:
  """torch name -> shape, as nested ``{'_parameters', '_buffers', '_modules'}`` dicts."""
  kernel = np.outer(taps, taps).astype(np.float32)
  kernel /= kernel.sum()
  root = {'_parameters': {}, '_buffers': {}, '_modules': {}}
  for key, shape in shapes.items():
    *path, leaf = key.split('.')
    node = root
    for part in path:
      node = node['_modules'].setdefault(part, {'_parameters': {}, '_buffers': {},
                                                '_modules': {}})
    if leaf == 'resample_filter':
      node['_buffers'][leaf] = np.broadcast_to(kernel, shape).copy()
    else:
      node['_parameters'][leaf] = rng.standard_normal(shape, np.float32) * 0.05
  return root


def _pickled(node: dict, class_name: str, init_kwargs: dict = None, attrs: dict = None):
  modules = {name: _pickled(child, 'Module') for name, child in node['_modules'].items()}
  state = module_state(parameters={k: _as_tensor(v) for k, v in node['_parameters'].items()},
                       modules=modules, _init_kwargs=init_kwargs or {})
  state.update(attrs or {})
  state['_buffers'] = {k: _as_tensor(v) for k, v in node['_buffers'].items()}
  return persistent(class_name, state)


def published_network(name: str = 'edm-cifar10-32x32-cond-vp', seed: int = 0) -> bytes:
  """The pickle bytes of the published architecture ``name``, random weights."""
  with open(os.path.join(EDM_FIXTURES, 'published_shapes.json')) as f:
    ref = json.load(f)[name]
  kwargs = ref['model_init_kwargs']
  root = _module_tree(ref['shapes'], np.random.default_rng(seed),
                      kwargs.get('resample_filter', [1, 1]))
  model = root['_modules'].pop('model')
  net = _pickled({**root, '_modules': {}}, ref['class_name'], attrs=ref['attrs'])
  net.args[0]['state']['_modules']['model'] = _pickled(model, ref['model_class_name'], kwargs)
  return dumps({'ema': net, 'loss_fn': None, 'augment_pipe': None, 'dataset_kwargs': {}})


if __name__ == '__main__':
  data = published_network(*sys.argv[2:3])
  with open(sys.argv[1], 'wb') as out:
    out.write(data)
  print(f'wrote {len(data):,} bytes to {sys.argv[1]}')
