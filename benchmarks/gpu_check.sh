#!/usr/bin/env bash
# GPU speed check: EDM and ISIR img/s at batch 128 and 512, float32 and bfloat16 networks.
#
#   bash benchmarks/gpu_check.sh               # on a GPU machine (one GPU), < 5 minutes
#   bash benchmarks/gpu_check.sh --cpu_smoke   # the same code path with tiny networks on CPU
#
# Assumes the project's requirements plus a CUDA build of jax (`pip install -U "jax[cuda12]"`);
# installs nothing. Random weights in the published cifar10 architectures (benchmarks/speed.py).
# EDM: 18 Heun steps (35 NFE). ISIR: K=5, N=5, stochastic proposals, 2 steps (63 NFE per image),
# one candidate per network call (candidate_chunk=1, so memory does not grow with N).
# Results print as they come and go to benchmarks/results/gpu_check.md (rewritten after every
# line, so a run cut by the time limit keeps what it measured); batch 128 of every sampler and
# dtype comes first. Compiled programs go to a persistent cache, so if compiling eats the time
# limit, a second run measures the rest. Extra arguments go to speed.py.
set -euo pipefail
cd "$(dirname "$0")/.."

LIMIT_S="${GPU_CHECK_LIMIT_S:-285}"
PYTHON="${PYTHON:-python}"
args=(--sections=samplers --samplers=edm,isir --dtypes=float32,bfloat16
      --sampler_batch_sizes=128,512 --sampler_steps=18 --isir_steps=2 --isir_candidates=5
      --isir_iterations=5 --candidate_chunk=1 --repeats=2 --budget_s=15
      --output=benchmarks/results/gpu_check.md
      --compilation_cache="${TMPDIR:-/tmp}/isir_jax_gpu_check_cache")

if [[ "${1:-}" == "--cpu_smoke" ]]; then
  shift
  export JAX_PLATFORMS=cpu
  args+=(--tiny --sampler_batch_sizes=2 --sampler_steps=2 --isir_candidates=2
         --isir_iterations=2 --repeats=1 --output="${TMPDIR:-/tmp}/gpu_check_smoke.md")
else
  backend="$(timeout 120 "$PYTHON" -c 'import jax; print(jax.default_backend())')"
  if [[ "$backend" != "gpu" ]]; then
    echo "gpu_check: jax.default_backend() is '$backend', expected 'gpu'" \
         "(install a CUDA build of jax, or use --cpu_smoke)." >&2
    exit 2
  fi
  "$PYTHON" -c 'import jax; print("devices:", jax.devices())'
fi

echo "gpu_check: time limit ${LIMIT_S}s; EDM and ISIR at batch 128 and 512, fp32 and bf16"
status=0
timeout -k 10 "$LIMIT_S" "$PYTHON" -m benchmarks.speed "${args[@]}" "$@" || status=$?
if [[ $status -eq 124 || $status -eq 137 ]]; then
  echo "gpu_check: stopped at the ${LIMIT_S}s limit; the rows above are complete measurements." >&2
fi
exit $status
