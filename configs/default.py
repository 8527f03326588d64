"""Shared defaults of every experiment; the per-data-set files override what changes.

A data-set file takes the method and flags as its config argument, as big_vision's
configs do: ``--config=configs/cifar10.py:isir``, ``configs/cifar10.py:dg,cond``,
``configs/testbed.py:isir,tiny``. Any field can then be overridden from the command
line, e.g. ``--config.sampler.num_steps=8``.

``config.sampler`` holds ``name`` and the keyword settings of
``isir_jax.samplers.get_sampler(name)``, under the sampler's names; the driver resolves
DiffRS's thresholds from three of them: ``thresholds`` (here the path of an npz file, in
the sampler the arrays), else a warm-up of ``warmup_samples`` trajectories whose
``rej_percentile`` quantile gives them (the sampler's ``rej_percentile`` means the same, with
its ``warmup_log_ratios``). Their defaults are the reference implementations' (EDM
``generate.py``, DG ``generate.py``, DiffRS ``generate_diffrs.py``, the seed's
``isir_code.py``).
"""

import ml_collections

# Config-argument tokens naming a sampler setting (see `sampler_config`).
METHODS = ('edm', 'dg', 'diffrs', 'isir', 'isir_stochastic', 'isir_ancestral', 'smc')


def parse_arg(arg: str | None, filename: str, flags: tuple[str, ...],
              default_method: str) -> tuple[str, set[str]]:
  """Splits a config argument ``method[,flag...]`` into the method and the flags.

  Args:
    arg: the text after ``:`` in ``--config=FILE:ARG`` (None or '' for defaults).
    filename: the config file, for error messages.
    flags: the flags this file accepts (e.g. ``('cond', 'tiny')``).
    default_method: the method when the argument names none.

  Returns:
    ``(method, set of flags)``.
  """
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  methods = [t for t in tokens if t in METHODS]
  unknown = [t for t in tokens if t not in METHODS and t not in flags]
  if unknown or len(methods) > 1:
    raise ValueError(
        f'{filename}: bad config argument {arg!r}; expected one method of '
        f'{"|".join(METHODS)} and optional flags {",".join(flags)}')
  return (methods[0] if methods else default_method), set(tokens) - set(methods)


def optional(value) -> ml_collections.FieldReference:
  """A field whose documented values include None: overridable from the command line as a
  Python literal (``--config.sampler.candidate_chunk=None`` or ``=5``); its consumer checks
  the type (a typed field would refuse ``None``, a None field any override)."""
  return ml_collections.FieldReference(value, field_type=object)


