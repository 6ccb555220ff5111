"""Randomized PipeDream on MPI ranks (DESIGN 2.6): one rank per stage, the plan is data.

Every rank computes the same `RPDPlan` (stage s_k, batch m_k, delays) from the same seed, so
nothing about the plan is communicated. Rank i runs, for k = 0, 1, ...: the forward of
iteration k with its block as it was after j_k^(i) global updates (a `BlockHistory` of the
last delta + 1 versions), then, if i >= s_k, the backward of iteration k, and if i == s_k the
update of its block. A rank at or above s_k waits for the gradient of iteration k; a rank
below s_k goes straight on to the next forward, so iterations overlap where their reads allow
(a rank's own updates always precede its later reads). The math is exactly the sequential
algorithm's (`rpd.simulate_rpd`): same plan, same stage calls, same order per stage.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rpd_mpi.engines.rpd import BlockHistory, RPDPlan
from rpd_mpi.ledger.parts import RankPart
from rpd_mpi.mpi.comm import Comm, RecvLink, SendLink, Waiter, wtime
from rpd_mpi.mpi.recorder import Recorder, hold
from rpd_mpi.progress import Progress
from rpd_mpi.records import BWD, FWD


class RPDRunner:
    """Rank i of an RPD run: its block's history, its links, its share of each iteration."""

    def __init__(self, cfg: Any, model: Any, comm: Comm, plan: RPDPlan, delta: int,
                 part: RankPart, waiter: Waiter, t0: float) -> None:
        self.cfg, self.plan, self.S, self.i = cfg, plan, comm.stages, comm.stage
        sl = model.slices[self.i]
        self.w = model.init_weights()[sl].copy()
        self.hist = BlockHistory(self.w, delta)
        self.mod = model.make_stage(self.i)
        self.rec = Recorder(part, comm, t0, sl.stop - sl.start,
                            cfg.eval_every // cfg.schedule.stages)
        self.losses = np.full(plan.stage.size, np.nan)
        self.progress = Progress(plan.stage.size, comm.rank == 0)
        shape, i, K = model.activation_shape(self.i), self.i, plan.stage.size
        back = int((plan.stage <= i).sum())          # iterations whose backward reaches i
        self.act_in = RecvLink(comm.act_comm, i - 1, shape, K, waiter, "activation") \
            if i > 0 else None
        self.act_out = SendLink(comm.act_comm, i + 1, shape, waiter, "activation") \
            if i < self.S - 1 else None
        self.grad_in = RecvLink(comm.grad_comm, i + 1, shape, back, waiter, "gradient") \
            if i < self.S - 1 else None
        self.grad_out = SendLink(comm.grad_comm, i - 1, shape, waiter, "gradient") \
            if i > 0 else None

    def run(self) -> None:
        for k in range(self.plan.stage.size):
            w_read, v, cache, g_last = self.forward(k)
            if self.i >= int(self.plan.stage[k]):
                self.backward(k, w_read, v, cache, g_last)
            if self.i == 0:
                self.progress.tick(k + 1)
        for link in (self.act_out, self.grad_out):
            if link:
                link.drain()
        if self.rec.taken.get(0) != self.hist.version:
            self.rec.snapshot(wtime(), self.w, 0, self.hist.version)
        self.rec.flush_rows()

    def forward(self, k: int) -> tuple[np.ndarray, int, Any, Any]:
        t_wait = wtime()
        a_in = self.act_in.take(k) if self.act_in else None
        start = wtime()
        w_read, v = self.hist.at(k - int(self.plan.delays[k, self.i]))
        batch = int(self.plan.batch[k])
        a_out, cache = self.mod.forward(w_read, a_in, batch)
        hold(self.cfg.runtime.op_cost, start)
        g_last, sent = None, 0
        if self.act_out:
            self.act_out.send(k, a_out)
            sent = a_out.nbytes
        else:
            self.losses[k], g_last = self.mod.loss(a_out, batch)
        if self.act_in:
            self.act_in.release()
        self.rec.event(FWD, k, 0, v, start, wtime(), start - t_wait, sent)
        return w_read, v, cache, g_last

    def backward(self, k: int, w_read: np.ndarray, v: int, cache: Any, g_last: Any) -> None:
        t_wait = wtime()
        g_out = self.grad_in.take(k) if self.grad_in else g_last
        start = wtime()
        batch, s_k = int(self.plan.batch[k]), int(self.plan.stage[k])
        g_w, g_in = self.mod.backward(w_read, cache, g_out, batch)
        hold(self.cfg.runtime.op_cost, start)
        sent = 0
        if self.i > s_k:
            self.grad_out.send(k, g_in)
            sent = g_in.nbytes
        if self.grad_in:
            self.grad_in.release()
        if self.i == s_k:
            self._update(k, batch, v, g_w, start)
        self.rec.event(BWD, k, 0, v, start, wtime(), start - t_wait, sent)

    def _update(self, k: int, batch: int, v: int, g_w: np.ndarray, start: float) -> None:
        self.w -= self.cfg.lr * g_w
        stale = self.hist.version - v
        self.hist.push(self.w, k)
        end = wtime()
        row = (self.i, 0, 0, k, batch, v, stale, math.nan, math.sqrt(float(g_w @ g_w)),
               start - self.rec.t0, end - self.rec.t0)
        self.rec.update(row, end, self.w, 0, self.hist.version)
