"""Time the engines' fast paths against the reference paths they must equal bit for bit.

Rows (best of --repeat; wall and CPU seconds, the machine may be shared):
  E3 PD          tridiag d = 512, n = 600, batch 5, S = 16, N = 600, lr 2^-8, f every slot
  E3 LocalSGD    the same data, R = 16, H = 5, N = 600 cut at 1230 slots
  RPD S=16       the same data, 9600 updates on the PD clock, uniform delays, delta = S^2 - S/2
  RPD S=128      E5-like: logistic n = 50, d = 512, batch 1, sigma = 0.5, the 3180-slot PD
                 clock (187390 updates); the reference runs only the first --rpd-prefix
                 updates and is scaled to the whole run (marked "scaled")
  budget search  smallest N reaching 3180 slots at S = 64 (PD, LocalSGD R = 64 H = 5, GPipe):
                 old = the bisection over whole timelines
  tiny simulate  a whole `rpd-mpi simulate` process (S = 2, N = 4; best of --tiny-repeat,
                 the median in the note): it never imports numba (the objective tracker
                 runs numpy for its first shifts)
"new" is what `sim.simulate` / `rpd.simulate_rpd` run (engines.fast_linear, fast_rpd); "old"
the reference engines kept next to them (sim._Engine, rpd.simulate_python); each pair is
checked to give identical weights.

    python benchmarks/bench_engines.py [--repeat 3] [--tiny-repeat 10] [--rpd-prefix 6000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

import rpd_mpi.engines.sim as sim
from rpd_mpi.engines.rpd import rpd_plan, simulate_python, simulate_rpd
from rpd_mpi.objectives import build_model
from rpd_mpi.schedule.delays import update_order
from rpd_mpi.schedule.generate import generate, smallest_reaching


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(best wall, best CPU seconds, last result)."""
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus), out


def reference_sim(*args: Any, **kw: Any) -> Any:
    saved = sim.simulate_linear
    sim.simulate_linear = lambda *a, **k: None
    try:
        return sim.simulate(*args, **kw)
    finally:
        sim.simulate_linear = saved


def bisection(method: str, S: int, budget: int, **kw: int) -> int:
    lo, hi = 1, max(1, budget // 2)
    while generate(method, S, hi, **kw).slots < budget:
        lo, hi = hi + 1, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if generate(method, S, mid, **kw).slots >= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def tiny_simulate(repeat: int) -> tuple[float, float, float]:
    """(best wall, best CPU, median wall) seconds of a tiny whole `rpd-mpi simulate`."""
    exe = os.path.join(os.path.dirname(sys.executable), "rpd-mpi")
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            before = os.times()
            w = time.perf_counter()
            subprocess.run([exe, "simulate", "--method", "pd", "--stages", "2",
                            "--microbatches", "4", "--out", f"{tmp}/t{i}.h5", "--quiet"],
                           check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - w)
            after = os.times()
            cpus.append(after.children_user + after.children_system
                        - before.children_user - before.children_system)
    return min(walls), min(cpus), sorted(walls)[len(walls) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tiny-repeat", type=int, default=10)
    ap.add_argument("--rpd-prefix", type=int, default=6000)
    args = ap.parse_args()
    rows: list[tuple[str, str, float, float, str]] = []

    def pair(name: str, old: Callable[[], Any], new: Callable[[], Any], reps: int,
             same: Callable[[Any, Any], bool], note: str = "") -> None:
        wo, co, a = best_of(reps, old)
        wn, cn, b = best_of(reps, new)
        rows.append((name, "old", wo, co, note))
        rows.append((name, "new", wn, cn, "identical" if same(a, b) else "DIFFERENT"))

    def same_w(a: Any, b: Any) -> bool:
        return bool(np.array_equal(a.final_weights, b.final_weights)
                    and np.array_equal(a.objective.value, b.objective.value))

    warm = build_model("logistic", 2, dim=4, examples=4, batch_size=1, seed=0, noise=0.1)
    sim.simulate(generate("pd", 2, 3), warm, 0.1)                        # numba: compile
    simulate_rpd(warm, 0.1, rpd_plan(10, 2, 4, 2, "uniform", 0), delta=2)  # or load once

    e3 = build_model("tridiag", 16, dim=512, examples=600, batch_size=5, seed=0)
    pd = generate("pd", 16, 600)
    pair("E3 PD (1230 slots, 9600 updates)", lambda: reference_sim(pd, e3, 2.0 ** -8),
         lambda: sim.simulate(pd, e3, 2.0 ** -8), args.repeat, same_w)
    lsgd = generate("localsgd", 16, 600, trajectories=16, local_steps=5).truncate(1230)
    pair("E3 LocalSGD H=5 (1230 slots)", lambda: reference_sim(lsgd, e3, 2.0 ** -5),
         lambda: sim.simulate(lsgd, e3, 2.0 ** -5), args.repeat, same_w)

    order = update_order(pd)
    plan = rpd_plan(order.slot.size, 16, e3.num_batches, 248, "uniform", 0)
    pair("RPD S=16 (9600 updates)",
         lambda: simulate_python(e3, 2.0 ** -8, plan, delta=248, clock=order.slot + 1),
         lambda: simulate_rpd(e3, 2.0 ** -8, plan, delta=248, clock=order.slot + 1),
         args.repeat, same_w)

    S = 128
    e5 = build_model("logistic", S, dim=512, examples=50, batch_size=1, seed=0, noise=0.5)
    clock = update_order(smallest_reaching("pd", S, 3180).truncate(3180)).slot + 1
    K, delta = clock.size, S * S - S // 2
    plan5 = rpd_plan(K, S, e5.num_batches, delta, "uniform", 0)
    part = rpd_plan(min(args.rpd_prefix, K), S, e5.num_batches, delta, "uniform", 0)
    wo, co, a = best_of(1, lambda: simulate_python(e5, 2.0 ** -6, part, delta=delta,
                                                   clock=clock))
    scale = K / part.stage.size
    rows.append((f"RPD S=128 (3180 slots, {K} updates)", "old", wo * scale, co * scale,
                 f"scaled from {part.stage.size} updates"))
    wn, cn, b = best_of(1, lambda: simulate_rpd(e5, 2.0 ** -6, plan5, delta=delta,
                                                clock=clock))
    prefix = simulate_rpd(e5, 2.0 ** -6, part, delta=delta, clock=clock)
    rows.append((f"RPD S=128 (3180 slots, {K} updates)", "new", wn, cn,
                 "identical prefix" if same_w(a, prefix) else "DIFFERENT"))

    for method, kw in (("pd", {}), ("localsgd", {"trajectories": 64, "local_steps": 5}),
                       ("gpipe", {})):
        pair(f"budget search {method} S=64 T=3180", lambda: bisection(method, 64, 3180, **kw),
             lambda: smallest_reaching(method, 64, 3180, **kw).microbatches, 1,
             lambda x, y: bool(x == y))

    wt, ct, med = tiny_simulate(args.tiny_repeat)
    rows.append(("tiny `rpd-mpi simulate` (whole process)", "new", wt, ct,
                 f"median wall {med:.3f} of {args.tiny_repeat}"))

    print(f"{'benchmark':44s} {'path':4s} {'wall s':>9s} {'CPU s':>9s}  note")
    for name, path, w, c, note in rows:
        print(f"{name:44s} {path:4s} {w:9.3f} {c:9.3f}  {note}")


if __name__ == "__main__":
    main()
