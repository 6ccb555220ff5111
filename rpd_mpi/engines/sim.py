"""The unit-time simulator: executes a `Timeline` with real math on every stage.

One process holds every stage (and, for LocalSGD, every trajectory and every allreduce group).
Ops run slot by slot, in stage order within a slot, through a handler table. Weight stashing:
F(mb, s) stashes the block it read with its version; B(mb, s) computes the gradient with the
stash and updates the current block, both through the stage's `BlockState`. The objective is
recorded at the `--eval-every` cadence (`engines.cadence`: every E block updates, checked at
slot ends), at the average over model copies. Data order: `blocks.batch_of`. Pure: no MPI,
no h5py; the CLI hands the result to the ledger.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, cast

import numpy as np

from rpd_mpi import signals
from rpd_mpi.engines.blocks import BlockState, FlushBuffer, batch_of
from rpd_mpi.engines.cadence import due
from rpd_mpi.engines.fast_linear import simulate_linear
from rpd_mpi.engines.health import Diverged, Health
from rpd_mpi.engines.resume import (Checkpoints, array_state, restore_arrays, restore_rngs,
                                    rng_states)
from rpd_mpi.objectives.protocol import Model, TrackedModel, Tracker
from rpd_mpi.records import (BWD, FWD, Objective, Trace, UpdateRow, Updates, empty_events,
                             row_array, to_updates)
from rpd_mpi.schedule.delays import update_order
from rpd_mpi.schedule.timeline import Timeline


class _Engine:
    """State of one simulation; `run` executes the timeline."""

    def __init__(self, tl: Timeline, model: Model, lr: float, groups: int,
                 health: Health) -> None:
        self.tl, self.model, self.G, self.health = tl, model, groups, health
        self.S, self.R = tl.stages, tl.trajectories
        self.C = groups * self.R
        self.W = np.tile(model.init_weights(), (self.C, 1))
        # one BlockState per (group, stage), serving that group's R trajectories
        self.state = [[BlockState(s, [self.W[g * self.R + r, sl] for r in range(self.R)], lr,
                                  group=g, flush=FlushBuffer(tl.flush, tl.microbatches),
                                  health=health)
                       for s, sl in enumerate(model.slices)] for g in range(groups)]
        self.mods = [[model.make_stage(s, g) for s in range(self.S)] for g in range(groups)]
        self.tracker = _tracker(model, self.weights())
        self.acts: dict[tuple[int, int, int], Any] = {}    # (g, mb, s) -> output of F(mb, s)
        self.grads: dict[tuple[int, int, int], Any] = {}   # (g, mb, s) -> input grad of B(mb, s)
        self.losses: dict[tuple[int, int], tuple[float, Any]] = {}
        self.handlers: dict[int, Callable[[int, int, int, int], None]] = {
            FWD: self._forward, BWD: self._backward}
        self.rows: list[UpdateRow] = []
        self.fversion = np.zeros((groups, tl.microbatches, self.S), dtype=np.int64)
        self.obj_t, self.obj_k, self.obj_v = [0.0], [0], [self.tracker.value()]
        self.slot = 0                      # the next slot to run

    def _forward(self, g: int, s: int, mb: int, t: int) -> None:
        state, r = self.state[g][s], mb % self.R
        a_in = self.acts.pop((g, mb, s - 1)) if s else None
        batch = batch_of(g, self.G, mb, self.model.num_batches)
        mod = self.mods[g][s]
        a_out, cache = mod.forward(state.blocks[r], a_in, batch)
        self.fversion[g, mb, s] = state.read(r, mb, cache)
        if s == self.S - 1:
            self.losses[(g, mb)] = mod.loss(a_out, batch)
            self.health.loss(self.losses[(g, mb)][0], s, mb)
        else:
            self.acts[(g, mb, s)] = a_out

    def _backward(self, g: int, s: int, mb: int, t: int) -> None:
        state, r = self.state[g][s], mb % self.R
        read = state.take(mb)
        loss, g_last = self.losses[(g, mb)]
        g_out = g_last if s == self.S - 1 else self.grads.pop((g, mb, s + 1))
        batch = batch_of(g, self.G, mb, self.model.num_batches)
        g_w, g_in = self.mods[g][s].backward(read.block, read.cache, g_out, batch)
        if s:
            self.grads[(g, mb, s)] = g_in
        else:
            del self.losses[(g, mb)]
        row = state.apply(r, g_w, microbatch=mb, batch=batch, version=read.version,
                          trajectory=r, loss=loss, start=t, end=t + 1)
        if row is not None:
            self.tracker.shift(s, state.last_step, -1.0 / self.C)
            self.rows.append(row)

    def weights(self) -> np.ndarray:
        return np.asarray(self.W[0] if self.W.shape[0] == 1 else self.W.mean(axis=0))

    def checkpoint(self) -> dict[str, Any]:
        """The whole state before slot `self.slot` (plain data; see `restore`)."""
        return {"slot": self.slot, "W": self.W.copy(),
                "blocks": [[st.checkpoint() for st in row] for row in self.state],
                "acts": {k: np.array(v) for k, v in self.acts.items()},
                "grads": {k: np.array(v) for k, v in self.grads.items()},
                "losses": {k: (v[0], np.array(v[1])) for k, v in self.losses.items()},
                "rows": list(self.rows), "fversion": self.fversion.copy(),
                "tracker": array_state(self.tracker, skip=("blocks",)),
                "objective": (list(self.obj_t), list(self.obj_k), list(self.obj_v)),
                "rngs": [rng_states(row) for row in self.mods]}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `checkpoint()`'s state (this engine built from the same inputs)."""
        self.slot = int(state["slot"])
        self.W[...] = state["W"]                 # in place: the blocks are views of W
        for row, saved in zip(self.state, state["blocks"]):
            for st, st_saved in zip(row, saved):
                st.restore(st_saved)
        self.acts, self.grads = dict(state["acts"]), dict(state["grads"])
        self.losses = dict(state["losses"])
        self.rows = list(state["rows"])
        self.fversion[...] = state["fversion"]
        restore_arrays(self.tracker, state["tracker"])
        self.obj_t, self.obj_k, self.obj_v = (list(x) for x in state["objective"])
        for mods, rngs in zip(self.mods, state["rngs"]):
            restore_rngs(mods, rngs)

    def run(self, eval_every: int, progress: Callable[[int], None] | None = None,
            checkpoints: Checkpoints | None = None) -> Objective:
        tl, averages = self.tl, set(self.tl.averages)
        ops = [[(int(k), s, int(m)) for s, (k, m) in enumerate(zip(tl.kind[t], tl.mb[t])) if k]
               for t in range(tl.slots)]
        first = self.slot
        for t in range(first, tl.slots):
            slot_ops, self.slot = ops[t], t
            self._cut(checkpoints, t > first)
            before = len(self.rows)
            for g in range(self.G):
                for op, s, mb in slot_ops:
                    self.handlers[op](g, s, mb, t)
            if t in averages:
                self.W[:] = self.W.mean(axis=0)
            if progress is not None:
                progress(t + 1)
            if due(before, len(self.rows), eval_every) or t == tl.slots - 1:
                self.record(t + 1)
        return self.objective()

    def _cut(self, checkpoints: Checkpoints | None, periodic: bool) -> None:
        """Between slots: a periodic checkpoint when due; a stop signal checkpoints (when
        checkpoints are on) and raises SignalStop."""
        try:
            signals.check()                  # SIGTERM & co.: stop between slots
        except signals.SignalStop as err:
            if checkpoints is not None:
                checkpoints.save(self.checkpoint(), len(self.rows), signals.name(err.signum))
            raise
        if checkpoints is not None and periodic and checkpoints.due():
            checkpoints.save(self.checkpoint(), len(self.rows), "checkpoint")

    def record(self, t: float) -> None:
        """The objective at time t (slots) after the updates so far; must be finite."""
        value = self.tracker.value()
        self.obj_t.append(t)
        self.obj_k.append(len(self.rows))
        self.obj_v.append(value)
        self.health.objective(value, len(self.rows))

    def objective(self) -> Objective:
        held = getattr(self.tracker, "held", None)      # char LM: held-out loss per point
        return Objective(np.array(self.obj_t, float), np.array(self.obj_k, np.int64),
                         np.array(self.obj_v),
                         np.array(held) if held and len(held) == len(self.obj_v) else None)


