"""GFLOP per sample of the networks, from XLA's cost analysis, and of a sampler's run.

docs/design.md, "Cost accounting": the cost of a sample is

    nfe x GFLOP(denoiser) + disc_evals x GFLOP(discriminator forward)
        + disc_grads x GFLOP(discriminator gradient, forward + backward),

with the counts every sampler reports in its stats and each network's FLOPs from
``jax.jit(f).lower(...).compile().cost_analysis()`` divided by the batch. Sizes:

  * 'cifar10': EDM's DDPM++ VP denoiser and DG's discriminator (ADM 32x32 classifier +
    head), the published architectures built by `benchmarks.speed` (the FLOPs do not
    depend on the weights); measured once and cached in ``benchmarks/results/cost.json``;
  * 'digits': the bundled networks of ``isir_jax/assets/digits`` (measured each time).

    python -m benchmarks.cost              # the table (CIFAR-10 from the cache)
    python -m benchmarks.cost --refresh    # re-measure CIFAR-10 and rewrite the cache
"""

import argparse
import dataclasses
import json
import os
from typing import Callable, Union

import jax
import jax.numpy as jnp

from benchmarks import speed
from configs import digits
from isir_jax import load_denoiser, load_discriminator

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'cost.json')
_BATCH = 4


@dataclasses.dataclass(frozen=True)
class NetworkCosts:
  """GFLOP per sample: one denoiser evaluation, one discriminator forward (``log_ratio``),
  one discriminator gradient (``guidance``: forward and backward)."""
  denoiser: float
  disc_forward: float
  disc_grad: float


def gflop_per_sample(stats_means: dict, costs: Union[NetworkCosts, dict]) -> float:
  """GFLOP per sample of a run from its mean counts.

  Args:
    stats_means: mean per sample of the sampler's 'nfe', 'disc_evals' and 'disc_grads'
      (missing counts are 0).
    costs: `NetworkCosts` (or a dict of its fields) at the network size of the claim.

  Returns:
    ``nfe * denoiser + disc_evals * disc_forward + disc_grads * disc_grad``.
  """
  if isinstance(costs, dict):
    costs = NetworkCosts(**costs)
  return (float(stats_means.get('nfe', 0)) * costs.denoiser +
          float(stats_means.get('disc_evals', 0)) * costs.disc_forward +
          float(stats_means.get('disc_grads', 0)) * costs.disc_grad)


def gflop_per_row(fn: Callable, *args, rows: int) -> float:
  """GFLOP of one row of a jitted ``fn(*args)`` (args may be ``jax.ShapeDtypeStruct``)."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):   # older JAX: one dict per device
    analysis = analysis[0]
  return float(analysis['flops']) / rows / 1e9


def measure(denoiser, discriminator, shape, batch: int = _BATCH) -> NetworkCosts:
  """Per-sample GFLOP of the two networks at image ``shape`` (H, W, C), unconditional."""
  x = jax.ShapeDtypeStruct((batch,) + tuple(shape), jnp.float32)
  sigma = jax.ShapeDtypeStruct((batch,), jnp.float32)
  return NetworkCosts(
      denoiser=gflop_per_row(lambda m, x, s: m(x, s), denoiser, x, sigma, rows=batch),
      disc_forward=gflop_per_row(lambda m, x, s: m.log_ratio(x, s), discriminator, x, sigma,
                                 rows=batch),
      disc_grad=gflop_per_row(lambda m, x, s: m.guidance(x, s), discriminator, x, sigma,
                              rows=batch))


def cifar10_costs(refresh: bool = False) -> NetworkCosts:
  """The CIFAR-10 networks' costs, from the cache unless ``refresh`` (then rewritten)."""
  if not refresh and os.path.exists(CACHE):
    with open(CACHE) as f:
      return NetworkCosts(**json.load(f)['cifar10'])
  models = speed.Models(tiny=False, seed=0)
  costs = measure(models.denoiser(), models.discriminator(), (32, 32, 3))
  os.makedirs(os.path.dirname(CACHE), exist_ok=True)
  with open(CACHE, 'w') as f:
    json.dump({'cifar10': dataclasses.asdict(costs),
               'note': 'GFLOP per sample from XLA cost analysis (python -m benchmarks.cost '
                       f'--refresh), batch {_BATCH}, float32, {jax.devices()[0].platform}'},
              f, indent=2)
  return costs


def digits_costs() -> NetworkCosts:
  """The bundled digits networks' costs (8x8x1)."""
  return measure(load_denoiser(os.path.join(digits.ASSETS, 'denoiser')),
                 load_discriminator(os.path.join(digits.ASSETS, 'discriminator')), (8, 8, 1))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--refresh', action='store_true',
                      help='re-measure the CIFAR-10 networks and rewrite the cache')
  args = parser.parse_args()
  rows = {'CIFAR-10 (32x32x3)': cifar10_costs(args.refresh), 'digits (8x8x1)': digits_costs()}
  print('| networks | denoiser | disc forward | disc gradient |')
  print('|---|---|---|---|')
  for name, c in rows.items():
    print(f'| {name} | {c.denoiser:.4g} | {c.disc_forward:.4g} | {c.disc_grad:.4g} |')
  print('GFLOP per sample (XLA cost analysis).')


if __name__ == '__main__':
  main()
