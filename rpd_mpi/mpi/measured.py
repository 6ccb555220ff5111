"""Turn what MPI ranks recorded into global, measured quantities (pure numpy).

- `global_updates`: the updates of all ranks in global order k by measured completion time,
  with the S-vector of measured global delays (docs/DESIGN.md 2.3): j_k^(s') counts the updates of the
  same model copy that completed before F(m_k, s') started.
- `objective_curve`: the objective over wall time, rebuilt from the block snapshots every
  rank took after its updates (no communication during the run).
"""

from __future__ import annotations

import numpy as np

from rpd_mpi.engines.rpd import RPDPlan
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.records import FWD, Objective, Updates, to_updates


def global_updates(rows: np.ndarray, events: np.ndarray, stages: int) -> Updates:
    """`rows`: every rank's update rows; `events`: every rank's events."""
    order = np.lexsort((rows["group"], rows["stage"], rows["end"]))
    u = rows[order]
    delays = np.zeros((u.size, stages), dtype=np.int64)
    copy = u["group"].astype(np.int64) * (int(u["trajectory"].max(initial=0)) + 1) \
        + u["trajectory"]
    fstart = _forward_starts(events, stages)
    for c in np.unique(copy):
        idx = np.nonzero(copy == c)[0]
        ends = u["end"][idx]                                    # sorted within the copy
        g = int(u["group"][idx[0]])
        starts = np.array([[fstart[(g, int(m), s)] for s in range(stages)]
                           for m in u["microbatch"][idx]]).reshape(idx.size, stages)
        j = np.searchsorted(ends, starts, side="right")
        delays[idx] = np.arange(idx.size)[:, None] - j
    return to_updates(u, delays)


def plan_updates(rows: np.ndarray, plan: RPDPlan) -> Updates:
    """RPD: the global order is the iteration index k (= microbatch); delays are the plan's."""
    return to_updates(rows[np.argsort(rows["microbatch"], kind="stable")], plan.delays)


def _forward_starts(events: np.ndarray, stages: int) -> dict[tuple[int, int, int], float]:
    f = events[events["op"] == FWD]
    return {(int(g), int(m), int(s)): float(t)
            for g, m, s, t in zip(f["group"], f["microbatch"], f["stage"], f["start"])}


def fill_losses(rows: np.ndarray, stages: int) -> None:
    """Give every update row the last-stage loss of its microbatch (in place)."""
    last = rows[rows["stage"] == stages - 1]
    loss = {(int(g), int(m)): float(v) for g, m, v in zip(last["group"], last["microbatch"],
                                                          last["loss"])}
    rows["loss"] = [loss.get((int(g), int(m)), np.nan)
                    for g, m in zip(rows["group"], rows["microbatch"])]


def objective_curve(model: Model, snaps: list[np.ndarray], times: np.ndarray,
                    every: int, copies: int) -> tuple[Objective, np.ndarray]:
    """f at t = 0, whenever `every` more updates have completed (by end time `times`), and at
    the end, from the latest snapshot of each (stage, copy) at that time, averaged over
    copies. The final point (and the returned final vector) uses every copy's last snapshot
    whatever its time stamp, so clock skew between ranks cannot drop a last update."""
    times = np.sort(times)
    w = model.init_weights()
    split = [[rows[rows["copy"] == c] for c in range(copies)] for rows in snaps]
    points = sorted(set(range(every, times.size, every)) - {0})
    obj_t, obj_k, obj_v = [0.0], [0], [model.full_objective(w)]
    for k in points:
        w = _weights_at(model, split, float(times[k - 1]))
        obj_t.append(float(times[k - 1]))
        obj_k.append(k)
        obj_v.append(model.full_objective(w))
    w = _weights_at(model, split, np.inf)
    stamps = [float(times[-1])] if times.size else []
    stamps += [float(r["time"].max()) for r in snaps if r.size]
    obj_t.append(max(stamps, default=0.0))
    obj_k.append(int(times.size))
    obj_v.append(model.full_objective(w))
    return Objective(np.array(obj_t), np.array(obj_k, np.int64), np.array(obj_v)), w


def _weights_at(model: Model, split: list[list[np.ndarray]], t: float) -> np.ndarray:
    w = model.init_weights()
    for sl, per_copy in zip(model.slices, split):
        total = np.zeros(sl.stop - sl.start)
        for mine in per_copy:
            i = int(np.searchsorted(mine["time"], t, side="right")) - 1
            total += mine["block"][i] if i >= 0 else w[sl]
        w[sl] = total / len(per_copy)
    return w
