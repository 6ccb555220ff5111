"""The unit-time simulator on the block-linear models, a slot at a time (docs/DESIGN.md 4).

`simulate_linear` runs what `sim._Engine` runs (PD, LocalSGD with G groups, GPipe, naive),
bit for bit, with the per-op Python handlers replaced by a few calls per slot: the slot's
forward products X_b[:, slice_s] @ w_s are ONE stacked `np.matmul` per stack of equal-width
stages (each item is the reference's own BLAS call on the same contiguous operands), the
backward products g @ X_b likewise, and the gradient norms g . g once at the end (one
stacked matmul over every update's gradient, the same dot per item); stashing, the lam and
noise terms, the GPipe flush sums, the SGD steps, the versions, the update rows and the
objective tracker's shifts (its own compiled kernel, called in the reference's order) are
numba loops (`kernels.sim_kernels`). With one stack (every stage as wide, e.g. E3) a slot
takes two kernel calls: the backward operands, then `_sim_close` (terms, updates and the
next slot's forwards), each with the run's fixed arrays passed as one tuple. The loss,
LocalSGD's average and the objective are the reference's numpy calls. Gradient noise:
stage s of group g draws at each of its backwards, in microbatch order, from the stage
module's generator; those draws are made up front (`engines.linear_ops`, with the op
tables and the operands, laid out once per model).

It returns None, and `sim.simulate` runs the reference engine instead, when it does not apply
(not a block-linear model, no numba, more than two block widths, a very large state, a run
too short to pay for loading the compiled kernels: `MIN_UPDATES`) and
when a health check fails (a loss, gradient or objective that is not finite or over
--diverge-factor; the gradient norms are checked with the norms, at the end): the reference
then reruns the run from the start and stops where it stops.
A stop signal is handled here, between slots, as the reference does. Pure: no MPI, no h5py.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from rpd_mpi import signals
from rpd_mpi.engines.cadence import due
from rpd_mpi.engines.health import Diverged, Health
from rpd_mpi.engines.linear_ops import (Ops, delay_rows, draw_noise, layout, run_events,
                                        stacks_of)
from rpd_mpi.objectives import kernels
from rpd_mpi.objectives.linear import BlockLinearModel
from rpd_mpi.records import BWD, FWD, UPDATE_ROW_DTYPE, Objective, Trace, to_updates
from rpd_mpi.schedule.delays import update_mask
from rpd_mpi.schedule.timeline import Timeline

MAX_STATE = 1 << 26            # doubles of stash, noise and activations the fast path holds
MIN_UPDATES = 2048             # fewer block updates: loading the kernels costs more than
                               # the reference engine (~0.2 s vs ~40 us per update)


class _Unhealthy(Exception):
    """A health check failed: the reference engine reruns the run."""


def simulate_linear(tl: Timeline, model: Any, lr: float, *, groups: int = 1,
                    eval_every: int = 1, progress: Callable[[int], None] | None = None,
                    diverge_factor: float = 0.0, min_updates: int = MIN_UPDATES
                    ) -> Trace | None:
    """`sim.simulate` for a block-linear model (same arguments), or None where the fast path
    does not apply (also: fewer than `min_updates` block updates) or a health check fails
    (see the module docstring)."""
    if not isinstance(model, BlockLinearModel) or not kernels.HAVE_NUMBA:
        return None
    stacks = stacks_of(model)
    G, S, N = groups, model.stages, tl.microbatches
    updates = G * int(update_mask(tl).sum())
    width = max(m for _, _, m in stacks)
    if len(stacks) > 2 or updates < min_updates or \
            G * N * model.dim * 2 + G * N * S * model.batch_size + updates * width > MAX_STATE:
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
        self.S, self.N, self.R, self.C, self.T = S, N, R, G * R, tl.slots
        self.kern = kernels.sim_kernels()
        self.health = Health(diverge_factor)
        self.bounds = np.array([sl.start for sl in model.slices] + [model.dim], np.int64)
        stack_of = np.zeros(S, np.int64)
        k_of = np.zeros(S, np.int64)
        for c, (lo, hi, m) in enumerate(stacks):
            stack_of[lo:hi], k_of[lo:hi] = c, np.arange(hi - lo)
        self.xs, self.cols = layout(model, stacks, self.bounds)
        self.widths = [m for _, _, m in stacks]
        width = max(self.widths)
        self.F = Ops(tl, FWD, G, model.num_batches, stack_of, k_of)
        self.B = Ops(tl, BWD, G, model.num_batches, stack_of, k_of)
        self.W = np.tile(model.init_weights(), (self.C, 1))
        self.tracker = model.objective_tracker(self.weights())
        self.version = np.zeros((G, S, R), np.int64)
        self.stash = np.zeros((G, N, S, width))
        self.stash_ver = np.zeros((G, N, S), np.int64)
        self.fversion = np.zeros((G, N, S), np.int64)
        self.acts = np.zeros((G, N, S, b))
        self.glast = np.zeros((G, N, b))
        self.losses = np.zeros((G, N))
        self.noise = draw_noise(model, tl, G, width)
        self.acc = np.zeros((G, S, R, width))
        self.cnt = np.zeros((G, S, R), np.int64)
        most = max(int(np.diff(self.F.start).max(initial=0)),
                   int(np.diff(self.B.start).max(initial=0)), 1)
        self.abuf = [np.zeros((most, b, m)) for m in self.widths]
        self.wbuf = [np.zeros((most, m, 1)) for m in self.widths]
        self.pbuf = np.zeros((most, b, 1))
        self.gbuf = np.zeros((most, 1, b))
        self.gw = [np.zeros((most, 1, m)) for m in self.widths]
        self.upad = np.zeros((most, width))
        self.applied = np.zeros(most, np.bool_)
        self.step_buf = np.zeros(width)
        K = G * int(update_mask(tl).sum())
        self.rows_i = np.zeros((K, 7), np.int64)
        self.rows_f = np.zeros((K, 4))
        self.grads = np.zeros((K, width))      # each row's gradient: the norms, at the end
        self.stack_of = stack_of
        self.nrows, self.shifts = 0, 0
        self.close_args: tuple[Any, ...] = ()          # `one_stack_args`
        self.forward_args: tuple[Any, ...] = ()
        self.finish_args: tuple[Any, ...] = ()
        self.views: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.last = model.make_stage(S - 1)
        loss_ops = np.nonzero(self.F.s == S - 1)[0]               # F ops on the last stage
        self.loss_start = np.searchsorted(self.F.t[loss_ops], np.arange(tl.slots + 1)).tolist()
        self.loss_ops = list(zip(*(a[loss_ops].tolist()              # (g, mb, batch) ints
                                   for a in (self.F.g, self.F.mb, self.F.batch))))
        # per-slot op ranges as Python ints
        self.fstart = [st.tolist() for _, st in self.F.by_stack]
        self.bstart = [st.tolist() for _, st in self.B.by_stack]
        self.ball = self.B.start.tolist()

    def weights(self) -> np.ndarray:
        return np.asarray(self.W[0] if self.W.shape[0] == 1 else self.W.mean(axis=0))

    def run(self, eval_every: int, progress: Callable[[int], None] | None) -> Trace:
        tl, averages = self.tl, set(self.tl.averages)
        obj_t, obj_k, obj_v = [0.0], [0], [self.tracker.value()]
        one = len(self.widths) == 1          # one stack: `step_one`, 2 kernel calls a slot
        forwarded = False                    # slot t's forwards already ran (`_sim_close`)
        value, check, last = self.tracker.value, signals.check, tl.slots - 1
        for t in range(tl.slots):
            try:
                check()
            except signals.SignalStop as err:
                if obj_k[-1] != self.nrows:
                    obj_t.append(t + 1)
                    obj_k.append(self.nrows)
                    obj_v.append(value())
                return self.trace(tl.truncate(t), (obj_t, obj_k, obj_v),
                                  signals.name(err.signum))
            before = self.nrows
            average = t in averages
            if one:
                forwarded = self.step_one(t, forwarded, not average)
            else:
                self.step(t)
            if average:
                self.W[:] = self.W.mean(axis=0)
            if progress is not None:
                progress(t + 1)
            if due(before, self.nrows, eval_every) or t == last:
                v = value()
                obj_t.append(t + 1)
                obj_k.append(self.nrows)
                obj_v.append(v)
                if not math.isfinite(v):
                    raise _Unhealthy
        return self.trace(tl, (obj_t, obj_k, obj_v), "")

    def forward(self, c: int, f0: int, f1: int) -> None:
        """F ops f0..f1 of stack c: the stash and the stacked operands."""
        self.kern["_sim_forward"](f0, f1, self.F.by_stack[c][0], self.R, self.W, self.bounds,
                                  self.xs[c], self.stash, self.stash_ver, self.version,
                                  self.fversion, self.abuf[c], self.wbuf[c])

    def step(self, t: int) -> None:
        """Slot t: forwards, backwards and updates of every stack, then this slot's losses
        (only later backwards read them)."""
        F, B, k, m = self.F, self.B, self.kern, self.model
        for c, ((ftab, _), (btab, _)) in enumerate(zip(F.by_stack, B.by_stack)):
            f0, f1 = self.fstart[c][t], self.fstart[c][t + 1]
            b0, b1 = self.bstart[c][t], self.bstart[c][t + 1]
            if f1 > f0:
                self.forward(c, f0, f1)
                np.matmul(self.abuf[c][:f1 - f0], self.wbuf[c][:f1 - f0],
                          out=self.pbuf[:f1 - f0])
            if f1 > f0 or b1 > b0:
                k["_sim_finish_backward"](f0, f1, b0, b1, ftab, self.pbuf, self.acts, btab,
                                          self.glast, self.xs[c], self.gbuf, self.abuf[c])
            if b1 == b0:
                continue
            n = b1 - b0
            np.matmul(self.gbuf[:n], self.abuf[c][:n], out=self.gw[c][:n])
            k["_sim_terms"](b0, b1, btab, self.bounds, self.gw[c], m.lam, m.noise,
                            self.stash, self.noise, self.tl.flush, self.N, self.acc,
                            self.cnt, self.upad, self.applied)
        self.apply(t, self.ball[t])
        self.losses_of(t)

    def step_one(self, t: int, forwarded: bool, may_forward: bool) -> bool:
        """`step` for one stack, in two kernel calls: slot t's forwards ran at the end of
        slot t - 1 when `forwarded`; `_sim_close` runs this slot's terms and updates and
        the next slot's forwards (unless not `may_forward`, an average comes first, or a
        resync interrupts the updates: then they run here, after it). Returns whether the
        next slot's forwards ran."""
        if not self.close_args:
            self.one_stack_args()
        k, fs, bs = self.kern, self.fstart[0], self.bstart[0]
        f0, f1, b0, b1 = fs[t], fs[t + 1], bs[t], bs[t + 1]
        if f1 > f0:
            if not forwarded:
                k["_sim_forward"](f0, f1, *self.forward_args)
            np.matmul(*self.operands(f1 - f0))
        if f1 > f0 or b1 > b0:
            k["_sim_finish_backward"](f0, f1, b0, b1, *self.finish_args)
        n0, n1 = (fs[t + 1], fs[t + 2]) if may_forward and t + 1 < self.T else (0, 0)
        if b1 == b0:
            self.losses_of(t)
            if n1 > n0:
                k["_sim_forward"](n0, n1, *self.forward_args)   # after this slot's matmul
            return n1 > n0
        np.matmul(*self.operands(b0 - b1))
        a0, a1, before = self.ball[t], self.ball[t + 1], self.shifts
        nxt, self.nrows, self.shifts = k["_sim_close"](
            b0, b1, a0, a1, n0, n1, t, self.nrows, before, *self.close_args)
        tr = self.tracker
        if self.shifts != before and self.shifts % tr.resync == 0:
            np.matmul(self.model.X, tr.w, out=tr.p)          # ObjectiveTracker's resync
        if nxt < a1:                # stopped for that resync: the rest, then the forwards
            self.apply(t, nxt)
        tr.shifts = self.shifts
        self.losses_of(t)
        if nxt < a1 and n1 > n0:
            k["_sim_forward"](n0, n1, *self.forward_args)
        return n1 > n0

    def one_stack_args(self) -> None:
        """The run's fixed arguments of the kernels `step_one` calls, in one tuple each."""
        (ftab, _), (btab, _) = self.F.by_stack[0], self.B.by_stack[0]
        m, tr = self.model, self.tracker
        self.forward_args = (ftab, self.R, self.W, self.bounds, self.xs[0], self.stash,
                             self.stash_ver, self.version, self.fversion, self.abuf[0],
                             self.wbuf[0])
        self.finish_args = (ftab, self.pbuf, self.acts, btab, self.glast, self.xs[0],
                            self.gbuf, self.abuf[0])
        self.close_args = (
            btab, self.gw[0], m.lam, m.noise, self.stash, self.noise, self.tl.flush, self.N,
            self.acc, self.cnt, self.upad, self.applied, self.B.all, self.grads, self.lr,
            self.R, self.W, self.bounds, self.version, self.stash_ver, self.losses,
            self.cols[0], -1.0 / self.C, tr.p, tr.w, self.step_buf, tr.resync, self.rows_i,
            self.rows_f, ftab, self.xs[0], self.fversion, self.abuf[0], self.wbuf[0])

    def operands(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The one stack's matmul operands (a, b, out) for n forwards (n > 0) or n backwards
        (n < 0), as views made once per count."""
        views = self.views.get(n)
        if views is None:
            if n > 0:
                views = (self.abuf[0][:n], self.wbuf[0][:n], self.pbuf[:n])
            else:
                views = (self.gbuf[:-n], self.abuf[0][:-n], self.gw[0][:-n])
            self.views[n] = views
        return views

    def losses_of(self, t: int) -> None:
        """Slot t's last-stage losses (the reference's numpy calls) and health checks."""
        last, S1, ops = self.last, self.S - 1, self.loss_ops
        for i in range(self.loss_start[t], self.loss_start[t + 1]):
            g, mb, batch = ops[i]
            loss, grad = last.loss(self.acts[g, mb, S1], batch)
            try:
                self.health.loss(loss, S1, mb)
            except Diverged:
                raise _Unhealthy from None
            self.losses[g, mb] = loss
            self.glast[g, mb] = grad

    def apply(self, t: int, first: int) -> None:
        """Slot t's updates from op `first` on (`_sim_apply`, with the tracker's resyncs)."""
        tr, b0, b1 = self.tracker, self.ball[t], self.ball[t + 1]
        while first < b1:
            before = self.shifts
            first, self.nrows, self.shifts = self.kern["_sim_apply"](
                b0, b1, first, self.B.all, self.applied, self.upad, self.grads, self.lr,
                self.R, self.W, self.bounds, self.version, self.stash_ver, self.losses,
                self.cols[0], self.cols[-1], -1.0 / self.C, tr.p, tr.w, self.step_buf,
                self.shifts, tr.resync, t, self.nrows, self.rows_i, self.rows_f)
            if self.shifts != before and self.shifts % tr.resync == 0:
                np.matmul(self.model.X, tr.w, out=tr.p)      # ObjectiveTracker's resync
        tr.shifts = self.shifts

    def norms(self, n: int) -> None:
        """The grad_norm column of rows 0..n: sqrt(g . g) as the reference computes it (one
        stacked matmul per block width, each item the same BLAS dot on the same contiguous
        m values); a norm that is not finite is a failed health check."""
        stack = self.stack_of[self.rows_i[:n, 0]]
        for c, m in enumerate(self.widths):
            idx = np.nonzero(stack == c)[0]
            g = np.ascontiguousarray(self.grads[idx, :m])
            sq = np.matmul(g.reshape(-1, 1, m), g.reshape(-1, m, 1))
            if not np.isfinite(sq).all():
                raise _Unhealthy
            self.rows_f[idx, 1] = np.sqrt(sq[:, 0, 0])

    def trace(self, done: Timeline, obj: tuple[list[float], list[int], list[float]],
              stopped: str) -> Trace:
        n = self.nrows
        self.norms(n)
        rows = np.zeros(n, UPDATE_ROW_DTYPE)
        for j, name in enumerate(("stage", "group", "trajectory", "microbatch", "batch",
                                  "version", "local_staleness")):
            rows[name] = self.rows_i[:n, j]
        for j, name in enumerate(("loss", "grad_norm", "start", "end")):
            rows[name] = self.rows_f[:n, j]
        objective = Objective(np.array(obj[0], float), np.array(obj[1], np.int64),
                              np.array(obj[2]))
        return Trace(to_updates(rows, delay_rows(self.tl, self.G)), objective,
                     self.weights().copy(), run_events(done, self.G, self.fversion), None,
                     stopped)
