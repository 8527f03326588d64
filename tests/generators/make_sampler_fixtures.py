"""Writes the sampler parity fixtures (tests/data/samplers/) from the reference code.

    REFVENV/bin/python tests/generators/make_sampler_fixtures.py --edm EDM_CHECKOUT \\
        --isir ISIR_CHECKOUT --out tests/data/samplers [--dg tests/data/dg]

Needs torch and numpy. EDM_CHECKOUT is a clone of NVlabs/edm (the network classes and
their pickling), ISIR_CHECKOUT the Diffusion ISIR seed, whose ``generate.edm_sampler``
(EDM-G++ with the DG terms) produces the reference outputs; both are imported at run
time. ``generate.py`` imports tensorflow, torchvision and tqdm for its command line
only; they are replaced by empty stand-in modules, as the sampler never uses them.

The denoiser is a small conditional DDPM++ VP network (16x16x3, 10 labels, augment_dim
9 as the published CIFAR-10 conditional model) built and re-drawn with the helpers of
``make_edm_fixtures.py`` and pickled as EDM does, with ``module_src`` replaced by a
placeholder. The discriminator is the reduced DG classifier and conditional head of
``tests/data/dg`` (written by ``make_dg_fixtures.py``), loaded into the reference classes.

Runs, all deterministic (``S_churn = 0``), for 6 and 18 steps, from fixed latents:
  edm: plain EDM (DG weights 0, no discriminator);
  dg:  EDM-G++ with ``dg_weight_1st_order = 2``, ``dg_weight_2nd_order = 0`` and DG's
       window ``time_min = 0.01``, ``time_max = 1``. Without churn every sample of a step
       has the same ``t_hat``, so the reference's whole-batch gate and the per-sample gate
       of isir_jax agree; the smallest noise levels fall outside the window, so both
       gated and guided steps are covered. The generator checks that no level lies
       within 1% of a window edge, where float32 and float64 could decide differently.

Outputs: ``ddpmpp_vp_cond.pkl`` (the network pickle) and ``golden.npz``: ``latents``
(NHWC float32 standard normal), ``class_labels``, the settings, and per run
``<mode>_<steps>`` (the final state, float64 NHWC, as the reference keeps it) and
``t_steps_<steps>`` (the reference's noise levels t_0..t_{n-1}, float64).
"""

import argparse
import importlib.util
import os
import pickle
import sys
import types

import numpy as np

from make_dg_fixtures import build_networks
from make_edm_fixtures import PLACEHOLDER_SRC, redraw, to_nhwc

NETWORK = dict(
    img_resolution=16, img_channels=3, label_dim=10, augment_dim=9, model_type='SongUNet',
    embedding_type='positional', encoder_type='standard', decoder_type='standard',
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=8, channel_mult=[1, 2],
    channel_mult_emb=2, num_blocks=1, attn_resolutions=[8], dropout=0.13)
PICKLE_NAME = 'ddpmpp_vp_cond.pkl'
BATCH = 3
STEPS = (6, 18)
SEED = 0
DG = dict(dg_weight_1st_order=2.0, dg_weight_2nd_order=0.0, time_min=0.01, time_max=1.0)
MODES = {
    'edm': dict(dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0),
    'dg': dict(dg_weight_1st_order=DG['dg_weight_1st_order'],
               dg_weight_2nd_order=DG['dg_weight_2nd_order']),
}
SAMPLER = dict(sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0,
               S_max=float('inf'), S_noise=1.0)


def import_reference_generate(isir_dir):
  """The seed's generate.py as a module, with its CLI-only imports stubbed out."""
  for name in ('tqdm', 'tensorflow', 'torchvision', 'torchvision.utils'):
    sys.modules[name] = types.ModuleType(name)
  sys.modules['torchvision.utils'].make_grid = sys.modules['torchvision.utils'].save_image = None
  sys.modules['torchvision'].utils = sys.modules['torchvision.utils']
  # By path: the EDM checkout (earlier on sys.path) has a generate.py of its own.
  spec = importlib.util.spec_from_file_location(
      'isir_reference_generate', os.path.join(isir_dir, 'generate.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def build_network(torch, networks, loss, out_dir):
  """The re-drawn conditional VP DDPM++ network, pickled as EDM's training loop does."""
  torch.manual_seed(SEED)
  net = networks.VPPrecond(**NETWORK).eval().requires_grad_(False)
  redraw(torch, net, torch.Generator().manual_seed(SEED))
  data = dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=None,
              dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='none'))
  with open(os.path.join(out_dir, PICKLE_NAME), 'wb') as f:
    pickle.dump(data, f)
  return net


