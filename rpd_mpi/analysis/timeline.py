"""Gantt chart of a run's events, or of a schedule generated from flags; bubble fractions.

Events (EVENT_DTYPE) come from a ledger — unit-time simulator runs: start/end in slots; MPI
runs: seconds since the start — or from a generated timeline (`--method pd --stages 4
--microbatches 8`). One row per rank (stage, and group when G > 1); forwards and backwards
are coloured bars, idle time is the grey background. LocalSGD averages are drawn so that they
show at any zoom: a green vertical line across every row at each average, and for measured
averaging events (op code 3) a green diamond on the rank's row as well. The bubble fraction of
a rank is the share of the run's span [first start, last end] in which it runs no forward or
backward; the table always covers the whole run, whatever the window drawn.

Default window: the whole run when no rank runs more than 40 forwards and backwards; a longer
run (an MPI run is a barcode at full width) is drawn from its start to the end of every
rank's 40th op, extended to the first LocalSGD average; `--window START:END` (slots or
seconds) overrides, `--window all` draws the whole run. The title names the method, order,
S, H, δ and lr of the run (never a path) and the window shown.

    rpd-mpi tool timeline run.h5 --out gantt.png [--window 0:80 | --window all]
    rpd-mpi tool timeline --method localsgd --stages 4 --trajectories 4 --local-steps 2 \
        --microbatches 16 --out gantt.pdf

With a ledger the schedule flags are errors (the ledger says what ran). `--out` is a 200 dpi
PNG by default, or any format matplotlib knows by its extension (.pdf, .svg, ...); its folder
must exist (it is not created).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from rpd_mpi.analysis.common import (FIGURE_HELP, Parser, ToolError, check_figure_file, guarded,
                                     int_at_least, markdown_table, pyplot, run_title, save_figure)
from rpd_mpi.budget import check_timeline
from rpd_mpi.build import schedule_of
from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.engines.sim import sim_events
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.records import AVG, BWD, FWD, RunRecord
from rpd_mpi.schedule.generate import generate
from rpd_mpi.schedule.timeline import Timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes

OPS = {FWD: ("forward", "#4C72B0"), BWD: ("backward", "#DD8452"), AVG: ("average", "#55A868")}
MAX_LABELS = 600          # microbatch numbers are written into bars only below this count
DEFAULT_OPS = 40          # a longer run is drawn up to every rank's DEFAULT_OPS-th op
AVG_COLOR = "#2CA02C"
#: schedule flags (without a ledger) and their defaults
SCHEDULE_FLAGS = {"method": "pd", "stages": 4, "microbatches": 8, "noam": 0, "trajectories": 1,
                  "local_steps": 1, "flush": 0}


def schedule_events(tl: Timeline) -> np.ndarray:
    """The unit-time events of a timeline (start = slot, end = slot + 1)."""
    return sim_events(tl, 1, np.zeros((1, tl.microbatches, tl.stages), dtype=np.int64))


def ledger_events(record: RunRecord, name: str = "ledger") -> tuple[np.ndarray, list[float]]:
    """A ledger's events and, for a unit-time LocalSGD run, the slots where it averaged."""
    events = record.events
    if events.shape[0] == 0:
        raise ToolError(f"{name} has no events (an RPD run has no schedule; draw its PD "
                        f"schedule with --method pd --stages S --microbatches N)")
    averages: list[float] = []
    no_avg_events = not np.any(events["op"] == AVG)
    if record.attrs.get("method") == "localsgd" and no_avg_events:
        try:
            averages = [t + 1.0 for t in schedule_of(RunConfig.from_dict(record.config)).averages]
        except ConfigError as err:
            raise ToolError(f"{name}: its config does not give a schedule: {err}") from None
    return events, averages


def bubble_table(events: np.ndarray) -> list[dict[str, Any]]:
    """Per rank: busy shares of F, B, averaging and the bubble (idle) fraction of the span."""
    t0, t1 = float(events["start"].min()), float(events["end"].max())
    span = max(t1 - t0, 1e-300)
    rows = []
    for rank in np.unique(events["rank"]):
        ev = events[events["rank"] == rank]
        share = {op: float(np.sum((ev["end"] - ev["start"])[ev["op"] == op])) / span
                 for op in OPS}
        rows.append({"rank": int(rank), "group": int(ev["group"][0]),
                     "stage": int(ev["stage"][0]), "forward": share[FWD],
                     "backward": share[BWD], "average": share[AVG],
                     "bubble": 1.0 - share[FWD] - share[BWD],
                     "wait": float(ev["wait"].sum()) / span})
    return rows


