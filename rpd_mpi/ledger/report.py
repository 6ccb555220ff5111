"""Summaries of one run: `RunRecord` in, a dict of plain Python values out (pure: no h5py).

`summarize` owns the meaning of every number `rpd-mpi report` prints; `format_summary`
renders it as text. The keys of the dict are stable (the CLI's `--json` contract):

    method, stages, groups, trajectories, engine, objective   run identity (from attrs)
    updates              K, the number of block updates
    slots                T of the unit-time timeline, or None when the run has none
    budget_slots         the slot budget T of --budget-slots, or None without one
    budget_protocol      how that budget picked the run: smallest (smallest N reaching T, cut
                         at T), fixed (the given N cut at T) or untruncated (smallest N, run
                         to its end); None without a budget
    wall_time            max event end - min event start (seconds in MPI runs), or None
    final_objective      last objective value, or None
    final_gap            final_objective - attrs["f_star"], or None when f_star is unknown
                         (charlm: final_objective is the training loss, nats per character,
                         on fixed windows of the training split)
    final_validation     charlm with a validation split: the last held-out loss (nats per
                         character, /objective/validation), else None
    final_validation_bits  the same in bits per character
    tokens_per_second    charlm: characters trained on (microbatches through the last stage x
                         batch size x context) per second of wall time (MPI: measured events;
                         simulator: attribute run_seconds, objective evaluations included)
    steady_max_delay     max of the delays (all stages) over the second half of the updates
    steady_mean_delay    mean of the same entries
    max_local_staleness  max local staleness over all updates
    utilization          simulator: busy cells / (T*S) of the timeline; MPI: measured,
                         sum of event durations (end - start, IDLE rows excluded) /
                         (ranks * wall_time), ranks = stages * groups
    mean_loss_last10pct  mean last-stage loss of the last ceil(K/10) updates
    unit_utilization     busy cells / (T*S) of the unit-time timeline (None without one)
    unit_steady_max_delay, unit_steady_mean_delay
                         the same delay statistics computed on the unit-time timeline, to
                         set next to the measured ones of an MPI run
    stage_utilization    MPI: per stage (stage 0 first, summed over groups) busy / wall
    partition            units (charlm) or coordinates per stage, or None (older ledgers)
    stage_parameters     parameters of each stage, or None
    predicted_stage_utilization
                         --partition auto: each stage's busy fraction predicted from the
                         profiled unit costs (`objectives.partition`), else None
    stage_bubble_time    MPI: per stage, seconds neither computing nor averaging (wall - busy)
    stage_wait_time      MPI: per stage, seconds blocked waiting for a message
    allreduce_time       MPI: seconds in LocalSGD averaging (AVG events), summed over ranks

Values that cannot be computed (no updates, no events, ...) are None. Floats may be nan/inf
for a diverged run (`status` says so); `rpd_mpi.jsonout` writes them as null.
"""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np

from rpd_mpi.records import AVG, FWD, IDLE, RunRecord
from rpd_mpi.schedule.delays import steady_max_mean, update_order
from rpd_mpi.schedule.timeline import Timeline, busy_fraction

SUMMARY_KEYS = (
    "method", "stages", "groups", "trajectories", "engine", "objective", "status", "updates",
    "slots", "budget_slots", "budget_protocol",
    "wall_time", "final_objective", "final_gap", "final_validation", "final_validation_bits",
    "tokens_per_second", "steady_max_delay", "steady_mean_delay",
    "max_local_staleness", "utilization", "mean_loss_last10pct",
    "unit_utilization", "unit_steady_max_delay", "unit_steady_mean_delay",
    "stage_utilization", "stage_bubble_time", "stage_wait_time", "allreduce_time",
    "partition", "stage_parameters", "predicted_stage_utilization",
)


