"""Converts DG's discriminator (ADM classifier + head ``.pt`` state dicts) to isir_jax.

    python -m checkpoints_convert.dg --classifier 32x32_classifier.pt \\
        --discriminator discriminator_60.pt --dst models/dg-cifar10-uncond
    python -m checkpoints_convert.dg --classifier 32x32_classifier.pt \\
        --discriminator discriminator_250.pt --cond --dst models/dg-cifar10-cond

The defaults are DG's published CIFAR-10 configuration (``classifier_lib.py``): the
classifier is ADM's ``create_classifier`` at 32x32 (width 128, depth 4, attention at
32/16/8, scale-shift norm, resblock down, attention pool, 1000 outputs); the head is
the same family at 8x8 on its 512 feature channels (width 128, depth 2, one output,
1000-row label embedding when conditional). The flags are checked against
``ARCH_RULES`` before anything is built; the files are read without torch; every
tensor is checked against ``jax.eval_shape`` of the configured networks before
anything is written.
"""

import dataclasses
import os
import re
from typing import Mapping, Optional, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from checkpoints_convert import common
from checkpoints_convert.common import ConversionError, Rule
from checkpoints_convert.reader import main_guard, read_state_dict
from isir_jax import checkpoints
from isir_jax import discriminator as dg
from isir_jax.train import trainers

# ADM's create_classifier: channel multipliers per image size.
CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
                64: (1, 2, 3, 4), 32: (1, 2, 4), 16: (1, 2), 8: (1,)}
# Torch Conv1d (1x1) layers; every other 2-D weight is an nn.Linear or the label embedding.
_CONV1D = ('qkv', 'proj_out', 'qkv_proj', 'c_proj')
# Type and range of every Arch field (the CLI flags); None means the default where allowed.
ARCH_RULES = {
    'image_size': Rule(int, 1, 1024), 'classifier_width': Rule(int, 1, 4096),
    'classifier_depth': Rule(int, 1, 32), 'classifier_attention_resolutions': Rule(str),
    'classifier_channel_mult': Rule(float, 0.125, 64, length=(1, 8)),
    'classifier_out_channels': Rule(int, 1, 100_000), 'disc_width': Rule(int, 1, 4096),
    'disc_depth': Rule(int, 1, 32), 'disc_attention_resolutions': Rule(str),
    'num_head_channels': Rule(int, 1, 4096), 'num_classes': Rule(int, 1, 100_000),
    'cond': Rule(bool), 'time_map': Rule(str, choices=dg.TIME_MAPS),
    'prob_clip': Rule(float, 0, 0.5),
}
_OPTIONAL = ('classifier_depth', 'classifier_channel_mult', 'time_map')


