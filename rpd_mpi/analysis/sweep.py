"""Step-size sweeps over a powers-of-two grid, in parallel processes or as a Slurm job array.

The rule that picks the step size (docs/DESIGN.md 7: "each method gets its best"):
  - a run's **score** is the mean of f − f⋆ (f when f⋆ is unknown) over the last 10 % of its
    objective points (at least one point; the objective is recorded at the run's cadence,
    one point per slot by default, so this is the last 10 % of the slot budget);
  - a run has **diverged** when any objective value is NaN/inf or the final value exceeds 10×
    the initial one; diverged runs are never picked;
  - the best step size is the one with the lowest score (ties: the smaller step size).
When the best lies on the edge of the grid the summary says so: the grid should be widened.

`--selector stable` is the paper's rule instead (its E4/E5 notebooks), on the raw objective f
of the last `--tail` share of the points (at least `--tail-min` of them): a step size is
**stable** when, on that tail, the coefficient of variation std/mean <= 0.15, the fraction of
steps that go up <= 0.45, the largest relative up-jump (f[i+1] - f[i]) / |f[i]| <= 0.05, the
total variation over the net change sum|Δf| / |f[-1] - f[0]| <= 5 and the least-squares
slope of log f per point <= 1e-4 (`--thresholds llm`, the paper's LLM runs: 0.25, 0.55, 0.10,
10, 1e-3). Among the stable, non-diverged step sizes whose tail mean is within 5 % of the best
stable tail mean the smallest step size wins; when none is stable, the lowest tail mean.

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
class Thresholds:
    """The stable rule's limits on a tail (module docstring)."""

    cv: float
    up_fraction: float
    up_jump: float
    tv_ratio: float
    log_slope: float


PAPER_THRESHOLDS = Thresholds(0.15, 0.45, 0.05, 5.0, 1e-4)
LLM_THRESHOLDS = Thresholds(0.25, 0.55, 0.10, 10.0, 1e-3)
THRESHOLDS = {"paper": PAPER_THRESHOLDS, "llm": LLM_THRESHOLDS}
SELECTORS = ("tail-mean", "stable")
WITHIN = 0.05        # stable: step sizes within 5 % of the best stable tail mean


@dataclass(frozen=True)
class Selector:
    """How a sweep picks its step size: `tail-mean` (lowest mean f − f⋆ of the last 10 %) or
    `stable` (the paper's rule on the last `tail` share of raw f, >= `tail_min` points)."""

    kind: str = "tail-mean"
    tail: float = TAIL
    tail_min: int = 1
    thresholds: Thresholds = PAPER_THRESHOLDS

    def __post_init__(self) -> None:
        if self.kind not in SELECTORS:
            raise ToolError(f"--selector must be one of {', '.join(SELECTORS)} "
                            f"(got {self.kind!r})")
        if not 0.0 < self.tail <= 1.0:
            raise ToolError(f"--tail must be in (0, 1] (got {self.tail})")
        if self.tail_min < 1:
            raise ToolError(f"--tail-min must be >= 1 (got {self.tail_min})")

    def describe(self) -> str:
        if self.kind == "tail-mean":
            return (f"min mean(f - f*) over the last {TAIL:.0%} of objective points; "
                    f"NaN/inf or final > {BLOWUP:g}x initial = diverged, excluded")
        t = self.thresholds
        return (f"stable on the last {self.tail:g} of the points (>= {self.tail_min}) of raw f: "
                f"cv <= {t.cv:g}, up-steps <= {t.up_fraction:g}, up-jump <= {t.up_jump:g}, "
                f"TV/|net| <= {t.tv_ratio:g}, log-slope <= {t.log_slope:g}; the smallest lr "
                f"within {WITHIN:.0%} of the best stable tail mean; none stable: the best "
                f"tail mean; diverged excluded")


TAIL_MEAN = Selector()


