"""Assembly of an MPI run's part files on rank 0: time and peak memory against run length.

For each N it launches a real run (`mpiexec -n S rpd-mpi train --method pd --stages S
--microbatches N --objective quadratic --dim D`) in which rank 0's call of
`rpd_mpi.mpi.train.assemble` (the assembly of the parts into the run record) is wrapped:

- time: wall seconds of that call (no tracing);
- rss: rank 0's peak resident memory (ru_maxrss) before and after it, so the growth the
  assembly adds to the run's own peak;
- traced (with --traced): a second call of the same function under tracemalloc, whose peak
  is what the assembly itself allocates in Python/numpy (h5py's C buffers not included).

The wrapper only needs the function name, so the same script measures any version of the
code (put another checkout first on PYTHONPATH). Prints one table row per N.
`--table parts` prints instead the part-file and ledger sizes of short charlm runs (S =
--stages, each --widths, each --snapshot-budget in --budgets), measured just before the
assembly, when the parts are complete.

    .venv/bin/python benchmarks/bench_assembly.py --ns 10000 20000 80000 --traced
    .venv/bin/python benchmarks/bench_assembly.py --table parts --widths 128 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable


def child(argv: list[str], result: str, traced: bool) -> int:
    """One rank of the run: rank 0 times its assembly and writes `result` (JSON)."""
    import rpd_mpi.mpi.train as train_module
    from rpd_mpi.cli import main

    original: Callable[..., Any] = getattr(train_module, "assemble")

    def timed(*args: Any, **kwargs: Any) -> Any:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        record = original(*args, **kwargs)
        seconds = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        parts = list(Path(args[0].out).parent.glob(Path(args[0].out).name + ".*.part"))
        out: dict[str, Any] = {"parts_mib": sum(p.stat().st_size for p in parts) / 2 ** 20,
                               "seconds": seconds, "rss_before_mib": before / 1024,
                               "rss_after_mib": after / 1024, "updates": len(record.updates),
                               "module": train_module.__file__}
        if traced:
            tracemalloc.start()
            original(*args, **kwargs)
            out["traced_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2 ** 20
            tracemalloc.stop()
        Path(result).write_text(json.dumps(out))
        return record

    setattr(train_module, "assemble", timed)
    return main(argv)


def run_one(ranks: int, argv: list[str], traced: bool, mpiexec: str) -> dict[str, Any]:
    """One `rpd-mpi train` job (argv without --out) with its assembly measured."""
    folder = Path(tempfile.mkdtemp(prefix="bench-assembly-"))
    try:
        result = folder / "result.json"
        argv = ["train", *argv, "--out", str(folder / "run.h5"), "--quiet", "--timeout", "600"]
        cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__,
               "--child", str(result), *(["--traced"] if traced else []), "--", *argv]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0 or not result.exists():
            raise SystemExit(f"run {argv} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        out: dict[str, Any] = json.loads(result.read_text())
        out["run_wall"] = wall
        out["ledger_mib"] = (folder / "run.h5").stat().st_size / 2 ** 20
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def assembly_table(args: argparse.Namespace) -> None:
    print(f"{'N':>7} {'K':>7} {'assembly s':>11} {'rss before':>11} {'rss after':>10} "
          f"{'traced peak':>12} {'ledger':>9} {'parts':>9} {'run s':>7}")
    for n in args.ns:
        r = run_one(args.stages, ["--method", "pd", "--stages", str(args.stages),
                                  "--microbatches", str(n), "--objective", "quadratic",
                                  "--dim", str(args.dim)], args.traced, args.mpiexec)
        traced = f"{r['traced_peak_mib']:8.1f} MiB" if "traced_peak_mib" in r else " " * 12
        print(f"{n:7d} {r['updates']:7d} {r['seconds']:11.2f} {r['rss_before_mib']:7.1f} MiB "
              f"{r['rss_after_mib']:6.1f} MiB {traced} {r['ledger_mib']:5.1f} MiB "
              f"{r.get('parts_mib', float('nan')):5.1f} MiB {r['run_wall']:7.1f}", flush=True)
    print(f"(code: {os.path.dirname(r['module'])})")


def parts_table(args: argparse.Namespace) -> None:
    """Part-file and ledger sizes of short charlm runs (S = --stages) at each --widths."""
    print(f"{'width':>5} {'N':>4} {'budget MiB':>10} {'parts MiB':>10} {'ledger MiB':>10} "
          f"{'ratio':>6} {'assembly s':>10}")
    for width in args.widths:
        for budget in args.budgets:
            r = run_one(args.stages, ["--method", "pd", "--objective", "charlm", "--stages",
                                      str(args.stages), "--width", str(width),
                                      "--microbatches", str(args.charlm_n),
                                      "--snapshot-budget", str(budget)],
                        False, args.mpiexec)
            print(f"{width:5d} {args.charlm_n:4d} {budget:10g} {r['parts_mib']:10.1f} "
                  f"{r['ledger_mib']:10.1f} {r['parts_mib'] / r['ledger_mib']:6.2f} "
                  f"{r['seconds']:10.2f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", choices=("assembly", "parts"), default="assembly")
    p.add_argument("--ns", type=int, nargs="+", default=[10000, 20000, 80000])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--traced", action="store_true", help="also a tracemalloc pass")
    p.add_argument("--widths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--budgets", type=float, nargs="+", default=[256.0])
    p.add_argument("--charlm-n", type=int, default=8, help="charlm microbatches")
    p.add_argument("--mpiexec", default=str(Path(sys.executable).with_name("mpiexec")))
    if sys.argv[1:2] == ["--child"]:        # one rank: --child RESULT [--traced] -- ARGV
        rest = sys.argv[3:]
        traced = rest[:1] == ["--traced"]
        rest = rest[1:] if traced else rest
        return child(rest[1:], sys.argv[2], traced)
    args = p.parse_args()
    (assembly_table if args.table == "assembly" else parts_table)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
