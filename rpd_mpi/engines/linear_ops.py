"""The operand tables and layouts of the block-linear fast path (`engines.fast_linear`).

Owns the op tables (`Ops`: every F or B op of a timeline in execution order, split by stack
of equal-width stages), the stacks themselves, the gradient noise drawn up front, the stacked
operands laid out once per model (`layout`), and the delay rows and events of a finished
run as the reference engine (`engines.sim`) records them. Pure numpy: no numba, MPI or h5py.
"""

from __future__ import annotations

import weakref

import numpy as np

from rpd_mpi.objectives.linear import BlockLinearModel
from rpd_mpi.records import BWD, empty_events
from rpd_mpi.schedule.delays import update_order
from rpd_mpi.schedule.timeline import Timeline


#: per model and stack layout: the stacked operands (`layout`), laid out once for every run
#: on the model (X is read-only)
_LAYOUTS: weakref.WeakKeyDictionary[BlockLinearModel, dict[tuple[tuple[int, int, int], ...],
                                                           tuple[list[np.ndarray],
                                                                 list[np.ndarray]]]] \
    = weakref.WeakKeyDictionary()


def layout(model: BlockLinearModel, stacks: list[tuple[int, int, int]],
           bounds: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per stack: X_b of each batch and stage (batch x stage x b x m), and the tracker's
    operands (stage x m x n, each X[:, slice_s].T contiguous)."""
    per_model = _LAYOUTS.setdefault(model, {})
    key = tuple(stacks)
    if key not in per_model:
        xs, cols = [], []
        b = model.batch_size
        for lo, hi, m in stacks:
            X = model.X[:, bounds[lo]:bounds[hi]]
            per = X.reshape(model.num_batches, b, hi - lo, m).transpose(0, 2, 1, 3)
            xs.append(np.ascontiguousarray(per))
            cols.append(np.ascontiguousarray(X.reshape(-1, hi - lo, m).transpose(1, 2, 0)))
        per_model[key] = (xs, cols)
    return per_model[key]


class Ops:
    """One kind of op (F or B) in execution order (slot, group, stage), with per-slot
    ranges, split by stack of equal-width stages."""

    def __init__(self, tl: Timeline, kind: int, groups: int, num_batches: int,
                 stack_of: np.ndarray, k_of: np.ndarray) -> None:
        t, s = np.nonzero(tl.kind == kind)                     # (slot, stage) order
        n = t.size
        t = np.tile(t, groups).reshape(groups, n).T.ravel()       # (slot, stage, group) ...
        s = np.tile(s, groups).reshape(groups, n).T.ravel()
        g = np.tile(np.arange(groups), n)
        order = np.lexsort((s, g, t))                           # ... to (slot, group, stage)
        self.t, self.s, self.g = t[order], s[order], g[order]
        self.mb = tl.mb[self.t, self.s].astype(np.int64)
        self.r = self.mb % tl.trajectories
        self.batch = (self.g + groups * self.mb) % num_batches   # blocks.batch_of
        self.stack, self.k = stack_of[self.s], k_of[self.s]
        T = tl.slots
        self.start = np.searchsorted(self.t, np.arange(T + 1))   # slot t: [start[t], start[t+1])
        self.pos = np.arange(self.t.size) - self.start[self.t]   # index within its slot
        self.by_stack = []           # per stack: its ops' table and per-slot starts
        for c in range(int(stack_of.max()) + 1):
            idx = np.nonzero(self.stack == c)[0]
            self.by_stack.append((self.table(idx, self.pos[idx]),
                                  np.searchsorted(self.t[idx], np.arange(T + 1))))
        self.all = self.table(np.arange(self.t.size), self.stack)

    def table(self, idx: np.ndarray, last: np.ndarray) -> np.ndarray:
        """The ops `idx` as an int64 table (kernels.G_ .. KS, then `last` as POS)."""
        cols = (self.g, self.s, self.mb, self.r, self.batch, self.k)
        return np.ascontiguousarray(np.stack([c[idx] for c in cols] + [last], axis=1),
                                    dtype=np.int64)


def stacks_of(model: BlockLinearModel) -> list[tuple[int, int, int]]:
    """(first stage, end stage, width) of each run of equal-width stages."""
    out: list[tuple[int, int, int]] = []
    for s, sl in enumerate(model.slices):
        m = sl.stop - sl.start
        if out and out[-1][2] == m:
            out[-1] = (out[-1][0], s + 1, m)
        else:
            out.append((s, s + 1, m))
    return out


def draw_noise(model: BlockLinearModel, tl: Timeline, groups: int, width: int) -> np.ndarray:
    """G x S x (backwards per stage) x width: stage s of group g's draws, one row per
    backward (microbatch order), as `StageModule.backward` draws them."""
    nb = (tl.kind == BWD).sum(axis=0)
    out = np.zeros((groups, model.stages, int(nb.max()) if model.noise else 0, width))
    if model.noise:
        for g in range(groups):
            for s, sl in enumerate(model.slices):
                m = sl.stop - sl.start
                rng = np.random.default_rng([model.seed, g, s])    # = StageModule.rng
                out[g, s, :nb[s], :m] = rng.standard_normal(int(nb[s]) * m).reshape(-1, m)
    return out


def delay_rows(tl: Timeline, groups: int) -> np.ndarray:
    """The delay rows of the updates in (slot, group, stage) order (as `sim._updates`)."""
    order = update_order(tl)
    if groups == 1:
        return order.delays
    n = order.slot.size
    keys = np.concatenate([order.slot * (groups + 1) + g for g in range(groups)])
    idx = np.concatenate([np.arange(n)] * groups)
    perm = np.lexsort((np.tile(order.stage, groups), keys))
    return np.asarray(order.delays[idx[perm]])


def run_events(tl: Timeline, groups: int, fversion: np.ndarray) -> np.ndarray:
    """One event per executed op on the unit-time clock (as `sim.sim_events`)."""
    t, s = np.nonzero(tl.kind)
    n = t.size
    ev = empty_events(n * groups)
    mb = tl.mb[t, s]
    for g in range(groups):
        part = ev[g * n:(g + 1) * n]
        part["rank"], part["group"], part["stage"] = g * tl.stages + s, g, s
        part["trajectory"], part["op"], part["microbatch"] = mb % tl.trajectories, \
            tl.kind[t, s], mb
        part["version"] = fversion[g, mb, s]
        part["start"], part["end"] = t, t + 1
    return ev