@dataclass(frozen=True)
class TailStats:
    """The stable rule's statistics of one curve's tail of raw f."""

    mean: float
    cv: float
    up_fraction: float
    up_jump: float
    tv_ratio: float
    log_slope: float

    def stable(self, t: Thresholds) -> bool:
        values = (self.cv, self.up_fraction, self.up_jump, self.tv_ratio, self.log_slope)
        limits = (t.cv, t.up_fraction, t.up_jump, t.tv_ratio, t.log_slope)
        return all(math.isfinite(v) and v <= lim for v, lim in zip(values, limits))


def tail_stats(values: np.ndarray, tail: float, tail_min: int) -> TailStats:
    """`TailStats` of the last max(tail_min, ceil(tail * n)) points of `values` (raw f)."""
    v = np.asarray(values, dtype=float)
    m = min(v.size, max(tail_min, math.ceil(tail * v.size)))
    t = v[v.size - m:]
    nan = math.nan
    if t.size == 0 or not np.all(np.isfinite(t)):
        return TailStats(nan, nan, nan, nan, nan, nan)
    mean = float(t.mean())
    cv = float(t.std()) / abs(mean) if mean else math.inf
    if t.size < 2:
        return TailStats(mean, cv, 0.0, 0.0, 0.0, 0.0)
    d = np.diff(t)
    up = d > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        jumps = np.where(up, d / np.abs(t[:-1]), 0.0)
    tv, net = float(np.abs(d).sum()), abs(float(t[-1] - t[0]))
    ratio = 0.0 if tv == 0.0 else (tv / net if net else math.inf)
    slope = float(np.polyfit(np.arange(t.size, dtype=float),
                             np.log(np.maximum(t, np.finfo(float).tiny)), 1)[0]) \
        if np.all(t > 0) else math.inf
    return TailStats(mean, cv, float(up.mean()), float(np.max(jumps)), ratio, slope)


@dataclass(frozen=True)
class SweepPoint:
    """One step size: its scores and where its ledger was written; `tail_mean` and
    `stable` are the stable rule's (nan / False when the sweep did not use it)."""

    lr: float
    initial: float
    final: float
    score: float
    diverged: bool
    ledger: str
    seconds: float
    tail_mean: float = math.nan
    stable: bool = False
    final_f: float = math.nan       # the raw objective f at the end


@dataclass(frozen=True)
class SweepResult:
    """All points of a sweep (by lr), the picked one and the kept ledger."""

    name: str
    points: tuple[SweepPoint, ...]
    best: SweepPoint | None
    best_ledger: str | None
    selector: Selector = TAIL_MEAN

    @property
    def at_edge(self) -> bool:
        lrs = [p.lr for p in self.points]
        return self.best is not None and len(lrs) > 1 and self.best.lr in (min(lrs), max(lrs))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "best_lr": self.best.lr if self.best else None,
                "best_ledger": self.best_ledger, "at_edge": self.at_edge,
                "selector": self.selector.kind, "rule": self.selector.describe(),
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


def run_point(cfg: RunConfig, selector: Selector = TAIL_MEAN) -> SweepPoint:
    """Simulate one configuration, write its ledger to cfg.out and score it."""
    t0 = time.perf_counter()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        record = simulate_run(cfg)
    write_run(cfg.out, record)
    return _point(record, cfg.lr, cfg.out, time.perf_counter() - t0, selector)


def _run_pair(job: tuple[RunConfig, Selector]) -> SweepPoint:
    return run_point(*job)


def _point(record: RunRecord, lr: float, path: str, seconds: float,
           selector: Selector = TAIL_MEAN) -> SweepPoint:
    initial, final, score, diverged = score_record(record)
    raw = np.asarray(record.objective.value, dtype=float)
    final_f = float(raw[-1]) if raw.size else math.nan
    if selector.kind == "tail-mean":
        return SweepPoint(lr, initial, final, score, diverged, path, seconds, final_f=final_f)
    stats = tail_stats(raw, selector.tail, selector.tail_min)
    return SweepPoint(lr, initial, final, score, diverged, path, seconds, stats.mean,
                      stats.stable(selector.thresholds), final_f)


