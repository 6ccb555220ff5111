"""Pipeline speed-up over one process, its ideal and what the machine allows (issue 12).

For each case the same model (same partition of units or coordinates, same microbatches N)
runs as an `rpd-mpi train` job of 1 rank (S = 1: the sequential baseline on the pipeline's
own code path) and of S ranks (static PD order); the speed-up is the ratio of their wall
times (ledger events), next to the schedule's ideal S N / (N + S - 1). The **attainable**
speed-up is measured too: S plain processes (no MPI, no messages) start together and each
runs its stage's N forwards and backwards on random inputs of the real shapes; T(1) over the
slowest of them is what S processes of this compute can give on this machine (memory
bandwidth and shared cores included). Efficiency = speed-up / attainable.

    python benchmarks/bench_speedup.py [--repeats 3] [--cases linear,charlm2,charlm4]

Cases: `linear` (block-linear quadratic, S = 2, a 1024 x 4096 matrix-vector product per op),
`charlm2` (charlm, 6 blocks, `--partition auto` over S = 2), `wide2` (charlm with 2 blocks of
width 256 on 256 tokens per microbatch, S = 2: each op is matrix-matrix products, compute-bound
at ~24 GFLOP/s on one core here, the case where memory bandwidth does not cap two processes),
`charlm4` (the 6-block model on S = 4 ranks: more ranks than this machine's 2 cores, reported
as oversubscribed; 8 units cannot balance over 4 stages when the embedding is cheap),
`charlm4b` (8 blocks on S = 4, which `auto` can balance; oversubscribed too). For the S-rank runs the table also gives each stage's measured utilization
and, for `auto` partitions, the utilization the profile predicted. Best of
`--repeats` runs for every wall time, the three measurements interleaved. Prints a markdown
table. On a machine other jobs load, the three move independently (efficiency above 1 is
such noise): measure on idle cores. With Linux's autogroup scheduling every rank mpiexec starts
is a session of its own and gets its own share of a loaded CPU, so S ranks get S shares; the
plain processes here get the same treatment (start_new_session), one process gets one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")       # as `rpd-mpi train` does (rpd_mpi/entry.py)

import numpy as np  # noqa: E402  (after the BLAS thread variables)

from rpd_mpi.build import build  # noqa: E402
from rpd_mpi.config import ObjectiveConfig, RunConfig, ScheduleConfig  # noqa: E402
from rpd_mpi.ledger.report import summarize  # noqa: E402
from rpd_mpi.ledger.run_file import read_run  # noqa: E402

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
LM = ["--objective", "charlm", "--layers", "6", "--width", "64", "--heads", "4",
      "--context", "32", "--batch-size", "8", "--lr", "0.125"]
CASES: dict[str, tuple[int, int, list[str]]] = {      # name -> (S, N, flags)
    "linear": (2, 64, ["--objective", "quadratic", "--dim", "8192", "--examples", "1024",
                       "--batch-size", "1024", "--lr", "1e-6"]),
    "charlm2": (2, 100, LM),
    "wide2": (2, 40, ["--objective", "charlm", "--layers", "2", "--width", "256", "--heads",
                      "4", "--context", "32", "--batch-size", "8", "--lr", "0.125"]),
    "charlm4": (4, 100, LM),
    "charlm4b": (4, 100, [*LM[:2], "--layers", "8", *LM[4:]]),
}


def train_run(stages: int, n: int, flags: list[str], partition: str,
              out: Path) -> dict[str, object]:
    """One `rpd-mpi train` job: its report (wall time = max event end - min event start,
    measured and, with `auto`, predicted utilization per stage)."""
    cmd = [MPIEXEC, "-n", str(stages), sys.executable, "-m", "rpd_mpi", "train", "--method",
           "pd", "--stages", str(stages), "--microbatches", str(n), *flags, "--partition",
           partition, "--out", str(out), "--force", "--quiet", "--eval-every", "1000000",
           "--max-memory", "0"]
    if stages > (os.cpu_count() or 1):
        cmd += ["--wait", "polite"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.stderr[-2000:]}")
    return summarize(read_run(out))


def partition_of(stages: int, n: int, flags: list[str], out: Path) -> str:
    """The explicit partition of a case: the units `auto` picks for S (charlm), or even."""
    if "charlm" not in flags:
        return ""
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", "simulate", "--method", "pd",
                          "--stages", str(stages), "--microbatches", "1", *flags,
                          "--partition", "auto", "--out", str(out), "--force", "--quiet"],
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return ",".join(str(c) for c in read_run(out).attrs["partition"])


def worker(spec: str) -> None:
    """One plain process: N forwards + backwards of one stage, printed as JSON seconds."""
    args = json.loads(spec)
    obj = {k: v for k, v in args["objective"].items()}
    cfg = RunConfig(schedule=ScheduleConfig(stages=args["stages"]),
                    objective=ObjectiveConfig(**obj), max_memory=0)
    model = build(cfg)
    s, n = args["stage"], args["n"]
    mod = model.make_stage(s)
    w = model.init_weights()[model.slices[s]].copy()
    shape = model.activation_shape(max(s - 1, 0))
    rng = np.random.default_rng(s)
    a_in = None if s == 0 else rng.standard_normal(shape)
    out, cache = mod.forward(w, a_in, 0)                     # warm-up (numba, caches)
    g = mod.loss(out, 0)[1] if mod.is_last else rng.standard_normal(out.shape)
    mod.backward(w, cache, g, 0)
    while time.time() < args["start"]:                        # start together
        time.sleep(0.001)
    t0 = time.perf_counter()
    for mb in range(n):
        batch = mb % model.num_batches
        out, cache = mod.forward(w, a_in, batch)
        if mod.is_last:
            g = mod.loss(out, batch)[1]
        mod.backward(w, cache, g, batch)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def _objective(flags: list[str], partition: str) -> dict[str, object]:
    names = {"--objective": "name", "--layers": "layers", "--width": "width",
             "--heads": "heads", "--context": "context", "--batch-size": "batch_size",
             "--dim": "dim", "--examples": "examples"}
    obj: dict[str, object] = {}
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag in names:
            obj[names[flag]] = value if flag == "--objective" else int(value)
    obj["partition"] = partition
    return obj


def concurrent_stages(stages: int, n: int, flags: list[str], partition: str) -> list[float]:
    """Seconds of each stage's compute, S plain processes at once (no communication)."""
    start = time.time() + 8.0
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(
        {"stages": stages, "stage": s, "n": n, "start": start,
         "objective": _objective(flags, partition)})], stdout=subprocess.PIPE, text=True,
        start_new_session=True) for s in range(stages)]     # own scheduling group, as the
    #                                                         ranks mpiexec starts (autogroup)
    times = []
    for p in procs:
        stdout, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(f"stage worker failed ({p.returncode})")
        times.append(float(json.loads(stdout.strip().splitlines()[-1])["seconds"]))
    return times


