"""Speed and memory of the networks and samplers on the published CIFAR-10 configurations.

Random (re-drawn) weights in the published architectures: the EDM cifar10 DDPM++ VP
denoiser (SongUNet, 56M parameters) and DG's discriminator (the ADM 32x32 classifier as a
frozen feature extractor plus the depth-2 head). Writes ``benchmarks/results/speed.md``:

    python -m benchmarks.speed                      # JAX only
    python -m benchmarks.speed --quick              # smaller batches and step counts
    python -m benchmarks.speed --reference_checkout=PATH/edm --seed_checkout=PATH/ISIR_Diffusion
        [--reference_python=PATH/venv/bin/python]   # + PyTorch reference, side by side

With a reference checkout, every PyTorch timing runs in a worker process
(`benchmarks/reference_worker.py`, torch + numpy only, by default in this interpreter) and the
repetitions are interleaved with the JAX ones (JAX, torch, JAX, torch, ...) on the same
inputs; the tables report medians, so a busy machine affects both sides alike.

Timed: the jitted, AOT-compiled JAX functions (compile time excluded and reported apart);
FLOPs from XLA's cost analysis of the compiled network; the matmul peak is a large
``jnp.dot`` timed in the same interleaved rounds. Samplers are timed at the step counts of
the flags (ISIR at K=5, N=5 is 2 (N + (K-1)(N-1)) = 42 NFE per step, so it uses few steps).

Modules: `models` (the networks, random weights), `timing` (the one stopwatch, interleaved
repetitions, AOT compilation), `reference` (the PyTorch worker client), `report` (markdown),
`networks` (sections peak, denoiser, discriminator, bf16), `sampling` (sections samplers,
memory); `__main__` holds the flags and runs the sections.
"""

from benchmarks.speed.models import Models

__all__ = ['Models']
