"""The bundled handwritten-digits demo: 8x8 digits, small trained networks, five methods.

``--config=configs/digits.py[:METHOD][,all][,tiny]``: METHOD (edm | dg | diffrs | isir |
isir_stochastic | isir_ancestral | smc, default isir_stochastic) sets ``config.sampler`` for
``--mode=sample``; ``--mode=demo`` samples with every method of ``config.demo.methods``
(EDM, ISIR and SMC, which fit the 2-minute budget of ``make demo``; ``all`` adds DG and DiffRS)
and prints a table. The models are the committed assets under ``isir_jax/assets/digits/``,
reproduced by the ``--mode=train_*`` commands of the README (in that order):

  train_feature_net     clean-digit classifier whose features define FD-digits
  train_denoiser        EDM denoiser (small SongUNet, EDM precond, EMA)
  train_classifier      noisy time-dependent classifier (ADM encoder, VP times)
  sample (method edm)   generated digits for the discriminator (train.discriminator.gen_dir)
  train_discriminator   DG head on the frozen classifier features, real vs generated
"""

import os

import ml_collections

from configs import default
from isir_jax import pretrained
from isir_jax.train import digits_data

ASSETS = pretrained.ASSETS
# digits-skew: a denoiser trained on a class-skewed resampling of the digits (classes 0-4
# four times as frequent as 5-9) and its discriminator against the real, balanced digits.
SKEW_ASSETS = pretrained.model_dir('skew')


def _encoder(**kw) -> ml_collections.ConfigDict:
  """ADM EncoderUNetModel kwargs (tiny versions of DG's classifier and head)."""
  base = dict(num_res_blocks=1, num_heads=1, num_head_channels=32,
              use_scale_shift_norm=True, resblock_updown=True,
              num_classes=0)
  return ml_collections.ConfigDict(dict(base, **kw))


def train_config(models: str) -> ml_collections.ConfigDict:
  """``config.train``: one section per trainer (architecture, optimiser, output dir).

  ``models`` is the directory of the denoiser, discriminator and thresholds of the chosen
  testbed (`ASSETS` or `SKEW_ASSETS`); the classifier and the feature net are shared.
  """
  t = ml_collections.ConfigDict()

  t.feature_net = ml_collections.ConfigDict(dict(
      out=os.path.join(ASSETS, 'feature_net'),
      ref_stats=os.path.join(ASSETS, 'feature_stats.npz'),  # all 1,797 real digits
      channels=(32, 64, 64), feature_dim=32,
      num_steps=3000, batch_size=128, lr=1e-3))

  # EDM (Karras et al. 2022): P_mean -1.2, P_std 1.2, sigma_data 0.5; EMA of the weights.
  t.denoiser = ml_collections.ConfigDict(dict(
      out=os.path.join(models, 'denoiser'),
      conditional=False,           # class-conditional denoiser (label_dim 10)
      class_weights=default.optional(None),   # per-class resampling weights (skew), None: as is
      model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
      p_mean=-1.2, p_std=1.2, sigma_data=0.5,
      num_steps=4000, batch_size=64, lr=2e-3, warmup_steps=200, ema_decay=0.999,
      grad_clip=1.0, ckpt_every=1000, log_every=100))

  # Plays ADM's 32x32_classifier.pt: trunk features 4x4x64 feed the head.
  t.classifier = ml_collections.ConfigDict(dict(
      out=os.path.join(ASSETS, 'classifier'),
      arch=_encoder(image_size=8, in_channels=1, model_channels=32, out_channels=10,
                    channel_mult=(1, 2), attention_resolutions=(2,)),
      importance=False,            # ADM trains its classifier at uniform times
      num_steps=2000, batch_size=64, lr=1e-3, ckpt_every=1000, log_every=100))

  # DG's train.py: Adam 3e-4, weight decay 1e-7, BCE, importance-sampled VP time.
  t.discriminator = ml_collections.ConfigDict(dict(
      out=os.path.join(models, 'discriminator'),
      classifier=os.path.join(ASSETS, 'classifier'),  # or a converted 32x32_classifier.pt dir
      real_data=os.path.join(ASSETS, 'digits.npz'),   # or DG's true_data.npz (uint8 NHWC)
      gen_dir='workdir/digits-gen',                   # samples_*.npz of the model to correct
      num_data=12000,              # cap on real and on generated images (DG: 50000)
      heldout=0.1,                 # fraction of each set held out for early stopping
      heldout_repeats=4,           # noise draws per held-out image
      eval_every=250, patience=6,  # held-out BCE period; stop after 6 without improvement
      conditional=False,
      head=_encoder(image_size=4, in_channels=64, model_channels=32, out_channels=1,
                    channel_mult=(1,), attention_resolutions=(1,), num_classes=10),
      importance=True,
      num_steps=10000, batch_size=64, lr=3e-4, weight_decay=1e-7,
      ckpt_every=1000, log_every=100))
  return t


