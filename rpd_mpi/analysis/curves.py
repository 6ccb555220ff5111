"""Objective curves of several ledgers on one plot: f − f⋆ (f when f⋆ is unknown) against
slots, block updates or wall-clock seconds; the mean and a band where several seeds exist.

x axes: `slots` is the objective's time column of a unit-time (simulator) ledger; `updates` is
its k column (block updates done); `wall` is the time column of an MPI ledger (seconds since
the start). A simulator ledger has no wall clock and an MPI ledger no slots: asking for them
is an error, not a silent substitute. The y axis is logarithmic (non-positive gaps are drawn
at the floor 1e-16), except for the character LM, whose training loss (nats/char) is drawn on
a linear axis; `--yscale` overrides.

Ledgers of the same configuration that differ only in the seed are drawn as one curve: the
mean over the seeds with a band (min–max, or ± one standard deviation with `--band std`);
`--separate` draws every ledger on its own. Legends name the method (and, for MPI runs of PD,
the order: static or dynamic), S, H (LocalSGD), δ (RPD) and the step size; the default title
names what the curves share (objective, size, S, clock), never a file path.

    rpd-mpi tool curves a.h5 b.h5 [--x slots|updates|wall] [--labels A,B] --out curves.png
    rpd-mpi tool curves seed0.h5 seed1.h5 seed2.h5 --out curves.pdf     # mean and band

`--out` is a 200 dpi PNG by default, or any format matplotlib knows by its extension (.pdf,
.svg, ...); its folder must exist (it is not created).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rpd_mpi.analysis.common import (FIGURE_HELP, Parser, ToolError, check_figure_file, describe,
                                     fmt, gaps, guarded, markdown_table, problem_text, pyplot,
                                     save_figure, tidy_log_axis)
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.records import RunRecord

X_AXES = {"slots": "time (slots, unit-time simulator)", "updates": "block updates k",
          "wall": "wall-clock time (seconds)"}
FLOOR = 1e-16
BANDS = ("minmax", "std")
LOSS_LABEL = "training loss (nats/char)"


@dataclass(frozen=True)
class Curve:
    """One curve: x, the objective gap (the mean over seeds for a merged curve), its legend
    label, and for a merged curve the band [low, high] and the seeds it averages."""

    label: str
    x: np.ndarray
    y: np.ndarray
    known_f_star: bool
    objective: str = ""
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    seeds: tuple[int, ...] = ()


def curve(record: RunRecord, x: str, label: str = "", name: str = "ledger") -> Curve:
    """The (x, f - f*) points of one ledger; ToolError if it has no such x axis."""
    if x not in X_AXES:
        raise ToolError(f"--x must be one of {', '.join(X_AXES)} (got {x!r})")
    simulated = record.attrs.get("engine") == "sim"
    if x == "wall" and simulated:
        raise ToolError(f"{name} is a unit-time simulator run: it has no wall-clock time "
                        f"(use --x slots or --x updates)")
    if x == "slots" and not simulated:
        raise ToolError(f"{name} is an MPI run: its time is in seconds (use --x wall)")
    xs = record.objective.k if x == "updates" else record.objective.time
    seed = record.attrs.get("seed")
    return Curve(label or describe(record), np.asarray(xs, dtype=float), gaps(record),
                 record.attrs.get("f_star") is not None, str(record.attrs.get("objective", "")),
                 seeds=(int(seed),) if seed is not None else ())


def config_key(record: RunRecord) -> str:
    """What a run is, but for its seed and output path: runs with equal keys are seeds of one
    configuration."""
    cfg = {k: v for k, v in record.config.items() if k not in ("seed", "out", "force")}
    return json.dumps([cfg, record.attrs.get("engine")], sort_keys=True, default=str)


def merge_seeds(curves: Sequence[Curve], band: str = "minmax") -> Curve:
    """The mean of several seeds' curves with a band (min–max or ± std) on a common x grid:
    the x of the curve with the fewest points, within the range every curve covers (measured
    runs are interpolated linearly; unit-time runs of one configuration share their x)."""
    if len(curves) == 1:
        return curves[0]
    if band not in BANDS:
        raise ToolError(f"--band must be one of {', '.join(BANDS)} (got {band!r})")
    if all(c.x.shape == curves[0].x.shape and np.array_equal(c.x, curves[0].x) for c in curves):
        grid = curves[0].x
        ys = np.stack([c.y for c in curves])
    else:
        lo = max(float(c.x[0]) for c in curves)
        hi = min(float(c.x[-1]) for c in curves)
        base = min(curves, key=lambda c: c.x.size).x
        grid = base[(base >= lo) & (base <= hi)]
        if grid.size == 0:
            raise ToolError("the seeds' curves share no x range")
        ys = np.stack([np.interp(grid, c.x, c.y) for c in curves])
    mean = ys.mean(axis=0)
    if band == "std":
        sd = ys.std(axis=0)
        low, high, what = mean - sd, mean + sd, "± std"
    else:
        low, high, what = ys.min(axis=0), ys.max(axis=0), "min–max"
    seeds = tuple(s for c in curves for s in c.seeds)
    return Curve(f"{curves[0].label}, mean of {len(curves)} seeds (band {what})", grid, mean,
                 all(c.known_f_star for c in curves), curves[0].objective, low, high, seeds)


def group_seeds(records: Sequence[RunRecord], curves: Sequence[Curve], band: str = "minmax"
                ) -> list[Curve]:
    """One curve per configuration (first-seen order): seeds of one configuration merged; a
    group in which a seed repeats (the same run twice) is drawn curve by curve."""
    groups: dict[str, list[Curve]] = {}
    for rec, c in zip(records, curves):
        groups.setdefault(config_key(rec), []).append(c)
    out: list[Curve] = []
    for g in groups.values():
        seeds = [s for c in g for s in c.seeds]
        out.extend([merge_seeds(g, band)] if len(set(seeds)) == len(g) else g)
    return out


def curves_title(records: Sequence[RunRecord]) -> str:
    """What every run shares: objective and size, S (when equal), the clock."""
    problems = {problem_text(r) for r in records}
    stages = {r.attrs.get("stages") for r in records}
    sim = {r.attrs.get("engine") == "sim" for r in records}
    parts = [problems.pop() if len(problems) == 1 else "objective"]
    if len(stages) == 1:
        parts.append(f"S={stages.pop()}")
    if len(sim) == 1:
        parts.append("simulated (unit time)" if sim.pop() else "MPI (wall clock)")
    return ", ".join(parts)


def y_scale(curves: Sequence[Curve], yscale: str = "auto") -> str:
    """'linear' for the character LM's loss (and when asked), else 'log'."""
    if yscale != "auto":
        return yscale
    return "linear" if curves and all(c.objective == "charlm" for c in curves) else "log"


