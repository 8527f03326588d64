"""One training loop for every model of the project: jitted optax step, EMA, resumable.

Each trainer supplies a loss ``loss_fn(params, batch, key) -> (loss, metrics)`` and
in-memory arrays; this loop owns batching, the optimizer step, the exponential
moving average of the weights, tqdm progress, and periodic orbax checkpoints of
the whole state under ``WORKDIR/checkpoints`` so that a rerun resumes from the
latest one with the same batches and keys an uninterrupted run would have used.
"""

import os
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from isir_jax import checkpoints

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs: step, params, optimizer state and EMA params."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


def save_model(directory: str, params: Any, config: dict) -> None:
  """``checkpoints.save_model``, then drops the absolute path orbax records in its marker files.

  Orbax writes the machine's temporary path into ``commit_success.txt``; the trained
  assets are committed to the repository, so the marker keeps only its first words.
  """
  checkpoints.save_model(directory, params, config)
  for root, _, files in os.walk(directory):
    if 'commit_success.txt' in files:
      with open(os.path.join(root, 'commit_success.txt'), 'w') as f:
        f.write('Checkpoint commit was successful.')


def make_optimizer(lr: float, weight_decay: float = 0.0, grad_clip: float = 0.0,
                   warmup_steps: int = 0) -> optax.GradientTransformation:
  """Adam with torch-style coupled L2 weight decay (as DG's ``Adam(weight_decay=)``).

  Args:
    lr: peak learning rate.
    weight_decay: L2 coefficient added to the gradient before Adam (0 disables).
    grad_clip: global-norm clip (0 disables).
    warmup_steps: linear learning-rate warm-up (EDM's ``lr_rampup``), 0 disables.
  """
  schedule = optax.linear_schedule(0.0, lr, warmup_steps) if warmup_steps else lr
  parts = []
  if grad_clip:
    parts.append(optax.clip_by_global_norm(grad_clip))
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.adam(schedule))
  return optax.chain(*parts)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of batch ``step``: shuffled epochs without replacement, last partial batch dropped.

  A pure function of (seed, step), so a resumed run sees the same batches.
  """
  if batch_size > num_examples:
    raise ValueError(f'batch_size {batch_size} exceeds the number of examples {num_examples}')
  per_epoch = num_examples // batch_size
  epoch, i = divmod(step, per_epoch)
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return perm[i * batch_size:(i + 1) * batch_size]


def train(loss_fn: LossFn, params: Any, data: dict[str, np.ndarray], *,
          optimizer: optax.GradientTransformation, num_steps: int, batch_size: int,
          workdir: Optional[str], seed: int = 0, ema_decay: Optional[float] = None,
          ckpt_every: int = 1000, log_every: int = 100, desc: str = 'train',
          ) -> tuple[TrainState, list[dict]]:
  """Minimises ``loss_fn`` over random batches of ``data`` and returns the final state.

  Args:
    loss_fn: ``(params, batch, key) -> (scalar loss, dict of scalar metrics)``;
      ``batch`` holds the rows of every array of ``data`` for this step.
    params: initial params (ignored when a checkpoint in ``workdir`` is resumed).
    data: arrays with a common leading dimension (examples).
    optimizer: an optax transformation, e.g. ``make_optimizer(...)``.
    num_steps: total number of optimizer steps (including resumed ones).
    batch_size: examples per step.
    workdir: where ``checkpoints/`` lives; None trains without checkpoints.
    seed: seeds the batch order and the per-step keys ``fold_in(key(seed), step)``.
    ema_decay: keep ``ema = decay * ema + (1 - decay) * params`` if set.
    ckpt_every: checkpoint period in steps (also written at the end).
    log_every: steps per logged metrics average.
    desc: progress-bar label.

  Returns:
    ``(state, history)``: the final TrainState and one dict of mean metrics
    (with ``step``) per ``log_every`` steps of this invocation.
  """
  sizes = {k: v.shape[0] for k, v in data.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f'data arrays differ in their leading dimension: {sizes}')
  num_examples = next(iter(sizes.values()))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optimizer.init(params),
                     ema_params=params if ema_decay is not None else None)
  manager = None
  if workdir is not None:
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints'),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False))
    latest = manager.latest_step()
    if latest is not None:
      state = manager.restore(latest, args=ocp.args.StandardRestore(state))
      logging.info('%s: resumed from step %d of %s', desc, latest, workdir)
  base_key = jax.random.key(seed)

  @jax.jit
  def step_fn(state, batch):
    key = jax.random.fold_in(base_key, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema_decay is not None:
      ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    metrics = dict(metrics, loss=loss)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  start = int(state.step)
  history, window = [], []
  bar = tqdm.tqdm(range(start, num_steps), desc=desc, initial=start, total=num_steps,
                  dynamic_ncols=True, mininterval=2.0)
  for step in bar:
    idx = batch_indices(num_examples, batch_size, seed, step)
    state, metrics = step_fn(state, {k: v[idx] for k, v in data.items()})
    window.append(metrics)
    if (step + 1) % log_every == 0 or step + 1 == num_steps:
      mean = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
      window = []
      history.append(dict(mean, step=step + 1))
      bar.set_postfix({k: f'{v:.4g}' for k, v in mean.items()})
      logging.info('%s step %d: %s', desc, step + 1, mean)
    if manager is not None and ((step + 1) % ckpt_every == 0 or step + 1 == num_steps):
      manager.save(step + 1, args=ocp.args.StandardSave(state))
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return state, history
