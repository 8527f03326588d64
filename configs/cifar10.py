"""CIFAR-10 32x32 with EDM's VP networks and DG's discriminators.

``--config=configs/cifar10.py:METHOD[,cond][,tiny]`` with METHOD one of
edm | dg | diffrs | isir | isir_stochastic; ``cond`` selects the class-conditional
networks. Model paths are the converted directories of the published checkpoints:

  python -m checkpoints_convert.edm --src edm-cifar10-32x32-uncond-vp.pkl --dst models/edm-cifar10-uncond
  python -m checkpoints_convert.dg --classifier 32x32_classifier.pt \
      --head discriminator_60.pt --dst models/dg-cifar10-uncond
"""

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
  if 'tiny' in flags:
    default.apply_tiny(config)
  return config
