"""Turn what MPI ranks recorded into global, measured quantities (pure numpy).

- `global_updates`: the updates of all ranks in global order k by measured completion time,
  with the S-vector of measured global delays (docs/DESIGN.md 2.3): j_k^(s') counts the updates
  of the same model copy that completed before F(m_k, s') started. One sort and one
  `searchsorted` per model copy: O(K log K).
- `objective_curve`: the objective over wall time, rebuilt from the block snapshots every
  rank took after its updates (no communication during the run), in one pass over the
  snapshots in time order, holding one block per (stage, copy) and one chunk per rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from rpd_mpi.engines.rpd import RPDPlan
from rpd_mpi.engines.validation import Evaluator
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.records import FWD, Objective, Updates, to_updates

#: a delay that cannot be known: the forward it depends on was lost (an incomplete part)
UNKNOWN_DELAY = -1


def forward_starts(events: np.ndarray, groups: int, microbatches: int,
                   stages: int) -> np.ndarray:
    """G x N x S start times of every forward (NaN where no event says)."""
    table = np.full((groups, microbatches, stages), np.nan)
    f = events[events["op"] == FWD]
    ok = (f["microbatch"] < microbatches) & (f["group"] < groups) & (f["stage"] < stages)
    f = f[ok]
    table[f["group"], f["microbatch"], f["stage"]] = f["start"]
    return table


def global_updates(rows: np.ndarray, fstart: np.ndarray, stages: int) -> Updates:
    """`rows`: every rank's update rows; `fstart`: `forward_starts` of every rank's events.
    A delay whose forward is unknown is UNKNOWN_DELAY."""
    order = np.lexsort((rows["group"], rows["stage"], rows["end"]))
    u = rows[order]
    delays = np.full((u.size, stages), UNKNOWN_DELAY, dtype=np.int64)
    if not u.size:
        return to_updates(u, delays)
    R = int(u["trajectory"].max()) + 1
    copy = u["group"].astype(np.int64) * R + u["trajectory"]
    g, m = u["group"].astype(np.int64), u["microbatch"].astype(np.int64)
    inside = (g < fstart.shape[0]) & (m < fstart.shape[1])
    starts = np.full((u.size, stages), np.nan)
    starts[inside] = fstart[g[inside], m[inside]]
    ends = np.ascontiguousarray(u["end"])
    by_copy = np.argsort(copy, kind="stable")       # within a copy: still in end order
    cuts = np.flatnonzero(np.diff(copy[by_copy])) + 1
    for idx in np.split(by_copy, cuts):
        j = np.searchsorted(ends[idx], starts[idx], side="right")
        # every forward of m_k precedes update k (its backward chain needs them), so j <= k
        # in true time; a negative value is the error of the ranks' clock offsets (a fraction
        # of a millisecond when ops are that short): clamped to 0
        d = np.maximum(np.arange(idx.size)[:, None] - j, 0)
        delays[idx] = np.where(np.isnan(starts[idx]), UNKNOWN_DELAY, d)
    return to_updates(u, delays)


def plan_updates(rows: np.ndarray, plan: RPDPlan) -> Updates:
    """RPD: the global order is the iteration index k (= microbatch); delays are the plan's."""
    u = rows[np.argsort(rows["microbatch"], kind="stable")]
    return to_updates(u, plan.delays[u["microbatch"]] if u.size else plan.delays[:0])


def fill_losses(rows: np.ndarray, stages: int) -> None:
    """Give every update row the last-stage loss of its microbatch (in place; NaN where the
    last stage recorded none)."""
    if not rows.size:
        return
    g, m = rows["group"].astype(np.int64), rows["microbatch"].astype(np.int64)
    table = np.full((int(g.max()) + 1, int(m.max()) + 1), np.nan)
    last = rows["stage"] == stages - 1
    table[g[last], m[last]] = rows["loss"][last]
    rows["loss"] = table[g, m]