@dataclasses.dataclass(frozen=True)
class Arch:
  """Architecture of the classifier and the head, in DG's terms (the CLI flags).

  Resolutions are comma-separated image sizes, as in ``create_classifier``; ``None``
  means the size-dependent default of the reference.
  """

  image_size: int = 32
  classifier_width: int = 128
  classifier_depth: Optional[int] = None
  classifier_attention_resolutions: str = '32,16,8'
  classifier_channel_mult: Optional[Sequence[float]] = None
  classifier_out_channels: int = 1000
  disc_width: int = 128
  disc_depth: int = 2
  disc_attention_resolutions: str = '32,16,8'
  num_head_channels: int = 64
  num_classes: int = 1000
  cond: bool = False
  time_map: Optional[str] = None
  prob_clip: float = 0.

  def check(self) -> None:
    """Raises ConversionError naming the first flag of the wrong type or range."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    common.check_values({k: v for k, v in values.items()
                         if v is not None or k not in _OPTIONAL}, ARCH_RULES, '', '--')
    levels = len(self._mult()) - 1
    if self.image_size % 2 ** levels:
      raise ConversionError(f'--image_size={self.image_size} is not divisible by 2^{levels} '
                            f'(channel multipliers {list(self._mult())})')
    for flag in ('classifier_attention_resolutions', 'disc_attention_resolutions'):
      _resolutions(getattr(self, flag), flag)

  def _mult(self) -> tuple:
    if self.classifier_channel_mult:
      return tuple(self.classifier_channel_mult)
    if self.image_size not in CHANNEL_MULT:
      raise ConversionError(f'--image_size={self.image_size}: no ADM channel_mult for it; '
                            f'use one of {sorted(CHANNEL_MULT)} or set --classifier_channel_mult')
    return CHANNEL_MULT[self.image_size]

  def encoder_kwargs(self) -> dict:
    depth = self.classifier_depth
    if depth is None:
      depth = 4 if self.image_size in (32, 64) else 2
    return _kwargs(self.image_size, 3, self.classifier_width, self.classifier_out_channels,
                   depth, _resolutions(self.classifier_attention_resolutions,
                                       'classifier_attention_resolutions'), self._mult(),
                   self.num_head_channels, 0)

  def head_kwargs(self) -> dict:
    mult = self._mult()
    size = self.image_size // 2 ** (len(mult) - 1)
    return _kwargs(size, int(mult[-1] * self.classifier_width), self.disc_width, 1,
                   self.disc_depth,
                   _resolutions(self.disc_attention_resolutions, 'disc_attention_resolutions'),
                   CHANNEL_MULT.get(size, (1,)),
                   self.num_head_channels, self.num_classes if self.cond else 0)

  def discriminator(self, params=None) -> dg.DGDiscriminator:
    """The configured discriminator (abstract when ``params`` is None), flags checked first."""
    self.check()
    time_map = self.time_map or ('cosine' if self.image_size == 64 else 'linear')
    return common.build(lambda: dg.DGDiscriminator.from_modules(
        dg.module_from_config(self.encoder_kwargs()), dg.module_from_config(self.head_kwargs()),
        params, {'time_map': time_map, 'prob_clip': self.prob_clip}), 'flags')

  def expected_params(self) -> tuple[dg.DGDiscriminator, dict]:
    """The abstract discriminator and the shapes of its params (``jax.eval_shape``)."""
    disc = self.discriminator()
    return disc, common.build(
        lambda: dg.init_params(disc.encoder, disc.head, jax.random.key(0), abstract=True),
        'flags')


def _resolutions(text: str, flag: str) -> list[int]:
  """'32,16,8' -> [32, 16, 8]; '' -> []."""
  parts = [p.strip() for p in text.split(',')] if text.strip() else []
  if len(parts) > 16 or not all(p.isascii() and p.isdigit() and 1 <= int(p) <= 4096 for p in parts):
    raise ConversionError(f'--{flag}={text[:80]!r} is not a comma-separated list of at most '
                          '16 ints in [1, 4096]')
  return [int(p) for p in parts]


def _kwargs(image_size, in_channels, width, out_channels, depth, resolutions, mult,
            head_channels, num_classes) -> dict:
  return dict(image_size=image_size, in_channels=in_channels, model_channels=width,
              out_channels=out_channels, num_res_blocks=depth,
              attention_resolutions=[image_size // r for r in resolutions],
              channel_mult=list(mult), num_head_channels=head_channels,
              use_scale_shift_norm=True, resblock_updown=True, num_classes=num_classes)


# --- Key and layout mapping between the torch state dict and the Flax params. ---

def _flax_name(torch_parts: Sequence[str]) -> list[str]:
  """['input_blocks', '1', '0', 'in_layers', '0'] -> ['input_blocks_1_0', 'in_layers_0']."""
  names = []
  for part in torch_parts:
    if part.isdigit() and names:
      names[-1] += '_' + part
    else:
      names.append(part)
  return names


def _torch_name(flax_name: str) -> str:
  """'input_blocks_1_0' -> 'input_blocks.1.0' (inverse of ``_flax_name``)."""
  return re.sub(r'_(\d+)', r'.\1', flax_name)


def torch_shapes(params_shapes: Mapping) -> dict[str, tuple]:
  """Torch state-dict keys and shapes that a Flax params tree (or its shapes) implies."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params_shapes)[0]:
    names = [p.key for p in path]
    mods, leaf_name, shape = names[:-1], names[-1], tuple(leaf.shape)
    key = '.'.join(_torch_name(m) for m in mods)
    if leaf_name == 'kernel' and len(shape) == 4:      # Conv2d [O, I, kh, kw]
      out[key + '.weight'] = (shape[3], shape[2], shape[0], shape[1])
    elif leaf_name == 'kernel':                        # Linear [O, I] or Conv1d [O, I, 1]
      extra = (1,) if mods[-1] in _CONV1D else ()
      out[key + '.weight'] = (shape[1], shape[0]) + extra
    elif leaf_name in ('scale', 'embedding'):
      out[key + '.weight'] = shape
    elif leaf_name == 'positional_embedding':          # torch [C, T], here [T, C]
      out[key + '.positional_embedding'] = shape[::-1]
    else:
      out[key + '.' + leaf_name] = shape
  return out


def to_flax(state: Mapping[str, np.ndarray]) -> dict:
  """Maps a (checked) torch state dict to a nested Flax params dict, NHWC layouts."""
  params = {}
  for key, value in state.items():
    parts = key.split('.')
    mods, leaf = _flax_name(parts[:-1]), parts[-1]
    value = np.asarray(value, np.float32)
    if leaf == 'positional_embedding':
      name, value = leaf, value.T
    elif leaf == 'bias':
      name = 'bias'
    elif value.ndim == 4:
      name, value = 'kernel', value.transpose(2, 3, 1, 0)
    elif value.ndim == 3:
      name, value = 'kernel', value[..., 0].T
    elif value.ndim == 2:
      name, value = ('embedding', value) if mods[-1] == 'label_emb' else ('kernel', value.T)
    else:
      name = 'scale'
    node = params
    for m in mods:
      node = node.setdefault(m, {})
    node[name] = np.ascontiguousarray(value)
  return params


