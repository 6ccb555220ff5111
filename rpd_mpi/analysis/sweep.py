"""Step-size sweeps over a powers-of-two grid, in parallel processes or as a Slurm job array.

The rule that picks the step size (docs/DESIGN.md 7: "each method gets its best"):
  - a run's **score** is the mean of f − f⋆ (f when f⋆ is unknown) over the last 10 % of its
    objective points (at least one point; the objective is recorded at the run's cadence,
    one point per slot by default, so this is the last 10 % of the slot budget);
  - a run has **diverged** when any objective value is NaN/inf or the final value exceeds 10×
    the initial one; diverged runs are never picked;
  - the best step size is the one with the lowest score (ties: the smaller step size).
When the best lies on the edge of the grid the summary says so: the grid should be widened.

Ledgers are written as `<out>/<name>_lr<e>.h5` for lr = 2^e; the best is renamed to
`<out>/<name>.h5` (the others are removed unless --keep-all). The summary goes to
`<out>/<name>_sweep.md` and `.json`.

    rpd-mpi tool sweep --method pd --stages 16 --objective tridiag ... --lr-lo -12 --lr-hi -3
    # Slurm: jobs/sweep-chain.sh -12 -3 <same flags>   (array task i: lr = 2^(-12+i), writes
    # results/sweep/<array job id>/lr_<i>.h5; then, afterok, `--collect` scores that folder)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rpd_mpi import jsonout
from rpd_mpi.analysis.common import (Parser, ToolError, add_run_flags, check_out_dir,
                                     config_from_args, fmt, gaps, guarded, int_at_least,
                                     lr_exponent, lr_text, markdown_table, parallel_map, write_text)
from rpd_mpi.build import simulate_run
from rpd_mpi.config import RunConfig
from rpd_mpi.ledger.run_file import read_run, write_run
from rpd_mpi.records import RunRecord

TAIL = 0.10          # share of the objective points the score averages
BLOWUP = 10.0        # final > BLOWUP * initial counts as diverged
EXPONENTS = (-1074, 1023)   # 2^e is a finite float64 > 0
MAX_GRID = 64        # step sizes one sweep may run
DEFAULT_OUT = "results/sweep"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]*")


@dataclass(frozen=True)
class SweepPoint:
    """One step size: its scores and where its ledger was written."""

    lr: float
    initial: float
    final: float
    score: float
    diverged: bool
    ledger: str
    seconds: float


@dataclass(frozen=True)
class SweepResult:
    """All points of a sweep (by lr), the picked one and the kept ledger."""

    name: str
    points: tuple[SweepPoint, ...]
    best: SweepPoint | None
    best_ledger: str | None

    @property
    def at_edge(self) -> bool:
        lrs = [p.lr for p in self.points]
        return self.best is not None and len(lrs) > 1 and self.best.lr in (min(lrs), max(lrs))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "best_lr": self.best.lr if self.best else None,
                "best_ledger": self.best_ledger, "at_edge": self.at_edge,
                "rule": f"min mean(f - f*) over the last {TAIL:.0%} of objective points; "
                        f"NaN/inf or final > {BLOWUP:g}x initial = diverged, excluded",
                "points": [dataclasses.asdict(p) for p in self.points]}


def score_record(record: RunRecord) -> tuple[float, float, float, bool]:
    """(initial, final, score, diverged) of one run by the module's rule."""
    g = gaps(record)
    if g.size == 0:
        return math.nan, math.nan, math.nan, True
    tail = max(1, math.ceil(TAIL * g.size))
    score = float(np.mean(g[-tail:]))
    initial, final = float(g[0]), float(g[-1])
    diverged = (not np.all(np.isfinite(g))) or final > BLOWUP * abs(initial) \
        or record.attrs.get("status") == "diverged"
    return initial, final, score, bool(diverged or not math.isfinite(score))


def power_grid(lo: int, hi: int) -> list[float]:
    """[2^lo, 2^(lo+1), ..., 2^hi]."""
    for flag, e in (("--lr-lo", lo), ("--lr-hi", hi)):
        if not EXPONENTS[0] <= e <= EXPONENTS[1]:
            raise ToolError(f"{flag}: must be in {EXPONENTS[0]}..{EXPONENTS[1]} (2^e a finite "
                            f"step size > 0) (got {e})")
    if hi < lo:
        raise ToolError(f"--lr-hi ({hi}) must be >= --lr-lo ({lo})")
    if hi - lo + 1 > MAX_GRID:
        raise ToolError(f"--lr-hi: at most {MAX_GRID} step sizes per sweep (got --lr-lo {lo} "
                        f"--lr-hi {hi})")
    return [2.0 ** e for e in range(lo, hi + 1)]


def ledger_name(name: str, lr: float) -> str:
    e = lr_exponent(lr)
    return f"{name}_lr{e if e is not None else format(lr, 'g')}.h5"


