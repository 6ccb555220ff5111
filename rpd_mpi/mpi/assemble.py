"""Rank 0 turns every rank's part file into one run record (docs/DESIGN.md 5).

Global order by measured completion time, measured delays, the objective over wall time
rebuilt from block snapshots, and the attributes of an MPI run.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rpd_mpi.build import to_record
from rpd_mpi.config import RunConfig
from rpd_mpi.ledger.parts import part_path, read_part, read_part_snapshots
from rpd_mpi.mpi import comm as commlib
from rpd_mpi.mpi.measured import fill_losses, global_updates, objective_curve, plan_updates
from rpd_mpi.records import RunRecord, Trace


def assemble(cfg: RunConfig, model: Any, tl: Any, plan: Any, size: int,
             meta: list[dict]) -> RunRecord:
    """Rank 0: the run file's record from every rank's part."""
    parts = [read_part(part_path(cfg.out, r)) for r in range(size)]
    events = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    if plan is not None:
        rows["loss"] = meta[-1]["losses"][rows["microbatch"]]
        updates, delta = plan_updates(rows, plan[0]), plan[1]
    else:
        fill_losses(rows, cfg.schedule.stages)
        updates = global_updates(rows, events, cfg.schedule.stages)
        delta = int(updates.delays.max()) if len(updates) else 0
    snaps = _snapshots_by_stage(cfg, size)
    copies = cfg.schedule.groups * tl.trajectories
    objective, final = objective_curve(model, snaps, updates.time, cfg.eval_every, copies)
    trace = Trace(updates, objective, final, events)
    extra = {"mpi_library": commlib.library_version(), "world_size": size,
             "hosts": sorted({m["host"] for m in meta}),
             "wait_strategy": [m["strategy"] for m in meta],
             "blocked_seconds": [m["blocked"] for m in meta],
             "clock_offsets": [m["clock_offset"] for m in meta],
             "op_cost": cfg.runtime.op_cost}
    if cfg.runtime.device != "cpu":
        extra["gpus"] = [m["device"] for m in meta]
    return to_record(cfg, model, trace, tl, engine="mpi", delta=delta, extra=extra)


def _snapshots_by_stage(cfg: RunConfig, size: int) -> list[np.ndarray]:
    S = cfg.schedule.stages
    out = []
    for s in range(S):
        rows = [read_part_snapshots(part_path(cfg.out, g * S + s))
                for g in range(cfg.schedule.groups)]
        both = np.concatenate(rows)
        out.append(both[np.argsort(both["time"], kind="stable")])
    return out