# --- Checks with actionable messages. ---

def _hint(key: str, prefix: str, kind: str) -> str:
  """The flag that most probably explains a problem with ``key``."""
  if key.startswith('label_emb'):
    return '--num_classes' if kind == 'shape' else '--cond'
  if key.endswith('positional_embedding'):
    return '--image_size'
  if key.startswith('out.2.c_proj') and prefix == 'classifier':
    return '--classifier_out_channels'
  if key.startswith('input_blocks.0.0') and prefix == 'disc' and kind == 'shape':
    return '--classifier_width (the head reads the classifier features) or --disc_width'
  if re.match(r'(input_blocks|middle_block)\.\d+\.1\.', key) and kind != 'shape':
    return f'--{prefix}_attention_resolutions or --{prefix}_depth'
  if kind != 'shape':
    return f'--{prefix}_depth or --image_size (sets the channel multipliers)'
  return f'--{prefix}_width'


def check_state_dict(state: Mapping[str, np.ndarray], expected: Mapping[str, tuple],
                     what: str, prefix: str) -> list[str]:
  """Compares a state dict with the expected torch keys/shapes; returns the problems.

  Args:
    state: torch key -> array, as ``read_state_dict`` returns.
    expected: torch key -> shape, from ``torch_shapes`` of the configured network.
    what: name of the file for the messages.
    prefix: 'classifier' or 'disc', the flag family of this network.

  Returns:
    One message per wrong shape, missing key and extra key, each naming the flag
    that most probably differs (empty when all match).
  """
  return common.structure_problems({k: tuple(np.shape(v)) for k, v in state.items()},
                                   expected, what,
                                   hint=lambda key, kind: _hint(key, prefix, kind))


def convert(classifier_state: Mapping[str, np.ndarray],
            disc_state: Mapping[str, np.ndarray], arch: Arch,
            names: tuple[str, str] = ('classifier', 'discriminator')) -> tuple[dict, dict]:
  """Checks both state dicts against ``arch`` and returns ``(params, config)``.

  Raises:
    ConversionError: listing every mismatch, missing key and extra key.
  """
  disc, shapes = arch.expected_params()
  common.raise_problems(
      check_state_dict(classifier_state, torch_shapes(shapes['encoder']), names[0], 'classifier')
      + check_state_dict(disc_state, torch_shapes(shapes['head']), names[1], 'disc'))
  params = {'encoder': to_flax(classifier_state), 'head': to_flax(disc_state)}
  got = jax.tree_util.tree_map(np.shape, params)
  want = jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)
  if got != want:  # The key mapping itself is wrong: a bug here, not in the file.
    raise AssertionError(f'converted tree differs from eval_shape: {got} vs {want}')
  return params, disc.to_config()


FLAGS = flags.FLAGS


def define_flags():
  """CLI flags, defined only when run as a script (importers keep a clean flag set)."""
  flags.DEFINE_string('classifier', None, 'ADM noisy classifier state dict (32x32_classifier.pt).')
  flags.DEFINE_string('discriminator', None,
                      'DG head state dict (discriminator_60.pt uncond, discriminator_250.pt cond); '
                      'omit it to convert the classifier alone, for training a new head.')
  common.define_output_flags()
  flags.DEFINE_bool('cond', False, 'The head is class conditional (has label_emb).')
  flags.DEFINE_integer('image_size', Arch.image_size, 'Classifier input resolution; 64 selects '
                       'the cosine time map and ADM 64x64 channel multipliers.')
  flags.DEFINE_integer('classifier_width', Arch.classifier_width, 'Classifier model_channels.')
  flags.DEFINE_integer('classifier_depth', None,
                       'Classifier residual blocks per level (default: 4 at 32/64, else 2).')
  flags.DEFINE_string('classifier_attention_resolutions', Arch.classifier_attention_resolutions,
                      'Classifier resolutions with attention.')
  flags.DEFINE_list('classifier_channel_mult', None,
                    'Classifier channel multipliers (default: ADM\'s for --image_size).')
  flags.DEFINE_integer('classifier_out_channels', Arch.classifier_out_channels,
                       'Classifier logits (unused by DG, but stored in the file).')
  flags.DEFINE_integer('disc_width', Arch.disc_width, 'Head model_channels.')
  flags.DEFINE_integer('disc_depth', Arch.disc_depth, 'Head residual blocks.')
  flags.DEFINE_string('disc_attention_resolutions', Arch.disc_attention_resolutions,
                      'Head resolutions with attention (relative to its 8x8 input).')
  flags.DEFINE_integer('num_head_channels', Arch.num_head_channels, 'Channels per attention head.')
  flags.DEFINE_integer('num_classes', Arch.num_classes, 'Rows of the head\'s label embedding.')
  flags.DEFINE_enum('time_map', None, dg.TIME_MAPS,
                    'VP time fed to the networks (default: cosine iff --image_size=64).')
  flags.DEFINE_float('prob_clip', 0., '0: log ratio = head logit (ISIR seed). p > 0: '
                     'log(D/(1-D)) with D clipped to [p, 1-p] (upstream DG uses 1e-5).')