def run_point(cfg: RunConfig) -> SweepPoint:
    """Simulate one configuration, write its ledger to cfg.out and score it."""
    t0 = time.perf_counter()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        record = simulate_run(cfg)
    write_run(cfg.out, record)
    return _point(record, cfg.lr, cfg.out, time.perf_counter() - t0)


def _point(record: RunRecord, lr: float, path: str, seconds: float) -> SweepPoint:
    initial, final, score, diverged = score_record(record)
    return SweepPoint(lr, initial, final, score, diverged, path, seconds)


def pick(points: Sequence[SweepPoint]) -> SweepPoint | None:
    """The non-diverged point of lowest score (smaller lr on ties); None if all diverged."""
    ok = [p for p in points if not p.diverged]
    return min(ok, key=lambda p: (p.score, p.lr)) if ok else None


def sweep(cfg_base: RunConfig, lrs: Sequence[float], jobs: int = 2,
          out_dir: str | Path = "results/sweep", name: str = "",
          keep_all: bool = False) -> SweepResult:
    """Run `cfg_base` at every step size of `lrs` in `jobs` processes and pick the best."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or cfg_base.schedule.method
    cfgs = [dataclasses.replace(cfg_base, lr=lr, out=str(out / ledger_name(name, lr)))
            for lr in sorted(set(lrs))]
    points = parallel_map(run_point, cfgs, jobs)
    return finish(name, points, out, keep_all)


def finish(name: str, points: Sequence[SweepPoint], out: Path, keep_all: bool) -> SweepResult:
    """Pick the best point, keep its ledger as <out>/<name>.h5, drop the rest (unless kept)."""
    points = sorted(points, key=lambda p: p.lr)
    best = pick(points)
    best_path = None
    if best is not None:
        best_path = out / f"{name}.h5"
        best_path.unlink(missing_ok=True)
        if keep_all:
            best_path.write_bytes(Path(best.ledger).read_bytes())
        else:
            Path(best.ledger).rename(best_path)
    if not keep_all:
        for p in points:
            if p is not best:
                Path(p.ledger).unlink(missing_ok=True)
    return SweepResult(name, tuple(points), best, str(best_path) if best_path else None)


def refine(cfg_base: RunConfig, center: int, lo: int, hi: int, jobs: int,
           out_dir: str | Path, name: str = "", width: int = 1) -> SweepResult:
    """Sweep 2^(center-width..center+width) within [2^lo, 2^hi]; while the best is on an edge
    that is not a limit, add the next power of two beyond it (a narrowed grid for costly S)."""
    name = name or cfg_base.schedule.method
    exps = set(range(max(lo, center - width), min(hi, center + width) + 1))
    points: dict[int, SweepPoint] = {}
    while True:
        todo = sorted(exps - set(points))
        if not todo:
            break
        res = sweep(cfg_base, [2.0 ** e for e in todo], jobs, out_dir, name, keep_all=True)
        points.update({lr_exponent(p.lr): p for p in res.points})   # type: ignore[misc]
        best = pick(list(points.values()))
        e = lr_exponent(best.lr) if best else None
        if e is not None and e == min(points) and e > lo:
            exps.add(e - 1)
        elif e is not None and e == max(points) and e < hi:
            exps.add(e + 1)
    return finish(name, list(points.values()), Path(out_dir), keep_all=False)


def summary_markdown(result: SweepResult) -> str:
    """lr, initial, final, score, diverged, seconds; the picked row in bold; the rule."""
    rows = []
    for p in result.points:
        mark = "**" if p is result.best else ""
        rows.append((f"{mark}{lr_text(p.lr)}{mark}", fmt(p.initial), fmt(p.final),
                     fmt(p.score), "yes" if p.diverged else "no", f"{p.seconds:.1f}"))
    table = markdown_table(("lr", "initial f−f⋆", "final f−f⋆", "score (last 10%)",
                            "diverged", "seconds"), rows)
    if result.best is None:
        verdict = "every step size diverged: no pick"
    else:
        verdict = f"picked lr = {lr_text(result.best.lr)} (score {fmt(result.best.score, 4)})"
        if result.at_edge:
            verdict += "; **on the edge of the grid**: widen it"
    return f"{table}\n\n{verdict}"


def slurm_lines(flags: Sequence[str], lo: int, hi: int, out: str) -> str:
    """The job-array form of the same sweep: jobs/sweep.sbatch runs `rpd-mpi simulate` with
    lr = 2^(LR_LO + i) in array task i and writes results/sweep/<array job id>/lr_<i>.h5;
    `--collect` scores them (jobs/sweep-chain.sh submits both, chained with afterok)."""
    run = " ".join(shlex.quote(f) for f in flags)
    grid = f"--lr-lo {lo} --lr-hi {hi}"
    return (f"# Slurm job array: task i runs lr = 2^({lo} + i), i = 0..{hi - lo}, and writes "
            f"results/sweep/<array job id>/lr_<i>.h5; the collect job runs after it (afterok)\n"
            f"jobs/sweep-chain.sh {lo} {hi} {run}\n"
            f"# or by hand: LR_LO={lo} sbatch --array=0-{hi - lo} jobs/sweep.sbatch {run}, then\n"
            f"rpd-mpi tool sweep {run} {grid} --out results/sweep/<array job id> --collect\n"
            f"# (without Slurm, task i alone: rpd-mpi tool sweep {run} {grid} "
            f"--out {shlex.quote(out)} --index i)")


def collect(lrs: Sequence[float], out: Path, name: str) -> SweepResult:
    """Score ledgers written elsewhere: <out>/<name>_lr<e>.h5 (--index) or <out>/lr_<i>.h5
    (jobs/sweep.sbatch task i). Keeps every ledger; the best is copied to <out>/<name>.h5."""
    points = []
    for i, lr in enumerate(lrs):
        paths = [out / ledger_name(name, lr), out / f"lr_{i}.h5"]
        path = next((p for p in paths if p.exists()), None)
        if path is None:
            raise ToolError(f"--collect: neither {paths[0]} nor {paths[1]} exists (did the task "
                            f"for lr {lr_text(lr)} run?)")
        record = read_run(path)
        if not math.isclose(float(record.attrs.get("lr", math.nan)), lr):
            raise ToolError(f"--collect: {path} was run with lr {record.attrs.get('lr')}, "
                            f"expected {lr_text(lr)} (check --lr-lo / LR_LO)")
        points.append(_point(record, lr, str(path), 0.0))
    return finish(name, points, out, keep_all=True)


def _pass_through(argv: Sequence[str]) -> list[str]:
    """The run flags of argv without the sweep's own options."""
    own = {"--jobs": 1, "--out": 1, "--name": 1, "--lr-lo": 1, "--lr-hi": 1, "--index": 1,
           "--keep-all": 0, "--collect": 0, "--json": 0}
    out, i = [], 0
    while i < len(argv):
        if argv[i] in own:
            i += 1 + own[argv[i]]
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="sweep", description=__doc__.splitlines()[0])
    add_run_flags(p, skip=("--out", "--lr"))
    p.add_argument("--lr-lo", type=int, default=-12, help="smallest lr = 2^LO")
    p.add_argument("--lr-hi", type=int, default=-3, help="largest lr = 2^HI")
    p.add_argument("--jobs", type=int_at_least(1), default=2, help="worker processes")
    p.add_argument("--out", default=None, help=f"folder for ledgers and summary (default "
                   f"{DEFAULT_OUT}; a given DIR is created if missing, its parent must exist)")
    p.add_argument("--name", default="", help="ledger stem (default: the method)")
    p.add_argument("--keep-all", action="store_true", help="keep every ledger")
    p.add_argument("--index", type=int_at_least(0), default=None,
                   help="run only grid point INDEX")
    p.add_argument("--collect", action="store_true", help="score ledgers already written")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    return guarded(lambda: _main(args, argv))


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = config_from_args(args, skip=("--out", "--lr"))
    lrs, out = power_grid(args.lr_lo, args.lr_hi), Path(args.out or DEFAULT_OUT)
    if args.out:
        check_out_dir(out)
    if args.name and not _NAME.fullmatch(args.name):
        raise ToolError(f"--name: a file stem of letters, digits and _.=- (got {args.name!r})")
    name = args.name or cfg.schedule.method
    if args.index is not None:
        if not 0 <= args.index < len(lrs):
            raise ToolError(f"--index must be in 0..{len(lrs) - 1} (got {args.index})")
        out.mkdir(parents=True, exist_ok=True)
        lr = lrs[args.index]
        point = run_point(dataclasses.replace(cfg, lr=lr, out=str(out / ledger_name(name, lr))))
        print(jsonout.dumps(dataclasses.asdict(point)))
        return 0
    if args.collect:
        result = collect(lrs, out, name)
    else:
        result = sweep(cfg, lrs, args.jobs, out, name, args.keep_all)
    slurm = slurm_lines(_pass_through(argv), args.lr_lo, args.lr_hi, str(out))
    write_summary(result, out, slurm)
    print(jsonout.dumps(result.to_dict()) if args.json else summary_markdown(result) + "\n\n" + slurm)
    return 0


def write_summary(result: SweepResult, out: str | Path, extra: str = "") -> Path:
    """<out>/<name>_sweep.md (table, pick, `extra`) and <out>/<name>_sweep.json."""
    out = Path(out)
    write_text(out / f"{result.name}_sweep.json", jsonout.dumps(result.to_dict(), indent=1))
    text = summary_markdown(result) + (f"\n\n{extra}" if extra else "")
    return write_text(out / f"{result.name}_sweep.md", text)
