"""CIFAR-10 32x32 with EDM's VP networks and DG's discriminators.

``--config=configs/cifar10.py:METHOD[,cond][,tiny]`` with METHOD one of
edm | dg | diffrs | isir | isir_stochastic | isir_ancestral | smc (default isir); ``cond`` selects the
class-conditional networks, ``tiny`` a few-second smoke run of the same path.
The model paths are directories converted once from the published checkpoints:

  python -m checkpoints_convert.edm --src edm-cifar10-32x32-uncond-vp.pkl --dst models/edm-cifar10-uncond
  python -m checkpoints_convert.edm --src edm-cifar10-32x32-cond-vp.pkl --dst models/edm-cifar10-cond
  python -m checkpoints_convert.dg --classifier 32x32_classifier.pt \
      --discriminator discriminator_60.pt --dst models/dg-cifar10-uncond
  python -m checkpoints_convert.dg --classifier 32x32_classifier.pt \
      --discriminator discriminator_250.pt --cond --dst models/dg-cifar10-cond
  python -m checkpoints_convert.inception --src pt_inception-2015-12-05-6726825d.pth \
      --dst models/inception

plus EDM's reference statistics ``cifar10-32x32.npz`` in ``models/``.
"""

import ml_collections

from configs import default


def get_config(arg: str | None = None):
  method, flags = default.parse_arg(arg, 'configs/cifar10.py', ('cond', 'tiny'), 'isir')
  cond = 'cond' in flags
  kind = 'cond' if cond else 'uncond'
  config = default.get_config()
  config.name = f'cifar10-{kind}-{method}'
  config.model.denoiser = f'models/edm-cifar10-{kind}'
  config.model.discriminator = f'models/dg-cifar10-{kind}' if method != 'edm' else ''
  config.model.conditional = cond
  config.sampler = default.sampler_config(method)
  config.fid.inception = 'models/inception'
  config.fid.ref_stats = 'models/cifar10-32x32.npz'   # EDM's reference statistics
  if method == 'smc':
    config.sample.batch_size = 512   # whole groups of 16 on up to 32 devices
  config.train = ml_collections.ConfigDict({'discriminator': discriminator_training(kind, cond)})
  if 'tiny' in flags:
    default.apply_tiny(config)
  return config


def discriminator_training(kind: str, cond: bool) -> ml_collections.ConfigDict:
  """``--mode=train_discriminator``: DG's head on the frozen ADM classifier (DG train.py).

  Real data: DG's ``true_data.npz`` (uint8 NHWC ``arr_0``, or ``samples`` + ``label``);
  generated: the EDM run's ``samples_*.npz`` (``--config=configs/cifar10.py:edm``).
  DG trained 60 (uncond) / 250 (cond) epochs of 2 x 50,000 images at batch 128.
  """
  epoch = 2 * 50000 // 128
  return ml_collections.ConfigDict(dict(
      out=f'models/dg-cifar10-{kind}-trained',
      classifier='models/adm-classifier-32x32',   # converted 32x32_classifier.pt
      real_data='data/true_data.npz',
      gen_dir=f'workdir/cifar10-{kind}-edm',
      num_data=50000, conditional=cond,
      heldout=0.0,                 # DG holds nothing out (e.g. 0.02 for early stopping)
      heldout_repeats=1, eval_every=epoch, patience=default.optional(None),
      head=dict(image_size=8, in_channels=512, model_channels=128, out_channels=1,
                num_res_blocks=2, attention_resolutions=(1,), channel_mult=(1,), num_heads=1,
                num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True,
                num_classes=1000),
      importance=True,
      num_steps=(250 if cond else 60) * epoch, batch_size=128, lr=3e-4, weight_decay=1e-7,
      ckpt_every=epoch, log_every=100))