def plot_curves(curves: Sequence[Curve], x: str, path: str | Path, title: str = "",
                styles: Sequence[str] | None = None, yscale: str = "auto") -> Path:
    """All curves on one plot (bands shaded); returns the figure's path."""
    plt = pyplot()
    scale = y_scale(curves, yscale)
    fig, ax = plt.subplots(figsize=(7, 4.6))

    def shown(y: np.ndarray) -> np.ndarray:
        y = np.where(np.isfinite(y), y, np.nan)
        return np.maximum(y, FLOOR) if scale == "log" else y

    for i, c in enumerate(curves):
        style = styles[i] if styles else "-"
        (line,) = ax.plot(c.x, shown(c.y), style, lw=1.3, label=c.label)
        if c.low is not None and c.high is not None:
            ax.fill_between(c.x, shown(c.low), shown(c.high), color=line.get_color(),
                            alpha=0.2, lw=0)
    exact = all(c.known_f_star for c in curves)
    if curves and all(c.objective == "charlm" for c in curves):
        ylabel = LOSS_LABEL
    else:
        ylabel = "f(w) − f⋆" if exact else "f(w)"
    ax.set(yscale=scale, xlabel=X_AXES[x], ylabel=ylabel, title=title or "objective")
    if scale == "log":
        tidy_log_axis(ax)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def summary_table(curves: Sequence[Curve], names: Sequence[str]) -> str:
    """ledger, label, points, first and final gap, minimum gap."""
    rows = []
    for name, c in zip(names, curves):
        finite = c.y[np.isfinite(c.y)]
        rows.append((name, c.label, int(c.y.size), fmt(c.y[0]), fmt(c.y[-1]),
                     fmt(finite.min()) if finite.size else "nan"))
    return markdown_table(("ledger", "label", "points", "first", "final", "min"), rows)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="curves", description=__doc__.splitlines()[0])
    p.add_argument("ledgers", nargs="+", help="run.h5 files")
    p.add_argument("--x", choices=tuple(X_AXES), default="slots",
                   help="x axis: slots (simulator), updates (block updates k) or wall "
                        "(seconds, MPI runs) (default slots)")
    p.add_argument("--labels", default="", help="comma-separated legend labels, one per "
                   "ledger (default: method, order, S, H, δ and lr of each run)")
    p.add_argument("--title", default="", help="figure title (default: the objective, size, "
                   "S and clock the runs share)")
    p.add_argument("--yscale", choices=("auto", "log", "linear"), default="auto",
                   help="y axis (default auto: linear for the char LM's loss, else log)")
    p.add_argument("--band", choices=BANDS, default="minmax",
                   help="band around the mean of several seeds: minmax or std (default minmax)")
    p.add_argument("--separate", action="store_true",
                   help="one curve per ledger, even for seeds of one configuration")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help=FIGURE_HELP)
    args = p.parse_args(argv)

    def body() -> int:
        check_figure_file(args.out)
        labels = args.labels.split(",") if args.labels else [""] * len(args.ledgers)
        if len(labels) != len(args.ledgers):
            raise ToolError(f"--labels: {len(labels)} labels for {len(args.ledgers)} ledgers")
        records = [read_run(path) for path in args.ledgers]
        curves = [curve(rec, args.x, label, path)
                  for rec, path, label in zip(records, args.ledgers, labels)]
        drawn = curves if args.separate else group_seeds(records, curves, args.band)
        plot_curves(drawn, args.x, args.out, args.title or curves_title(records),
                    yscale=args.yscale)
        print(summary_table(curves, args.ledgers))
        merged = [c for c in drawn if len(c.seeds) > 1]
        for c in merged:
            print(f"{c.label}: seeds {', '.join(map(str, c.seeds))}")
        print(f"wrote {args.out}")
        return 0
    return guarded(body)
