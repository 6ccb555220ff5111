"""PD, LocalSGD, GPipe and naive on MPI ranks: each rank executes its stage's program.

`--order static` runs the stage's op sequence of the unit-time timeline (so the math equals
the simulator's); `--order dynamic` applies the 1F1B choice rule (`schedule.choose_1f1b`) to
what has actually arrived (docs/DESIGN.md 4.2). Ops dispatch through a handler table; the
block, stash, flush and SGD step are the simulator's (`engines.blocks.BlockState`); every op
is stamped with MPI.Wtime() (start, end, seconds blocked waiting) and
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

from rpd_mpi.checkpoint import Writer
from rpd_mpi.config import RunConfig
from rpd_mpi.engines.blocks import BlockState, FlushBuffer, batch_of
from rpd_mpi.engines.health import Health
from rpd_mpi.ledger.parts import RankPart
from rpd_mpi.mpi.backend import CPU, Backend
from rpd_mpi.engines.resume import restore_rngs, rng_states
from rpd_mpi.mpi.comm import Comm, Stopped, Waiter, wtime
from rpd_mpi.mpi.comm_gpu import Links
from rpd_mpi.mpi.cut import END, Cutter, CutRunner, Held, next_input
from rpd_mpi.mpi.comm_links import stage_links
from rpd_mpi.mpi.recorder import Recorder, hold
from rpd_mpi.mpi.runner import STOPS, RunnerResult, stop_for
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.progress import Progress
from rpd_mpi.records import AVG, BWD, FWD, IDLE, Divergence
from rpd_mpi.schedule.rules import choose_1f1b, next_turn, noam_allows
from rpd_mpi.schedule.timeline import Timeline


class StageRunner(CutRunner):
    """One rank = one stage (of one group): its `BlockState`, links, handlers."""

    def __init__(self, cfg: RunConfig, model: Model, comm: Comm, tl: Timeline, part: RankPart,
                 waiter: Waiter, t0: float, backend: Backend = CPU,
                 links: Links | None = None, writer: Writer | None = None,
                 resume: dict[str, Any] | None = None) -> None:
        self.cfg, self.model, self.comm, self.tl = cfg, model, comm, tl
        self.S, self.s, self.g = tl.stages, comm.stage, comm.group
        self.G, self.R = cfg.schedule.groups, tl.trajectories
        self.backend = backend
        sl = model.slices[self.s]
        # one block per trajectory (CPU: to_device returns the array itself)
        self.W = backend.to_device(np.tile(model.init_weights()[sl], (self.R, 1)))
        self.health = Health(cfg.diverge_factor)
        self.state = BlockState(self.s, [self.W[r] for r in range(self.R)], cfg.lr,
                                group=self.g, flush=FlushBuffer(tl.flush, tl.microbatches),
                                health=self.health)
        self.divergence: Divergence | None = None
        self.mod = model.make_stage(self.s, self.g)
        self.losses: dict[int, tuple[float, Any]] = {}
        self.rec = Recorder(part, comm, t0, sl.stop - sl.start, cfg.eval_every,
                            backend.to_host)
        self.waiter, self.op_cost = waiter, cfg.runtime.op_cost
        self.handlers: dict[int, Callable[[int], None]] = {
            FWD: self.forward, BWD: self.backward, AVG: self.average}
        self.progress = Progress(tl.microbatches, comm.rank == 0 and not cfg.quiet)
        self.fault = _parse_fault(cfg.runtime.fault, comm.rank)
        self.ops_done = 0
        self.idle_since: float | None = None
        self.pc = 0                           # static order: the next op of the program
        self.nf = self.nb = 0                 # dynamic order: the 1F1B state
        self.has_b = self.turn_b = False
        self.held = Held(resume["held"] if resume else None)
        self.taken = dict(resume["taken"]) if resume else {"act": 0, "grad": 0}
        self._links(links)
        self.cutter: Cutter | None = None
        if writer is not None:
            self.cutter = Cutter(comm, waiter, self.links, writer, self.held, self.taken,
                                 lambda a: np.array(backend.to_host(a), copy=True))
            self.cutter.mb_of = self._message_order()
            waiter.on_cut = self.cutter.hook
        if resume:
            self._restore(resume)

    def _links(self, device: Links | None) -> None:
        s = self.s
        fslot, bslot = self.tl.op_slots(FWD), self.tl.op_slots(BWD)
        kinds = {"recv": device.recv, "send": device.send} if device else {}
        # a resumed run receives what the cut had not yet taken off the links
        acts = int((fslot[:, s] >= 0).sum()) - self.taken["act"]
        grads = int((bslot[:, s] >= 0).sum()) - self.taken["grad"]
        self.links = stage_links(self.comm, s, self.S, self.model.activation_shape(s),
                                 acts, grads, self.waiter, **kinds,
                                 dtype=getattr(self.model, "dtype", np.float64))
        # with a slot budget, send only what the peer will consume before the budget ends
        self.next_fwd = fslot[:, s + 1] >= 0 if s < self.S - 1 else None
        self.prev_bwd = bslot[:, s - 1] >= 0 if s > 0 else None

    def batch(self, mb: int) -> int:
        return batch_of(self.g, self.G, mb, self.model.num_batches)

    def _hold(self, start: float) -> None:
        hold(self.op_cost, start)

    def _wait_start(self) -> float:
        """When this op began waiting: now, or (dynamic order) when the idle wait before it
        began, so that time blocked in `_await` is charged to the op it was waiting for."""
        t, self.idle_since = (self.idle_since or wtime()), None
        return t

    def _take(self, kind: str, link: Any, mb: int) -> tuple[Any, bool]:
        return next_input(self.held, self.taken, kind, link, mb, self.backend.to_device)

    def forward(self, mb: int) -> None:
        t_wait, links = self._wait_start(), self.links
        a_in, release = self._take("act", links.act_in, mb) if links.act_in else (None, False)
        self._begin()
        start = wtime()
        r, batch = mb % self.R, self.batch(mb)
        a_out, cache = self.mod.forward(self.state.blocks[r], a_in, batch)
        v = self.state.read(r, mb, cache)
        if self.s == self.S - 1:
            self.losses[mb] = self.mod.loss(a_out, batch)
            self.health.loss(self.losses[mb][0], self.s, mb)
        self._hold(start)
        sent = 0
        if links.act_out and self.next_fwd is not None and self.next_fwd[mb]:
            links.act_out.send(mb, a_out)
            sent = a_out.nbytes
        if release and links.act_in:
            links.act_in.release()
        self.rec.event(FWD, mb, r, v, start, wtime(), start - t_wait, sent)

    def backward(self, mb: int) -> None:
        t_wait, links = self._wait_start(), self.links
        g_out, release = self._take("grad", links.grad_in, mb) if links.grad_in \
            else (self.losses[mb][1], False)
        self._begin()
        start = wtime()
        r, batch = mb % self.R, self.batch(mb)
        read = self.state.take(mb)
        g_w, g_in = self.mod.backward(read.block, read.cache, g_out, batch)
        self._hold(start)
        sent = 0
        if links.grad_out and g_in is not None and self.prev_bwd is not None \
                and self.prev_bwd[mb]:
            links.grad_out.send(mb, g_in)
            sent = g_in.nbytes
        if release and links.grad_in:
            links.grad_in.release()
        loss = self.losses.pop(mb)[0] if self.s == self.S - 1 else math.nan
        row = self.state.apply(r, g_w, microbatch=mb, batch=batch, version=read.version,
                               trajectory=r, loss=loss, start=start - self.rec.t0,
                               end=self.rec.now)
        if row is not None:
            self.rec.update(row, self.state.blocks[r], self._copy(r), self.state.version[r])
        self.rec.event(BWD, mb, r, read.version, start, wtime(), start - t_wait, sent)
        if self.s == 0:
            self.progress.tick(mb + 1)

    def _copy(self, r: int) -> int:
        """The model copy of trajectory r of this group (the ledger's snapshot key)."""
        return self.g * self.R + r

    def _begin(self) -> None:
        """The op has its input: from here a cut waits for it to end (`cut.Cutter.hook`)."""
        if self.cutter is not None:
            self.cutter.begun = True

    def average(self, rnd: int) -> None:
        """LocalSGD round end: mean over this rank's R copies, then over the stage's groups."""
        self._begin()
        start = wtime()
        mean = self.W.mean(axis=0)
        if self.G > 1:               # over the host (CPU: to_host/to_device are no-ops)
            host = self.backend.to_host(mean)
            self.comm.allreduce_mean(host, self.G)
            mean = self.backend.to_device(host)
        self.W[:] = mean
        end = wtime()
        for r in range(self.R):
            self.rec.snapshot(end - self.rec.t0, self.W[r], self._copy(r),
                              self.state.version[r])
        self.rec.event(AVG, rnd, 0, self.state.version[0], start, end, 0.0,
                       mean.nbytes if self.G > 1 else 0)

    def _inject(self) -> None:
        if self.comm.stop.raised():
            raise Stopped("another rank stopped the job")
        if self.fault and self.ops_done == self.fault[1]:
            if self.fault[0] == "raise":
                raise RuntimeError(f"injected fault at op {self.ops_done}")
            time.sleep(1e9)          # injected stall: the others must time out

    def run_static(self, program: np.ndarray) -> RunnerResult:
        """The stage's ops in timeline order (the simulator's math exactly), from `pc` on
        (a resumed run: where the checkpoint's cut left it)."""
        ops, mbs = program["op"].tolist(), program["mb"].tolist()
        slots = program["slot"].tolist() + [END]
        if self.cutter is not None:
            self.cutter.position = lambda begun: slots[self.pc + 1 if begun else self.pc]

        def step() -> None:
            self._inject()
            self.handlers[ops[self.pc]](mbs[self.pc])
            self.pc += 1
            self.ops_done += 1           # after the op: a cut that interrupted it reruns it

        def body() -> None:
            while self.pc < len(ops):
                self._op(step, lambda T: self._catch_up(step, slots, T))
            self._end_round()
        return self._guarded(body)

    def updates_done(self) -> int:
        return int(sum(self.state.version))

    def checkpoint(self) -> dict[str, Any]:
        """This rank's part of the cut (plain data; `_restore` is the inverse)."""
        to_host = self.backend.to_host
        self.rec.flush()
        return {"pc": self.pc, "dynamic": (self.nf, self.nb, self.has_b, self.turn_b),
                "W": np.array(to_host(self.W), copy=True),
                "block": self.state.checkpoint(lambda a: np.asarray(to_host(a))),
                "losses": {k: (v[0], np.array(to_host(v[1]), copy=True))
                           for k, v in self.losses.items()},
                "held": self.held.state(), "taken": dict(self.taken),
                "rng": rng_states([self.mod]), "ops_done": self.ops_done,
                "recorder": self.rec.checkpoint(), "part": self.rec.part.counts()}

    def _restore(self, st: dict[str, Any]) -> None:
        dev = self.backend.to_device
        self.pc = int(st["pc"])
        self.nf, self.nb, self.has_b, self.turn_b = st["dynamic"]
        self.W[...] = dev(st["W"])                # in place: the blocks are views of W
        self.state.restore(st["block"], dev)
        self.losses = {k: (v[0], dev(v[1])) for k, v in st["losses"].items()}
        restore_rngs([self.mod], st["rng"])
        self.ops_done = int(st["ops_done"])
        self.rec.restore(st["recorder"])

    def _message_order(self) -> dict[str, Callable[[int], int]]:
        """The microbatch of the n-th message on each incoming link (-1: no more)."""
        if self.cfg.runtime.order == "dynamic":
            N = self.tl.microbatches
            return {kind: (lambda n: n if n < N else -1) for kind in ("act", "grad")}
        fslot, bslot = self.tl.op_slots(FWD)[:, self.s], self.tl.op_slots(BWD)[:, self.s]
        order = {"act": np.nonzero(fslot >= 0)[0][np.argsort(fslot[fslot >= 0],
                                                             kind="stable")],
                 "grad": np.nonzero(bslot >= 0)[0][np.argsort(bslot[bslot >= 0],
                                                              kind="stable")]}
        def nth(o: np.ndarray) -> Callable[[int], int]:
            return lambda n: int(o[n]) if n < o.size else -1
        return {kind: nth(o) for kind, o in order.items()}

    def run_dynamic(self) -> RunnerResult:
        if self.cutter is not None:
            self.cutter.position = lambda begun: 0
        return self._guarded(self._dynamic)

    def _guarded(self, body: Callable[[], None]) -> RunnerResult:
        """Run the program; a divergence here announces a stop, a stop elsewhere ends it.
        Either way the rows recorded so far reach the part file."""
        try:
            body()
            self.finish()
        except STOPS as err:
            self.divergence, write_error = stop_for(err, self.comm)
            if not write_error:
                self.rec.final_snapshots(self.state.blocks,
                                         [self._copy(r) for r in range(self.R)],
                                         self.state.version)
                self.rec.flush_rows()
            return RunnerResult(self.links, divergence=self.divergence, write_error=write_error)
        return RunnerResult(self.links)

    def _dynamic(self) -> None:
        """PD 1F1B on what has arrived: F needs its activation (stage 0: NOAM), B its
        gradient; when neither is ready, wait politely for either."""
        N, noam, links, held = self.tl.microbatches, self.tl.noam, self.links, self.held

        def step() -> None:
            nf, nb = self.nf, self.nb
            f_ready = nf < N and (held.has("act") or links.act_in.ready() if links.act_in
                                  else noam_allows(nf, nb, noam))
            b_ready = nb < nf and (held.has("grad") or links.grad_in.ready()
                                   if links.grad_in else True)
            op = choose_1f1b(b_ready, f_ready, self.has_b, self.turn_b)
            if op == IDLE:
                self._await(nf, nb, N)
                return
            self._inject()
            self.handlers[op](nf if op == FWD else nb)
            self.ops_done += 1
            self.nf, self.nb = (nf + 1, nb) if op == FWD else (nf, nb + 1)
            self.has_b, self.turn_b = next_turn(op, self.has_b, self.turn_b)

        def to_the_end(T: int) -> None:
            while T >= END and self.nb < N:      # a rank had ended: run to the end
                step()
        while self.nb < N:
            self._op(step, to_the_end)
        self._end_round()

    def _await(self, nf: int, nb: int, N: int) -> None:
        self.idle_since = self.idle_since or wtime()
        probes = [link.ready for link, want in ((self.links.act_in, nf < N),
                                                (self.links.grad_in, nb < nf))
                  if link is not None and want]
        self.waiter.until(probes, lambda: f"activation {nf} or gradient {nb} (dynamic order)")

    def finish(self) -> None:
        self.links.drain()
        self.rec.final_snapshots(self.state.blocks, [self._copy(r) for r in range(self.R)],
                                 self.state.version)
        self.rec.flush_rows()


def _parse_fault(spec: str, rank: int) -> tuple[str, int] | None:
    """'raise:RANK:OP' or 'stall:RANK:OP' (testing aid) -> (kind, op) for this rank."""
    if not spec:
        return None
    kind, r, op = spec.split(":")
    return (kind, int(op)) if int(r) == rank else None