def run_case(name: str, repeats: int, tmp: Path) -> dict[str, object]:
    stages, n, flags = CASES[name]
    part = partition_of(stages, n, flags, tmp / f"{name}-part.h5")
    t1s: list[float] = []
    runs: list[dict[str, object]] = []
    concs: list[list[float]] = []
    for _ in range(repeats):     # interleaved, so that a change of load hits all three
        t1s.append(float(train_run(1, n, flags, "", tmp / f"{name}-1.h5")["wall_time"]))
        runs.append(train_run(stages, n, flags, "auto" if part else "",   # cached profile:
                              tmp / f"{name}-S.h5"))                     # the same units
        concs.append(concurrent_stages(stages, n, flags, part))
    best = min(runs, key=lambda r: float(r["wall_time"]))   # type: ignore[arg-type]
    if part and ",".join(str(c) for c in best["partition"]) != part:  # type: ignore[attr-defined]
        raise RuntimeError(f"{name}: auto chose {best['partition']} after {part}")
    t1, ts, conc = min(t1s), float(best["wall_time"]), min(concs, key=max)
    speedup, attainable = t1 / ts, t1 / max(conc)
    return {"case": name, "S": stages, "N": n, "partition": part or "even",
            "oversubscribed": stages > (os.cpu_count() or 1), "t1": t1, "tS": ts,
            "speedup": speedup, "ideal": stages * n / (n + stages - 1),
            "attainable": attainable, "efficiency": speedup / attainable,
            "stage_seconds": conc, "utilization": best["stage_utilization"],
            "predicted": best.get("predicted_stage_utilization")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            rows.append(run_case(name, args.repeats, Path(tmp)))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{os.cpu_count()} cores; best of {args.repeats}\n")
    print("| case | S | N | partition | T(1) s | T(S) s | speed-up | ideal SN/(N+S-1) | "
          "attainable | efficiency | utilization per stage | predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = " (oversubscribed)" if r["oversubscribed"] else ""
        print(f"| {r['case']}{note} | {r['S']} | {r['N']} | {r['partition']} | "
              f"{r['t1']:.3f} | {r['tS']:.3f} | {r['speedup']:.2f} | {r['ideal']:.2f} | "
              f"{r['attainable']:.2f} | {r['efficiency']:.2f} | {_fracs(r['utilization'])} | "
              f"{_fracs(r['predicted'])} |")


def _fracs(values: object) -> str:
    return "-" if values is None else \
        ", ".join(f"{v:.2f}" for v in values)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