def bubble_markdown(rows: list[dict[str, Any]]) -> str:
    """The per-rank table, plus the mean bubble fraction."""
    body = [(r["rank"], r["group"], r["stage"], f"{r['forward']:.3f}", f"{r['backward']:.3f}",
             f"{r['average']:.3f}", f"{r['bubble']:.3f}", f"{r['wait']:.3f}") for r in rows]
    mean = float(np.mean([r["bubble"] for r in rows]))
    return (markdown_table(("rank", "group", "stage", "F", "B", "avg", "bubble", "wait"), body)
            + f"\n\nmean bubble fraction: {mean:.4f}")


def _row_labels(events: np.ndarray) -> tuple[np.ndarray, list[str]]:
    ranks = np.unique(events["rank"])
    groups = np.unique(events["group"])
    labels = []
    for r in ranks:
        ev = events[events["rank"] == r][0]
        labels.append(f"g{ev['group']} s{ev['stage']}" if groups.size > 1 else f"s{ev['stage']}")
    return ranks, labels


def _window(events: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    if window is None:
        return events
    lo, hi = window
    keep = (events["end"] > lo) & (events["start"] < hi)
    if not np.any(keep):
        raise ToolError(f"--window {lo:g}:{hi:g} holds no events (the run spans "
                        f"{events['start'].min():g}..{events['end'].max():g})")
    return events[keep]


def average_times(events: np.ndarray, averages: Sequence[float] = ()) -> list[float]:
    """Where the run averaged: the schedule's averages, else the measured averaging events'
    starts (one time per average: the earliest rank's)."""
    if averages:
        return sorted(float(t) for t in averages)
    avg = events[events["op"] == AVG]
    if avg.shape[0] == 0:
        return []
    starts = np.sort(avg["start"].astype(float))
    ranks = max(1, np.unique(avg["rank"]).size)
    return [float(t) for t in starts[::ranks]]


def default_window(events: np.ndarray, averages: Sequence[float] = (),
                   ops: int = DEFAULT_OPS) -> tuple[float, float] | None:
    """None (the whole run) when no rank runs more than `ops` forwards and backwards; else
    (start, the end of every rank's `ops`-th op), extended past the first average."""
    busy = events[(events["op"] == FWD) | (events["op"] == BWD)]
    if busy.shape[0] == 0:
        return None
    per_rank = [np.sort(busy["end"][busy["rank"] == r].astype(float))
                for r in np.unique(busy["rank"])]
    if max(mine.size for mine in per_rank) <= ops:
        return None
    lo = float(events["start"].min())
    hi = max(float(mine[min(ops, mine.size) - 1]) for mine in per_rank)
    first = next(iter(average_times(events, averages)), None)
    op_len = float(np.median(busy["end"] - busy["start"]))
    if first is not None and first + op_len > hi:
        hi = first + 3 * op_len
    span_end = float(events["end"].max())
    return None if hi >= span_end else (lo, hi)


def window_text(events: np.ndarray, window: tuple[float, float] | None, unit: str) -> str:
    """'slots 0–100 of 1230' / 'seconds 0–0.05 of 0.7' / 'all 14 slots'."""
    t0, t1 = float(events["start"].min()), float(events["end"].max())
    name = "slots" if unit == "slot" else "seconds"
    def num(x: float) -> str:
        return f"{x:.6g}" if unit == "slot" else f"{x:.3g}"

    if window is None:
        return f"all {num(t1 - t0)} {name}"
    return f"{name} {num(window[0])}–{num(window[1])} of {num(t0)}–{num(t1)}"


def plot_gantt(events: np.ndarray, path: str | Path, *, title: str = "",
               averages: Sequence[float] = (), window: tuple[float, float] | None = None,
               unit: str = "slot") -> Path:
    """Draw the Gantt chart of `events` (optionally only `window`) into a figure file."""
    plt = pyplot()
    shown = _window(events, window)
    ranks, labels = _row_labels(events)
    lo = window[0] if window else float(events["start"].min())
    hi = window[1] if window else float(events["end"].max())
    height = 1.0 + 0.38 * len(ranks)
    fig, ax = plt.subplots(figsize=(min(14.0, 4 + 0.12 * (hi - lo)) if unit == "slot" else 10,
                                    height))
    ax.barh(np.arange(len(ranks)), hi - lo, left=lo, height=0.8, color="#E6E6E6",
            label="idle")
    index = {int(r): i for i, r in enumerate(ranks)}
    for op, (name, color) in OPS.items():
        ev = shown[shown["op"] == op]
        if ev.shape[0] and op != AVG:
            ax.barh([index[int(r)] for r in ev["rank"]], ev["end"] - ev["start"],
                    left=ev["start"], height=0.8, color=color, edgecolor="white", lw=0.4,
                    label=name)
    _write_microbatches(ax, shown, index, hi - lo)
    times = [t for t in average_times(events, averages) if lo <= t <= hi]
    for i, t in enumerate(times):
        ax.axvline(t, color=AVG_COLOR, ls="-", lw=2.0, alpha=0.85,
                   label=None if i else "LocalSGD average")
    avg = shown[shown["op"] == AVG]
    if avg.shape[0]:
        ax.barh([index[int(r)] for r in avg["rank"]], avg["end"] - avg["start"],
                left=avg["start"], height=0.8, color=AVG_COLOR)
        ax.scatter(avg["start"], [index[int(r)] for r in avg["rank"]], marker="D", s=28,
                   color=AVG_COLOR, edgecolor="black", lw=0.5, zorder=5,
                   label="averaging (measured)")
    ax.set(yticks=np.arange(len(ranks)), yticklabels=labels, xlim=(lo, hi),
           xlabel="time (slots)" if unit == "slot" else "wall-clock time (seconds)",
           ylabel="rank", title=title)
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / (0.75 * height)), ncol=5,
              fontsize=8, frameon=False)
    return save_figure(fig, path)