def convert_classifier(classifier_state: Mapping[str, np.ndarray], arch: Arch,
                       name: str = 'classifier') -> tuple[dict, dict]:
  """Checks the classifier alone against ``arch``; returns its ``(params, config)``.

  For training a new DG head (``--mode=train_discriminator``) on the frozen classifier.

  Raises:
    ConversionError: listing every mismatch, missing key and extra key.
  """
  disc, shapes = arch.expected_params()
  common.raise_problems(
      check_state_dict(classifier_state, torch_shapes(shapes['encoder']), name, 'classifier'))
  return (to_flax(classifier_state),
          {'family': dg.CLASSIFIER_FAMILY, 'module': dg.module_config(disc.encoder)})


def _arch_from_flags() -> Arch:
  try:
    mult = tuple(float(m) for m in FLAGS.classifier_channel_mult or ())
  except ValueError:
    raise ConversionError(f'--classifier_channel_mult={FLAGS.classifier_channel_mult!r} is not '
                          'a list of numbers') from None
  return Arch(
      image_size=FLAGS.image_size, classifier_width=FLAGS.classifier_width,
      classifier_depth=FLAGS.classifier_depth,
      classifier_attention_resolutions=FLAGS.classifier_attention_resolutions,
      classifier_channel_mult=mult or None,
      classifier_out_channels=FLAGS.classifier_out_channels, disc_width=FLAGS.disc_width,
      disc_depth=FLAGS.disc_depth, disc_attention_resolutions=FLAGS.disc_attention_resolutions,
      num_head_channels=FLAGS.num_head_channels, num_classes=FLAGS.num_classes,
      cond=FLAGS.cond, time_map=FLAGS.time_map, prob_clip=FLAGS.prob_clip)


def convert_files(classifier: str, discriminator: Optional[str], arch: Arch,
                  dst: str) -> tuple[dict, dict, str]:
  """Reads and converts the classifier (and the head, if given).

  Returns:
    ``(params, config, summary line)``; ``dst`` is only named in the line.
  """
  arch.check()
  if not discriminator:
    params, config = convert_classifier(read_state_dict(classifier), arch, classifier)
    config['source'] = {'classifier': os.path.basename(classifier)}
    n = sum(np.size(v) for v in jax.tree_util.tree_leaves(params))
    return params, config, (f'converted {classifier} -> {dst}: {n:,} params, classifier '
                            'only (for --mode=train_discriminator)')
  states = [read_state_dict(p) for p in (classifier, discriminator)]
  params, config = convert(*states, arch, names=(classifier, discriminator))
  config['source'] = {'classifier': os.path.basename(classifier),
                      'discriminator': os.path.basename(discriminator)}
  n = sum(np.size(v) for v in jax.tree_util.tree_leaves(params))
  head = config['head']
  return params, config, (
      f'converted {classifier} + {discriminator} -> {dst}: {n:,} params, '
      f'{"conditional" if head["num_classes"] else "unconditional"} head, '
      f'features {head["in_channels"]}x{head["image_size"]}x{head["image_size"]}, '
      f'time map {config["time_map"]}')


def load(directory: str) -> dict:
  """The params of a written model, as the project's loaders load them.

  A discriminator through ``isir_jax.discriminator.load_discriminator``; a classifier
  alone through ``isir_jax.train.trainers.load_classifier``.
  """
  if checkpoints.load_config(directory).get('family') == dg.CLASSIFIER_FAMILY:
    return trainers.load_classifier(directory)[1]
  return dg.load_discriminator(directory).params


@main_guard
def main(argv):
  del argv
  sources = [p for p in (FLAGS.classifier, FLAGS.discriminator) if p]
  common.run(lambda: convert_files(FLAGS.classifier, FLAGS.discriminator, _arch_from_flags(),
                                   FLAGS.dst), FLAGS.dst, sources, load, FLAGS.overwrite)


if __name__ == '__main__':
  define_flags()
  flags.mark_flags_as_required(['classifier', 'dst'])
  app.run(main)
