"""The EDM sampler (Karras et al. 2022, Alg. 2) and the reverse steps all samplers share.

Proposal kernels (``StepSettings.proposal``), each a reverse step from ``x`` at ``t`` to
``t' < t``:

  * ``'churn'``: `churn.edm_step`, EDM's churned Heun/Euler step: noise is added *before* the
    solver step, so every draw needs its own denoiser evaluations.
  * ``'ancestral'``: the DDIM(eta) step (Song et al. 2021, "Denoising Diffusion Implicit
    Models", arXiv 2010.02502, eq. 12) on EDM's sigma scale; eta = 1 is the DDPM posterior
    ``q(x_t' | x_t, x0)`` (Ho et al. 2020, "Denoising Diffusion Probabilistic Models",
    eq. 7). With ``x0 = D(x; t)``:
        ``s = eta t' sqrt(t^2 - t'^2) / t``,  ``m = x0 + c (x - x0)``,  ``c = sqrt(t'^2 - s^2) / t``
    and ``x' = m + s eps``.
  * ``'dpmpp_2m_sde'``: DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++: Fast Solver
    for Guided Sampling of Diffusion Probabilistic Models", arXiv 2211.01095, Sec. 4-5 and
    App. on SDE solvers), with alpha = 1 and ``lambda = -log sigma``. The exact solution
    of the SDE over a step of length ``h = log(t / t')`` weights the data prediction by
    ``a exp(-a (lambda_t' - lambda))``; its first-order (constant ``x0``) part is the step
    above with ``c = exp(-a h)``, so ``a = -log(c) / h`` (a = 2 at eta = 1, the paper's
    SDE; a = 1 at eta = 0, its ODE). The second-order part extrapolates ``x0`` linearly in
    lambda through the previous step's output ``x0_prev`` (step length ``h_prev``) and
    integrates that term exactly:
        ``m += b (x0 - x0_prev)``,  ``b = (h - (1 - c) / a) / h_prev``
    (the paper prints the same term with the midpoint coefficient ``(1 - c) h / (2 h_prev)``
    at a = 2, equal to second order). The first step, with no previous output, and the
    last, to ``t' = 0`` (where ``m = x0``), are first order.

For the two shared-mean kernels the mean ``m`` is one denoiser call, and every draw of
the step is ``m + s eps_c``: candidates of ISIR (and DiffRS) share it. The 2M kernel
carries ``x0_prev`` from step to step, so it still costs one call per step. The last step
of every kernel is deterministic for the shared-mean kernels (``s = 0`` at ``t' = 0``).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from isir_jax.samplers import checks, schedule
from isir_jax.samplers.churn import edm_step_scan, per_row

Array = jax.Array
# draw(ids [c]) -> the proposals [B, c, ...] of candidates ids from every row of a state.
Draw = Callable[[Array], Array]

PROPOSALS = ('churn', 'ancestral', 'dpmpp_2m_sde')
_DEFAULT_STEPS = 18


def _levels(noise_levels) -> tuple:
  """Validated explicit noise levels: floats, strictly decreasing, positive, then one 0."""
  if not checks.concrete(noise_levels):
    raise TypeError('samplers: noise_levels must be concrete numbers (the per-step tables are '
                    'built from them), not traced values')
  t = np.asarray(noise_levels, np.float64)
  if t.ndim != 1:
    raise ValueError(f'samplers: noise_levels must be a 1-D sequence, got shape {t.shape}')
  if t.size and t[-1] != 0:
    t = np.append(t, 0.0)
  if t.size < 3 or not np.all(t[:-1] > 0) or not np.all(np.diff(t) < 0):
    raise ValueError('samplers: noise_levels must be at least 2 strictly decreasing positive '
                     f'levels (then 0), got {np.asarray(noise_levels).tolist()}')
  return tuple(float(v) for v in t)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """Settings of the EDM discretisation and step (names as in EDM's generate.py).

  ``proposal`` picks the kernel (module docstring); ``solver`` and the ``S_*`` churn
  settings belong to 'churn', ``eta`` to the shared-mean kernels. ``noise_levels`` replaces
  the Karras schedule (``num_steps``, ``sigma_min``, ``sigma_max``, ``rho``) by explicit
  decreasing levels ``t_0 > ... > t_{n-1} (> 0)``, used as given (a final 0 is appended if
  missing). ``S_churn``, ``S_noise`` and ``eta`` may be traced (e.g. ``jax.vmap`` over
  them): the program's structure then assumes they act (noise is drawn wherever the
  window ``[S_min, S_max]``, or the step, allows it).
  """
  num_steps: int = 18
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  solver: str = 'heun'
  S_churn: float = 0.0
  S_min: float = 0.0
  S_max: float = float('inf')
  S_noise: float = 1.0
  proposal: str = 'churn'
  eta: float = 1.0
  noise_levels: Optional[tuple] = None

  def __post_init__(self):
    if self.solver not in ('heun', 'euler'):
      raise ValueError(f"samplers: solver must be 'heun' or 'euler', got {self.solver!r}")
    if self.noise_levels is not None:
      levels = _levels(self.noise_levels)
      if self.num_steps not in (_DEFAULT_STEPS, len(levels) - 1):
        raise ValueError(f'samplers: num_steps={self.num_steps} disagrees with the '
                         f'{len(levels) - 1} steps of noise_levels; leave num_steps out')
      object.__setattr__(self, 'noise_levels', levels)
      object.__setattr__(self, 'num_steps', len(levels) - 1)
    if self.num_steps < 2:
      raise ValueError(f'samplers: num_steps must be >= 2, got {self.num_steps}')
    if checks.concrete(self.S_churn) and self.S_churn < 0:
      raise ValueError(f'samplers: S_churn must be >= 0, got {self.S_churn}')
    if self.proposal not in PROPOSALS:
      raise ValueError(f'samplers: proposal must be one of {PROPOSALS}, got {self.proposal!r}')
    if checks.concrete(self.eta) and not 0 <= self.eta <= 1:
      raise ValueError(f'samplers: eta must be in [0, 1], got {self.eta}')
    if self.shared_mean and not (checks.concrete(self.S_churn) and self.S_churn == 0):
      raise ValueError(
          f'samplers: S_churn={self.S_churn} belongs to proposal=\'churn\'; '
          f'proposal={self.proposal!r} adds its noise after the mean (set by eta), so set '
          'S_churn=0')

  @property
  def shared_mean(self) -> bool:
    """Whether a step's draws are ``mean + s eps`` around one shared mean."""
    return self.proposal != 'churn'

  @property
  def heun(self) -> bool:
    """Whether steps (but the last) take EDM's Heun correction ('churn' only)."""
    return self.solver == 'heun' and not self.shared_mean

  @property
  def stochastic(self) -> bool:
    """Whether the step draws noise at some noise level (churn acts, or eta > 0); a traced
    setting counts as acting."""
    acts = lambda v: not checks.concrete(v) or v != 0
    if self.shared_mean:
      return acts(self.eta)
    return acts(self.S_churn) and acts(self.S_noise) and self.S_min <= self.S_max

  def sigmas(self, denoiser) -> Array:
    """The [n + 1] noise levels ``t_0 .. t_{n-1}, 0`` for this denoiser (``noise_levels``,
    or the Karras schedule in the denoiser's range).

    Computed eagerly even under ``jit`` (they are constants), so that the static per-step
    tables below can read them.
    """
    with jax.ensure_compile_time_eval():
      if self.noise_levels is not None:
        return jnp.asarray(self.noise_levels, jnp.float32)
      lo, hi = schedule.sigma_range(denoiser, self.sigma_min, self.sigma_max)
      return schedule.karras_sigmas(self.num_steps, lo, hi, self.rho, denoiser.round_sigma)

  def gamma(self, t_cur: Array, S_churn=None) -> Array:
    return schedule.churn_gamma(t_cur, self.S_churn if S_churn is None else S_churn,
                                self.num_steps, self.S_min, self.S_max)

  def noisy_steps(self, t: Array) -> np.ndarray:
    """Static bool [n]: whether step i's proposal draws noise, for levels ``t`` [n + 1].

    False where churn is zero (outside ``[S_min, S_max]``) and, for the shared-mean
    kernels, at the last step (``s = 0`` at ``t' = 0``) and everywhere at eta = 0.
    """
    if not self.stochastic:
      return np.zeros(self.num_steps, bool)
    t = np.asarray(t, np.float64)
    if self.shared_mean:
      if not checks.concrete(self.eta):   # s > 0 wherever eta > 0 can make it so
        return t[1:] > 0
      return self.mean_coefficients(t)[2] > 0
    if not checks.concrete(self.S_churn):
      return (t[:-1] >= self.S_min) & (t[:-1] <= self.S_max)
    with jax.ensure_compile_time_eval():
      return np.asarray(self.gamma(jnp.asarray(t[:-1], jnp.float32))) > 0

  def mean_coefficients(self, t: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step float32 [n] tables ``(c, b, s)`` of the shared-mean kernels (module docstring).

    ``b`` is zero for 'ancestral' and at the first and last steps.
    """
    # float64 numpy for a concrete eta; float32 jnp for a traced one.
    xp = np if checks.concrete(self.eta) else jnp
    t = np.asarray(t, np.float64)
    t_cur, t_next = t[:-1], t[1:]
    s = self.eta * t_next * np.sqrt(t_cur ** 2 - t_next ** 2) / t_cur
    c = xp.sqrt(xp.maximum(t_next ** 2 - s ** 2, 0.0)) / t_cur
    b = xp.zeros_like(c)
    if self.proposal == 'dpmpp_2m_sde':
      i = np.arange(1, self.num_steps - 1)   # a previous step, and t' > 0
      h, h_prev = np.log(t_cur[i] / t_next[i]), np.log(t[i - 1] / t_cur[i])
      a = -xp.log(c[i]) / h
      b = xp.concatenate([b[:1], (h - (1 - c[i]) / a) / h_prev, b[-1:]])
    return tuple(xp.asarray(v, xp.float32) for v in (c, b, s))

  def nfe(self, step: int) -> int:
    """Denoiser evaluations of one step: 2 with Heun, 1 for Euler, shared-mean kernels and
    the last step."""
    return 2 if self.heun and step < self.num_steps - 1 else 1

  def nfe_table(self) -> np.ndarray:
    """`nfe` of every step: int [n]."""
    return np.asarray([self.nfe(i) for i in range(self.num_steps)])

  def total_nfe(self, proposals=None) -> int:
    """Denoiser evaluations of a run, with ``proposals[i]`` step evaluations at step i."""
    per = np.ones(self.num_steps, int) if proposals is None else np.asarray(proposals)
    return int(np.sum(per * self.nfe_table()))


def split_settings(settings: dict) -> tuple[StepSettings, dict]:
  """Separates the `StepSettings` fields from a sampler's other settings (unchecked; a
  sampler's parser uses `checks.parse_settings`, which names unknown settings)."""
  names = {f.name for f in dataclasses.fields(StepSettings)}
  step = StepSettings(**{k: v for k, v in settings.items() if k in names})
  return step, {k: v for k, v in settings.items() if k not in names}


def cost_stats(batch: int, nfe, disc_evals=0, disc_grads=0) -> dict:
  """The per-sample cost counts every sampler reports: int32 [B] each.

  'nfe': denoiser evaluations; 'disc_evals': discriminator forward evaluations
  (``log_ratio``); 'disc_grads': discriminator gradient evaluations (``guidance``, one
  forward and one backward pass each).
  """
  counts = dict(nfe=nfe, disc_evals=disc_evals, disc_grads=disc_grads)
  return {k: jnp.broadcast_to(jnp.asarray(v, jnp.int32), (batch,)) for k, v in counts.items()}


def shared_mean(denoiser, x: Array, x0_prev: Optional[Array], t_cur: Array, c: Array,
                b: Array, class_labels: Optional[Array] = None) -> tuple[Array, Array]:
  """The mean of a shared-mean step (module docstring): one denoiser call for rows x [R, ...].

  Args:
    x: states [R, ...] at levels ``t_cur`` [R].
    x0_prev: the previous step's denoiser outputs (DPM-Solver++(2M)), or None (first order).
    c, b: the step's coefficients (`StepSettings.mean_coefficients`), scalars or [R].
    class_labels: [R, label_dim] or None.

  Returns:
    ``(m, x0)``: the mean [R, ...] and ``x0 = D(x; t_cur)`` (carried to the next step).
  """
  x0 = denoiser(x, t_cur, class_labels)
  m = x0 + per_row(c, x) * (x - x0)
  if x0_prev is not None:
    m = m + per_row(b, x) * (x0 - x0_prev)
  return m, x0


def run_steps(body: Callable, carry, step: StepSettings):
  """Runs ``body(carry, i, heun) -> carry`` for i = 0..n-1 as one ``lax.scan``.

  Steps 0..n-2 use the configured solver, the last step (to ``t_n = 0``) is Euler, so no
  evaluation is wasted at sigma = 0. ``heun`` is the traced flag ``i < n - 1`` with Heun
  and None with Euler (the ``heun`` of `churn.edm_step_scan`), so every step, the last
  included, is traced and compiled once.
  """
  last = step.num_steps - 1
  carry, _ = lax.scan(lambda c, i: (body(c, i, (i < last) if step.heun else None), None), carry,
                      jnp.arange(step.num_steps))
  return carry


def full_rows(v: Array, rows: int) -> Array:
  return jnp.full([rows], v, jnp.float32)


def initial_candidates(keys: Array, ids: Array, sigma_max: Array, shape,
                       latents: Optional[Array] = None) -> Array:
  """Initial states ``sigma_max * eps`` [B, c, *shape] of candidates ``ids`` of each sample.

  Candidate 0 is the latent of `edm_sample`; user ``latents`` replace candidate 0.
  """
  eps = schedule.candidates_normal(jax.vmap(schedule.latent_key)(keys), ids, shape)
  if latents is not None:
    latents = schedule.check_latents(latents, keys.shape[0], shape)
    first = (ids == 0).reshape((1, -1) + (1,) * len(shape))
    eps = jnp.where(first, latents[:, None], eps)
  return eps * sigma_max


def step_noise(keys: Array, ids: Array, i, shape) -> Array:
  """Proposal noise [B, c, *shape] of candidates ``ids`` at step i: candidate c of sample b
  uses ``fold_in(fold_in(fold_in(keys[b], i), 0), c)``."""
  return schedule.candidates_normal(jax.vmap(lambda k: schedule.step_key(k, i))(keys), ids,
                                    shape)


def propose(denoiser, x: Array, keys: Array, ids: Array, i, t: Array,
            class_labels: Optional[Array], step: StepSettings, heun) -> Array:
  """Churned candidates ``ids`` [c] of step i from every row of x [B, ...]: [B, c, ...].

  Every candidate starts from the same ``(x_i, t_i)``; candidate c is churned with the
  noise of `step_noise`. `edm_sample` takes candidate 0, ISIR chooses among many.
  """
  batch, count, shape = x.shape[0], ids.shape[0], x.shape[1:]
  rows = batch * count
  eps = None
  if step.stochastic:
    eps = step_noise(keys, ids, i, shape).reshape((rows,) + shape)
  labels = None if class_labels is None else jnp.repeat(class_labels, count, axis=0)
  t_cur, t_next = full_rows(t[i], rows), full_rows(t[i + 1], rows)
  x_new, _ = edm_step_scan(denoiser, jnp.repeat(x, count, axis=0), t_cur, t_next, eps, labels,
                           gamma=step.gamma(t_cur), S_noise=step.S_noise, heun=heun)
  return x_new.reshape((batch, count) + shape)


def initial_state(x: Array, step: StepSettings) -> tuple[Array, Optional[Array]]:
  """The scan state ``(x, x0_prev)`` of a run from x: ``x0_prev`` only for the 2M kernel."""
  return x, (jnp.zeros_like(x) if step.proposal == 'dpmpp_2m_sde' else None)


def proposals(denoiser, state: tuple, keys: Array, i, t: Array,
              class_labels: Optional[Array], step: StepSettings,
              heun) -> tuple[Draw, Optional[Array]]:
  """The proposal kernel of step i from every row of ``state = (x [B, ...], x0_prev)``.

  Returns ``(draw, x0_prev')``: ``draw(ids)`` gives candidates ``ids`` [B, c, ...] with
  the noise of `step_noise`, and ``x0_prev'`` is the state's next ``x0_prev``. For
  'churn' the denoiser runs inside ``draw`` (per candidate); for the shared-mean kernels
  it runs here, once, and ``draw`` only adds noise to the mean.
  """
  x, x0_prev = state
  if not step.shared_mean:
    return (lambda ids: propose(denoiser, x, keys, ids, i, t, class_labels, step, heun)), x0_prev
  c, b, s = (jnp.asarray(v)[i] for v in step.mean_coefficients(t))
  batch, shape = x.shape[0], x.shape[1:]
  m, x0 = shared_mean(denoiser, x, x0_prev, full_rows(t[i], batch), c, b, class_labels)

  def draw(ids):
    if not step.stochastic:
      return jnp.broadcast_to(m[:, None], (batch, ids.shape[0]) + shape)
    return m[:, None] + s * step_noise(keys, ids, i, shape)

  return draw, (None if x0_prev is None else x0)


@checks.sample_function('edm', uses=None)
def edm_sample(denoiser, keys: Array, class_labels: Optional[Array] = None,
               latents: Optional[Array] = None, *, shape, **settings) -> tuple[Array, dict]:
  """EDM sampling with any proposal kernel: by default the Heun/Euler ODE, or stochastic
  with churn (EDM Alg. 2); 'ancestral' and 'dpmpp_2m_sde' (module docstring).

  Args:
    denoiser: a `Denoiser` (see isir_jax/types.py).
    keys: [B] keys, one per sample; step i's noise is derived from ``fold_in(keys[b], i)``
      (see `step_noise`), so a sample does not depend on its batch.
    class_labels: [B, label_dim] one-hot, or None.
    latents: optional [B, *shape] standard normal latents (default: from each key).
    shape: static image shape (H, W, C).
    **settings: `StepSettings` fields (num_steps, sigma_min, sigma_max, rho, solver,
      S_churn, S_min, S_max, S_noise, proposal, eta).

  Returns:
    images [B, *shape] (EDM scale, unclipped) and stats `cost_stats` ('nfe',
    'disc_evals' = 'disc_grads' = 0).
  """
  step = _parse(settings)
  t = step.sigmas(denoiser)
  first = jnp.arange(1)
  x0 = initial_candidates(keys, first, t[0], shape, latents)[:, 0]

  def body(state, i, heun):
    draw, x0_prev = proposals(denoiser, state, keys, i, t, class_labels, step, heun)
    return draw(first)[:, 0], x0_prev

  x, _ = run_steps(body, initial_state(x0, step), step)
  return x, cost_stats(keys.shape[0], step.total_nfe())


def make_sampler(sample: Callable, parse: Callable[[dict], Any], denoiser, discriminator=None,
                 *, shape, **settings) -> Callable:
  """Binds a sampler's model(s) and settings: ``sample_fn(keys, class_labels, latents)``.

  Everything that can be checked before sampling is checked now: the models against the
  protocols (`checks.check_models`, for a ``sample`` marked by `checks.sample_function`) and
  ``parse(settings)``. A discriminator is passed on only when the sampler uses one.
  """
  uses = getattr(sample, 'uses', 'log_ratio' if discriminator is not None else None)
  name = getattr(sample, 'sampler_name', sample.__name__.replace('_sample', ''))
  checks.check_models(name, denoiser, discriminator, uses)
  parse(settings)
  args = (denoiser,) if uses is None else (denoiser, discriminator)
  return functools.partial(sample, *args, shape=tuple(shape), **settings)


def _parse(settings: dict) -> StepSettings:
  return checks.parse_settings('edm', settings, StepSettings)[0]


def edm_sampler(denoiser, discriminator=None, *, shape, **settings) -> Callable:
  """EDM's factory: ``edm_sampler(denoiser, *, shape, **settings)``
  returns ``sample_fn(keys, class_labels=None, latents=None) -> (images, stats)``.

  Settings: the `StepSettings` fields. Stats: 'nfe', 'disc_evals' = 'disc_grads' = 0.
  """
  del discriminator  # EDM does not use one.
  return make_sampler(edm_sample, _parse, denoiser, shape=shape, **settings)
