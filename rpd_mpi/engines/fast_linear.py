"""The unit-time simulator on the block-linear models, a slot at a time (docs/DESIGN.md 4).

`simulate_linear` runs what `sim._Engine` runs (PD, LocalSGD with G groups, GPipe, naive),
bit for bit, with the per-op Python handlers replaced by a few calls per slot: the slot's
forward products X_b[:, slice_s] @ w_s are ONE stacked `np.matmul` per stack of equal-width
stages (each item is the reference's own BLAS call on the same contiguous operands), the
backward products g @ X_b and the gradient norms g . g likewise; stashing, the lam and noise
terms, the GPipe flush sums, the SGD steps, the versions, the update rows and the objective
tracker's shifts (its own compiled kernel, called in the reference's order) are numba loops
(`kernels.sim_kernels`). The loss, LocalSGD's average and the objective are the reference's
numpy calls. Gradient noise: stage s of group g draws at each of its backwards, in microbatch
order, from the stage module's generator; those draws are made up front.

It returns None, and `sim.simulate` runs the reference engine instead, when it does not apply
(not a block-linear model, no numba, more than two block widths, a very large state, a run
too short to pay for loading the compiled kernels: `MIN_UPDATES`) and
when a health check fails (a loss, gradient or objective that is not finite or over
--diverge-factor): the reference then reruns the run from the start and stops where it stops.
A stop signal is handled here, between slots, as the reference does. Pure: no MPI, no h5py.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from rpd_mpi import signals
from rpd_mpi.engines.cadence import due
from rpd_mpi.engines.health import Diverged, Health
from rpd_mpi.objectives import kernels
from rpd_mpi.objectives.linear import BlockLinearModel
from rpd_mpi.records import BWD, FWD, UPDATE_ROW_DTYPE, Objective, Trace, empty_events, to_updates
from rpd_mpi.schedule.delays import update_mask, update_order
from rpd_mpi.schedule.timeline import Timeline

MAX_STATE = 1 << 26            # doubles of stash, noise and activations the fast path holds
MIN_UPDATES = 2048             # fewer block updates: loading the kernels costs more than
                               # the reference engine (~0.2 s vs ~40 us per update)


class _Unhealthy(Exception):
    """A health check failed: the reference engine reruns the run."""


class _Ops:
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


def _stacks(model: BlockLinearModel) -> list[tuple[int, int, int]]:
    """(first stage, end stage, width) of each run of equal-width stages."""
    out: list[tuple[int, int, int]] = []
    for s, sl in enumerate(model.slices):
        m = sl.stop - sl.start
        if out and out[-1][2] == m:
            out[-1] = (out[-1][0], s + 1, m)
        else:
            out.append((s, s + 1, m))
    return out


def _noise(model: BlockLinearModel, tl: Timeline, groups: int, width: int) -> np.ndarray:
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


def simulate_linear(tl: Timeline, model: Any, lr: float, *, groups: int = 1,
                    eval_every: int = 1, progress: Callable[[int], None] | None = None,
                    diverge_factor: float = 0.0, min_updates: int = MIN_UPDATES
                    ) -> Trace | None:
    """`sim.simulate` for a block-linear model (same arguments), or None where the fast path
    does not apply (also: fewer than `min_updates` block updates) or a health check fails
    (see the module docstring)."""
    if not isinstance(model, BlockLinearModel) or not kernels.HAVE_NUMBA:
        return None
    stacks = _stacks(model)
    G, S, N = groups, model.stages, tl.microbatches
    if len(stacks) > 2 or G * N * model.dim * 2 + G * N * S * model.batch_size > MAX_STATE \
            or G * int(update_mask(tl).sum()) < min_updates:
        return None
    try:
        return _Run(tl, model, lr, G, stacks, diverge_factor).run(eval_every, progress)
    except _Unhealthy:
        return None


class _Run:
    """The state of one fast simulation."""

    def __init__(self, tl: Timeline, model: BlockLinearModel, lr: float, G: int,
                 stacks: list[tuple[int, int, int]], diverge_factor: float) -> None:
        self.tl, self.model, self.lr, self.G = tl, model, lr, G
        S, N, R, b = model.stages, tl.microbatches, tl.trajectories, model.batch_size
        self.S, self.N, self.R, self.C = S, N, R, G * R
        self.kern = kernels.sim_kernels()
        self.health = Health(diverge_factor)
        self.bounds = np.array([sl.start for sl in model.slices] + [model.dim], np.int64)
        stack_of = np.zeros(S, np.int64)
        k_of = np.zeros(S, np.int64)
        self.xs, self.cols = [], []
        for c, (lo, hi, m) in enumerate(stacks):
            stack_of[lo:hi], k_of[lo:hi] = c, np.arange(hi - lo)
            X = model.X[:, self.bounds[lo]:self.bounds[hi]]
            per = X.reshape(model.num_batches, b, hi - lo, m).transpose(0, 2, 1, 3)
            self.xs.append(np.ascontiguousarray(per))           # batch x stage x b x m
            self.cols.append(np.ascontiguousarray(X.reshape(-1, hi - lo, m).transpose(1, 0, 2)))
        self.widths = [m for _, _, m in stacks]
        width = max(self.widths)
        self.F = _Ops(tl, FWD, G, model.num_batches, stack_of, k_of)
        self.B = _Ops(tl, BWD, G, model.num_batches, stack_of, k_of)
        self.W = np.tile(model.init_weights(), (self.C, 1))
        self.tracker = model.objective_tracker(self.weights())
        self.version = np.zeros((G, S, R), np.int64)
        self.stash = np.zeros((G, N, S, width))
        self.stash_ver = np.zeros((G, N, S), np.int64)
        self.fversion = np.zeros((G, N, S), np.int64)
        self.acts = np.zeros((G, N, S, b))
        self.glast = np.zeros((G, N, b))
        self.losses = np.zeros((G, N))
        self.noise = _noise(model, tl, G, width)
        self.acc = np.zeros((G, S, R, width))
        self.cnt = np.zeros((G, S, R), np.int64)
        most = max(int(np.diff(self.F.start).max(initial=0)),
                   int(np.diff(self.B.start).max(initial=0)), 1)
        self.abuf = [np.zeros((most, b, m)) for m in self.widths]
        self.wbuf = [np.zeros((most, m, 1)) for m in self.widths]
        self.pbuf = np.zeros((most, b, 1))
        self.gbuf = np.zeros((most, 1, b))
        self.gw = [np.zeros((most, 1, m)) for m in self.widths]
        self.ubuf = [np.zeros((most, 1, m)) for m in self.widths]
        self.sq = [np.zeros((most, 1, 1)) for _ in self.widths]
        self.upad = np.zeros((most, width))
        self.sqpad = np.zeros(most)
        self.applied = np.zeros(most, np.bool_)
        self.upos = np.zeros(most, np.int64)
        self.step_buf = np.zeros(width)
        K = G * int(update_mask(tl).sum())
        self.rows_i = np.zeros((K, 7), np.int64)
        self.rows_f = np.zeros((K, 4))
        self.nrows, self.shifts = 0, 0
        self.last = model.make_stage(S - 1)
        self.loss_ops = np.nonzero(self.F.s == S - 1)[0]          # F ops on the last stage
        self.loss_start = np.searchsorted(self.F.t[self.loss_ops], np.arange(tl.slots + 1))

    def weights(self) -> np.ndarray:
        return np.asarray(self.W[0] if self.W.shape[0] == 1 else self.W.mean(axis=0))

    def run(self, eval_every: int, progress: Callable[[int], None] | None) -> Trace:
        tl, averages = self.tl, set(self.tl.averages)
        obj_t, obj_k, obj_v = [0.0], [0], [self.tracker.value()]
        for t in range(tl.slots):
            try:
                signals.check()
            except signals.SignalStop as err:
                if obj_k[-1] != self.nrows:
                    obj_t.append(t + 1)
                    obj_k.append(self.nrows)
                    obj_v.append(self.tracker.value())
                return self.trace(tl.truncate(t), (obj_t, obj_k, obj_v),
                                  signals.name(err.signum))
            before = self.nrows
            self.step(t)
            if t in averages:
                self.W[:] = self.W.mean(axis=0)
            if progress is not None:
                progress(t + 1)
            if due(before, self.nrows, eval_every) or t == tl.slots - 1:
                value = self.tracker.value()
                obj_t.append(t + 1)
                obj_k.append(self.nrows)
                obj_v.append(value)
                if not math.isfinite(value):
                    raise _Unhealthy
        return self.trace(tl, (obj_t, obj_k, obj_v), "")

    def step(self, t: int) -> None:
        """Slot t: forwards, backwards and updates of every stack, then this slot's losses
        (only later backwards read them)."""
        F, B, k, m = self.F, self.B, self.kern, self.model
        for c, ((ftab, fstart), (btab, bstart)) in enumerate(zip(F.by_stack, B.by_stack)):
            f0, f1 = int(fstart[t]), int(fstart[t + 1])
            b0, b1 = int(bstart[t]), int(bstart[t + 1])
            if f1 > f0:
                k["_sim_forward"](f0, f1, ftab, self.R, self.W, self.bounds, self.xs[c],
                                  self.stash, self.stash_ver, self.version, self.fversion,
                                  self.abuf[c], self.wbuf[c])
                np.matmul(self.abuf[c][:f1 - f0], self.wbuf[c][:f1 - f0],
                          out=self.pbuf[:f1 - f0])
            if f1 > f0 or b1 > b0:
                k["_sim_finish_backward"](f0, f1, ftab, self.pbuf, self.acts, b0, b1, btab,
                                          self.glast, self.xs[c], self.gbuf, self.abuf[c])
            if b1 == b0:
                continue
            n = b1 - b0
            np.matmul(self.gbuf[:n], self.abuf[c][:n], out=self.gw[c][:n])
            u = k["_sim_terms"](b0, b1, btab, self.bounds, self.gw[c], m.lam, m.noise,
                                self.stash, self.noise, self.tl.flush, self.N, self.acc,
                                self.cnt, self.ubuf[c], self.upad, self.applied, self.upos)
            if u:
                ub = self.ubuf[c][:u]
                np.matmul(ub, ub.reshape(u, -1, 1), out=self.sq[c][:u])
                if not np.isfinite(self.sq[c][:u]).all():
                    raise _Unhealthy
                self.sqpad[self.upos[:u]] = self.sq[c][:u, 0, 0]
        self.apply(t)
        for i in self.loss_ops[self.loss_start[t]:self.loss_start[t + 1]]:
            g, mb = int(F.g[i]), int(F.mb[i])
            loss, grad = self.last.loss(self.acts[g, mb, self.S - 1], int(F.batch[i]))
            try:
                self.health.loss(loss, self.S - 1, mb)
            except Diverged:
                raise _Unhealthy from None
            self.losses[g, mb] = loss
            self.glast[g, mb] = grad

    def apply(self, t: int) -> None:
        B, tr = self.B, self.tracker
        b0, b1 = int(B.start[t]), int(B.start[t + 1])
        first = b0
        while first < b1:
            before = self.shifts
            first, self.nrows, self.shifts = self.kern["_sim_apply"](
                b0, b1, first, B.all, self.applied, self.upad, self.sqpad, self.lr, self.R,
                self.W, self.bounds, self.version, self.stash_ver, self.losses, self.cols[0],
                self.cols[-1], -1.0 / self.C, tr.p, tr.w, self.step_buf, self.shifts,
                tr.resync, t, self.nrows, self.rows_i, self.rows_f)
            if self.shifts != before and self.shifts % tr.resync == 0:
                np.matmul(self.model.X, tr.w, out=tr.p)      # ObjectiveTracker's resync
        tr.shifts = self.shifts

    def trace(self, done: Timeline, obj: tuple[list[float], list[int], list[float]],
              stopped: str) -> Trace:
        n = self.nrows
        rows = np.zeros(n, UPDATE_ROW_DTYPE)
        for j, name in enumerate(("stage", "group", "trajectory", "microbatch", "batch",
                                  "version", "local_staleness")):
            rows[name] = self.rows_i[:n, j]
        for j, name in enumerate(("loss", "grad_norm", "start", "end")):
            rows[name] = self.rows_f[:n, j]
        objective = Objective(np.array(obj[0], float), np.array(obj[1], np.int64),
                              np.array(obj[2]))
        return Trace(to_updates(rows, _delays(self.tl, self.G)), objective,
                     self.weights().copy(), _events(done, self.G, self.fversion), None,
                     stopped)


def _delays(tl: Timeline, groups: int) -> np.ndarray:
    """The delay rows of the updates in (slot, group, stage) order (as `sim._updates`)."""
    order = update_order(tl)
    if groups == 1:
        return order.delays
    n = order.slot.size
    keys = np.concatenate([order.slot * (groups + 1) + g for g in range(groups)])
    idx = np.concatenate([np.arange(n)] * groups)
    perm = np.lexsort((np.tile(order.stage, groups), keys))
    return np.asarray(order.delays[idx[perm]])


def _events(tl: Timeline, groups: int, fversion: np.ndarray) -> np.ndarray:
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