def _write_microbatches(ax: Axes, ev: np.ndarray, index: dict[int, int], width: float) -> None:
    busy = ev[(ev["op"] == FWD) | (ev["op"] == BWD)]
    if busy.shape[0] > MAX_LABELS or width <= 0:
        return
    size = 7 if width <= 60 else 5
    for e in busy:
        ax.text((e["start"] + e["end"]) / 2, index[int(e["rank"])], str(int(e["microbatch"])),
                ha="center", va="center", fontsize=size, color="white")


def parse_window(text: str | None) -> tuple[float, float] | None:
    """'A:B' -> (A, B) with A < B; None for no text or 'all'."""
    if not text or text == "all":
        return None
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError:
        raise ToolError(f"--window must be START:END or all (got {text!r})") from None
    if not hi > lo:
        raise ToolError(f"--window end must exceed its start (got {text!r})")
    return lo, hi


def _from_flags(args: argparse.Namespace) -> tuple[np.ndarray, list[float], str]:
    for name, default in SCHEDULE_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    flag, value = ("--microbatches", args.microbatches) if args.microbatches > args.stages \
        else ("--stages", args.stages)
    check_timeline(flag, value, args.method, args.stages, args.microbatches, args.noam,
                   args.trajectories, args.local_steps, args.flush)
    try:
        tl = generate(args.method, args.stages, args.microbatches, noam=args.noam,
                      trajectories=args.trajectories, local_steps=args.local_steps,
                      flush=args.flush)
    except ValueError as err:
        raise ToolError(str(err)) from None
    title = (f"{args.method} S={tl.stages} N={tl.microbatches}"
             + (f" R={tl.trajectories} H={tl.local_steps}" if args.method == "localsgd" else "")
             + f": {tl.slots} slots")
    return schedule_events(tl), [t + 1.0 for t in tl.averages], title


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="timeline", description=__doc__.splitlines()[0])
    p.add_argument("ledger", nargs="?", help="run.h5 (omit to draw a schedule from flags)")
    p.add_argument("--method", choices=("pd", "localsgd", "gpipe", "naive"), default=None,
                   help="schedule to draw without a ledger (default pd)")
    for flag, low in (("--stages", 1), ("--microbatches", 1), ("--noam", 0),
                      ("--trajectories", 1), ("--local-steps", 1), ("--flush", 0)):
        default = SCHEDULE_FLAGS[flag[2:].replace("-", "_")]
        p.add_argument(flag, type=int_at_least(low), default=None,
                       help=f"without a ledger (default {default})")
    p.add_argument("--window", default=None,
                   help="START:END of the time axis to draw (slots, or seconds for an MPI "
                        "run), or all; default: the whole run when no rank runs more than "
                        f"{DEFAULT_OPS} forwards and backwards, else from the start to the end "
                        f"of every rank's {DEFAULT_OPS}th op (extended to the first LocalSGD "
                        "average)")
    p.add_argument("--out", type=Path, default=Path("timeline.png"), help=FIGURE_HELP)
    args = p.parse_args(argv)

    def body() -> int:
        check_figure_file(args.out)
        window = parse_window(args.window)
        given = [n for n in SCHEDULE_FLAGS if getattr(args, n) is not None]
        if args.ledger and given:
            raise ToolError(f"--{given[0].replace('_', '-')}: draws a schedule from flags; "
                            f"with a ledger ({args.ledger}) the ledger says what ran")
        if args.ledger:
            record = read_run(args.ledger)
            events, averages = ledger_events(record, args.ledger)
            unit = "slot" if record.attrs.get("engine") == "sim" else "s"
            title = run_title(record)
        else:
            (events, averages, title), unit = _from_flags(args), "slot"
        if args.window is None:
            window = default_window(events, averages)
        title += f"\n{window_text(events, window, unit)}" + (
            " (default window; --window all draws the whole run)"
            if args.window is None and window else "")
        plot_gantt(events, args.out, title=title, averages=averages, window=window, unit=unit)
        print(bubble_markdown(bubble_table(events)))
        print(f"wrote {args.out}")
        return 0
    return guarded(body)