class _FullTracker:
    """Objective along the mean weights for models without an incremental tracker; with a
    `validation_objective` (a validation split) also the held-out loss at each value()."""

    def __init__(self, model: Model, w: np.ndarray) -> None:
        self.model, self.w = model, np.array(w, dtype=float)
        self.held: list[float] = []

    def shift(self, s: int, delta: np.ndarray, scale: float = 1.0) -> None:
        self.w[self.model.slices[s]] += scale * delta

    def value(self) -> float:
        held = getattr(self.model, "validation_objective", lambda w: None)(self.w)
        if held is not None:
            self.held.append(float(held))
        return float(self.model.full_objective(self.w))


def _tracker(model: Model, w: np.ndarray) -> Tracker:
    """The model's incremental tracker (block-linear models), else full evaluations."""
    if hasattr(model, "objective_tracker"):
        return cast(TrackedModel, model).objective_tracker(w)
    return _FullTracker(model, w)


def simulate(tl: Timeline, model: Model, lr: float, *, groups: int = 1,
             eval_every: int = 1, progress: Callable[[int], None] | None = None,
             diverge_factor: float = 0.0, checkpoints: Checkpoints | None = None,
             resume: dict[str, Any] | None = None) -> Trace:
    """Execute `tl` on `model` with step size `lr`; `groups` pipelines average together.
    `progress(slots_done)` is called after every slot when given. A non-finite loss,
    gradient or objective (or a loss over `diverge_factor` x the first) stops the run: the
    trace then holds the updates before it and its `divergence`. `checkpoints` takes the
    engine's state between slots when due (and at a stop signal); `resume`, such a state,
    continues from it: the trace equals the uninterrupted run's exactly.

    Block-linear models without checkpoints run `fast_linear.simulate_linear` (the same
    bits, a few calls per slot); it declines (None) where it does not apply."""
    if checkpoints is None and resume is None:
        fast = simulate_linear(tl, model, lr, groups=groups, eval_every=eval_every,
                               progress=progress, diverge_factor=diverge_factor)
        if fast is not None:
            return fast
    eng = _Engine(tl, model, lr, groups, Health(diverge_factor))
    if resume is not None:
        eng.restore(resume)
    try:
        objective = eng.run(eval_every, progress, checkpoints)
    except (Diverged, signals.SignalStop) as err:   # stop: keep what was done before it
        divergence = replace(err.divergence, update=len(eng.rows)) \
            if isinstance(err, Diverged) else None
        stopped = signals.name(err.signum) if isinstance(err, signals.SignalStop) else ""
        if eng.obj_k[-1] != len(eng.rows):
            eng.obj_t.append(eng.slot + 1)
            eng.obj_k.append(len(eng.rows))
            eng.obj_v.append(eng.tracker.value())
        done = tl.truncate(eng.slot)             # the events of the slots that completed
        return Trace(_updates(eng.rows, tl, groups), eng.objective(), eng.weights().copy(),
                     sim_events(done, groups, eng.fversion), divergence, stopped)
    updates = _updates(eng.rows, tl, groups)
    return Trace(updates, objective, eng.weights().copy(), sim_events(tl, groups, eng.fversion))


def _updates(rows: list[UpdateRow], tl: Timeline, groups: int) -> Updates:
    order = update_order(tl)
    delays = order.delays
    if groups > 1:   # rows are in (slot, group, stage) order: regroup the per-group delays
        delays = _interleave_groups(order.slot, order.stage, groups, order.delays)
    return to_updates(row_array(rows), delays)


def _interleave_groups(slot: np.ndarray, stage: np.ndarray, groups: int,
                       per_group: np.ndarray) -> np.ndarray:
    """Delay rows in (slot, group, stage) order from one group's (slot, stage) rows."""
    n = slot.size
    keys = np.concatenate([slot * (groups + 1) + g for g in range(groups)])
    idx = np.concatenate([np.arange(n)] * groups)
    order = np.lexsort((np.tile(stage, groups), keys))
    return np.asarray(per_group[idx[order]])


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
