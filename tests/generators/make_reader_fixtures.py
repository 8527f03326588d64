"""Writes the fixtures of tests/test_reader.py from the reference EDM code and torch.

Usage (needs torch and an NVlabs/edm checkout; run once, commit the output):

    python tests/generators/make_reader_fixtures.py --edm PATH/TO/edm \
        --out tests/data/reader

Writes:
  edm-tiny.pkl       a tiny class-conditional DDPM++ EDMPrecond with re-drawn random
                     weights, pickled the way EDM's training loop does
                     (``dict(ema, loss_fn, augment_pipe, dataset_kwargs)``), with each
                     persistent class's embedded source replaced by a placeholder.
  state_dict_zip.pt     a torch.save state dict in the zip format.
  state_dict_legacy.pt  the same state dict in the legacy (non-zip) format.
  expected.npz       the arrays the reader must return: ``edm/<name>`` (the EMA
                     network's state_dict) and ``sd/<name>`` (the state dict;
                     bfloat16 widened to float32).
  expected.json      class names and init kwargs of the pickled objects.
"""

import argparse
import json
import os
import pickle
import sys

import numpy as np
import torch

PLACEHOLDER_SRC = '# module source omitted from this test fixture\n'


def redraw_(module: torch.nn.Module, generator: torch.Generator) -> None:
  """Re-draws every parameter: N(0,1)/sqrt(fan_in), 1-D ones 1 + 0.1 N(0,1)."""
  with torch.no_grad():
    for p in module.parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(p[0].numel()))
      else:
        p.copy_(1 + 0.1 * noise)


def make_network_pickle(out: str) -> dict:
  """Writes edm-tiny.pkl; returns the expected arrays and metadata."""
  from training import augment, loss, networks  # pylint: disable=import-outside-toplevel
  net = networks.EDMPrecond(
      img_resolution=8, img_channels=3, label_dim=4, sigma_data=np.float64(0.5),
      model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1,
      attn_resolutions=[4], dropout=np.float64(0.13))
  redraw_(net, torch.Generator().manual_seed(0))
  ema = net.eval().requires_grad_(False)
  data = dict(ema=ema, loss_fn=loss.EDMLoss(), augment_pipe=augment.AugmentPipe(p=0.12, xflip=1),
              dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset',
                                  path='cifar10.zip', use_labels=True, xflip=False))
  for value in [ema, data['loss_fn'], data['augment_pipe'], *ema.modules()]:
    if hasattr(type(value), '_orig_module_src'):
      type(value)._orig_module_src = PLACEHOLDER_SRC
  with open(os.path.join(out, 'edm-tiny.pkl'), 'wb') as f:
    pickle.dump(data, f)
  arrays = {f'edm/{k}': v.numpy() for k, v in ema.state_dict().items()}
  meta = dict(
      keys=list(data),
      ema_class=type(ema).__name__,
      ema_init_kwargs={k: (v.item() if isinstance(v, np.generic) else v)
                       for k, v in ema.init_kwargs.items()},
      model_class=type(ema.model).__name__,
      enc_class=f'{type(ema.model.enc).__module__}.{type(ema.model.enc).__name__}',
      loss_class=type(data['loss_fn']).__name__,
      augment_p=data['augment_pipe'].p)
  return arrays, meta


def make_state_dicts(out: str) -> dict:
  """Writes the zip and legacy state dicts; returns the expected arrays."""
  g = torch.Generator().manual_seed(1)
  module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
  redraw_(module, g)
  sd = module.state_dict()                       # OrderedDict with _metadata
  base = torch.randn(3, 5, generator=g)
  sd['transposed'] = base.t()                    # non-contiguous view
  sd['offset_slice'] = base[1:, 2:]              # view with a storage offset
  sd['half'] = torch.randn(6, generator=g).half()
  sd['bfloat16'] = torch.randn(6, generator=g).bfloat16()
  sd['double'] = torch.randn(2, 2, generator=g, dtype=torch.float64)
  sd['int64'] = torch.arange(-3, 4)
  sd['int32'] = torch.arange(5, dtype=torch.int32)
  sd['uint8'] = torch.arange(250, 256, dtype=torch.uint8)
  sd['uint16'] = torch.tensor([1, 2, 65535], dtype=torch.uint16)   # _rebuild_tensor_v3
  sd['bool'] = torch.tensor([True, False, True])
  sd['scalar'] = torch.tensor(2.5)
  sd['empty'] = torch.zeros(0, 3)
  torch.save(sd, os.path.join(out, 'state_dict_zip.pt'))
  torch.save(sd, os.path.join(out, 'state_dict_legacy.pt'), _use_new_zipfile_serialization=False)
  widened = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in sd.items()}
  return {f'sd/{k}': v.numpy() for k, v in widened.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--edm', required=True, help='path of an NVlabs/edm checkout')
  parser.add_argument('--out', default='tests/data/reader', help='output directory')
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.edm))
  os.makedirs(args.out, exist_ok=True)
  arrays, meta = make_network_pickle(args.out)
  arrays.update(make_state_dicts(args.out))
  np.savez(os.path.join(args.out, 'expected.npz'), **arrays)
  with open(os.path.join(args.out, 'expected.json'), 'w') as f:
    json.dump(meta, f, indent=2)
  sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in sorted(os.listdir(args.out))}
  print(f'wrote {args.out}: {sizes} ({sum(sizes.values())} bytes)')


if __name__ == '__main__':
  main()
