"""The unit-time simulator: executes a `Timeline` with real math on every stage.

One process holds every stage (and, for LocalSGD, every trajectory and every allreduce group).
Ops run slot by slot, in stage order within a slot, through a handler table. Weight stashing:
F(mb, s) stashes the block it read with its version; B(mb, s) computes the gradient with the
stash and updates the current block. The objective is evaluated at a cadence in slots, at the
average over model copies. Pure: no MPI, no h5py; the CLI hands the result to the ledger.

Data order: in group g, microbatch mb uses batch (g + G * mb) mod B (G = 1: mb mod B).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from rpd_mpi.engines.blocks import FlushBuffer
from rpd_mpi.records import BWD, FWD, Objective, Trace, Updates, empty_events
from rpd_mpi.schedule.delays import update_order
from rpd_mpi.schedule.timeline import Timeline


class _Engine:
    """State of one simulation; `run` executes the timeline."""

    def __init__(self, tl: Timeline, model: Any, lr: float, groups: int) -> None:
        self.tl, self.model, self.lr, self.G = tl, model, lr, groups
        self.S, self.R = tl.stages, tl.trajectories
        self.C = groups * self.R
        self.W = np.tile(model.init_weights(), (self.C, 1))
        self.blocks = [[self.W[c, sl] for sl in model.slices] for c in range(self.C)]
        self.version = [[0] * self.S for _ in range(self.C)]
        self.mods = [[model.make_stage(s, g) for s in range(self.S)] for g in range(groups)]
        self.tracker = _tracker(model, self.weights())
        self.acts: dict[tuple[int, int, int], Any] = {}    # (g, mb, s) -> output of F(mb, s)
        self.grads: dict[tuple[int, int, int], Any] = {}   # (g, mb, s) -> input grad of B(mb, s)
        self.stash: dict[tuple[int, int, int], tuple] = {}
        self.losses: dict[tuple[int, int], tuple[float, Any]] = {}
        self.flush = FlushBuffer(tl.flush, tl.microbatches)
        self.handlers: dict[int, Callable[[int, int, int, int], None]] = {
            FWD: self._forward, BWD: self._backward}
        self.rows: list[tuple] = []
        self.fversion = np.zeros((groups, tl.microbatches, self.S), dtype=np.int64)

    def _forward(self, g: int, s: int, mb: int, t: int) -> None:
        c = g * self.R + mb % self.R
        w = self.blocks[c][s]
        a_in = self.acts.pop((g, mb, s - 1)) if s else None
        batch = (g + self.G * mb) % self.model.num_batches
        mod = self.mods[g][s]
        a_out, cache = mod.forward(w, a_in, batch)
        v = self.version[c][s]
        self.stash[(g, mb, s)] = (w.copy(), v, cache)
        self.fversion[g, mb, s] = v
        if s == self.S - 1:
            self.losses[(g, mb)] = mod.loss(a_out, batch)
        else:
            self.acts[(g, mb, s)] = a_out

    def _backward(self, g: int, s: int, mb: int, t: int) -> None:
        c = g * self.R + mb % self.R
        w_read, v, cache = self.stash.pop((g, mb, s))
        loss, g_last = self.losses[(g, mb)]
        g_out = g_last if s == self.S - 1 else self.grads.pop((g, mb, s + 1))
        batch = (g + self.G * mb) % self.model.num_batches
        g_w, g_in = self.mods[g][s].backward(w_read, cache, g_out, batch)
        if s:
            self.grads[(g, mb, s)] = g_in
        else:
            del self.losses[(g, mb)]
        g_w = self.flush.add((c, s), mb, g_w)
        if g_w is None:
            return
        step = self.lr * g_w
        self.blocks[c][s] -= step
        self.tracker.shift(s, step, -1.0 / self.C)
        stale = self.version[c][s] - v
        self.version[c][s] += 1
        self.rows.append((s, g, mb % self.R, mb, batch, v, stale, loss,
                          math.sqrt(float(g_w @ g_w)), t + 1))

    def weights(self) -> np.ndarray:
        return self.W[0] if self.W.shape[0] == 1 else self.W.mean(axis=0)

    def run(self, eval_every: int, progress: Callable[[int], None] | None = None
            ) -> Objective:
        tl, averages = self.tl, set(self.tl.averages)
        ops = [[(int(k), s, int(m)) for s, (k, m) in enumerate(zip(tl.kind[t], tl.mb[t])) if k]
               for t in range(tl.slots)]
        obj_t, obj_k, obj_v = [0], [0], [self.tracker.value()]
        for t, slot_ops in enumerate(ops):
            for g in range(self.G):
                for op, s, mb in slot_ops:
                    self.handlers[op](g, s, mb, t)
            if t in averages:
                self.W[:] = self.W.mean(axis=0)
            if progress is not None:
                progress(t + 1)
            if (t + 1) % eval_every == 0 or t == tl.slots - 1:
                obj_t.append(t + 1)
                obj_k.append(len(self.rows))
                obj_v.append(self.tracker.value())
        return Objective(np.array(obj_t, float), np.array(obj_k, np.int64), np.array(obj_v))


class _FullTracker:
    """Objective along the mean weights for models without an incremental tracker."""

    def __init__(self, model: Any, w: np.ndarray) -> None:
        self.model, self.w = model, np.array(w, dtype=float)

    def shift(self, s: int, delta: np.ndarray, scale: float = 1.0) -> None:
        self.w[self.model.slices[s]] += scale * delta

    def value(self) -> float:
        return float(self.model.full_objective(self.w))


def _tracker(model: Any, w: np.ndarray) -> Any:
    make = getattr(model, "objective_tracker", None)
    return make(w) if make else _FullTracker(model, w)


def simulate(tl: Timeline, model: Any, lr: float, *, groups: int = 1,
             eval_every: int = 1, progress: Callable[[int], None] | None = None) -> Trace:
    """Execute `tl` on `model` with step size `lr`; `groups` pipelines average together.
    `progress(slots_done)` is called after every slot when given."""
    eng = _Engine(tl, model, lr, groups)
    objective = eng.run(eval_every, progress)
    updates = _updates(eng.rows, tl, groups)
    return Trace(updates, objective, eng.weights().copy(), sim_events(tl, groups, eng.fversion))


def _updates(rows: list[tuple], tl: Timeline, groups: int) -> Updates:
    cols = list(zip(*rows)) if rows else [()] * 10
    ints = [np.array(c, dtype=np.int64) for c in cols[:7]]
    order = update_order(tl)
    delays = order.delays
    if groups > 1:   # rows are in (slot, group, stage) order: regroup the per-group delays
        delays = _interleave_groups(order.slot, order.stage, groups, order.delays)
    return Updates(stage=ints[0], group=ints[1], trajectory=ints[2], microbatch=ints[3],
                   batch=ints[4], version=ints[5], local_staleness=ints[6],
                   delays=delays[: len(rows)], loss=np.array(cols[7], float),
                   grad_norm=np.array(cols[8], float), time=np.array(cols[9], float))


def _interleave_groups(slot: np.ndarray, stage: np.ndarray, groups: int,
                       per_group: np.ndarray) -> np.ndarray:
    """Delay rows in (slot, group, stage) order from one group's (slot, stage) rows."""
    n = slot.size
    keys = np.concatenate([slot * (groups + 1) + g for g in range(groups)])
    idx = np.concatenate([np.arange(n)] * groups)
    order = np.lexsort((np.tile(stage, groups), keys))
    return per_group[idx[order]]


def sim_events(tl: Timeline, groups: int, fversion: np.ndarray) -> np.ndarray:
    """One event per executed op on the unit-time clock (start = slot, end = slot + 1)."""
    t, s = np.nonzero(tl.kind)
    n = t.size
    ev = empty_events(n * groups)
    for g in range(groups):
        part = ev[g * n:(g + 1) * n]
        mb = tl.mb[t, s]
        part["rank"], part["group"], part["stage"] = g * tl.stages + s, g, s
        part["trajectory"], part["op"], part["microbatch"] = mb % tl.trajectories, tl.kind[t, s], mb
        part["version"] = fversion[g, mb, s]
        part["start"], part["end"] = t, t + 1
    return ev
