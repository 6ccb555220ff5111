"""Time the simulator on the paper's E3 PD run and the delay analysis at S = 128.

E3 PD: tridiagonal quadratic, d = 512, n = 600, batch 5, N = 600, S = 16, lr = 2^-8,
objective every slot (1230 slots, 9600 block updates). Prints a table; best of --repeat runs.

    python benchmarks/bench_sim.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

from rpd_mpi.schedule.delays import delay_stats
from rpd_mpi.objectives import build_model
from rpd_mpi.schedule.generate import generate
from rpd_mpi.engines.sim import simulate


def best_of(repeat: int, fn) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    model = build_model("tridiag", 16, dim=512, examples=600, batch_size=5, seed=0)
    tl = generate("pd", 16, 600)
    simulate(generate("pd", 2, 2), build_model("tridiag", 2, dim=4, examples=4,
                                                batch_size=2, seed=0), 0.1)   # numba warm-up
    rows = []
    t, trace = best_of(args.repeat, lambda: simulate(tl, model, 2.0 ** -8, eval_every=1))
    rows.append(("E3 PD simulate (1230 slots, 9600 updates, f every slot)", t,
                 f"f - f* = {trace.objective.value[-1]:.4g}"))
    t, _ = best_of(args.repeat, lambda: generate("pd", 16, 600))
    rows.append(("PD 1F1B timeline S=16 N=600", t, f"{tl.slots} slots"))
    t, stats = best_of(max(1, args.repeat // 2), lambda: delay_stats(generate("pd", 128, 1280)))
    rows.append(("timeline + delay stats S=128 N=1280", t, f"steady max {stats['steady_max']}"))
    print(f"{'benchmark':58s} {'seconds':>9s}  result")
    for name, sec, note in rows:
        print(f"{name:58s} {sec:9.3f}  {note}")


if __name__ == "__main__":
    main()
