"""E1: steady-state delay statistics of the PD 1F1B schedule as a function of S.

For each S the timeline has N = 10 S microbatches (`--per-stage`); `rpd_mpi.schedule.delays.delay_stats`
gives the mean, p10 and max over the second half of the updates and the startup max over the
first half. Least-squares quadratics a S^2 + b S + c are fitted to the mean and the max over
the even S (the paper's closed form S^2 - S/2 is exact for even S). Outputs: a Markdown table
(stdout and `--out`/delays_vs_s.md), JSON and a 200 dpi PNG (log S; the delay axis is
symmetric-log, linear below 1, so that a p10 of 0 at S = 2 is drawn at 0; `--format pdf`
or svg, ... writes delays_vs_s.pdf instead).

    rpd-mpi tool delays_vs_s [--stages 2,4,8] [--out results/E1] [--jobs 2]

`--out DIR` is created if missing; its parent folder must exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from rpd_mpi import jsonout
from rpd_mpi.analysis.common import (Parser, ToolError, check_out_dir, figure_formats, guarded,
                                     int_at_least, markdown_table, parallel_map, pyplot,
                                     save_figure, write_text)
from rpd_mpi.budget import check_timeline
from rpd_mpi.schedule.delays import delay_stats, pd_steady_max
from rpd_mpi.schedule.generate import generate

if TYPE_CHECKING:
    from matplotlib.axes import Axes

ODD_STAGES = (3, 5, 7, 9, 15, 31, 63, 127)
DEFAULT_STAGES = tuple(sorted(set(range(2, 129, 2)) | set(ODD_STAGES)))
COLUMNS = ("steady_mean", "steady_p10", "steady_max", "startup_max")
MAX_VALUES = 4096         # distinct S one call may ask for


@dataclass(frozen=True)
class Fit:
    """a S^2 + b S + c, fitted by least squares over `stages`."""

    a: float
    b: float
    c: float
    stages: tuple[int, ...]

    def __call__(self, s: np.ndarray) -> np.ndarray:
        y: np.ndarray = self.a * s * s + self.b * s + self.c
        return y

    def text(self) -> str:
        a, b, c = (round(x, 4) + 0.0 for x in (self.a, self.b, self.c))
        return f"{a:.4f}·S² {b:+.4f}·S {c:+.4f}"


def stats_for(stages: int, per_stage: int = 10) -> dict[str, Any]:
    """delay_stats of the PD timeline with N = per_stage * S, plus the closed form."""
    row = delay_stats(generate("pd", stages, per_stage * stages))
    row["formula_max"] = pd_steady_max(stages)
    return row


def delay_table(stages: Sequence[int], per_stage: int = 10, jobs: int = 1
                ) -> list[dict[str, Any]]:
    """One `stats_for` row per S (computed in `jobs` processes, largest S first)."""
    order = sorted(stages, reverse=True)
    rows = parallel_map(_stats_default if per_stage == 10 else _Stats(per_stage), order, jobs)
    return sorted(rows, key=lambda r: r["stages"])


def _stats_default(stages: int) -> dict[str, Any]:
    return stats_for(stages)


@dataclass(frozen=True)
class _Stats:
    per_stage: int

    def __call__(self, stages: int) -> dict[str, Any]:
        return stats_for(stages, self.per_stage)


def quadratic_fit(stages: Sequence[int], values: Sequence[float]) -> Fit:
    """Least-squares a S^2 + b S + c through (stages, values); needs 3 distinct S."""
    s = np.asarray(stages, dtype=float)
    if np.unique(s).size < 3:
        raise ToolError(f"a quadratic fit needs at least 3 distinct S (got {sorted(set(stages))})")
    design = np.stack([s * s, s, np.ones_like(s)], axis=1)
    coef = np.linalg.lstsq(design, np.asarray(values, dtype=float), rcond=None)[0]
    return Fit(float(coef[0]), float(coef[1]), float(coef[2]), tuple(int(x) for x in stages))


def fits(rows: list[dict[str, Any]]) -> dict[str, Fit]:
    """Fits of the mean and the max over the even S (all S when fewer than 3 are even)."""
    even = [r for r in rows if r["stages"] % 2 == 0]
    use = even if len({r["stages"] for r in even}) >= 3 else rows
    s = [r["stages"] for r in use]
    return {"steady_mean": quadratic_fit(s, [r["steady_mean"] for r in use]),
            "steady_max": quadratic_fit(s, [r["steady_max"] for r in use])}


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """S, mean, p10, max, S^2 - S/2, match, startup max."""
    body = [(r["stages"], f"{r['steady_mean']:.2f}", f"{r['steady_p10']:.1f}",
             r["steady_max"], r["formula_max"],
             "yes" if r["steady_max"] == r["formula_max"] else "**no**", r["startup_max"])
            for r in rows]
    return markdown_table(("S", "mean", "p10", "max", "⌊S²−S/2⌋", "max = formula",
                           "startup max"), body)


def plot(rows: list[dict[str, Any]], fitted: dict[str, Fit], path: str | Path) -> Path:
    """The four statistics vs S with the fitted quadratics dashed: log x, and a symmetric-log
    y axis (linear below 1 block update, log above) so that a p10 of 0 (S = 2) is drawn at 0
    instead of dropping off a log axis."""
    plt = pyplot()
    s = np.array([r["stages"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4.6))
    styles = {"steady_max": ("max", "C3", "o"), "startup_max": ("startup max", "C1", "^"),
              "steady_mean": ("mean", "C0", "s"), "steady_p10": ("p10", "C2", "v")}
    for key, (label, color, marker) in styles.items():
        ax.plot(s, [r[key] for r in rows], marker, color=color, ms=3.5, label=label)
    grid = np.geomspace(s.min(), s.max(), 200)
    for key, fit in fitted.items():
        name = "max" if key == "steady_max" else "mean"
        ax.plot(grid, fit(grid), "--", color="k" if name == "max" else "0.5", lw=1,
                label=f"fit {name}: {fit.text()}")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0, linscale=0.5)
    ax.set(xlabel="stages S", ylabel="global delay (block updates; linear below 1)",
           title="PD 1F1B delays, steady state (N = 10 S)")
    ax.set_ylim(bottom=-0.2)
    power_ticks(ax, s)
    symlog_ticks(ax, max(float(r["startup_max"]) for r in rows))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def symlog_ticks(ax: Axes, top: float) -> None:
    """y ticks 0, 1, 10, 100, ... up to `top`, labelled as plain numbers; no minor labels."""
    from matplotlib.ticker import NullFormatter
    ticks = [0.0] + [10.0 ** e for e in range(0, 12) if 10.0 ** e <= 10 * top]
    ax.set_yticks(ticks, ["0"] + [str(int(t)) for t in ticks[1:]])
    ax.yaxis.set_minor_formatter(NullFormatter())


def power_ticks(ax: Axes, s: np.ndarray) -> None:
    """x ticks at the powers of two inside the range of `s`, labelled as integers."""
    ticks = [2 ** e for e in range(0, 12) if s.min() <= 2 ** e <= s.max()]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xticks([], minor=True)


def parse_stages(text: str) -> list[int]:
    """'2,4,8' or '2-16' or '2-16:2' (step) -> sorted distinct S >= 1."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                span, _, step = part.partition(":")
                lo, hi = (int(x) for x in span.split("-"))
                values = range(lo, hi + 1, int(step or 1))
                if len(values) > MAX_VALUES:
                    raise ToolError(f"--stages: at most {MAX_VALUES} values (got {text!r})")
                out.update(values)
            elif part:
                out.add(int(part))
        except ValueError:
            raise ToolError(f"--stages: expected e.g. 2,4,8 or 2-128:2 (got {text!r})") from None
    if not out or min(out) < 1:
        raise ToolError(f"--stages: every S must be >= 1 (got {text!r})")
    return sorted(out)