def pick(points: Sequence[SweepPoint], selector: Selector = TAIL_MEAN) -> SweepPoint | None:
    """The picked point by `selector` (module docstring); None if all diverged.
    tail-mean: the non-diverged point of lowest score (smaller lr on ties)."""
    ok = [p for p in points if not p.diverged]
    if not ok:
        return None
    if selector.kind == "tail-mean":
        return min(ok, key=lambda p: (p.score, p.lr))
    ok = [p for p in ok if math.isfinite(p.tail_mean)] or ok
    stable = [p for p in ok if p.stable]
    if not stable:
        return min(ok, key=lambda p: (p.tail_mean, p.lr))
    best = min(p.tail_mean for p in stable)
    near = [p for p in stable if p.tail_mean <= best + WITHIN * abs(best)]
    return min(near, key=lambda p: p.lr)


def sweep(cfg_base: RunConfig, lrs: Sequence[float], jobs: int = 2,
          out_dir: str | Path = "results/sweep", name: str = "",
          keep_all: bool = False, selector: Selector = TAIL_MEAN) -> SweepResult:
    """Run `cfg_base` at every step size of `lrs` in `jobs` processes and pick the best."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = name or cfg_base.schedule.method
    cfgs = [dataclasses.replace(cfg_base, lr=lr, out=str(out / ledger_name(name, lr)))
            for lr in sorted(set(lrs))]
    points = parallel_map(_run_pair, [(c, selector) for c in cfgs], jobs)
    return finish(name, points, out, keep_all, selector)


def finish(name: str, points: Sequence[SweepPoint], out: Path, keep_all: bool,
           selector: Selector = TAIL_MEAN) -> SweepResult:
    """Pick the best point, keep its ledger as <out>/<name>.h5, drop the rest (unless kept)."""
    points = sorted(points, key=lambda p: p.lr)
    best = pick(points, selector)
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
    return SweepResult(name, tuple(points), best, str(best_path) if best_path else None,
                       selector)


def refine(cfg_base: RunConfig, center: int, lo: int, hi: int, jobs: int,
           out_dir: str | Path, name: str = "", width: int = 1,
           selector: Selector = TAIL_MEAN) -> SweepResult:
    """Sweep 2^(center-width..center+width) within [2^lo, 2^hi]; while the best is on an edge
    that is not a limit, add the next power of two beyond it (a narrowed grid for costly S)."""
    name = name or cfg_base.schedule.method
    exps = set(range(max(lo, center - width), min(hi, center + width) + 1))
    points: dict[int, SweepPoint] = {}
    while True:
        todo = sorted(exps - set(points))
        if not todo:
            break
        res = sweep(cfg_base, [2.0 ** e for e in todo], jobs, out_dir, name, keep_all=True,
                    selector=selector)
        points.update({lr_exponent(p.lr): p for p in res.points})   # type: ignore[misc]
        best = pick(list(points.values()), selector)
        e = lr_exponent(best.lr) if best else None
        if e is not None and e == min(points) and e > lo:
            exps.add(e - 1)
        elif e is not None and e == max(points) and e < hi:
            exps.add(e + 1)
    return finish(name, list(points.values()), Path(out_dir), keep_all=False,
                  selector=selector)


def summary_markdown(result: SweepResult) -> str:
    """lr, initial, final, score, diverged, seconds; the picked row in bold; the rule."""
    rows = []
    stable = result.selector.kind == "stable"
    for p in result.points:
        mark = "**" if p is result.best else ""
        extra = (fmt(p.final_f), fmt(p.tail_mean), "yes" if p.stable else "no") if stable else ()
        rows.append((f"{mark}{lr_text(p.lr)}{mark}", fmt(p.initial), fmt(p.final),
                     fmt(p.score), *extra, "yes" if p.diverged else "no", f"{p.seconds:.1f}"))
    heads = ("final f", f"tail mean f (last {result.selector.tail:g})", "stable") \
        if stable else ()
    table = markdown_table(("lr", "initial f−f⋆", "final f−f⋆", "score (last 10%)", *heads,
                            "diverged", "seconds"), rows)
    if result.best is None:
        verdict = "every step size diverged: no pick"
    else:
        verdict = f"picked lr = {lr_text(result.best.lr)} (score {fmt(result.best.score, 4)})"
        if stable:
            verdict += f" by the stable rule ({result.selector.describe()})"
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


def collect(lrs: Sequence[float], out: Path, name: str,
            selector: Selector = TAIL_MEAN) -> SweepResult:
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
        points.append(_point(record, lr, str(path), 0.0, selector))
    return finish(name, points, out, keep_all=True, selector=selector)


def _pass_through(argv: Sequence[str]) -> list[str]:
    """The run flags of argv without the sweep's own options."""
    own = {"--jobs": 1, "--out": 1, "--name": 1, "--lr-lo": 1, "--lr-hi": 1, "--index": 1,
           "--keep-all": 0, "--collect": 0, "--json": 0, "--selector": 1, "--tail": 1,
           "--tail-min": 1, "--thresholds": 1}
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
    p.add_argument("--selector", choices=SELECTORS, default="tail-mean",
                   help="how the step size is picked: tail-mean (lowest mean f - f* over the "
                        "last 10%%) or stable (the paper's rule; see --tail, --thresholds) "
                        "(default tail-mean)")
    p.add_argument("--tail", type=float, default=None,
                   help="stable: share of the points the tail statistics use (default 0.2)")
    p.add_argument("--tail-min", type=int_at_least(1), default=1,
                   help="stable: at least this many tail points (default 1)")
    p.add_argument("--thresholds", choices=tuple(THRESHOLDS), default="paper",
                   help="stable: the paper's limits or the looser ones of its LLM runs "
                        "(default paper)")
    args = p.parse_args(argv)
    return guarded(lambda: _main(args, argv))


