"""The trainers behind ``main.py --mode=train_*``: one function per model.

Each takes the experiment config and a workdir, trains with the shared loop
(``isir_jax.train.loop``; checkpoints under ``WORKDIR/train_<model>/`` so a rerun
resumes), and writes the final model in the layout the loaders read
(``isir_jax.checkpoints``) to the directory the config names.
"""

import os
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from isir_jax import checkpoints
from isir_jax import discriminator as disc_lib
from isir_jax import denoiser as denoiser_lib
from isir_jax import io
from isir_jax.networks import precond
from isir_jax.train import digits_data
from isir_jax.train import feature_net
from isir_jax.train import losses
from isir_jax.train import loop

CLASSIFIER_FAMILY = disc_lib.CLASSIFIER_FAMILY


def _kwargs(cfg: ml_collections.ConfigDict) -> dict:
  """A config section as JSON-able module kwargs (tuples as lists)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}


def _optimizer(cfg: ml_collections.ConfigDict):
  return loop.make_optimizer(cfg.lr, weight_decay=cfg.get('weight_decay', 0.0),
                             grad_clip=cfg.get('grad_clip', 0.0),
                             warmup_steps=cfg.get('warmup_steps', 0))


def _run(cfg, loss_fn, params, data, workdir, name, seed, **kwargs):
  return loop.train(loss_fn, params, data, optimizer=_optimizer(cfg), num_steps=cfg.num_steps,
                    batch_size=cfg.batch_size, workdir=os.path.join(workdir, f'train_{name}'),
                    seed=seed, ema_decay=cfg.get('ema_decay', None),
                    ckpt_every=cfg.get('ckpt_every', 1000), log_every=cfg.get('log_every', 100),
                    desc=name, **kwargs)


def load_images(path: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Images in [-1, 1] (float32 NHWC) and integer labels (or None) of one npz file.

  Accepts the bundled digits (``levels``), sample shards and DG's data files
  (uint8 ``samples`` or ``arr_0``, scaled as DG's ``2 x / 255 - 1``; ``label`` optional).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: image npz not found')
  with np.load(path) as f:
    if 'levels' in f:
      return digits_data.load_digits(path)
    key = 'samples' if 'samples' in f else 'arr_0' if 'arr_0' in f else None
    if key is None:
      raise ValueError(f'{path}: expected an array "samples", "arr_0" or "levels", '
                       f'found {sorted(f.keys())}')
    x = f[key]
    labels = f['label'] if 'label' in f else None
  if x.dtype != np.uint8 or x.ndim != 4:
    raise ValueError(f'{path}: "{key}" must be uint8 NHWC, got {x.dtype} {x.shape}')
  if labels is not None and labels.ndim == 2:  # one-hot
    labels = labels.argmax(-1)
  return x.astype(np.float32) / 127.5 - 1.0, (None if labels is None else labels.astype(np.int32))


def load_shards(directory: str) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Concatenates the sample shards of a run directory in index order (DG's ``gendir``)."""
  paths = io.shard_paths(directory)
  if not paths:
    raise FileNotFoundError(f'{directory}: no samples_<k>.npz shards (generate them with '
                            'main.py --mode=sample first)')
  parts = [load_images(p) for p in paths]
  labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
  return np.concatenate([p[0] for p in parts]), labels


def denoiser_module_config(cfg: ml_collections.ConfigDict, resolution: int, channels: int
                           ) -> dict:
  """The ``build_precond`` config of the demo denoiser: EDMPrecond around a small SongUNet."""
  label_dim = digits_data.NUM_CLASSES if cfg.conditional else 0
  unet = dict(img_resolution=resolution, in_channels=channels, out_channels=channels,
              label_dim=label_dim, model_channels=cfg.model_channels,
              channel_mult=list(cfg.channel_mult), num_blocks=cfg.num_blocks,
              attn_resolutions=list(cfg.attn_resolutions), dropout=0.0)
  return {'class_name': 'EDMPrecond',
          'kwargs': dict(img_resolution=resolution, img_channels=channels, label_dim=label_dim,
                         sigma_data=cfg.sigma_data),
          'model': {'class_name': 'SongUNet', 'kwargs': unet}}