# Knobs chosen on validation seeds by ``python -m benchmarks.quality``, per testbed
# (`isir_jax.pretrained.TUNED`, where the rule and the values are explained).
TUNED = pretrained.TUNED


def demo_samplers(testbed: str | None = None) -> ml_collections.ConfigDict:
  """``config.demo.samplers``: one section per demo method, passed to ``get_sampler(name)``,
  with the ``testbed``'s tuned values (`TUNED`), or as the papers set them (None).

  The settings live in the package (`isir_jax.pretrained.method_settings`, what
  ``pretrained.digits()`` returns), so that they are importable after installation.
  """
  return ml_collections.ConfigDict(pretrained.DIGITS_SETTINGS if testbed is None
                                   else pretrained.method_settings(testbed))


def get_config(arg: str | None = None):
  method, flags = default.parse_arg(arg, 'configs/digits.py', ('all', 'tiny', 'natural'),
                                    'isir_stochastic')
  # The testbed: digits-skew (default: its error is known, class frequencies) or the
  # model of the natural digits (`natural`).
  testbed = 'natural' if 'natural' in flags else 'skew'
  models = ASSETS if testbed == 'natural' else SKEW_ASSETS
  config = default.get_config()
  config.name = f'digits-{method}' if testbed == 'natural' else f'digits-skew-{method}'
  config.mode = 'demo'            # `python main.py` = the demo table; --mode=sample for one method
  config.testbed = testbed
  config.model.denoiser = os.path.join(models, 'denoiser')
  config.model.discriminator = os.path.join(models, 'discriminator')   # unused by edm
  config.sampler = default.sampler_config(method)
  config.sample.num_samples = 64
  config.sample.batch_size = 64

  config.data = ml_collections.ConfigDict()
  config.data.path = os.path.join(ASSETS, 'digits.npz')   # real digits, [-1, 1] NHWC on load

  config.demo = ml_collections.ConfigDict()
  config.demo.methods = (('edm', 'dg', 'diffrs', 'isir_stochastic', 'isir_scaled', 'smc')
                         if 'all' in flags else ('edm', 'isir_stochastic', 'isir_scaled', 'smc'))
  config.demo.num_samples = 512         # per method, one batch (whole SMC groups)
  config.demo.min_fd_samples = 1000     # FD-digits is shown from this many samples on
  config.demo.grid_samples = 400        # digits per PNG grid, sorted by predicted class
  config.demo.xla_cache = 'workdir/xla_cache'   # persistent compilation cache ('' disables)
  config.demo.feature_net = os.path.join(ASSETS, 'feature_net')
  config.demo.ref_stats = os.path.join(ASSETS, 'feature_stats.npz')
  config.demo.diffrs_thresholds = os.path.join(models, 'diffrs_thresholds.npz')
  # DiffRS warm-up quantile behind diffrs_thresholds.
  config.demo.rej_percentile = TUNED[testbed].get('diffrs', {}).get('rej_percentile', 0.75)
  config.demo.warmup_samples = 2000     # warm-up samples of EDM for the DiffRS thresholds
  config.demo.samplers = demo_samplers(testbed)

  config.train = train_config(models)
  if testbed == 'skew':
    config.train.denoiser.class_weights = digits_data.SKEW_WEIGHTS
    config.train.discriminator.gen_dir = 'workdir/digits-skew-gen'
  if 'tiny' in flags:
    default.apply_tiny(config)
    apply_tiny_training(config.train)
    config.demo.num_samples = 8       # the samplers keep 18 steps (the DiffRS thresholds' length)
    config.demo.samplers.smc.group_size = 2
    config.demo.grid_samples = 8
    config.demo.warmup_samples = 8
  return config


def apply_tiny_training(t: ml_collections.ConfigDict) -> None:
  """Shrinks every trainer to seconds (tests): tiny widths, few steps, small batches."""
  for name in ('feature_net', 'denoiser', 'classifier', 'discriminator'):
    t[name].num_steps = 30
    t[name].batch_size = 16
    t[name].log_every = 10
  t.feature_net.update(dict(channels=(8, 8, 8), feature_dim=8, lr=1e-2, num_steps=100,
                            log_every=20))
  t.denoiser.update(dict(model_channels=8, channel_mult=(1,), attn_resolutions=(),
                         warmup_steps=0, ema_decay=0.5, lr=1e-2))
  t.classifier.arch.update(dict(channel_mult=(1,), attention_resolutions=()))
  t.classifier.lr = 3e-3
  t.discriminator.head.update(dict(image_size=8, in_channels=32, attention_resolutions=()))
  t.discriminator.lr = 3e-3
  t.discriminator.num_data = 64
