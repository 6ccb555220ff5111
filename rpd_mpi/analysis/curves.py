"""Objective curves of several ledgers on one log-y plot: f − f⋆ (f when f⋆ is unknown)
against slots, block updates or wall-clock seconds.

x axes: `slots` is the objective's time column of a unit-time (simulator) ledger; `updates` is
its k column (block updates done); `wall` is the time column of an MPI ledger (seconds since
the start). A simulator ledger has no wall clock and an MPI ledger no slots: asking for them
is an error, not a silent substitute. Non-positive gaps are drawn at the floor 1e-16.

    rpd-mpi tool curves a.h5 b.h5 [--x slots|updates|wall] [--labels A,B] --out curves.png

The folder of `--out` must exist (it is not created).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rpd_mpi.analysis.common import (Parser, ToolError, check_out_file, describe, fmt, gaps,
                                     guarded, markdown_table, pyplot, save_png)
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.records import RunRecord

X_AXES = {"slots": "slots (unit time)", "updates": "block updates k",
          "wall": "wall-clock time (s)"}
FLOOR = 1e-16


@dataclass(frozen=True)
class Curve:
    """One ledger's curve: x, the objective gap, and its legend label."""

    label: str
    x: np.ndarray
    y: np.ndarray
    known_f_star: bool


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
    return Curve(label or describe(record), np.asarray(xs, dtype=float), gaps(record),
                 record.attrs.get("f_star") is not None)


def plot_curves(curves: Sequence[Curve], x: str, path: str | Path, title: str = "",
                styles: Sequence[str] | None = None) -> Path:
    """All curves on one log-y plot; returns the PNG path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, c in enumerate(curves):
        y = np.where(np.isfinite(c.y), np.maximum(c.y, FLOOR), np.nan)
        style = styles[i] if styles else "-"
        ax.plot(c.x, y, style, lw=1.3, label=c.label)
    exact = all(c.known_f_star for c in curves)
    ax.set(yscale="log", xlabel=X_AXES[x], ylabel="f(w) − f⋆" if exact else "f(w)",
           title=title or "objective")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


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
    p.add_argument("--x", choices=tuple(X_AXES), default="slots")
    p.add_argument("--labels", default="", help="comma-separated legend labels")
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, default=Path("curves.png"),
                   help="PNG to write (its folder must exist)")
    args = p.parse_args(argv)

    def body() -> int:
        check_out_file(args.out)
        labels = args.labels.split(",") if args.labels else [""] * len(args.ledgers)
        if len(labels) != len(args.ledgers):
            raise ToolError(f"--labels: {len(labels)} labels for {len(args.ledgers)} ledgers")
        curves = [curve(read_run(path), args.x, label, path)
                  for path, label in zip(args.ledgers, labels)]
        plot_curves(curves, args.x, args.out, args.title)
        print(summary_table(curves, args.ledgers))
        print(f"wrote {args.out}")
        return 0
    return guarded(body)