def train_denoiser(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains the demo's EDM denoiser on the digits and saves its EMA weights.

  EDM loss and preconditioning (Karras et al. 2022, Sec. 5): ``ln sigma ~
  N(P_mean, P_std^2)``, weight ``(sigma^2 + sd^2) / (sigma sd)^2``; the saved model
  (``train.denoiser.out``, readable by ``load_denoiser``) holds the EMA of the weights.
  """
  cfg = config.train.denoiser
  images, labels = digits_data.load_digits(config.data.path)
  if cfg.get('class_weights'):
    # digits-skew: a class-skewed resampling, the model's deliberate, known error.
    idx = digits_data.class_resample(labels, cfg.class_weights, config.seed)
    images, labels = images[idx], labels[idx]
  module_config = denoiser_module_config(cfg, images.shape[1], images.shape[3])
  module = precond.build_precond(module_config)
  data = {'image': images}
  one_hot = None
  if cfg.conditional:
    data['label'] = np.eye(digits_data.NUM_CLASSES, dtype=np.float32)[labels]
    one_hot = data['label'][:1]
  variables = module.init(jax.random.key(config.seed), images[:1], jnp.ones((1,)), one_hot)

  def loss_fn(v, batch, key):
    denoise = lambda x, s, c: module.apply(v, x, s, c)
    loss = losses.edm_loss(denoise, batch['image'], key, batch.get('label'),
                           p_mean=cfg.p_mean, p_std=cfg.p_std, sigma_data=cfg.sigma_data)
    return loss, {}

  state, history = _run(cfg, loss_fn, variables, data, workdir, 'denoiser', config.seed)
  loop.save_model(cfg.out, state.ema_params,
                         {'family': denoiser_lib.FAMILY, 'module': module_config,
                          'source': 'isir_jax.train.trainers.train_denoiser',
                          'num_steps': cfg.num_steps})
  return history


def load_classifier(directory: str) -> tuple[dict, Any]:
  """The noisy classifier (module kwargs, params) of a trained or converted model dir.

  Accepts an ``adm_classifier`` dir (written by ``train_classifier``) or a
  ``dg_discriminator`` dir (converted ``32x32_classifier.pt``), whose encoder is used.
  """
  params, config = checkpoints.load_model(directory, (CLASSIFIER_FAMILY, disc_lib.FAMILY))
  if config['family'] == CLASSIFIER_FAMILY:
    return config['module'], params
  return config['encoder'], params['encoder']


def train_classifier(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains the noisy time-dependent digit classifier (ADM ``EncoderUNetModel``).

  It plays the role of ADM's ``32x32_classifier.pt``: its trunk is the frozen
  feature extractor of the discriminator. Writes ``config.train.classifier.out``.
  """
  cfg = config.train.classifier
  images, labels = digits_data.load_digits(config.data.path)
  module = disc_lib.module_from_config(_kwargs(cfg.arch))
  params = module.init(jax.random.key(config.seed), images[:1], jnp.zeros((1,)))['params']

  def loss_fn(p, batch, key):
    fn = lambda x, t: module.apply({'params': p}, x, t)
    return losses.noisy_classifier_loss(fn, batch['image'], batch['label'], key,
                                        importance=cfg.importance)

  state, history = _run(cfg, loss_fn, params, {'image': images, 'label': labels},
                        workdir, 'classifier', config.seed)
  loop.save_model(cfg.out, state.params,
                         {'family': CLASSIFIER_FAMILY, 'module': _kwargs(cfg.arch)})
  return history


def _one_hot(labels: Optional[np.ndarray], num_classes: int) -> np.ndarray:
  if labels is None:
    raise ValueError('a conditional discriminator needs labels in the real and generated npz '
                     '("label")')
  return np.eye(num_classes, dtype=np.float32)[labels]


def heldout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) index arrays: a random ``fraction`` of ``range(count)`` held out."""
  perm = np.random.default_rng(seed).permutation(count)
  num_heldout = int(round(count * fraction))
  return perm[num_heldout:], perm[:num_heldout]


def heldout_evaluator(loss_fn, parts: list[dict], repeats: int, seed: int):
  """Jitted ``params -> {'loss', 'acc'}`` over the held-out real and generated parts, each
  image ``repeats`` times, the two parts weighted equally, the same noise at every call."""
  key = jax.random.key(seed)
  batches = [{k: np.repeat(v, repeats, axis=0) for k, v in part.items()} for part in parts]

  @jax.jit
  def evaluate(params):
    out = [loss_fn(params, batch, jax.random.fold_in(key, i)) for i, batch in enumerate(batches)]
    return {'loss': sum(loss for loss, _ in out) / len(out),
            'acc': sum(metrics['acc'] for _, metrics in out) / len(out)}

  return evaluate


def _balanced(real: dict, gen: dict) -> dict:
  """Real and generated rows with the real ones repeated to the generated count, so that
  uniform batches hold both classes equally often (DG trains on equal counts)."""
  reps = np.resize(np.arange(len(real['image'])), max(len(gen['image']), len(real['image'])))
  return {k: np.concatenate([real[k][reps], gen[k]]) for k in real}


def train_discriminator(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains DG's discriminator head on frozen classifier features (DG ``train.py``).

  Real images (``train.discriminator.real_data``) are labelled 1, generated ones
  (the shards in ``train.discriminator.gen_dir``) 0, each capped at ``num_data``;
  the head sees the classifier's features of VP-perturbed inputs at importance-sampled
  times, optionally with the class label. A ``heldout`` fraction of each set is kept
  out of training: every ``eval_every`` steps the held-out BCE and accuracy (real and
  generated weighted equally, ``heldout_repeats`` noise draws per image with a fixed key)
  are measured, the head of the lowest held-out BCE is kept, and training stops after
  ``patience`` evaluations without improvement. Works for the digits and, from a
  converted ``32x32_classifier.pt`` and CIFAR-10 npz files, for DG's CIFAR-10 heads.
  Writes a ``dg_discriminator`` dir (``load_discriminator`` reads it) to ``out``, with
  the held-out metrics in its config.json (``training``).
  Returns the logged metrics (``loss``, ``acc``, ``step``, ``heldout_*``).
  """
  cfg = config.train.discriminator
  enc_kwargs, enc_params = load_classifier(cfg.classifier)
  encoder = disc_lib.module_from_config(enc_kwargs)
  real_x, real_y = load_images(cfg.real_data)
  gen_x, gen_y = load_shards(cfg.gen_dir)
  n = cfg.num_data
  real_x, gen_x = real_x[:n], gen_x[:n]
  if real_x.shape[1:] != gen_x.shape[1:]:
    raise ValueError(f'real images {real_x.shape[1:]} ({cfg.real_data}) differ from generated '
                     f'{gen_x.shape[1:]} ({cfg.gen_dir})')
  real = {'image': real_x, 'is_real': np.ones(len(real_x), np.float32)}
  gen = {'image': gen_x, 'is_real': np.zeros(len(gen_x), np.float32)}
  head_kwargs = _kwargs(cfg.head)
  if cfg.conditional:
    real['label'] = _one_hot(real_y[:n] if real_y is not None else None, cfg.head.num_classes)
    gen['label'] = _one_hot(gen_y[:n] if gen_y is not None else None, cfg.head.num_classes)
  else:
    head_kwargs['num_classes'] = 0
  splits = [heldout_split(len(part['image']), cfg.heldout, config.seed + i)
            for i, part in enumerate((real, gen))]
  data = _balanced(*({k: v[tr] for k, v in part.items()}
                     for part, (tr, _) in zip((real, gen), splits)))
  heldout = [{k: v[ho] for k, v in part.items()} for part, (_, ho) in zip((real, gen), splits)]

  head = disc_lib.module_from_config(head_kwargs)
  feats = jax.eval_shape(lambda: encoder.apply({'params': enc_params}, real_x[:1],
                                               jnp.zeros((1,)), feature=True))
  if feats.shape[1:] != (head.image_size, head.image_size, head.in_channels):
    raise ValueError(f'classifier features are {feats.shape[1:]} but the head expects '
                     f'{(head.image_size, head.image_size, head.in_channels)}: set '
                     'train.discriminator.head.image_size / in_channels')
  labels0 = jnp.zeros((1,), jnp.int32) if head.num_classes else None
  head_params = head.init(jax.random.key(config.seed), jnp.zeros((1,) + feats.shape[1:]),
                          jnp.zeros((1,)), labels0)['params']
  disc = disc_lib.DGDiscriminator.from_modules(encoder, head, {'encoder': enc_params,
                                                         'head': head_params})

  def loss_fn(p, batch, key):
    def logit_fn(x_vp, tau, labels):
      t = disc.network_time(tau)
      feats = jax.lax.stop_gradient(disc.features(x_vp, t))   # frozen extractor
      return disc.head_logit(feats, t, labels, head_params=p)
    return losses.discriminator_loss(logit_fn, batch['image'], batch['is_real'], key,
                                     batch.get('label'), importance=cfg.importance)

  evaluate = (heldout_evaluator(loss_fn, heldout, cfg.heldout_repeats, config.seed + 1)
              if all(len(part['image']) for part in heldout) else None)
  state, history = _run(cfg, loss_fn, head_params, data, workdir, 'discriminator', config.seed,
                        evaluate=evaluate, eval_every=cfg.eval_every, patience=cfg.patience)
  best = state.params if evaluate is None else state.best_params
  trained = disc.replace(params={'encoder': enc_params, 'head': best})
  report = dict(num_real=len(real_x), num_generated=len(gen_x), heldout_fraction=cfg.heldout,
                steps=int(state.step))
  if evaluate is not None:
    final = {k: float(v) for k, v in evaluate(best).items()}
    report.update(heldout_bce=final['loss'], heldout_accuracy=final['acc'],
                  best_step=int(state.best_step))
  loop.save_model(cfg.out, trained.params, dict(trained.to_config(), training=report))
  logging.info('discriminator: %s', report)
  history[-1].update(report)
  return history


def train_feature_net(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Trains the clean-digit classifier whose features define FD-digits.

  Also writes the reference statistics of all real digits (``train.feature_net.ref_stats``).
  """
  cfg = config.train.feature_net
  history = feature_net.train_feature_net(
      cfg.out, os.path.join(workdir, 'train_feature_net'), num_steps=cfg.num_steps,
      batch_size=cfg.batch_size, lr=cfg.lr, seed=config.seed, channels=tuple(cfg.channels),
      feature_dim=cfg.feature_dim, data_path=config.data.path,
      log_every=cfg.get('log_every', 100))
  images, _ = digits_data.load_digits(config.data.path)
  feature_net.reference_stats(feature_net.load_feature_net(cfg.out), images, cfg.ref_stats)
  return history