def selector_of(args: argparse.Namespace) -> Selector:
    """The `Selector` of the sweep flags (`--tail` only with --selector stable)."""
    if args.selector == "tail-mean":
        if args.tail is not None or args.tail_min != 1 or args.thresholds != "paper":
            raise ToolError("--tail, --tail-min and --thresholds: only --selector stable "
                            "uses them")
        return TAIL_MEAN
    return Selector("stable", 0.2 if args.tail is None else args.tail, args.tail_min,
                    THRESHOLDS[args.thresholds])


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    cfg = config_from_args(args, skip=("--out", "--lr"))
    selector = selector_of(args)
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
        point = run_point(dataclasses.replace(cfg, lr=lr, out=str(out / ledger_name(name, lr))),
                          selector)
        print(jsonout.dumps(dataclasses.asdict(point)))
        return 0
    if args.collect:
        result = collect(lrs, out, name, selector)
    else:
        result = sweep(cfg, lrs, args.jobs, out, name, args.keep_all, selector)
    slurm = slurm_lines(_pass_through(argv), args.lr_lo, args.lr_hi, str(out))
    write_summary(result, out, slurm)
    print(jsonout.dumps(result.to_dict()) if args.json
          else summary_markdown(result) + "\n\n" + slurm)
    return 0


def write_summary(result: SweepResult, out: str | Path, extra: str = "") -> Path:
    """<out>/<name>_sweep.md (table, pick, `extra`) and <out>/<name>_sweep.json."""
    out = Path(out)
    write_text(out / f"{result.name}_sweep.json", jsonout.dumps(result.to_dict(), indent=1))
    text = summary_markdown(result) + (f"\n\n{extra}" if extra else "")
    return write_text(out / f"{result.name}_sweep.md", text)
