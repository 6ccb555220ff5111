"""Time the character-LM kernels: numpy reference vs numba, per kernel, at model sizes.

    python benchmarks/bench_kernels.py [--repeat 20] [--sizes small paper]

Prints one table per size (best-of-repeat time per call in microseconds and the speed-up
numpy / numba) and, at the end, which kernels beat numpy at every size: that list is what
`rpd_mpi.kernels_lm.NUMBA_FASTER` should hold. Sizes (float64):
  small  batch 8,  context 32,  width 32,  heads 2, vocab 39 (the default model)
  paper  batch 16, context 128, width 256, heads 8, vocab 65 (the paper preset, per stage)
Single-threaded numba vs numpy as the model calls them (one MPI rank per core).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from rpd_mpi.objectives import kernels_lm as K

SIZES = {"small": dict(b=8, t=32, c=32, h=2, v=39), "paper": dict(b=16, t=128, c=256, h=8, v=65)}


def kernel_args(name: str, b: int, t: int, c: int, h: int, v: int) -> tuple:
    """Arguments of kernel `name` with the shapes the model passes."""
    rng = np.random.default_rng(0)
    n = b * t
    x = rng.standard_normal((n, c))
    if name == "layernorm_forward":
        return x, rng.standard_normal(c), rng.standard_normal(c), 1e-5
    if name == "layernorm_backward":
        _, mean, rstd = K.layernorm_forward_ref(x, np.ones(c), np.zeros(c), 1e-5)
        return rng.standard_normal((n, c)), x, np.ones(c), mean, rstd
    if name.startswith("gelu"):
        u = rng.standard_normal(n * 4 * c)
        return (u,) if name == "gelu_forward" else (u, rng.standard_normal(u.size))
    if name == "softmax_xent":
        return rng.standard_normal((n, v)), rng.integers(v, size=n)
    if name.startswith("causal"):
        s = rng.standard_normal((b * h, t, t))
        if name == "causal_softmax_forward":
            return s, 0.125
        return K.causal_softmax_forward_ref(s, 0.125), rng.standard_normal(s.shape), 0.125
    return rng.integers(v, size=n), x, v


def best_time(fn: Callable, args: tuple, repeat: int) -> float:
    """Best wall time of one call, seconds (each sample runs enough calls to last ~2 ms)."""
    fn(*args)
    t0 = time.perf_counter()
    fn(*args)
    calls = max(1, int(2e-3 / max(time.perf_counter() - t0, 1e-9)))
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def table(size: str, repeat: int) -> dict[str, float]:
    """Print the table of one size; return name -> speed-up."""
    dims = SIZES[size]
    print(f"\n{size}: " + ", ".join(f"{k}={v}" for k, v in dims.items()))
    print(f"{'kernel':26s} {'numpy us':>10s} {'numba us':>10s} {'speed-up':>9s}")
    speedups = {}
    for name, (fast, ref) in K.KERNELS.items():
        args = kernel_args(name, **dims)
        t_ref, t_fast = best_time(ref, args, repeat), best_time(fast, args, repeat)
        speedups[name] = t_ref / t_fast
        print(f"{name:26s} {t_ref * 1e6:10.1f} {t_fast * 1e6:10.1f} {speedups[name]:8.2f}x")
    return speedups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = ap.parse_args()
    results = [table(size, args.repeat) for size in args.sizes]
    faster = sorted(n for n in K.KERNELS if all(r[n] > 1.0 for r in results))
    slower = sorted(set(K.KERNELS) - set(faster))
    print(f"\nnumba faster at every size: {', '.join(faster) or '-'}")
    print(f"numpy as fast or faster somewhere: {', '.join(slower) or '-'}")
    print(f"NUMBA_FASTER in rpd_mpi.kernels_lm: {', '.join(sorted(K.NUMBA_FASTER))}")


if __name__ == "__main__":
    main()