def build_discriminator(torch, unet, dg_dir):
  """The DG fixture's classifier + conditional head, as ``classifier_lib.get_discriminator``."""
  classifier, heads = build_networks(unet)
  head = heads['cond']
  classifier.load_state_dict(torch.load(os.path.join(dg_dir, 'classifier.pt')))
  head.load_state_dict(torch.load(os.path.join(dg_dir, 'discriminator_cond.pt')))
  classifier.eval()
  head.eval()

  def evaluate(inputs, timesteps=None, condition=None):
    with torch.enable_grad():
      features = classifier(inputs, timesteps=timesteps, feature=True)
      return head(features, timesteps, sigmoid=False, condition=condition).view(-1)
  return evaluate


def check_window_margin(vpsde, torch, t_steps):
  """Fails if a noise level's VP time is within 1% of a window edge."""
  tau = vpsde.compute_tau(torch.from_numpy(t_steps)).numpy()
  for edge in (DG['time_min'], DG['time_max']):
    margin = np.abs(tau / edge - 1).min()
    if margin < 0.01:
      raise SystemExit(f'a noise level has VP time within {margin:.2%} of the window edge {edge}')
  inside = (tau >= DG['time_min']) & (tau <= DG['time_max'])
  print(f'{len(tau)} steps: {inside.sum()} inside the DG window, {(~inside).sum()} outside')


def record_schedule(net):
  """Makes ``net.round_sigma`` record its inputs; the sampler's first call is the schedule."""
  calls = []
  plain = net.round_sigma

  def round_sigma(sigma):
    calls.append(plain(sigma))
    return calls[-1]
  net.round_sigma = round_sigma
  return calls


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--edm', required=True, help='NVlabs/edm checkout')
  parser.add_argument('--isir', required=True, help='Diffusion ISIR seed checkout')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--dg', default=None,
                      help='DG fixture directory (default: OUT/../dg)')
  args = parser.parse_args()
  dg_dir = args.dg or os.path.join(os.path.dirname(os.path.abspath(args.out)), 'dg')

  sys.path.insert(0, os.path.abspath(args.isir))
  sys.path.insert(0, os.path.abspath(args.edm))  # EDM's torch_utils/training come first.
  import torch  # pylint: disable=import-outside-toplevel
  from torch_utils import persistence  # pylint: disable=import-outside-toplevel
  from training import loss, networks  # pylint: disable=import-outside-toplevel
  from guided_diffusion import unet  # pylint: disable=import-outside-toplevel
  import classifier_lib  # pylint: disable=import-outside-toplevel
  generate = import_reference_generate(os.path.abspath(args.isir))
  # Persistent classes pickle their module's source; keep it out of the fixtures.
  for cls in persistence._decorators:  # pylint: disable=protected-access
    cls._orig_module_src = PLACEHOLDER_SRC  # pylint: disable=protected-access
  torch.set_num_threads(1)
  os.makedirs(args.out, exist_ok=True)

  net = build_network(torch, networks, loss, args.out)
  discriminator = build_discriminator(torch, unet, dg_dir)
  vpsde = classifier_lib.vpsde()

  rng = np.random.default_rng(SEED)
  shape = (BATCH, NETWORK['img_channels'], NETWORK['img_resolution'], NETWORK['img_resolution'])
  latents = rng.standard_normal(shape).astype(np.float32)
  labels = np.eye(NETWORK['label_dim'], dtype=np.float32)[
      rng.choice(NETWORK['label_dim'], BATCH, replace=False)]
  out = dict(latents=to_nhwc(latents), class_labels=labels, steps=np.array(STEPS),
             **{k: np.float64(v) for k, v in {**SAMPLER, **DG}.items()})

  def no_noise(x):  # S_churn = 0: the churn noise is multiplied by 0; draw none.
    return torch.zeros_like(x)

  calls = record_schedule(net)
  for steps in STEPS:
    for mode, weights in MODES.items():
      use_dg = weights['dg_weight_1st_order'] != 0 or weights['dg_weight_2nd_order'] != 0
      x = generate.edm_sampler(
          False, DG['time_min'], DG['time_max'], vpsde, weights['dg_weight_1st_order'],
          weights['dg_weight_2nd_order'], discriminator if use_dg else None, net,
          torch.from_numpy(latents), torch.from_numpy(labels), randn_like=no_noise,
          num_steps=steps, **SAMPLER)
      assert x.dtype == torch.float64, x.dtype
      t_steps = calls[0].numpy()
      calls.clear()
      assert t_steps.shape == (steps,), t_steps.shape
      if mode == 'edm':
        check_window_margin(vpsde, torch, t_steps)
        out[f't_steps_{steps}'] = t_steps
      np.testing.assert_array_equal(t_steps, out[f't_steps_{steps}'])
      out[f'{mode}_{steps}'] = to_nhwc(x.detach().numpy())
      print(f'{mode}_{steps}: max|x| {np.abs(out[f"{mode}_{steps}"]).max():.4g}')
  for steps in STEPS:
    diff = np.abs(out[f'dg_{steps}'] - out[f'edm_{steps}']).max()
    print(f'{steps} steps: max|dg - edm| {diff:.4g}')
  np.savez_compressed(os.path.join(args.out, 'golden.npz'), **out)


if __name__ == '__main__':
  main()
