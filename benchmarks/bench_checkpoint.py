"""Checkpoint cost against block size and in-flight depth (a table; not a test).

    python benchmarks/bench_checkpoint.py [--quick]

Runs real jobs with `--checkpoint-every`: `mpiexec -n S rpd-mpi train` (PD, static order) and
`rpd-mpi simulate`, on the quadratic objective at several sizes d (block = d / S values per
stage) and depths S (stage 0 holds up to S stashed blocks of in-flight microbatches), and
prints what each ledger records about its checkpoints: how many were taken, their mean and
longest time (the whole cut: agreement, catch-up, drain, every rank's write, the commit) and
the size of the newest on disk. The time a run spends checkpointing is about
checkpoints x mean; compare it with the run's wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from rpd_mpi.ledger import read_run

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


def run(kind: str, stages: int, dim: int, folder: Path, every: float) -> dict[str, float]:
    out = folder / f"{kind}-{stages}-{dim}.h5"
    flags = ["--method", "pd", "--stages", str(stages), "--objective", "quadratic",
             "--dim", str(dim), "--examples", "20", "--batch-size", "10", "--quiet",
             "--out", str(out), "--checkpoint-every", str(every), "--max-memory", "0",
             "--lr", "1e-7"]
    if kind == "train":
        cmd = [MPIEXEC, "-n", str(stages), sys.executable, "-m", "rpd_mpi", "train",
               "--microbatches", "200", "--op-cost", "0.004", *flags]
    else:
        cmd = [sys.executable, "-m", "rpd_mpi", "simulate", "--microbatches", "3000", *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)
    a = read_run(out).attrs
    return {"n": a["checkpoints"], "mean": a["checkpoint_seconds_mean"],
            "max": a["checkpoint_seconds_max"], "mib": a["checkpoint_bytes"] / 2 ** 20,
            "wall": float(a.get("wall_time") or 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two sizes, one depth")
    args = ap.parse_args()
    dims = (4096, 65536) if args.quick else (4096, 65536, 524288)
    depths = (2,) if args.quick else (2, 4)
    print(f"{'engine':9} {'S':>2} {'d':>7} {'block':>7} {'ckpts':>5} {'mean s':>7} "
          f"{'max s':>7} {'MiB':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("train", "simulate"):
            for S in depths:
                for d in dims:
                    r = run(kind, S, d, Path(tmp), 0.25)
                    print(f"{kind:9} {S:2d} {d:7d} {d // S:7d} {r['n']:5d} {r['mean']:7.3f} "
                          f"{r['max']:7.3f} {r['mib']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