@dataclass
class SnapshotStream:
    """One rank's snapshots (time, version, copy, block rows) in time order: `times` all at
    once (8 bytes a row), the rows themselves from `chunks`, one chunk at a time."""

    stage: int
    times: np.ndarray
    chunks: Callable[[], Iterator[np.ndarray]]
    _iter: Iterator[np.ndarray] | None = field(default=None, repr=False)
    _chunk: np.ndarray | None = field(default=None, repr=False)
    _at: int = 0             # rows of _chunk already consumed

    @classmethod
    def of(cls, stage: int, rows: np.ndarray) -> SnapshotStream:
        """A stream over rows held in memory (sorted by time, stably)."""
        rows = rows[np.argsort(rows["time"], kind="stable")]
        return cls(stage, np.ascontiguousarray(rows["time"]), lambda: iter([rows]))

    def take(self, n: int) -> Iterator[np.ndarray]:
        """The next n rows, as one or more slices of chunks."""
        if self._iter is None:
            self._iter = self.chunks()
        while n > 0:
            if self._chunk is None or self._at >= self._chunk.shape[0]:
                self._chunk, self._at = next(self._iter), 0
                continue
            k = min(n, self._chunk.shape[0] - self._at)
            yield self._chunk[self._at:self._at + k]
            self._at += k
            n -= k


def objective_curve(model: Model, streams: Iterable[SnapshotStream], times: np.ndarray,
                    every: int, copies: int) -> tuple[Objective, np.ndarray]:
    """f at t = 0, whenever `every` more updates have completed (by end time `times`), and at
    the end, from the latest snapshot of each (stage, copy) at that time, averaged over
    copies. The final point (and the returned final vector) uses every copy's last snapshot
    whatever its time stamp, so clock skew between ranks cannot drop a last update."""
    times = np.sort(times)
    streams = list(streams)
    w = model.init_weights()
    latest = [np.tile(w[sl], (copies, 1)) for sl in model.slices]   # stage -> copy x d_s
    ks = np.arange(every, times.size, every)
    at = np.append(times[ks - 1], np.inf)            # the points' times, then the end
    pos = [np.searchsorted(st.times, at, side="right") for st in streams]
    done = [0] * len(streams)
    evaluate = Evaluator(model)         # f(w), and the held-out loss of a char LM split
    obj_v = [evaluate(w)]
    for p in range(at.size):
        changed = set()
        for i, st in enumerate(streams):
            if pos[i][p] > done[i]:
                for rows in st.take(int(pos[i][p]) - done[i]):
                    _apply(latest[st.stage], rows)
                done[i] = int(pos[i][p])
                changed.add(st.stage)
        for s in sorted(changed):
            w[model.slices[s]] = _mean(latest[s])
        obj_v.append(evaluate(w) if changed else evaluate.again())
    stamps = [float(times[-1])] if times.size else []
    stamps += [float(st.times[-1]) for st in streams if st.times.size]
    obj_t = [0.0, *times[ks - 1].tolist(), max(stamps, default=0.0)]
    obj_k = [0, *ks.tolist(), int(times.size)]
    return Objective(np.array(obj_t), np.array(obj_k, np.int64), np.array(obj_v),
                     evaluate.values(len(obj_v))), w


def _apply(latest: np.ndarray, rows: np.ndarray) -> None:
    """latest[copy] = the block of the last of `rows` of that copy."""
    copy = rows["copy"].astype(np.int64)
    if copy.size > 1 and np.unique(copy).size < copy.size:
        _, first = np.unique(copy[::-1], return_index=True)
        keep = copy.size - 1 - first
        copy, blocks = copy[keep], rows["block"][keep]
    else:
        blocks = rows["block"]
    latest[copy] = blocks


def _mean(per_copy: np.ndarray) -> np.ndarray:
    """The mean over copies, summed in copy order (the order the simulator sums in)."""
    total = np.zeros(per_copy.shape[1])
    for block in per_copy:
        total += block
    mean: np.ndarray = total / per_copy.shape[0]
    return mean