def _plain(value: Any) -> Any:
    """A JSON-serialisable plain Python value (numpy scalars unwrapped)."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _status(record: RunRecord) -> str:
    """complete, stopped (by SIGTERM ...), or diverged (at update k: what = value)."""
    a = record.attrs
    status = str(a.get("status") or "complete")
    if status == "stopped":
        status += f" by {a.get('stopped_by')} after {len(record.updates)} updates"
    if status == "incomplete":        # assembled from the parts of a killed or crashed run
        status += f" ({a.get('missing')})"
    if status == "diverged":
        status += (f" at update {a.get('diverged_update')}: {a.get('diverged_what')} = "
                   f"{a.get('diverged_value')} (stage {a.get('diverged_stage')}, microbatch "
                   f"{a.get('diverged_microbatch')})")
    resumed = int(a.get("resumed") or 0)
    if resumed:                       # continued from checkpoints (rpd_mpi.checkpoint)
        status += f", resumed {resumed}x"
    return status


def _stages(record: RunRecord) -> int:
    if record.attrs.get("stages") is not None:
        return int(record.attrs["stages"])
    if record.updates.delays.ndim == 2 and record.updates.delays.shape[1]:
        return int(record.updates.delays.shape[1])
    return len(record.final_blocks)


def _wall_time(events: np.ndarray) -> float | None:
    if events.shape[0] == 0:
        return None
    return float(events["end"].max() - events["start"].min())


def _unit_utilization(record: RunRecord) -> float | None:
    kind = record.timeline_kind
    return busy_fraction(kind) if kind is not None and kind.size else None


def _utilization(record: RunRecord, ranks: int, wall: float | None) -> float | None:
    if record.attrs.get("engine") == "sim" or not record.events.size:
        return _unit_utilization(record)
    if wall is None or wall <= 0 or ranks <= 0:
        return None
    events = record.events[record.events["op"] != IDLE]
    busy = float(np.sum(events["end"] - events["start"]))
    return busy / (ranks * wall)


def _delay_stats(record: RunRecord) -> tuple[int | None, float | None]:
    return steady_max_mean(record.updates.delays)


def _final_values(record: RunRecord) -> tuple[float | None, float | None]:
    values = record.objective.value
    if values.shape[0] == 0:
        return None, None
    final = float(values[-1])
    f_star = record.attrs.get("f_star")
    gap = None if f_star is None else final - float(f_star)
    return final, gap


def _validation(record: RunRecord) -> tuple[float | None, float | None]:
    """(last held-out loss in nats, in bits) per character, or (None, None)."""
    held = record.objective.validation
    if held is None or not np.size(held):
        return None, None
    final = float(np.asarray(held)[-1])
    return final, final / math.log(2.0)


def _tokens_per_second(record: RunRecord, wall: float | None) -> float | None:
    """Characters trained on per wall second (charlm), None when it cannot be told."""
    obj = record.config.get("objective", {}) if isinstance(record.config, dict) else {}
    if record.attrs.get("objective") != "charlm" or not isinstance(obj, dict):
        return None
    seconds = wall if record.attrs.get("engine") != "sim" else record.attrs.get("run_seconds")
    ev, last = record.events, _stages(record) - 1
    if not seconds or seconds <= 0 or not ev.size:
        return None
    forwards = int(np.count_nonzero((ev["op"] == FWD) & (ev["stage"] == last)))
    tokens = forwards * int(obj.get("batch_size") or 0) * int(obj.get("context") or 0)
    return tokens / float(seconds) if tokens else None


def _budget(record: RunRecord) -> tuple[int | None, str | None]:
    """(budget T, protocol) from the stored configuration (a ledger written before the
    protocols were named ran `smallest`)."""
    schedule = record.config.get("schedule", {}) if isinstance(record.config, dict) else {}
    budget = int(schedule.get("budget_slots") or 0)
    if not budget:
        return None, None
    return budget, str(schedule.get("budget_mode") or "smallest")


def _last_loss_mean(record: RunRecord) -> float | None:
    n = len(record.updates)
    if n == 0:
        return None
    tail = max(1, math.ceil(n / 10))
    return float(np.mean(record.updates.loss[n - tail:]))


def _slots(record: RunRecord) -> int | None:
    """Unit-time length: the timeline's, or (RPD) the clock of its last update."""
    if record.timeline_kind is not None:
        return int(record.timeline_kind.shape[0])
    if record.attrs.get("engine") == "sim" and len(record.updates):
        return int(record.updates.time[-1])
    return None


def _unit_delays(record: RunRecord) -> tuple[int | None, float | None]:
    """Steady-state delay statistics of the stored unit-time timeline."""
    if record.timeline_kind is None:
        return None, None
    a = record.attrs
    mb = cast(np.ndarray, record.timeline_mb)     # written together with timeline_kind
    tl = Timeline(record.timeline_kind, mb, a.get("method", "pd"),
                  int(mb.max()) + 1, int(a.get("trajectories") or 1),
                  int(a.get("local_steps") or 1), flush=int(a.get("flush") or 0))
    return steady_max_mean(update_order(tl).delays)


def _per_stage(record: RunRecord, stages: int, wall: float | None) -> dict[str, Any]:
    """Measured per-stage utilization, bubble and wait time (MPI runs only)."""
    ev = record.events
    if record.attrs.get("engine") == "sim" or not ev.size or not wall:
        return {"stage_utilization": None, "stage_bubble_time": None,
                "stage_wait_time": None, "allreduce_time": None}
    groups = int(record.attrs.get("groups") or 1)
    busy_ev = ev[ev["op"] != IDLE]
    busy = np.bincount(busy_ev["stage"], busy_ev["end"] - busy_ev["start"], minlength=stages)
    wait = np.bincount(ev["stage"], ev["wait"], minlength=stages)
    avg = ev[ev["op"] == AVG]
    return {"stage_utilization": [float(b / (groups * wall)) for b in busy],
            "stage_bubble_time": [float(groups * wall - b) for b in busy],
            "stage_wait_time": [float(w) for w in wait],
            "allreduce_time": float(np.sum(avg["end"] - avg["start"])) if avg.size else 0.0}


