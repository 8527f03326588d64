"""Writes the EDM network parity fixtures (tests/data/edm/) from the reference code.

    REFVENV/bin/python tests/generators/make_edm_fixtures.py EDM_CHECKOUT tests/data/edm

Needs torch and numpy; EDM_CHECKOUT is a clone of NVlabs/edm, imported at run time.
For each small configuration it builds the reference preconditioned network,
re-draws every parameter (default-initialised EDM nets are nearly trivial: zeroed
output convs), pickles it as EDM's training loop does (``{'ema', 'loss_fn',
'augment_pipe', 'dataset_kwargs'}``) with the embedded ``module_src`` replaced by a
placeholder, and saves inputs and reference outputs (float32, as the reference
computes) to ``<name>.npz``. A stand-alone two-head attention block and a wide
GroupNorm are saved as state dicts in ``unetblock_heads.npz``; the architectures of
the published checkpoints as state-dict shapes in ``published_shapes.json``.
"""

import json
import os
import pickle
import sys

import numpy as np

PLACEHOLDER_SRC = '# module_src removed from this test fixture\n'
SIGMAS = np.array([0.002, 0.02, 0.2, 2.0, 20.0, 80.0], np.float32)

# name -> (precond class, precond kwargs, extra reference outputs). Extras: 'scalar_sigma'
# (one 0-dim sigma for the batch, as the reference Heun step passes it), 'no_labels'
# (class_labels=None on a conditional net), 'augment' (augmentation labels given).
CONFIGS = {
    # DDPM++ (cifar10 uncond vp): positional embedding, standard encoder/decoder.
    'ddpmpp_vp': ('VPPrecond', dict(
        img_resolution=16, img_channels=3, label_dim=0, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard',
        channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
        channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[8],
        dropout=0.13), ()),
    # NCSN++ (cifar10 ve): Fourier embedding, residual encoder; skip decoder for coverage.
    'ncsnpp_ve': ('VEPrecond', dict(
        img_resolution=16, img_channels=3, label_dim=0, model_type='SongUNet',
        embedding_type='fourier', encoder_type='residual', decoder_type='skip',
        channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=8,
        channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[8],
        dropout=0.13), ()),
    # ADM (imagenet cond): EDM preconditioning, class labels, attention only where C >= 64
    # (here dec.4x4_block0; the 16-channel blocks get none), no blocks in the encoder.
    'adm_edm_cond': ('EDMPrecond', dict(
        img_resolution=8, img_channels=3, label_dim=10, model_type='DhariwalUNet',
        model_channels=16, channel_mult=[1, 4], channel_mult_emb=2, num_blocks=0,
        attn_resolutions=[8, 4], dropout=0.1), ('no_labels',)),
    # iDDPM: discrete noise levels, 2 * img_channels outputs, augmentation labels.
    'iddpm_adm': ('iDDPMPrecond', dict(
        img_resolution=8, img_channels=2, label_dim=0, model_type='DhariwalUNet',
        model_channels=8, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
        attn_resolutions=[4], augment_dim=9, dropout=0.1), ('scalar_sigma', 'augment')),
    # Conditional DDPM++ with augmentation labels, skip encoder, EDM preconditioning.
    'ddpmpp_edm_cond': ('EDMPrecond', dict(
        img_resolution=8, img_channels=3, label_dim=10, model_type='SongUNet',
        embedding_type='positional', encoder_type='skip', decoder_type='standard',
        channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
        channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[4],
        augment_dim=9, dropout=0.13, sigma_min=0.002, sigma_max=80.0), ('augment',)),
}


# The published checkpoints' architectures (EDM README/train.py: --arch, --cres, --augment,
# --cond), for a shapes-only check of the converter at full size.
PUBLISHED = {
    'edm-cifar10-32x32-cond-vp': ('VPPrecond', dict(
        img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard',
        channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
        channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)),
    'edm-cifar10-32x32-uncond-ve': ('VEPrecond', dict(
        img_resolution=32, img_channels=3, label_dim=0, model_type='SongUNet',
        embedding_type='fourier', encoder_type='residual', decoder_type='standard',
        channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
        channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)),
    'edm-ffhq-64x64-uncond-vp': ('VPPrecond', dict(
        img_resolution=64, img_channels=3, label_dim=0, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard',
        channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
        channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05)),
    'edm-imagenet-64x64-cond-adm': ('EDMPrecond', dict(
        img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet',
        model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1, use_fp16=True)),
}


def redraw(torch, module, generator):
  """Re-draws all parameters: N(0,1)/sqrt(fan_in) weights, GroupNorm scale 1+0.1N, 1-D 0.1N."""
  norms = {name for name, m in module.named_modules() if type(m).__name__ == 'GroupNorm'}
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      owner, leaf = name.rpartition('.')[::2]
      if p.ndim >= 2:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      elif owner in norms and leaf == 'weight':
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)


def network_inputs(rng, batch, img_resolution, img_channels, label_dim):
  """Noisy images x = y + sigma n with y in [-1, 1], per-sample sigmas, one-hot labels."""
  shape = (batch, img_channels, img_resolution, img_resolution)
  y = rng.uniform(-1, 1, shape).astype(np.float32)
  x = y + SIGMAS[:batch, None, None, None] * rng.standard_normal(shape).astype(np.float32)
  labels = None
  if label_dim:
    labels = np.eye(label_dim, dtype=np.float32)[rng.integers(0, label_dim, batch)]
  return x, labels


