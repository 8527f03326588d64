"""Writes the DG discriminator golden fixtures (tests/data/dg/) from the reference code.

Usage (in a venv with torch and numpy):

    python tests/generators/make_dg_fixtures.py REF_ISIR_CHECKOUT tests/data/dg

REF_ISIR_CHECKOUT is a checkout of the Diffusion ISIR seed (classifier_lib.py,
guided_diffusion/). The networks are built on CPU with the reference classes at a
reduced size (16x16 classifier of width 32 -> 64x8x8 features, heads of width 32 and
depth 1, 16 channels per attention head so several heads are exercised, 10 label
rows instead of 1000), every weight is re-drawn at random (default-initialised ADM
nets are nearly constant), and the reference ``get_grad_log_ratio`` is recorded for
both time maps (img_resolution 32: linear VP time, 64: cosine) and both heads.
To keep the data small the unconditional head shares the conditional head's weights
(its state dict is the conditional one without ``label_emb.weight``).

Outputs: classifier.pt, discriminator_cond.pt (torch.save zip state dicts),
arch.json (the converter flags of this architecture) and golden.npz (arrays in NHWC).
"""

import json
import os
import sys

import numpy as np

ARCH = dict(image_size=16, classifier_width=32, classifier_depth=1,
            classifier_attention_resolutions='16,8', classifier_out_channels=10,
            disc_width=32, disc_depth=1, disc_attention_resolutions='32,16,8',
            num_head_channels=16, num_classes=10)
SIGMAS = np.geomspace(0.05, 80., 8).astype(np.float32)  # VP tau in [0.0116, 0.933].
NUM_LABELS = 10


def attention_ds(image_size, resolutions):
  return tuple(image_size // int(r) for r in resolutions.split(','))


def build_networks(unet):
  """The reduced classifier and the two heads, with the published options."""
  common = dict(num_head_channels=ARCH['num_head_channels'], use_scale_shift_norm=True,
                resblock_updown=True, pool='attention')
  size = ARCH['image_size']
  classifier = unet.EncoderUNetModel(
      image_size=size, in_channels=3, model_channels=ARCH['classifier_width'],
      out_channels=ARCH['classifier_out_channels'], num_res_blocks=ARCH['classifier_depth'],
      attention_resolutions=attention_ds(size, ARCH['classifier_attention_resolutions']),
      channel_mult=(1, 2), **common)
  feat_size, feat_ch = size // 2, 2 * ARCH['classifier_width']
  heads = {}
  for name, cond in (('uncond', False), ('cond', True)):
    heads[name] = unet.EncoderUNetModel(
        image_size=feat_size, in_channels=feat_ch, model_channels=ARCH['disc_width'],
        out_channels=1, num_res_blocks=ARCH['disc_depth'],
        attention_resolutions=attention_ds(feat_size, ARCH['disc_attention_resolutions']),
        channel_mult=(1,), condition=cond, num_class=ARCH['num_classes'], **common)
  return classifier, heads


def redraw(torch, module, gen):
  """Re-draws every parameter: N(0,1)/sqrt(fan_in) weights, 1+0.1N norm scales, 0.1N rest."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      z = torch.randn(p.shape, generator=gen)
      if name.endswith('label_emb.weight') or name.endswith('c_proj.weight'):
        p.copy_(z)  # unit scale: labels matter, and the logit is O(1).
      elif p.ndim >= 2 and not name.endswith('positional_embedding'):
        p.copy_(z / np.sqrt(np.prod(p.shape[1:])))
      elif name.endswith('positional_embedding'):
        p.copy_(z / np.sqrt(p.shape[0]))
      elif name.endswith('weight'):  # GroupNorm scale.
        p.copy_(1. + 0.1 * z)
      else:
        p.copy_(0.1 * z)


def main(ref_dir, out_dir):
  sys.path.insert(0, os.path.abspath(ref_dir))
  import torch
  import classifier_lib
  from guided_diffusion import unet

  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(0)
  classifier, heads = build_networks(unet)
  for m in (classifier, heads['cond']):
    redraw(torch, m, gen)
  cond_state = heads['cond'].state_dict()
  heads['uncond'].load_state_dict(
      {k: v for k, v in cond_state.items() if k != 'label_emb.weight'})
  for m in (classifier, *heads.values()):
    m.eval()

  os.makedirs(out_dir, exist_ok=True)
  torch.save(classifier.state_dict(), os.path.join(out_dir, 'classifier.pt'))
  torch.save(cond_state, os.path.join(out_dir, 'discriminator_cond.pt'))
  with open(os.path.join(out_dir, 'arch.json'), 'w') as f:
    json.dump(ARCH, f, indent=2, sort_keys=True)

  b, s = len(SIGMAS), ARCH['image_size']
  data = torch.rand(b, 3, s, s, generator=gen) * 2 - 1
  sigma = torch.from_numpy(SIGMAS)
  x = data + sigma[:, None, None, None] * torch.randn(b, 3, s, s, generator=gen)
  labels = torch.nn.functional.one_hot(
      torch.randint(0, NUM_LABELS, (b,), generator=gen), NUM_LABELS).float()
  vpsde = classifier_lib.vpsde()

  def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)

  out = dict(x=nhwc(x), sigma=SIGMAS, labels=labels.numpy())
  for name, head in heads.items():
    def evaluate(inputs, timesteps=None, condition=None, head=head):
      feats = classifier(inputs, timesteps=timesteps, feature=True)
      return head(feats, timesteps, sigmoid=False, condition=condition).view(-1)

    cond = labels if name == 'cond' else None
    for res in (32, 64):
      key = f'{name}_{res}'
      g, log_ratio = classifier_lib.get_grad_log_ratio(
          evaluate, vpsde, x, sigma, res, 0.01, 1.0, cond, log=True)
      log_only = classifier_lib.get_grad_log_ratio(
          evaluate, vpsde, x, sigma, res, 0.01, 1.0, cond, log_only=True)
      out[f'{key}_guidance'] = nhwc(g)
      out[f'{key}_log_ratio'] = log_ratio.detach().numpy()
      out[f'{key}_log_only'] = log_only.detach().numpy()
  np.savez_compressed(os.path.join(out_dir, 'golden.npz'), **out)
  for k, v in out.items():
    print(f'{k:24s} {str(v.shape):18s} max|.|={np.abs(v).max():.4g}')


if __name__ == '__main__':
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  main(sys.argv[1], sys.argv[2])