def sampler_config(method: str) -> ml_collections.ConfigDict:
  """The reference settings of a method, as ``config.sampler``."""
  s = ml_collections.ConfigDict()
  s.name = method.split('_')[0]   # sampler registry name: edm | dg | diffrs | isir | smc
  # Karras time steps (EDM Eq. 5) and the Heun sampler with churn (EDM Alg. 2).
  s.num_steps = 18                # sampling steps; 18 steps of Heun = 35 NFE
  s.sigma_min = 0.002             # lowest noise level (clipped to the network's range)
  s.sigma_max = 80.0              # highest noise level (clipped to the network's range)
  s.rho = 7.0                     # time step exponent
  s.solver = 'heun'               # 'heun' (2nd order) or 'euler'
  s.S_churn = 0.0                 # stochasticity strength (0: deterministic ODE steps)
  s.S_min = 0.0                   # churn only where S_min <= t_i <= S_max
  s.S_max = float('inf')
  s.S_noise = 1.0                 # noise inflation of the churn
  # Proposal kernel of every step: 'churn' (EDM's churned Heun/Euler step, above), or a
  # shared mean plus noise, one denoiser call per step: 'ancestral' (DDIM(eta); eta = 1 is
  # the DDPM posterior) or 'dpmpp_2m_sde' (DPM-Solver++(2M) SDE). solver and S_* act on
  # 'churn' only (S_churn must be 0 otherwise), eta on the others. DG needs 'churn'.
  s.proposal = 'churn'
  s.eta = 1.0
  if s.name == 'dg':
    s.dg_weight_1st_order = 2.0   # DG weight w1 in the Euler part (EDM-G++: 2)
    s.dg_weight_2nd_order = 0.0   # DG weight w2 in the Heun correction
    s.time_min = 0.01             # VP time window where guidance acts (DG's --time_min/max)
    s.time_max = 1.0
    s.boosting = False            # DG boosting: churn and doubled guidance where log ratio < 0
  if s.name == 'diffrs':
    # generate_diffrs.py as the seed ran it: --rej_percentile=0.75 --max_iter=105.
    s.rej_percentile = 0.75       # quantile of the warm-up log ratios -> thresholds M_i, M2_i
    s.warmup_samples = 1000       # plain trajectories for the thresholds (reference: 10 x 100)
    s.thresholds = ''             # npz of earlier thresholds; '': warm up, save in the workdir
    s.backsteps = 1               # levels re-noised back after a rejection
    s.min_backsteps = 0           # test only after steps to levels k > min_backsteps ...
    s.max_backsteps = 18          # ... and k <= max_backsteps
    s.max_iter = 105              # NFE cap per sample; past it the sample restarts from noise
  if s.name == 'isir':
    # As the seed ran it (isir_code.py --cnt_inner_steps=5 --isir_batch=5, S_churn 0).
    # Its proposals are the deterministic Heun step, so only the initial-latent i-SIR
    # acts; initial_only says so explicitly (the sampler refuses N > 1 otherwise).
    s.num_candidates = 5          # N: i-SIR candidates per iteration
    s.num_iterations = 5          # K: i-SIR iterations per step
    s.initial_only = True         # i-SIR on the initial latent x_T only, plain steps after
    # Weights exp(weight_scale * d): 1 is the i-SIR target; > 1 sharpens the correction of
    # an under-confident discriminator (as DG's w does), < 1 softens it.
    s.weight_scale = 1.0
    # Proposals per network call, in equal pieces, to bound memory (None: all
    # N + (K-1)(N-1) proposals of a step at once). Memory grows with batch x chunk;
    # 7 divides this default's 21 proposals and the 7 of isir_stochastic.
    s.candidate_chunk = optional(7)
  if method == 'isir_stochastic':
    # Recommended: stochastic proposals (EDM churn), so i-SIR acts at every step with churn
    # (14 of 18: the first two and last two are outside [S_min, S_max] and run plain, 2 NFE);
    # 2 (N + (K-1)(N-1)) = 14 NFE per corrected step. A starting point, not tuned for FID.
    s.num_candidates = 4
    s.num_iterations = 2
    s.initial_only = False
    s.S_churn = 5.0
    s.S_min = 0.01
    s.S_max = 50.0
  if method == 'isir_ancestral':
    # Shared-mean proposals: the N + (K-1)(N-1) = 15 candidates of a step are the DDPM
    # posterior mean (one denoiser call) plus their own noise, so a step costs 1 NFE and
    # 15 discriminator evaluations (the last step, deterministic, 1 NFE and none).
    # Exact testbed (benchmarks/results/testbed.md): a fraction of isir_stochastic's
    # GFLOP, with a higher error floor. A starting point, not tuned for FID.
    s.proposal = 'ancestral'
    s.eta = 1.0
    s.num_candidates = 8
    s.num_iterations = 2
    s.initial_only = False
    s.candidate_chunk = 5
  if s.name == 'smc':
    # Sequential Monte Carlo: weights d(x', t') - d(x, t) carried across steps and
    # resampled within groups of group_size consecutive samples (batches, device shards
    # and the sample count must hold whole groups). DPM-Solver++(2M) SDE proposals: a step
    # costs 1 NFE and, inside the window, one discriminator evaluation. Kernel and window
    # are the digits testbed's best (benchmarks/results/quality.md: the ancestral kernel
    # loses recall, resampling down to t' = 0 leaves near-copies); not measured on CIFAR-10.
    # See the README's SMC section.
    s.proposal = 'dpmpp_2m_sde'
    s.eta = 1.0
    s.group_size = 16             # G particles per group
    s.weight_scale = 1.0          # lambda: increments lambda (d(x') - d(x)); 1 is exact
    s.resample = 'systematic'     # 'systematic' or 'multinomial'
    # None: resample at every weighted step; a fraction: when the group's ESS < it * G.
    s.ess_threshold = ml_collections.FieldReference(None, field_type=float)
    s.resample_window = (0.5, float('inf'))   # target noise levels t' of the weighted steps
    s.final_resample = True       # weight and resample the last step in the window
    s.num_candidates = 1          # N > 1: an SIR move (ISIR, K = 1) inside SMC
    s.candidate_chunk = ml_collections.FieldReference(None, field_type=int)
    s.guidance_weight = 0.0       # w > 0: twisted proposal (DG's term in the mean)
    s.twist_correction = True     # weight by q_plain / q_guided (False: guided model, approx.)
    s.time_min = 0.01             # DG's window of VP times for that guidance
    s.time_max = 1.0
  return s


