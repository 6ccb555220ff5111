"""Rank 0 turns every rank's part file into one run record (docs/DESIGN.md 5).

Global order by measured completion time, measured delays, the objective over wall time
rebuilt from block snapshots, and the attributes of an MPI run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rpd_mpi.build import RPDSetup, to_record
from rpd_mpi.config import RunConfig
from rpd_mpi.ledger.parts import part_path, read_part, read_part_snapshots
from rpd_mpi.mpi import comm as commlib
from rpd_mpi.mpi.measured import fill_losses, global_updates, objective_curve, plan_updates
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.records import Divergence, RunRecord, Trace
from rpd_mpi.schedule.timeline import Timeline


@dataclass(frozen=True)
class RankMeta:
    """What each rank reports to rank 0 at the end of the run (gathered once)."""

    host: str
    blocked: float                 # seconds blocked in waits
    strategy: str                  # wait strategy: spin or polite
    clock_offset: float            # this rank's clock minus rank 0's (seconds)
    losses: np.ndarray | None      # RPD, last stage: the loss of every iteration
    device: dict[str, Any] | None  # --device cuda: the rank's GPU and transport
    divergence: Divergence | None = None   # this rank saw the run diverge
    write_error: str = ""                  # this rank's part file could not be written
    signal: str = ""                       # the stop signal this rank received (SIGTERM, ...)


def assemble(cfg: RunConfig, model: Model, tl: Timeline, rpd: RPDSetup | None, size: int,
             meta: list[RankMeta], run_id: str = "", stopped: bool = False) -> RunRecord:
    """Rank 0: the run file's record from every rank's part (of a stopped run: what the
    ranks recorded before the stop, with the divergence one of them saw)."""
    parts = [read_part(part_path(cfg.out, r, run_id), allow_incomplete=stopped)
             for r in range(size)]
    events = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    if rpd is not None:
        losses = meta[-1].losses
        assert losses is not None, "the last stage of an RPD run reports its losses"
        rows["loss"] = losses[rows["microbatch"]]
        updates, delta = plan_updates(rows, rpd.plan), rpd.delta
    else:
        fill_losses(rows, cfg.schedule.stages)
        updates = global_updates(rows, events, cfg.schedule.stages)
        delta = int(updates.delays.max()) if len(updates) else 0
    snaps = _snapshots_by_stage(cfg, size, run_id)
    copies = cfg.schedule.groups * tl.trajectories
    objective, final = objective_curve(model, snaps, updates.time, cfg.eval_every, copies)
    seen = [m.divergence for m in meta if m.divergence is not None]
    divergence = replace(seen[0], update=len(updates)) if seen else None
    signalled = [m.signal for m in meta if m.signal]
    trace = Trace(updates, objective, final, events, divergence,
                  signalled[0] if signalled and divergence is None else "")
    extra: dict[str, Any] = {
        "mpi_library": commlib.library_version(), "world_size": size,
        "hosts": sorted({m.host for m in meta}),
        "wait_strategy": [m.strategy for m in meta],
        "blocked_seconds": [m.blocked for m in meta],
        "clock_offsets": [m.clock_offset for m in meta],
        "op_cost": cfg.runtime.op_cost}
    if cfg.runtime.device != "cpu":
        extra["gpus"] = [m.device for m in meta]
    return to_record(cfg, model, trace, tl, engine="mpi", delta=delta, extra=extra,
                     run_id=run_id)


def _snapshots_by_stage(cfg: RunConfig, size: int, run_id: str) -> list[np.ndarray]:
    S = cfg.schedule.stages
    out = []
    for s in range(S):
        rows = []
        for g in range(cfg.schedule.groups):
            snaps = read_part_snapshots(part_path(cfg.out, g * S + s, run_id))
            if snaps is None:
                raise RuntimeError(f"the part file of rank {g * S + s} holds no snapshots")
            rows.append(snaps)
        both: np.ndarray = np.concatenate(rows)
        out.append(both[np.argsort(both["time"], kind="stable")])
    return out
