"""Writes tests/data/inception/: pytorch-fid's FID Inception on random weights.

    python tests/generators/make_inception_fixtures.py [PYTORCH_FID_SRC] [--out DIR]

Needs torch, torchvision and pytorch-fid (the pip package, or a checkout whose
``src`` directory is given as PYTORCH_FID_SRC). Nothing is downloaded: the network
is built by pytorch-fid's own ``fid_inception_v3`` with its weight loading stubbed
out, then every tensor is re-drawn randomly.

The full network (24M parameters) is too big to commit, so two fixtures:

* ``full_state_dict_shapes.json``: key -> shape of the real network's state dict
  (what ``pt_inception-2015-12-05-6726825d.pth`` holds), for the converter's
  structure check at full width;
* ``fid_inception_w16.pth`` + ``fid_inception_w16.npz``: the same topology with every
  convolution's width divided by 16 (torchvision's ``BasicConv2d`` patched; pools,
  paddings, strides and block wiring untouched), its state dict saved in torch's
  legacy (non-zip) format like the published file, and a 299x299 uint8 input with
  the float64 reference outputs (pool3 features and fc logits).
"""

import argparse
import json
import os
import sys
from unittest import mock

import numpy as np

WIDTH_DIVISOR = 16
NUM_IMAGES = 2


def _import_reference(src: str | None):
  """Imports torch, torchvision's inception module and pytorch_fid.inception."""
  if src:
    sys.path.insert(0, src)
  import torch
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    # A CUDA torchvision wheel beside CPU torch cannot load its C ops, and its import
    # then registers fake kernels for two undeclared ops; declare them and retry.
    for op in ('nms', 'qnms'):
      torch.library.define(f'torchvision::{op}',
                           '(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    for name in [m for m in sys.modules if m.startswith('torchvision')]:
      del sys.modules[name]
  import torchvision.models.inception as tv_inception
  import pytorch_fid.inception as pfi
  return torch, tv_inception, pfi


def build(torch, tv_inception, pfi, width_divisor: int):
  """pytorch-fid's FID Inception without its weights, widths divided by ``width_divisor``."""
  base = tv_inception.BasicConv2d

  class NarrowConv(base):
    def __init__(self, in_channels, out_channels, **kwargs):
      in_channels = in_channels if in_channels == 3 else in_channels // width_divisor
      super().__init__(in_channels, out_channels // width_divisor, **kwargs)

  with mock.patch.object(pfi, 'load_state_dict_from_url', return_value=None), \
       mock.patch.object(tv_inception.Inception3, 'load_state_dict', return_value=None), \
       mock.patch.object(tv_inception, 'BasicConv2d', NarrowConv):
    net = pfi.fid_inception_v3()
  if width_divisor > 1:
    net.fc = torch.nn.Linear(2048 // width_divisor, net.fc.out_features)
  return net.eval()


def redraw(torch, net, rng: np.random.Generator) -> None:
  """Re-draws every weight and batch-norm statistic (default init is too tame)."""
  for name, t in net.state_dict().items():
    if name.endswith('num_batches_tracked'):
      continue
    shape, leaf = tuple(t.shape), name.rsplit('.', 1)[-1]
    if leaf == 'weight' and len(shape) > 1:             # conv / linear: He, N(0, 2/fan_in)
      value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))
    elif leaf == 'weight':                              # batch-norm scale
      value = 1 + 0.1 * rng.standard_normal(shape)
    elif leaf == 'running_var':
      value = rng.uniform(0.5, 1.5, shape)
    else:                                               # biases, running means
      value = 0.1 * rng.standard_normal(shape)
    t.copy_(torch.from_numpy(value.astype(np.float32)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('pytorch_fid_src', nargs='?', default=None)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'data',
                                                    'inception'))
  args = parser.parse_args()
  torch, tv_inception, pfi = _import_reference(args.pytorch_fid_src)
  os.makedirs(args.out, exist_ok=True)

  full = build(torch, tv_inception, pfi, 1)
  shapes = {k: list(v.shape) for k, v in full.state_dict().items()}
  with open(os.path.join(args.out, 'full_state_dict_shapes.json'), 'w') as f:
    f.write('{\n' + ',\n'.join(f'{json.dumps(k)}: {v}' for k, v in shapes.items()) + '\n}\n')
  del full

  rng = np.random.default_rng(0)
  net = build(torch, tv_inception, pfi, WIDTH_DIVISOR)
  with torch.no_grad():
    redraw(torch, net, rng)
  torch.save(net.state_dict(), os.path.join(args.out, f'fid_inception_w{WIDTH_DIVISOR}.pth'),
             _use_new_zipfile_serialization=False)

  images = rng.integers(0, 256, [NUM_IMAGES, 299, 299, 3], dtype=np.uint8)
  x = torch.from_numpy((images.astype(np.float64) - 128) / 128).permute(0, 3, 1, 2)
  pooled = {}
  net.avgpool.register_forward_hook(lambda m, i, o: pooled.setdefault('pool3', o.flatten(1)))
  with torch.no_grad():
    logits = net.double()(x)
  np.savez(os.path.join(args.out, f'fid_inception_w{WIDTH_DIVISOR}.npz'), images=images,
           pool3=pooled['pool3'].numpy(), logits=logits.numpy(), width_divisor=WIDTH_DIVISOR)
  print(f'wrote {args.out}: pool3 {tuple(pooled["pool3"].shape)} '
        f'max|pool3| {pooled["pool3"].abs().max():.3g}, max|logits| {logits.abs().max():.3g}')


if __name__ == '__main__':
  main()