def get_config() -> ml_collections.ConfigDict:
  """Defaults shared by every experiment (EDM sampling on converted checkpoints)."""
  config = ml_collections.ConfigDict()
  config.name = 'default'         # run name; the default --workdir is workdir/<name>
  config.mode = 'sample'          # what main.py runs when --mode is not given
  config.seed = 0                 # sample i is drawn from fold_in(key(seed), i)
  config.distributed = False      # join a multi-host job with jax.distributed.initialize()

  config.model = ml_collections.ConfigDict()
  config.model.kind = 'checkpoint'   # 'checkpoint': the converted dirs below; 'testbed': exact mixture
  config.model.denoiser = ''         # converted EDM network dir (python -m checkpoints_convert.edm)
  config.model.discriminator = ''    # converted DG discriminator dir (dg, diffrs, isir only)
  config.model.conditional = False   # class-conditional sampling; must match both networks
  config.model.dtype = 'float32'     # network compute: 'float32' or 'bfloat16' (TPU/GPU speed)

  config.sampler = sampler_config('edm')

  config.sample = ml_collections.ConfigDict()
  config.sample.num_samples = 50000  # images to generate (a rerun with more extends the set)
  config.sample.batch_size = 500     # global batch = images per shard samples_{k}.npz
  config.sample.class_idx = -1       # conditional only: fixed class, or -1 for uniform random

  config.fid = ml_collections.ConfigDict()
  config.fid.inception = ''          # converted Inception dir (python -m checkpoints_convert.inception)
  config.fid.ref_stats = ''          # reference statistics npz (mu, sigma), e.g. EDM's cifar10-32x32.npz
  config.fid.dataset = ''            # fid_stats mode: images (dir of npz shards / PNGs) to compute ref_stats from
  config.fid.batch_size = 250        # Inception batch size
  return config


def apply_tiny(config: ml_collections.ConfigDict) -> None:
  """Shrinks a config to seconds on a CPU, for tests and CI (the `tiny` flag)."""
  config.name += '-tiny'
  config.sample.num_samples = 8
  config.sample.batch_size = 4
  config.sampler.num_steps = 4
  config.fid.batch_size = 4
  if config.sampler.name == 'isir':
    config.sampler.num_candidates = 2
    config.sampler.num_iterations = 2
  if config.sampler.name == 'smc':
    config.sampler.group_size = 2
  if config.sampler.name == 'diffrs':
    config.sampler.warmup_samples = 8
    config.sampler.max_backsteps = 4
    config.sampler.max_iter = 20
