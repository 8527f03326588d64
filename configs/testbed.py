"""The exact Gaussian-mixture testbed as 8x8x1 images (``isir_jax.testbed``, 'gmm64').

The "pretrained model" is the exact denoiser of a mixture with the wrong weights
(0.5/0.5) and the discriminator is the exact log density ratio to the true mixture
(0.2/0.8), so every method runs in seconds on a CPU with no checkpoint. The `tiny`
flag shrinks it further for CI. ``--config=configs/testbed.py:METHOD[,tiny]``.
"""

from configs import default


def get_config(arg: str | None = None):
  method, flags = default.parse_arg(arg, 'configs/testbed.py', ('tiny',), 'isir_stochastic')
  config = default.get_config()
  config.name = f'testbed-{method}'
  config.model.kind = 'testbed'
  config.sampler = default.sampler_config(method)
  config.sample.num_samples = 1024
  config.sample.batch_size = 256
  if 'tiny' in flags:
    default.apply_tiny(config)
  return config
