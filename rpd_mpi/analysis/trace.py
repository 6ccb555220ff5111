"""Chrome trace of a run's events for Perfetto or chrome://tracing: `rpd-mpi tool trace`.

    rpd-mpi tool trace run.h5 --out trace.json

Writes the Trace Event Format's JSON object form ({"traceEvents": [...], ...}):

- one process (track) per rank, named by metadata events "rank R (group g, stage s)";
- every ledger event (F, B, LocalSGD avg, idle where recorded) as one complete event
  ("ph": "X", category "op") on its rank's track, ts and dur in microseconds, with args
  microbatch, version, wait (ledger units) and wait_us, bytes, trajectory, group, stage;
- for RPD runs, one more track, "RPD iterations", with one complete event per iteration k
  (category "iteration": from its first F to its last B when the run has events, otherwise
  the slot before the update's completion time), args k, stage, batch, delays, loss;
  overlapping (pipelined) iterations go to separate lanes (threads) of that track, since a
  track's complete events must nest.

Measured (MPI) ledgers use their seconds (1 s = 1e6 us, rank 0's clock). Simulator ledgers
are on the unit-time clock: 1 slot is drawn as 1000 us (1 ms), and `otherData.clock` says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from rpd_mpi.analysis.common import Parser, check_out_file, guarded
from rpd_mpi.api import Run, open_run
from rpd_mpi.ledger.schema import OP_CODES
from rpd_mpi.records import BWD, FWD

SLOT_US = 1000.0              # one unit-time slot of a simulator ledger, in microseconds
SECOND_US = 1e6


def scale_of(run: Run) -> tuple[float, str]:
    """Microseconds per ledger time unit, and the sentence saying what the clock is."""
    if run.time_units == "slots":
        return SLOT_US, (f"simulator ledger on the unit-time clock: 1 slot is drawn as "
                         f"{SLOT_US:g} us (not a measured time)")
    return SECOND_US, "measured seconds since the run's common start (rank 0's clock)"


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def rank_tracks(events: np.ndarray) -> list[dict[str, Any]]:
    """Metadata events naming and ordering one track per rank."""
    out: list[dict[str, Any]] = []
    for rank in np.unique(events["rank"]):
        first = events[events["rank"] == rank][0]
        name = f"rank {int(rank)} (group {int(first['group'])}, stage {int(first['stage'])})"
        out += [{"name": "process_name", "ph": "M", "pid": int(rank), "tid": 0,
                 "args": {"name": name}},
                {"name": "process_sort_index", "ph": "M", "pid": int(rank), "tid": 0,
                 "args": {"sort_index": int(rank)}},
                {"name": "thread_name", "ph": "M", "pid": int(rank), "tid": 0,
                 "args": {"name": "ops"}}]
    return out


def op_events(events: np.ndarray, scale: float) -> list[dict[str, Any]]:
    """One complete event per ledger event."""
    out = []
    for ev in events:
        start, end, wait = float(ev["start"]), float(ev["end"]), float(ev["wait"])
        op = int(ev["op"])
        out.append({
            "name": OP_CODES.get(str(op), f"op {op}"), "cat": "op", "ph": "X",
            "pid": int(ev["rank"]), "tid": 0, "ts": start * scale,
            "dur": max(0.0, (end - start) * scale),
            "args": {"microbatch": int(ev["microbatch"]), "version": int(ev["version"]),
                     "wait": _num(wait), "wait_us": _num(wait * scale),
                     "bytes": int(ev["bytes"]), "trajectory": int(ev["trajectory"]),
                     "group": int(ev["group"]), "stage": int(ev["stage"])}})
    return out


def iteration_events(run: Run, scale: float, pid: int) -> list[dict[str, Any]]:
    """RPD: one complete event per iteration k on its own track (see the module doc)."""
    upd, events = run.updates, run.events
    spans: dict[int, tuple[float, float]] = {}
    ops = events[np.isin(events["op"], (FWD, BWD))] if events.size else events
    for ev in ops:
        k = int(ev["microbatch"])
        lo, hi = spans.get(k, (math.inf, -math.inf))
        spans[k] = (min(lo, float(ev["start"])), max(hi, float(ev["end"])))
    out: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
         "args": {"name": "RPD iterations"}},
        {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
         "args": {"sort_index": pid}}]
    lanes: list[float] = []              # end time of the last iteration in each lane
    for k in range(len(upd)):
        end = float(upd.time[k])
        start, stop = spans.get(k, (end - 1.0 if run.time_units == "slots" else end, end))
        lane = next((i for i, busy in enumerate(lanes) if busy <= start), len(lanes))
        if lane == len(lanes):
            lanes.append(stop)
            out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": lane,
                        "args": {"name": f"lane {lane}"}})
        lanes[lane] = stop
        out.append({
            "name": f"iteration {k}", "cat": "iteration", "ph": "X", "pid": pid, "tid": lane,
            "ts": start * scale, "dur": max(0.0, (stop - start) * scale),
            "args": {"k": k, "stage": int(upd.stage[k]), "batch": int(upd.batch[k]),
                     "delays": [int(d) for d in upd.delays[k]],
                     "loss": _num(float(upd.loss[k]))}})
    return out


def chrome_trace(run: Run) -> dict[str, Any]:
    """The whole trace as a JSON-ready object."""
    scale, clock = scale_of(run)
    events = run.events
    trace = rank_tracks(events) + op_events(events, scale)
    if run.attrs.get("method") == "rpd":
        pid = int(events["rank"].max()) + 1 if events.size else 0
        trace += iteration_events(run, scale, pid)
    attrs = run.attrs
    return {
        "traceEvents": trace, "displayTimeUnit": "ms",
        "otherData": {"ledger": str(run.path), "clock": clock, "time_units": run.time_units,
                      "us_per_time_unit": scale, "method": attrs.get("method"),
                      "engine": attrs.get("engine"), "order": attrs.get("order"),
                      "stages": attrs.get("stages"), "groups": attrs.get("groups"),
                      "events": int(events.size), "updates": len(run.updates),
                      "created": attrs.get("created", ""),
                      "git_commit": attrs.get("git_commit", "")},
    }


def write_trace(ledger: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the trace of `ledger` to `out`; returns it."""
    trace = chrome_trace(open_run(ledger))
    with open(out, "w", encoding="utf-8") as f:
        json.dump(trace, f, allow_nan=False, separators=(",", ":"))
    return trace


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="rpd-mpi tool trace", description=__doc__.splitlines()[0])
    p.add_argument("ledger", help="run.h5 (simulator or MPI)")
    p.add_argument("--out", type=Path, default=Path("trace.json"),
                   help="trace file to write (.json; default trace.json); open it in "
                        "https://ui.perfetto.dev or chrome://tracing")
    args = p.parse_args(argv)

    def body() -> int:
        check_out_file(args.out, suffix=".json")
        trace = write_trace(args.ledger, args.out)
        ops = sum(1 for e in trace["traceEvents"] if e.get("cat") == "op")
        print(f"wrote {args.out}: {ops} op events on "
              f"{len({e['pid'] for e in trace['traceEvents'] if e.get('cat') == 'op'})} "
              f"rank tracks ({trace['otherData']['clock']})")
        return 0
    return guarded(body)
