"""Randomized PipeDream on MPI ranks (docs/DESIGN.md 2.6, 4.3): one rank per stage.

Every rank computes the same `RPDPlan` (stage s_k, batch m_k, delays) from the same seed, so
nothing about the plan is communicated. Rank i runs, for k = 0, 1, ...: the forward of
iteration k with its block as it was after j_k^(i) global updates (its `BlockState` keeps the
last delta + 1 versions), then, if i >= s_k, the backward of iteration k, and if i == s_k the
update of its block. A rank at or above s_k waits for the gradient of iteration k; a rank
below s_k goes straight on to the next forward, so iterations overlap where their reads allow
(a rank's own updates always precede its later reads). The math is exactly the sequential
algorithm's (`rpd.simulate_rpd`): same plan, same stage calls, same order per stage.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rpd_mpi.checkpoint import Writer
from rpd_mpi.config import RunConfig
from rpd_mpi.engines.blocks import BlockState, Stashed
from rpd_mpi.engines.health import Health
from rpd_mpi.engines.resume import restore_rngs, rng_states
from rpd_mpi.engines.rpd import RPDPlan
from rpd_mpi.ledger.parts import RankPart
from rpd_mpi.mpi.comm import Comm, Stopped, Waiter, wtime
from rpd_mpi.mpi.cut import END, Cutter, CutRunner, Held, next_input
from rpd_mpi.mpi.comm_links import stage_links
from rpd_mpi.mpi.recorder import Recorder, hold
from rpd_mpi.mpi.runner import STOPS, RunnerResult, stop_for
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.progress import Progress
from rpd_mpi.records import BWD, FWD


class RPDRunner(CutRunner):
    """Rank i of an RPD run: its block's `BlockState` (with history), links, share of each
    iteration."""

    def __init__(self, cfg: RunConfig, model: Model, comm: Comm, plan: RPDPlan, delta: int,
                 part: RankPart, waiter: Waiter, t0: float, writer: Writer | None = None,
                 resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.plan, self.S, self.i = cfg, plan, comm.stages, comm.stage
        sl = model.slices[self.i]
        self.health = Health(cfg.diverge_factor)
        self.state = BlockState(self.i, [model.init_weights()[sl].copy()], cfg.lr,
                                history=delta, health=self.health)
        self.comm = comm
        self.mod = model.make_stage(self.i)
        self.rec = Recorder(part, comm, t0, sl.stop - sl.start, cfg.eval_every)
        self.losses = np.full(plan.stage.size, np.nan)
        self.progress = Progress(plan.stage.size, comm.rank == 0 and not cfg.quiet,
                                 what="iterations")
        K = plan.stage.size
        back = plan.stage <= self.i                   # iterations whose backward reaches i
        # this rank's ops: F of every iteration k (position 2k), B where it reaches i (2k + 1)
        self.ops = [(op, k) for k in range(K) for op in ((FWD, BWD) if back[k] else (FWD,))]
        self.pc = 0
        self.pending: tuple[Stashed, Any] | None = None     # F(k) done, B(k) to come
        self.held = Held(resume["held"] if resume else None)
        self.taken = dict(resume["taken"]) if resume else {"act": 0, "grad": 0}
        grads = np.nonzero(back)[0] if self.i < self.S - 1 else np.zeros(0, np.int64)
        self.links = stage_links(comm, self.i, self.S, model.activation_shape(self.i),
                                 K - self.taken["act"], grads.size - self.taken["grad"],
                                 waiter)
        self.cutter: Cutter | None = None
        if writer is not None:
            self.cutter = Cutter(comm, waiter, self.links, writer, self.held, self.taken,
                                 lambda a: np.array(a, copy=True))
            self.cutter.mb_of = {"act": lambda n: n if n < K else -1,
                                 "grad": lambda n: int(grads[n]) if n < grads.size else -1}
            positions = [2 * k + (op == BWD) for op, k in self.ops] + [END]
            self.cutter.position = lambda begun: positions[self.pc + 1 if begun else self.pc]
            waiter.on_cut = self.cutter.hook
        if resume:
            self._restore(resume)

    def run(self) -> RunnerResult:
        """Every iteration's share; a divergence announces a stop, a stop ends the loop."""
        divergence, write_error = None, ""
        positions = [2 * k + (op == BWD) for op, k in self.ops] + [END]

        def step() -> None:
            if self.comm.stop.raised():
                raise Stopped("another rank stopped the job")
            op, k = self.ops[self.pc]
            if op == FWD:
                self.pending = self.forward(k)
            else:
                assert self.pending is not None
                self.backward(k, *self.pending)
            if op == FWD and (self.pc + 1 == len(self.ops) or self.ops[self.pc + 1][0] == FWD):
                self.pending = None
            self.pc += 1
            if self.i == 0:
                self.progress.tick(k + 1)
        try:
            while self.pc < len(self.ops):
                self._op(step, lambda T: self._catch_up(step, positions, T))
            self._end_round()
            self.links.drain()
        except STOPS as err:
            divergence, write_error = stop_for(err, self.comm)
        if not write_error:
            self.rec.final_snapshots(self.state.blocks, [0], self.state.version)
            self.rec.flush_rows()
        losses = self.losses if self.i == self.S - 1 else None
        return RunnerResult(self.links, losses, divergence, write_error)

    def updates_done(self) -> int:
        return int(self.state.version[0])

    def checkpoint(self) -> dict[str, Any]:
        """This rank's part of the cut (`_restore` is the inverse)."""
        self.rec.flush()
        return {"pc": self.pc, "pending": self.pending, "W": self.state.blocks[0].copy(),
                "block": self.state.checkpoint(), "losses": self.losses.copy(),
                "held": self.held.state(), "taken": dict(self.taken),
                "rng": rng_states([self.mod]), "recorder": self.rec.checkpoint(),
                "part": self.rec.part.counts()}

    def _restore(self, st: dict[str, Any]) -> None:
        self.pc, self.pending = int(st["pc"]), st["pending"]
        self.state.blocks[0][...] = st["W"]
        self.state.restore(st["block"])
        self.losses[...] = st["losses"]
        restore_rngs([self.mod], st["rng"])
        self.rec.restore(st["recorder"])

    def _input(self, kind: str, link: Any, k: int) -> tuple[Any, bool]:
        return next_input(self.held, self.taken, kind, link, k)

    def forward(self, k: int) -> tuple[Stashed, Any]:
        t_wait, links = wtime(), self.links
        a_in, release = self._input("act", links.act_in, k) if links.act_in else (None, False)
        if self.cutter is not None:
            self.cutter.begun = True
        start = wtime()
        w_read, v = self.state.read_at(k - int(self.plan.delays[k, self.i]))
        batch = int(self.plan.batch[k])
        a_out, cache = self.mod.forward(w_read, a_in, batch)
        hold(self.cfg.runtime.op_cost, start)
        g_last, sent = None, 0
        if links.act_out:
            links.act_out.send(k, a_out)
            sent = a_out.nbytes
        else:
            self.losses[k], g_last = self.mod.loss(a_out, batch)
            self.health.loss(float(self.losses[k]), self.i, k)
        if release and links.act_in:
            links.act_in.release()
        self.rec.event(FWD, k, 0, v, start, wtime(), start - t_wait, sent)
        return Stashed(w_read, v, cache), g_last

    def backward(self, k: int, read: Stashed, g_last: Any) -> None:
        t_wait, links = wtime(), self.links
        g_out, release = self._input("grad", links.grad_in, k) if links.grad_in \
            else (g_last, False)
        if self.cutter is not None:
            self.cutter.begun = True
        start = wtime()
        batch, s_k = int(self.plan.batch[k]), int(self.plan.stage[k])
        g_w, g_in = self.mod.backward(read.block, read.cache, g_out, batch)
        hold(self.cfg.runtime.op_cost, start)
        sent = 0
        if self.i > s_k and links.grad_out and g_in is not None:
            links.grad_out.send(k, g_in)
            sent = g_in.nbytes
        if release and links.grad_in:
            links.grad_in.release()
        if self.i == s_k:
            row = self.state.apply(0, g_w, microbatch=k, batch=batch, version=read.version,
                                   start=start - self.rec.t0, end=self.rec.now)
            assert row is not None              # RPD has no flushes
            self.rec.update(row, self.state.blocks[0], 0, self.state.version[0])
        self.rec.event(BWD, k, 0, read.version, start, wtime(), start - t_wait, sent)
