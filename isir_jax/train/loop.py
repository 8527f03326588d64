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
  """Everything a resumed run needs: step, params, optimizer state, EMA params and, with
  held-out evaluation, the best params so far, their held-out loss and step."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  best_params: Any = None
  best_loss: Any = None
  best_step: Any = None


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
          evaluate: Optional[Callable[[Any], dict]] = None, eval_every: int = 500,
          patience: Optional[int] = None) -> tuple[TrainState, list[dict]]:
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
    evaluate: optional held-out evaluation ``params -> dict`` with a ``'loss'`` entry, run
      every ``eval_every`` steps and at the end; the state keeps the params of the lowest
      held-out loss (``best_params``, ``best_loss``, ``best_step``).
    eval_every: steps between evaluations.
    patience: early stopping: end the run once ``patience`` evaluations in a row have not
      improved on the best held-out loss (None: run all ``num_steps``).

  Returns:
    ``(state, history)``: the final TrainState and one dict of mean metrics
    (with ``step``) per ``log_every`` steps of this invocation; held-out metrics are
    entries ``heldout_<name>`` of the dict logged at each evaluation step.
  """
  sizes = {k: v.shape[0] for k, v in data.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f'data arrays differ in their leading dimension: {sizes}')
  num_examples = next(iter(sizes.values()))
  tracked = evaluate is not None
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=optimizer.init(params),
                     ema_params=params if ema_decay is not None else None,
                     best_params=params if tracked else None,
                     best_loss=jnp.full((), jnp.inf) if tracked else None,
                     best_step=jnp.zeros((), jnp.int32) if tracked else None)
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

  def held_out(state, step):
    """Evaluates, keeps the best params; returns (state, metrics, whether to stop)."""
    metrics = {f'heldout_{k}': float(v) for k, v in evaluate(state.params).items()}
    if metrics['heldout_loss'] < float(state.best_loss):
      state = state.replace(best_params=state.params,
                            best_loss=jnp.asarray(metrics['heldout_loss'], jnp.float32),
                            best_step=jnp.asarray(step, jnp.int32))
    stale = (step - int(state.best_step)) // eval_every
    return state, metrics, patience is not None and stale >= patience

  start = int(state.step)
  if tracked and patience is not None and (start - int(state.best_step)) // eval_every >= patience:
    start = num_steps   # a resumed run that had stopped early
  history, window = [], []
  bar = tqdm.tqdm(range(start, num_steps), desc=desc, initial=start, total=num_steps,
                  dynamic_ncols=True, mininterval=2.0)
  for step in bar:
    idx = batch_indices(num_examples, batch_size, seed, step)
    state, metrics = step_fn(state, {k: v[idx] for k, v in data.items()})
    window.append(metrics)
    stop = False
    last = step + 1 == num_steps
    evaluated = tracked and ((step + 1) % eval_every == 0 or last)
    if evaluated:
      state, heldout, stop = held_out(state, step + 1)
    if (step + 1) % log_every == 0 or last or evaluated:
      mean = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
      if evaluated:
        mean.update(heldout)
      window = []
      history.append(dict(mean, step=step + 1))
      bar.set_postfix({k: f'{v:.4g}' for k, v in mean.items()})
      logging.info('%s step %d: %s', desc, step + 1, mean)
    if manager is not None and ((step + 1) % ckpt_every == 0 or last or stop):
      manager.save(step + 1, args=ocp.args.StandardSave(state))
    if stop:
      logging.info('%s: early stop at step %d (best held-out loss %.4f at step %d)', desc,
                   step + 1, float(state.best_loss), int(state.best_step))
      break
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  return state, history