def run(stages: Sequence[int], out: Path | None, per_stage: int = 10, jobs: int = 1,
        figure: str = "png") -> tuple[list[dict[str, Any]], dict[str, Fit], str]:
    """Compute, fit, and (with `out`) write delays_vs_s.{md,json} and the figure
    delays_vs_s.<figure> (png, pdf, svg, ...); returns the parts."""
    rows = delay_table(stages, per_stage, jobs)
    fitted = fits(rows)
    text = table_markdown(rows) + "\n\n" + "\n".join(
        f"- fit of the {k.split('_')[1]} over S = {min(f.stages)}..{max(f.stages)} "
        f"({len(f.stages)} values): {f.text()}" for k, f in fitted.items())
    if out is not None:
        write_text(out / "delays_vs_s.md", text)
        payload = {"rows": [{k: r[k] for k in ("stages", *COLUMNS, "formula_max")}
                            for r in rows],
                   "fits": {k: {"a": f.a, "b": f.b, "c": f.c, "stages": list(f.stages)}
                            for k, f in fitted.items()}}
        write_text(out / "delays_vs_s.json", jsonout.dumps(payload, indent=1))
        plot(rows, fitted, out / f"delays_vs_s.{figure}")
    return rows, fitted, text


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="delays_vs_s", description=__doc__.splitlines()[0])
    p.add_argument("--stages", default=None,
                   help="S values: '2,4,8', '2-128:2' (default: every even S <= 128 and "
                        f"{', '.join(map(str, ODD_STAGES))})")
    p.add_argument("--per-stage", type=int_at_least(1), default=10,
                   help="microbatches per stage (N/S)")
    p.add_argument("--out", type=Path, default=None, help="folder for .md/.json and the "
                   "figure (created if missing; its parent must exist)")
    p.add_argument("--format", default="png", dest="figure_format",
                   help="the figure's format, any matplotlib knows: png (200 dpi, default), "
                        "pdf, svg, eps, ...")
    p.add_argument("--jobs", type=int_at_least(1), default=1, help="worker processes")
    args = p.parse_args(argv)

    def body() -> int:
        stages = parse_stages(args.stages) if args.stages else list(DEFAULT_STAGES)
        S = max(stages)
        flag, value = ("--per-stage", args.per_stage) if args.per_stage > S else ("--stages", S)
        check_timeline(flag, value, "pd", S, args.per_stage * S)
        ext = args.figure_format.lower().lstrip(".")
        if ext not in figure_formats():
            raise ToolError(f"--format must be one of {', '.join(sorted(figure_formats()))} "
                            f"(got {args.figure_format!r})")
        if args.out is not None:
            check_out_dir(args.out)
        _, _, text = run(stages, args.out, args.per_stage, args.jobs, ext)
        print(text)
        return 0
    return guarded(body)
