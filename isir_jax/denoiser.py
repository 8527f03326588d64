"""EDM denoisers ``D(x; sigma)`` from converted checkpoints or from (module, params).

    den = load_denoiser('models/edm-cifar10-32x32-uncond-vp')
    d = jax.jit(lambda x, s: den(x, s))(x, sigma)       # x: [B, 32, 32, 3], sigma: [B] or ()

A :class:`Denoiser` is a pytree whose leaves are the network variables and whose
static part is the Flax module, so it can be closed over or passed through
``jax.jit``/``vmap``/``pmap`` like any array container.
"""

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from isir_jax import checkpoints
from isir_jax.networks import precond

Array = jax.Array
FAMILY = 'edm'


@flax.struct.dataclass
class Denoiser:
  """A preconditioned EDM network with its variables (satisfies ``types.Denoiser``).

  Attributes:
    module: the preconditioner module (``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``,
      ``EDMPrecond``) wrapping a ``SongUNet`` or ``DhariwalUNet``.
    params: the variables passed to ``module.apply``: ``{'params': ...}`` plus
      ``{'buffers': ...}`` for NCSN++'s Fourier frequencies.
  """
  module: nn.Module = flax.struct.field(pytree_node=False)
  params: Any

  @classmethod
  def from_module(cls, module: nn.Module, params: Any) -> 'Denoiser':
    """Wraps a preconditioner module and its variables (no disk access)."""
    return cls(module=module, params=params)

  def __call__(self, x: Array, sigma: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None) -> Array:
    """Returns ``D(x; sigma)`` [B, H, W, C] float32 for x [B, H, W, C], sigma () or [B]."""
    return self.module.apply(self.params, x, sigma, class_labels, augment_labels)

  def round_sigma(self, sigma: Array) -> Array:
    """Nearest supported noise level (iDDPM's discrete levels; identity otherwise)."""
    return self.module.round_sigma(sigma)

  @property
  def sigma_min(self) -> float:
    return float(self.module.sigma_min)

  @property
  def sigma_max(self) -> float:
    return float(self.module.sigma_max)

  @property
  def shape(self) -> tuple[int, int, int]:
    """Image shape (H, W, C)."""
    return (self.module.img_resolution, self.module.img_resolution, self.module.img_channels)

  @property
  def label_dim(self) -> int:
    """Number of classes of a conditional network (0: unconditional)."""
    return self.module.label_dim


def load_denoiser(directory: str, dtype: Any = jnp.float32) -> Denoiser:
  """Loads a denoiser written by ``checkpoints_convert.edm`` (or a trainer).

  Args:
    directory: model directory (``config.json`` + ``params/``).
    dtype: compute dtype of the U-Net, e.g. ``jnp.bfloat16``; params stay float32
      and the preconditioning runs in float32.
  Returns:
    The :class:`Denoiser`.
  """
  def expected(config):
    module = precond.build_precond(config['module'])
    return jax.eval_shape(module.init, jax.random.key(0), *precond.example_inputs(module))

  params, config = checkpoints.load_model(directory, FAMILY, expected)
  module = precond.build_precond(config['module'], dtype=dtype)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return Denoiser.from_module(module, params)