def to_nhwc(a):
  return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def make_network_fixture(torch, networks, loss, name, outdir, seed):
  """Builds, re-draws, pickles and evaluates one configuration."""
  class_name, kwargs, extras = CONFIGS[name]
  torch.manual_seed(seed)
  net = getattr(networks, class_name)(**kwargs).eval().requires_grad_(False)
  redraw(torch, net, torch.Generator().manual_seed(seed))
  data = dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=None,
              dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='none'))
  with open(os.path.join(outdir, f'{name}.pkl'), 'wb') as f:
    pickle.dump(data, f)

  rng = np.random.default_rng(seed)
  batch = len(SIGMAS)
  x, labels = network_inputs(rng, batch, kwargs['img_resolution'],
                             kwargs['img_channels'], kwargs['label_dim'])
  t = lambda a: None if a is None else torch.from_numpy(a)
  sigma = torch.from_numpy(SIGMAS)
  run = lambda *args, **kw: to_nhwc(net(*args, **kw).numpy())
  out = dict(x=to_nhwc(x), sigma=SIGMAS, out=run(t(x), sigma, t(labels)),
             sigma_min=np.float64(net.sigma_min), sigma_max=np.float64(net.sigma_max),
             round_sigma=net.round_sigma(sigma).numpy())
  if labels is not None:
    out['labels'] = labels
  if 'scalar_sigma' in extras:
    out['out_scalar_sigma'] = run(t(x), torch.tensor(1.5), t(labels))
  if 'no_labels' in extras:
    out['out_no_labels'] = run(t(x), sigma, None)
  if 'augment' in extras:
    aug = (0.5 * rng.standard_normal((batch, kwargs['augment_dim']))).astype(np.float32)
    out['augment_labels'] = aug
    out['out_augment'] = run(t(x), sigma, t(labels), augment_labels=t(aug))
  np.savez_compressed(os.path.join(outdir, f'{name}.npz'), **out)
  n_params = sum(p.numel() for p in net.parameters())
  print(f'{name}: {class_name}/{kwargs["model_type"]}, {n_params} params, '
        f'max|out| {np.abs(out["out"]).max():.3g}')


def make_block_fixture(torch, networks, outdir, seed):
  """A two-head attention UNetBlock (ADM style) and a 192-channel GroupNorm."""
  torch.manual_seed(seed)
  block = networks.UNetBlock(in_channels=16, out_channels=32, emb_channels=8, attention=True,
                             num_heads=2, adaptive_scale=True).eval().requires_grad_(False)
  redraw(torch, block, torch.Generator().manual_seed(seed))
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
  emb = rng.standard_normal((2, 8)).astype(np.float32)
  out = block(torch.from_numpy(x), torch.from_numpy(emb)).numpy()
  state = {f'state.{k}': v.numpy() for k, v in block.state_dict().items()}
  # A wide GroupNorm, where EDM's rule caps the groups at 32 (not 192 // 4 = 48).
  norm = networks.GroupNorm(num_channels=192).eval().requires_grad_(False)
  redraw(torch, norm, torch.Generator().manual_seed(seed))
  norm_x = rng.standard_normal((2, 192, 2, 2)).astype(np.float32)
  norm_out = norm(torch.from_numpy(norm_x)).numpy()
  state.update({f'norm.{k}': v.numpy() for k, v in norm.state_dict().items()})
  np.savez_compressed(os.path.join(outdir, 'unetblock_heads.npz'), x=to_nhwc(x), emb=emb,
                      out=to_nhwc(out), num_heads=2, norm_x=to_nhwc(norm_x),
                      norm_out=to_nhwc(norm_out), **state)
  print(f'unetblock_heads: max|out| {np.abs(out).max():.3g}')


def make_published_shapes(torch, networks, outdir):
  """Records, per published architecture, what the converter reads: the preconditioner's
  scalar attributes, the U-Net's init kwargs, the state-dict shapes and the parameter count."""
  out = {}
  for name, (class_name, kwargs) in PUBLISHED.items():
    net = getattr(networks, class_name)(**kwargs)
    attrs = {k: v for k, v in vars(net).items()
             if not k.startswith('_') and isinstance(v, (bool, int, float, str))}
    out[name] = dict(
        class_name=class_name, attrs=attrs, model_class_name=type(net.model).__name__,
        model_init_kwargs=dict(net.model.init_kwargs),
        shapes={k: list(v.shape) for k, v in net.state_dict().items()},
        num_params=sum(p.numel() for p in net.parameters()))
    print(f'{name}: {out[name]["num_params"]} params')
    del net
  with open(os.path.join(outdir, 'published_shapes.json'), 'w') as f:
    json.dump(out, f, indent=0, sort_keys=True)


def main(argv):
  if len(argv) != 3:
    sys.exit(f'usage: {argv[0]} EDM_CHECKOUT OUTDIR')
  checkout, outdir = argv[1:]
  sys.path.insert(0, os.path.abspath(checkout))
  import torch  # pylint: disable=import-outside-toplevel
  from torch_utils import persistence  # pylint: disable=import-outside-toplevel
  from training import loss, networks  # pylint: disable=import-outside-toplevel
  # Persistent classes pickle their module's source; keep it out of the fixtures.
  for cls in persistence._decorators:  # pylint: disable=protected-access
    cls._orig_module_src = PLACEHOLDER_SRC  # pylint: disable=protected-access
  torch.set_num_threads(1)
  os.makedirs(outdir, exist_ok=True)
  for seed, name in enumerate(CONFIGS):
    make_network_fixture(torch, networks, loss, name, outdir, seed)
  make_block_fixture(torch, networks, outdir, seed=len(CONFIGS))
  make_published_shapes(torch, networks, outdir)


if __name__ == '__main__':
  main(sys.argv)
