"""The run record from every rank's part file (docs/DESIGN.md 5): on rank 0 at the end of a
run (`assemble`), or afterwards from the parts alone (`recover`, `rpd-mpi assemble OUT`).

Global order by measured completion time, measured delays, the objective over wall time
rebuilt from block snapshots in one streaming pass, and the attributes of an MPI run. Only
the events and update rows are held whole (the record holds them); snapshots are read a chunk
at a time. No MPI here: `rpd-mpi assemble` runs in a plain process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rpd_mpi.build import RPDSetup, build, rpd_setup, schedule_of, to_record
from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.engines.cadence import rank_updates
from rpd_mpi.ledger import LedgerError
from rpd_mpi.ledger.parts import (find_parts, iter_part_rows, part_attrs, part_column,
                                  part_path, read_part, read_part_dataset, read_part_snapshots)
from rpd_mpi.mpi.measured import (SnapshotStream, fill_losses, forward_starts, global_updates,
                                  objective_curve, plan_updates)
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.records import Divergence, RunRecord, Trace
from rpd_mpi.schedule.timeline import Timeline


@dataclass(frozen=True)
class RankMeta:
    """What each rank reports to rank 0 at the end of the run (gathered once), and notes in
    its part before closing it (`notes`), so that the parts alone can be assembled."""

    host: str
    blocked: float                 # seconds blocked in waits
    strategy: str                  # wait strategy: spin or polite
    clock_offset: float            # this rank's clock minus rank 0's (seconds)
    losses: np.ndarray | None      # RPD, last stage: the loss of every iteration
    device: dict[str, Any] | None  # --device cuda: the rank's GPU and transport
    divergence: Divergence | None = None   # this rank saw the run diverge
    write_error: str = ""                  # this rank's part file could not be written
    signal: str = ""                       # the stop signal this rank received (SIGTERM, ...)

    def notes(self) -> dict[str, Any]:
        """The part attributes that say the same (losses are the part's /losses)."""
        return {"host": self.host, "blocked": float(self.blocked), "strategy": self.strategy,
                "clock_offset": float(self.clock_offset), "device": self.device,
                "divergence": dataclasses.asdict(self.divergence)
                if self.divergence is not None else None,
                "write_error": self.write_error, "signal": self.signal, "closed": True}

    @classmethod
    def from_notes(cls, attrs: Mapping[str, Any]) -> RankMeta:
        """Read back `notes` (what a part that was never closed lacks gets its default)."""
        div = attrs.get("divergence")
        return cls(host=str(attrs.get("host", "")), blocked=float(attrs.get("blocked", 0.0)),
                   strategy=str(attrs.get("strategy", "")),
                   clock_offset=float(attrs.get("clock_offset", 0.0)), losses=None,
                   device=attrs.get("device"),
                   divergence=Divergence(**div) if isinstance(div, dict) else None,
                   write_error=str(attrs.get("write_error", "")),
                   signal=str(attrs.get("signal", "")))


def assemble(cfg: RunConfig, model: Model, tl: Timeline, rpd: RPDSetup | None, size: int,
             meta: list[RankMeta], run_id: str = "", stopped: bool = False) -> RunRecord:
    """Rank 0: the run file's record from every rank's part (of a stopped run: what the
    ranks recorded before the stop, with the divergence one of them saw)."""
    paths: list[Path | None] = [part_path(cfg.out, r, run_id) for r in range(size)]
    return build_record(cfg, model, tl, rpd, paths, meta, run_id, stopped)


def build_record(cfg: RunConfig, model: Model, tl: Timeline, rpd: RPDSetup | None,
                 paths: list[Path | None], meta: list[RankMeta], run_id: str,
                 stopped: bool) -> RunRecord:
    """The record from the parts at `paths` (None: a rank whose part is missing)."""
    S = cfg.schedule.stages
    present = [(r, p) for r, p in enumerate(paths) if p is not None]
    parts = [read_part(p, allow_incomplete=stopped) for _, p in present]
    events = np.concatenate([p.events for p in parts])
    rows = np.concatenate([p.updates for p in parts])
    if rpd is not None:
        rows["loss"] = _rpd_losses(paths[S - 1], rpd.plan.stage.size)[rows["microbatch"]]
        updates, delta = plan_updates(rows, rpd.plan), rpd.delta
    else:
        fill_losses(rows, S)
        fstart = forward_starts(events, cfg.schedule.groups, tl.microbatches, S)
        updates = global_updates(rows, fstart, S)
        delta = int(updates.delays.max()) if len(updates) else 0
    streams = [_stream(r % S, p, stopped) for r, p in present]
    copies = cfg.schedule.groups * tl.trajectories
    objective, final = objective_curve(model, streams, updates.time, cfg.eval_every, copies)
    seen = [m.divergence for m in meta if m.divergence is not None]
    divergence = replace(seen[0], update=len(updates)) if seen else None
    signalled = [m.signal for m in meta if m.signal]
    trace = Trace(updates, objective, final, events, divergence,
                  signalled[0] if signalled and divergence is None else "")
    first = part_attrs(present[0][1]) if present else {}
    extra: dict[str, Any] = {
        "mpi_library": str(first.get("mpi_library", "")), "world_size": len(paths),
        "hosts": sorted({m.host for m in meta if m.host}),
        "wait_strategy": [m.strategy for m in meta],
        "blocked_seconds": [m.blocked for m in meta],
        "clock_offsets": [m.clock_offset for m in meta],
        "op_cost": cfg.runtime.op_cost}
    if cfg.runtime.device != "cpu":
        extra["gpus"] = [m.device for m in meta]
    return to_record(cfg, model, trace, tl, engine="mpi", delta=delta, extra=extra,
                     run_id=run_id)


def _rpd_losses(path: Path | None, iterations: int) -> np.ndarray:
    """RPD: the loss of every iteration, from the last stage's part (NaN where it has none)."""
    losses = np.full(iterations, np.nan)
    rows = read_part_dataset(path, "losses") if path is not None else None
    if rows is not None and rows.size:       # (a NaN row never hides a value: resumed runs)
        ok = (rows["k"] < iterations) & ~np.isnan(rows["loss"])
        losses[rows["k"][ok]] = rows["loss"][ok]
    return losses


def _stream(stage: int, path: Path, stopped: bool) -> SnapshotStream:
    """The snapshots of one part as a stream in time order: read chunk by chunk when the
    part wrote them in time order (always, in one run), else sorted in memory."""
    times = part_column(path, "snapshots", "time")
    if times.size == 0 and not stopped:
        raise RuntimeError(f"the part file {path.name} holds no snapshots")
    if np.all(np.diff(times) >= 0):
        return SnapshotStream(stage, times, lambda: iter_part_rows(path, "snapshots"))
    rows = read_part_snapshots(path)
    assert rows is not None
    return SnapshotStream.of(stage, rows)


# ----------------------------------------------------------------- rpd-mpi assemble OUT


@dataclass(frozen=True)
class Recovered:
    """What `recover` made of a run's parts."""

    record: RunRecord
    run_id: str
    paths: list[Path]         # the part files it read
    complete: bool            # every rank's part was closed: the ledger the run would write
    missing: str              # what the parts lack ('' when complete)


def recover(out: str, run_id: str = "") -> Recovered:
    """The run record of `<out>.<run id>.rankNNNNN.part`: the ledger the run would have
    written if every rank closed its part (the run was killed during the assembly), else
    one with `status = "incomplete"` and `missing` saying what is lacking. ConfigError
    (naming OUT or --run-id) when there are no parts or they cannot be assembled."""
    found = find_parts(out)
    if not found:
        raise ConfigError("OUT", f"no part files {Path(out).name}.<run id>.rankNNNNN.part "
                                 f"next to {out}: nothing to assemble")
    if run_id and run_id not in found:
        raise ConfigError("--run-id", f"no part files of run {run_id!r} next to {out} (runs "
                                      f"there: {', '.join(sorted(found))})")
    if not run_id and len(found) > 1:
        raise ConfigError("--run-id", f"part files of {len(found)} runs lie next to {out} "
                                      f"({', '.join(sorted(found))}); name one with --run-id")
    run_id = run_id or next(iter(found))
    ranks = found[run_id]
    attrs, unreadable = _read_attrs(ranks)
    if not attrs:
        raise ConfigError("OUT", f"none of the part files of run {run_id} can be read "
                                 f"({'; '.join(unreadable.values())})")
    first = next(iter(attrs.values()))
    if "config" not in first or "world_size" not in first:
        raise ConfigError("OUT", f"the part files of run {run_id} do not say their "
                                 f"configuration (written by an older rpd_mpi)")
    cfg = RunConfig.from_dict(first["config"])
    model, tl = build(cfg), schedule_of(cfg)
    rpd = rpd_setup(cfg, model, tl) if cfg.schedule.method == "rpd" else None
    world = int(first["world_size"])
    paths: list[Path | None] = [ranks[r] if r in attrs else None for r in range(world)]
    meta = [RankMeta.from_notes(attrs.get(r, {})) for r in range(world)]
    closed = all(r in attrs and attrs[r].get("closed") is True for r in range(world))
    stopped = not all(r in attrs and attrs[r].get("complete") is True for r in range(world))
    record = build_record(cfg, model, tl, rpd, paths, meta, run_id, stopped)
    prov = attrs[0].get("provenance") if 0 in attrs else None
    if isinstance(prov, dict):
        record.attrs.update(prov)        # the run's command line and versions, not ours
    plan = rpd.plan.stage if rpd is not None else None
    expected = sum(rank_updates(tl, r % cfg.schedule.stages, plan) for r in range(world))
    missing = "" if closed else _missing(world, attrs, unreadable, len(record.updates),
                                         expected)
    if missing:
        record.attrs.update(status="incomplete", missing=missing)
    return Recovered(record, run_id, sorted(ranks.values()), not missing, missing)


def _read_attrs(ranks: dict[int, Path]) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    attrs: dict[int, dict[str, Any]] = {}
    unreadable: dict[int, str] = {}
    for r, path in sorted(ranks.items()):
        try:
            attrs[r] = part_attrs(path)
            read_part(path, allow_incomplete=True)       # the rows open cleanly too
        except (LedgerError, OSError, ValueError) as err:
            attrs.pop(r, None)
            unreadable[r] = f"{path.name}: {' '.join(str(err).split())[:200]}"
    return attrs, unreadable


def _missing(world: int, attrs: dict[int, dict[str, Any]], unreadable: dict[int, str],
             updates: int, expected: int) -> str:
    """One line: which ranks' parts are lacking and why, and how many updates are in."""
    what = []
    for r in range(world):
        a = attrs.get(r)
        if a is None:
            what.append(f"rank {r}: {'unreadable part' if r in unreadable else 'no part'}")
        elif a.get("closed") is not True:
            error = a.get("error")
            what.append(f"rank {r}: " + (f"failed ({error})" if error else
                                         "killed before closing its part"))
    return "; ".join(what) + f"; {updates} of {expected} block updates recorded"
