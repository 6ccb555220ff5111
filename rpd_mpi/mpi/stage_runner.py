"""The MPI runtime: each rank executes its stage's program (DESIGN 4, `mpi` engine).

`--order static` runs the stage's op sequence of the unit-time timeline (so the math equals
the simulator's); `--order dynamic` applies the 1F1B choice rule (`schedule.choose_1f1b`) to
what has actually arrived. Ops dispatch through a handler table; weight stashing as in the
simulator; every op is stamped with MPI.Wtime() (start, end, seconds blocked waiting) and
written, with the rank's updates and block snapshots, to the rank's part file as it goes.
With `--device cuda` the rank's blocks, stash and activations live on its GPU (`backend`),
the links come from `comm_gpu`, and snapshots and LocalSGD averages go through the host.

Stages compute (objectives), comm moves bytes, this module decides when.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from rpd_mpi.engines.blocks import FlushBuffer
from rpd_mpi.ledger.parts import RankPart
from rpd_mpi.mpi.backend import CPU, Backend
from rpd_mpi.mpi.comm import Comm, RecvLink, SendLink, Waiter, wtime
from rpd_mpi.mpi.recorder import Recorder, hold
from rpd_mpi.progress import Progress
from rpd_mpi.records import AVG, BWD, FWD, IDLE
from rpd_mpi.schedule.rules import choose_1f1b, next_turn
from rpd_mpi.schedule.timeline import Timeline


class StageRunner:
    """One rank = one stage (of one group): block, stash, links, handlers."""

    def __init__(self, cfg: Any, model: Any, comm: Comm, tl: Timeline, part: RankPart,
                 waiter: Waiter, t0: float, backend: Backend = CPU, links: Any = None
                 ) -> None:
        self.cfg, self.model, self.comm, self.tl = cfg, model, comm, tl
        self.S, self.s, self.g = tl.stages, comm.stage, comm.group
        self.G, self.R = cfg.schedule.groups, tl.trajectories
        self.backend = backend
        self.recv_link, self.send_link = (links.recv, links.send) if links else (RecvLink,
                                                                                 SendLink)
        sl = model.slices[self.s]
        # one block per trajectory (CPU: to_device returns the array itself)
        self.W = backend.to_device(np.tile(model.init_weights()[sl], (self.R, 1)))
        self.version = [0] * self.R
        self.mod = model.make_stage(self.s, self.g)
        self.stash: dict[int, tuple] = {}
        self.losses: dict[int, tuple[float, Any]] = {}
        self.flush = FlushBuffer(tl.flush, tl.microbatches)
        self.rec = Recorder(part, comm, t0, sl.stop - sl.start,
                            cfg.eval_every // cfg.schedule.stages, backend.to_host)
        self.waiter, self.op_cost = waiter, cfg.runtime.op_cost
        self.handlers: dict[int, Callable[[int], None]] = {
            FWD: self.forward, BWD: self.backward, AVG: self.average}
        self.progress = Progress(tl.microbatches, comm.rank == 0)
        self.fault = _parse_fault(cfg.runtime.fault, comm.rank)
        self.ops_done = 0
        self.idle_since: float | None = None
        self._links()

    def _links(self) -> None:
        shape, s, c = self.model.activation_shape(self.s), self.s, self.comm
        fslot, bslot = self.tl.op_slots(FWD), self.tl.op_slots(BWD)
        recv, send = self.recv_link, self.send_link
        self.act_in = recv(c.act_comm, s - 1, shape, int((fslot[:, s] >= 0).sum()),
                           self.waiter, "activation") if s > 0 else None
        self.grad_in = recv(c.grad_comm, s + 1, shape, int((bslot[:, s] >= 0).sum()),
                            self.waiter, "gradient") if s < self.S - 1 else None
        self.act_out = send(c.act_comm, s + 1, shape, self.waiter, "activation") \
            if s < self.S - 1 else None
        self.grad_out = send(c.grad_comm, s - 1, shape, self.waiter, "gradient") \
            if s > 0 else None
        # with a slot budget, send only what the peer will consume before the budget ends
        self.next_fwd = fslot[:, s + 1] >= 0 if s < self.S - 1 else None
        self.prev_bwd = bslot[:, s - 1] >= 0 if s > 0 else None

    def batch(self, mb: int) -> int:
        return (self.g + self.G * mb) % self.model.num_batches

    def _hold(self, start: float) -> None:
        hold(self.op_cost, start)

    def _wait_start(self) -> float:
        """When this op began waiting: now, or (dynamic order) when the idle wait before it
        began, so that time blocked in `_await` is charged to the op it was waiting for."""
        t, self.idle_since = (self.idle_since or wtime()), None
        return t

    def forward(self, mb: int) -> None:
        t_wait = self._wait_start()
        a_in = self.act_in.take(mb) if self.act_in else None
        start = wtime()
        r = mb % self.R
        w = self.W[r]
        batch = self.batch(mb)
        a_out, cache = self.mod.forward(w, a_in, batch)
        v = self.version[r]
        self.stash[mb] = (w.copy(), v, cache)
        if self.s == self.S - 1:
            self.losses[mb] = self.mod.loss(a_out, batch)
        self._hold(start)
        sent = 0
        if self.act_out and self.next_fwd[mb]:
            self.act_out.send(mb, a_out)
            sent = a_out.nbytes
        if self.act_in:
            self.act_in.release()
        self.rec.event(FWD, mb, r, v, start, wtime(), start - t_wait, sent)

    def backward(self, mb: int) -> None:
        t_wait = self._wait_start()
        g_out = self.grad_in.take(mb) if self.grad_in else self.losses[mb][1]
        start = wtime()
        r, batch = mb % self.R, self.batch(mb)
        w_read, v, cache = self.stash.pop(mb)
        g_w, g_in = self.mod.backward(w_read, cache, g_out, batch)
        self._hold(start)
        sent = 0
        if self.grad_out and self.prev_bwd[mb]:
            self.grad_out.send(mb, g_in)
            sent = g_in.nbytes
        if self.grad_in:
            self.grad_in.release()
        loss = self.losses.pop(mb)[0] if self.s == self.S - 1 else math.nan
        g_w = self.flush.add(r, mb, g_w)
        if g_w is not None:
            self._apply(mb, r, batch, v, loss, g_w, start)
        end = wtime()
        self.rec.event(BWD, mb, r, v, start, end, start - t_wait, sent)
        if self.s == 0:
            self.progress.tick(mb + 1)

    def _apply(self, mb: int, r: int, batch: int, v: int, loss: float, g_w: np.ndarray,
               start: float) -> None:
        step = self.cfg.lr * g_w
        self.W[r] -= step
        stale = self.version[r] - v
        self.version[r] += 1
        end = wtime()
        row = (self.s, self.g, r, mb, batch, v, stale, loss, math.sqrt(float(g_w @ g_w)),
               start - self.rec.t0, end - self.rec.t0)
        self.rec.update(row, end, self.W[r], self.g * self.R + r, self.version[r])

    def average(self, rnd: int) -> None:
        """LocalSGD round end: mean over this rank's R copies, then over the stage's groups."""
        start = wtime()
        mean = self.W.mean(axis=0)
        if self.G > 1:               # over the host (CPU: to_host/to_device are no-ops)
            host = self.backend.to_host(mean)
            self.comm.allreduce_mean(host, self.G)
            mean = self.backend.to_device(host)
        self.W[:] = mean
        end = wtime()
        for r in range(self.R):
            self.rec.snapshot(end, self.W[r], self.g * self.R + r, self.version[r])
        self.rec.event(AVG, rnd, 0, self.version[0], start, end, 0.0,
                       mean.nbytes if self.G > 1 else 0)

    def _inject(self) -> None:
        if self.fault and self.ops_done == self.fault[1]:
            if self.fault[0] == "raise":
                raise RuntimeError(f"injected fault at op {self.ops_done}")
            time.sleep(1e9)          # injected stall: the others must time out
        self.ops_done += 1

    def run_static(self, program: np.ndarray) -> None:
        for op, mb in zip(program["op"].tolist(), program["mb"].tolist()):
            self._inject()
            self.handlers[op](mb)
        self.finish()

    def run_dynamic(self) -> None:
        """PD 1F1B on what has arrived: F needs its activation (stage 0: NOAM), B its
        gradient; when neither is ready, wait politely for either."""
        N, noam = self.tl.microbatches, self.tl.noam
        nf = nb = 0
        has_b = turn_b = False
        while nb < N:
            f_ready = nf < N and (self.act_in.ready() if self.act_in else nf - nb < noam)
            b_ready = nb < nf and (self.grad_in.ready() if self.grad_in else True)
            op = choose_1f1b(b_ready, f_ready, has_b, turn_b)
            if op == IDLE:
                self._await(nf, nb, N)
                continue
            self._inject()
            self.handlers[op](nf if op == FWD else nb)
            nf, nb = (nf + 1, nb) if op == FWD else (nf, nb + 1)
            has_b, turn_b = next_turn(op, has_b, turn_b)
        self.finish()

    def _await(self, nf: int, nb: int, N: int) -> None:
        self.idle_since = self.idle_since or wtime()
        probes = [link.ready for link, want in ((self.act_in, nf < N), (self.grad_in, nb < nf))
                  if link is not None and want]
        self.waiter.until(probes, lambda: f"activation {nf} or gradient {nb} (dynamic order)")

    def finish(self) -> None:
        for link in (self.act_out, self.grad_out):
            if link:
                link.drain()
        for r in range(self.R):
            if self.rec.taken.get(self.g * self.R + r) != self.version[r]:
                self.rec.snapshot(wtime(), self.W[r], self.g * self.R + r, self.version[r])
        self.rec.flush_rows()


def _parse_fault(spec: str, rank: int) -> tuple[str, int] | None:
    """'raise:RANK:OP' or 'stall:RANK:OP' (testing aid) -> (kind, op) for this rank."""
    if not spec:
        return None
    kind, r, op = spec.split(":")
    return (kind, int(op)) if int(r) == rank else None