def summarize(record: RunRecord) -> dict[str, Any]:
    """The summary of one run, keys as in SUMMARY_KEYS, plain Python values only."""
    attrs = record.attrs
    stages, groups = _stages(record), int(attrs.get("groups") or 1)
    wall = _wall_time(record.events) if attrs.get("engine") != "sim" else None
    steady_max, steady_mean = _delay_stats(record)
    final, gap = _final_values(record)
    staleness = record.updates.local_staleness
    out = {
        "method": attrs.get("method"), "stages": stages, "groups": groups,
        "trajectories": int(attrs.get("trajectories") or 1),
        "engine": attrs.get("engine"), "objective": attrs.get("objective"),
        "status": _status(record),
        "updates": len(record.updates),
        "slots": _slots(record),
        "budget_slots": _budget(record)[0], "budget_protocol": _budget(record)[1],
        "wall_time": wall, "final_objective": final, "final_gap": gap,
        "final_validation": _validation(record)[0],
        "final_validation_bits": _validation(record)[1],
        "tokens_per_second": _tokens_per_second(record, wall),
        "steady_max_delay": steady_max, "steady_mean_delay": steady_mean,
        "max_local_staleness": int(staleness.max()) if staleness.size else None,
        "utilization": _utilization(record, stages * groups, wall),
        "mean_loss_last10pct": _last_loss_mean(record),
        "unit_utilization": _unit_utilization(record),
    }
    out["unit_steady_max_delay"], out["unit_steady_mean_delay"] = _unit_delays(record)
    out.update(_per_stage(record, stages, wall))
    out.update({key: attrs.get(key) for key in ("partition", "stage_parameters",
                                                "predicted_stage_utilization")})
    return {key: _plain(out[key]) for key in SUMMARY_KEYS}


_LABELS = {
    "method": "method", "stages": "stages S", "groups": "groups G",
    "trajectories": "trajectories R", "engine": "engine", "objective": "objective",
    "status": "status",
    "updates": "block updates K", "slots": "timeline slots T",
    "budget_slots": "slot budget", "budget_protocol": "budget protocol", "wall_time": "wall time",
    "final_objective": "final objective", "final_gap": "final gap f - f*",
    "final_validation": "final validation loss (nats/char)",
    "final_validation_bits": "final validation (bits/char)",
    "tokens_per_second": "tokens per second",
    "steady_max_delay": "steady max delay", "steady_mean_delay": "steady mean delay",
    "max_local_staleness": "max local staleness", "utilization": "utilization",
    "mean_loss_last10pct": "mean loss (last 10%)", "unit_utilization": "unit-time utilization",
    "unit_steady_max_delay": "unit-time steady max delay",
    "unit_steady_mean_delay": "unit-time steady mean delay",
    "stage_utilization": "utilization per stage", "stage_bubble_time": "bubble s per stage",
    "stage_wait_time": "wait s per stage", "allreduce_time": "averaging s (all ranks)",
    "partition": "partition (units per stage)", "stage_parameters": "parameters per stage",
    "predicted_stage_utilization": "predicted utilization per stage",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable text, one `label: value` line per key; unknown keys are appended."""
    keys = [k for k in SUMMARY_KEYS if k in summary]
    keys += [k for k in summary if k not in SUMMARY_KEYS]
    labels = {k: _LABELS.get(k, k) for k in keys}
    width = max((len(label) for label in labels.values()), default=0)
    return "\n".join(f"{labels[k]:<{width}}  {_fmt(summary[k])}" for k in keys)


_COMPARE = (("ledger", "ledger"), ("method", "method"), ("stages", "S"), ("updates", "K"),
            ("slots", "slots"), ("wall_time", "wall s"), ("final_objective", "final f"),
            ("final_gap", "f - f*"), ("final_validation", "val f"),
            ("tokens_per_second", "tok/s"), ("steady_mean_delay", "mean delay"),
            ("steady_max_delay", "max delay"), ("utilization", "util"))


def compare_table(summaries: list[dict[str, Any]]) -> str:
    """One row per run: the columns of `_COMPARE`, aligned, '-' for missing values."""
    rows = [[label for _, label in _COMPARE]]
    rows += [[_fmt(s.get(key)) for key, _ in _COMPARE] for s in summaries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COMPARE))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
