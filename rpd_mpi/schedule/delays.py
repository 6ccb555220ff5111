"""Global delays and local staleness of a timeline's block updates (docs/DESIGN.md 2.3).

Updates are numbered k = 0, 1, ... in (slot, stage) order. For update k (microbatch m_k on
stage s_k) and every stage s', j_k^(s') counts the updates before F(m_k, s') in that order; the
delay is k - j_k^(s'). With several trajectories (LocalSGD) k and j count only the updates of
the update's own trajectory: the model copy that the op reads.

All of it is prefix sums over the flattened grid, so S = 128 takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rpd_mpi.records import BWD, FWD
from rpd_mpi.schedule.timeline import Timeline


@dataclass(frozen=True)
class UpdateOrder:
    """The block updates of a timeline in global (slot, stage) order."""

    slot: np.ndarray
    stage: np.ndarray
    microbatch: np.ndarray
    delays: np.ndarray           # K x S
    local_staleness: np.ndarray  # K


def update_order(tl: Timeline) -> UpdateOrder:
    """Updates in (slot, stage) order with their global delays and local staleness."""
    is_b = update_mask(tl)
    t, s = np.nonzero(is_b)                  # row-major: (slot, stage) order
    mb = tl.mb[t, s]
    fslot = tl.op_slots(FWD)
    delays = np.zeros((t.size, tl.stages), dtype=np.int32)
    stale = np.zeros(t.size, dtype=np.int64)
    traj = mb % tl.trajectories
    for r in range(tl.trajectories):
        rows = np.nonzero(traj == r)[0]
        mask = is_b & (tl.mb % tl.trajectories == r) if tl.trajectories > 1 else is_b
        delays[rows], stale[rows] = _trajectory_delays(mask, t[rows], s[rows], mb[rows], fslot)
    return UpdateOrder(t, s, mb, delays, stale)


def update_mask(tl: Timeline) -> np.ndarray:
    """T x S: True where a block update completes (every backward; with flushes, the last
    backward of each flush)."""
    is_b: np.ndarray = tl.kind == BWD
    if tl.flush:
        last = (tl.mb % tl.flush == tl.flush - 1) | (tl.mb == tl.microbatches - 1)
        is_b &= last
    return is_b


def _trajectory_delays(mask: np.ndarray, t: np.ndarray, s: np.ndarray, mb: np.ndarray,
                       fslot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stages = mask.shape[1]
    before = np.zeros(mask.size + 1, dtype=np.int32)           # updates before flat index
    np.cumsum(mask.ravel(), out=before[1:])
    k = before[t * stages + s]
    flat = fslot[mb].astype(np.int32)                          # n x S slots of F(m_k, s')
    f_own = flat[np.arange(t.size), s]
    flat *= stages
    flat += np.arange(stages, dtype=np.int32)
    j = before[flat]
    np.subtract(k[:, None], j, out=j)                          # delays k - j, in place
    # local staleness: updates of this stage (same trajectory) between F(m, s) and B(m, s)
    per_stage = np.zeros((mask.shape[0] + 1, stages), dtype=np.int32)
    np.cumsum(mask, axis=0, out=per_stage[1:])
    stale = per_stage[t, s] - per_stage[f_own + 1, s]
    return j, stale


def steady_state(rows: np.ndarray) -> np.ndarray:
    """The steady-state part of per-update rows: the second half of the updates
    (docs/DESIGN.md 2.3; the first half is the start-up transient)."""
    return rows[rows.shape[0] // 2:]


def steady_max_mean(delays: np.ndarray) -> tuple[int | None, float | None]:
    """Max and mean of the steady-state delays (None, None without updates)."""
    steady = steady_state(delays)
    if steady.size == 0:
        return None, None
    return int(steady.max()), float(steady.mean())


def delay_stats(tl: Timeline) -> dict[str, Any]:
    """Steady-state (second half of the updates) and startup statistics, JSON-ready."""
    order = update_order(tl)
    d = order.delays
    steady = steady_state(d)
    startup = d[: d.shape[0] - steady.shape[0]]
    return {
        "method": tl.method,
        "stages": tl.stages,
        "microbatches": tl.microbatches,
        "slots": tl.slots,
        "updates": int(d.shape[0]),
        "steady_max": int(steady.max()) if steady.size else 0,
        "steady_mean": float(steady.mean()) if steady.size else 0.0,
        "steady_p10": _p10(steady),
        "startup_max": int(startup.max()) if startup.size else 0,
        "per_stage_steady_max": [int(x) for x in steady.max(axis=0)] if steady.size else [],
        "steady_max_local_staleness": int(steady_state(order.local_staleness).max())
        if steady.size else 0,
        "utilization": tl.utilization(),
    }


def _p10(values: np.ndarray) -> float:
    """The 10th percentile (linear interpolation, as numpy's default), via partition."""
    if values.size == 0:
        return 0.0
    flat = values.ravel()
    pos = 0.1 * (flat.size - 1)
    lo = int(np.floor(pos))
    part = np.partition(flat, (lo, min(lo + 1, flat.size - 1)))
    return float(part[lo] + (pos - lo) * (part[min(lo + 1, flat.size - 1)] - part[lo]))


def pd_steady_max(stages: int) -> int:
    """The paper's closed form of the steady-state max delay: floor(S^2 - S/2)."""
    return (2 * stages * stages - stages) // 2
