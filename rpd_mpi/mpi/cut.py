"""Consistent cuts of a running pipeline, for checkpoints (docs/DESIGN.md 4.5).

A cut is requested through the communicator's cut flag (`comm.cut`): by rank 0 when
--checkpoint-every has passed on its clock, or by any rank that gets a stop signal while
checkpoints are on (a final cut: checkpoint, then stop). The ranks then agree on a cut and
take it in three steps:

1. *Agree.* Each rank contributes its position: at an op boundary, the position of its next
   op; inside a wait for the input of an op not begun, that op's (the wait is left); inside a
   wait in the middle of an op (a send buffer, a LocalSGD allreduce), the next op's. The
   positions are a common clock of the schedule: the timeline slot in the static order,
   2k / 2k + 1 for RPD's forward / backward of iteration k, and 0 in the dynamic order. A
   rank whose program has ended contributes END. The cut is T = the largest position
   (an elementwise Iallreduce MAX, with the request's code).
2. *Catch up* (static order, RPD): every rank runs its ops at positions < T. Those ops only
   need messages of ops at positions < T, so nobody waits for a rank that has stopped. T = END
   means a rank had already ended: every rank runs to its end and the cut is not taken.
3. *Drain to the cut.* The ranks exchange how many messages each link sent; every receiver
   takes what was sent to it but not yet consumed (into its held messages, which the next
   ops read before the link), every sender completes its sends. Now no message is in flight:
   the ranks' states (blocks, stash, held messages, position, RNGs, ...) form a consistent
   cut, and each rank writes its own; rank 0 commits the checkpoint.

While waiting anywhere in steps 1-3 a rank takes arrived messages into its held messages,
so a sender blocked on a send buffer always gets going again. The order of the ops each
rank executes is unchanged, so the math of a static-order run with cuts equals the
uninterrupted run's, and a resumed run restores every piece of the cut.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable

import numpy as np

from rpd_mpi.checkpoint import Writer
from rpd_mpi.mpi.comm import CUT_FINAL, CUT_PERIODIC, STOP_SIGNAL, Comm, Stopped, Waiter
from rpd_mpi.mpi.comm_links import StageLinks
from rpd_mpi.mpi.recorder import Recorder
from rpd_mpi.mpi.runner import sent_count

END = np.iinfo(np.int64).max // 4      # the position of a rank whose program has ended


class CutNow(Exception):
    """Leave the wait for the input of an op that has not begun: a cut comes first."""


class Held:
    """Messages taken off a link before their op (at a cut), in order, per link kind."""

    def __init__(self, state: dict[str, list[tuple[int, Any]]] | None = None) -> None:
        self.queues: dict[str, deque[tuple[int, Any]]] = {
            kind: deque(state.get(kind, []) if state else []) for kind in ("act", "grad")}

    def pop(self, kind: str, mb: int) -> Any | None:
        q = self.queues[kind]
        if not q:
            return None
        got, payload = q.popleft()
        if got != mb:
            raise RuntimeError(f"held {kind} message of microbatch {got}, the op wants {mb}")
        return payload

    def has(self, kind: str) -> bool:
        return bool(self.queues[kind])

    def state(self) -> dict[str, list[tuple[int, Any]]]:
        return {kind: list(q) for kind, q in self.queues.items()}


def next_input(held: Held, taken: dict[str, int], kind: str, link: Any, mb: int,
               move: Callable[[Any], Any] = lambda a: a) -> tuple[Any, bool]:
    """The input of op `mb` from `kind`'s link: a message held at a cut first (`move`d to
    where the stage computes; nothing to release then), else the link's next, counted in
    `taken`. (payload, taken off the link)."""
    payload = held.pop(kind, mb)
    if payload is not None:
        return move(payload), False
    payload = link.take(mb)          # may leave for a cut (CutNow): nothing counted then
    taken[kind] += 1
    return payload, True


class Cutter:
    """One rank's side of the cut protocol. The runner supplies its position (`position`:
    begun -> the position to contribute) and runs its ops; the cutter does the rest."""

    def __init__(self, comm: Comm, waiter: Waiter, links: StageLinks, writer: Writer,
                 held: Held, taken: dict[str, int], copy: Callable[[Any], Any]) -> None:
        self.comm, self.waiter, self.links, self.writer = comm, waiter, links, writer
        self.held, self.taken, self.copy = held, taken, copy
        self.contributed: tuple[Any, np.ndarray] | None = None
        self.started = 0.0                 # perf_counter() when this cut's agreement began
        self.active = False                # inside a cut: waits do not start another
        self.ended = False                 # the round at END is over: no more cuts
        self.position: Callable[[bool], int] = lambda begun: 0
        self.begun = False
        self.mb_of: dict[str, Callable[[int], int]] = {}   # link kind -> mb of its n-th message

    # -- requests ---------------------------------------------------------------------------
    def hook(self) -> None:
        """Waiter.on_cut: a cut was requested while this rank waits."""
        if self.active or self.ended or self.contributed is not None:
            return
        self.contribute(self.position(self.begun))
        if not self.begun:
            raise CutNow()

    def requested(self) -> bool:
        """At an op boundary: has a cut been requested (rank 0: is one due)? Contributes."""
        if self.ended:
            return False
        if self.contributed is None:
            if self.comm.rank == 0 and self.writer.due() and not self.comm.cut.code:
                self.comm.cut.announce(CUT_PERIODIC)
            if not self.comm.cut.raised():
                return False
            self.contribute(self.position(False))
        return True

    def contribute(self, position: int) -> None:
        mine = np.array([position, self.comm.cut.code], dtype=np.int64)
        self.contributed = self.comm.cut_collective(mine, "max")

    # -- the cut ----------------------------------------------------------------------------
    def agree(self) -> tuple[int, int]:
        """Step 1: (T, code) once every rank contributed (taking arrivals meanwhile)."""
        assert self.contributed is not None
        self.active, self.started = True, time.perf_counter()
        req, out = self.contributed
        self._wait(req, "the agreement on a checkpoint cut")
        return int(out[0]), int(out[1])

    def take(self, state: Callable[[], dict[str, Any]], progress: int, now: float,
             code: int) -> None:
        """Step 3 and the checkpoint: drain the links to the cut, write this rank's state,
        rank 0 commits; the flag is settled for the next cut."""
        links, comm = self.links, self.comm
        sent = np.array([sent_count(links.act_out), sent_count(links.grad_out), progress],
                        dtype=np.int64)
        req, every = comm.cut_collective(sent, "gather")
        progress = int(every[:, 2].sum())        # block updates of the whole job
        self._wait(req, "the message counts of a checkpoint cut")
        if links.act_in is not None:
            self._take_up_to("act", links.act_in, int(every[comm.rank - 1, 0]))
        if links.grad_in is not None:
            self._take_up_to("grad", links.grad_in, int(every[comm.rank + 1, 1]))
        links.drain()
        step = self.writer.step + 1
        self.writer.put(step, comm.rank, state())
        req, _ = comm.cut_collective(np.zeros(1), "barrier")
        self._wait(req, "every rank to write its checkpoint")
        if comm.rank == 0:
            path = self.writer.commit(step, comm.size, {"progress": progress, "elapsed": now},
                                      cause="signal" if code == CUT_FINAL else "checkpoint")
            self.path = path
        else:
            self.writer.step = step
        req, _ = comm.cut_collective(np.zeros(1), "barrier")
        self._wait(req, "rank 0 to commit the checkpoint")
        self.settle()
        self.writer.seconds.append(time.perf_counter() - self.started)

    def settle(self) -> None:
        """Every announcement of the cut received; ready for the next one."""
        self.comm.cut.settle(self.waiter)
        self.comm.cut.reset()
        self.writer.last = time.monotonic()
        self.contributed, self.active = None, False

    def _take_up_to(self, kind: str, link: Any, sent: int) -> None:
        while link.next < sent:
            self._hold(kind, link)

    def _hold(self, kind: str, link: Any) -> None:
        n = self.taken[kind]
        mb = self.mb_of[kind](n)
        payload = link.take(mb)
        self.held.queues[kind].append((mb, self.copy(payload)))
        link.release()
        self.taken[kind] = n + 1

    def pump(self) -> bool:
        """Take every message that has arrived (a probe for `Waiter.until`: never done)."""
        for kind, link in (("act", self.links.act_in), ("grad", self.links.grad_in)):
            while link is not None and self.mb_of[kind](self.taken[kind]) >= 0 \
                    and link.ready():
                self._hold(kind, link)
        return False

    def _wait(self, req: Any, what: str) -> None:
        stop, self.waiter.stop = self.waiter.stop, None
        try:
            self.waiter.until([req.Test, self.pump], lambda: f"{what} (--timeout "
                                                             f"{self.waiter.timeout:g})")
        finally:
            self.waiter.stop = stop



class CutRunner:
    """The op loop of a runner whose ops a cut can interrupt (a base of the rank runners):
    `_op` runs one op or the cut requested before it; `_cut` takes the cut."""

    cutter: Cutter | None
    comm: Comm
    pc: int
    rec: Recorder

    def checkpoint(self) -> dict[str, Any]:
        raise NotImplementedError

    def updates_done(self) -> int:
        raise NotImplementedError

    def _op(self, step: Callable[[], None], catch_up: Callable[[int], None]) -> None:
        """One op, or the cut requested before it / while waiting for its input."""
        cutter = self.cutter
        if cutter is None:
            step()
            return
        cutter.begun = False
        try:
            if not cutter.requested():
                step()
                return
        except CutNow:
            pass                                 # the op had not begun: it runs after
        self._cut(catch_up)

    def _catch_up(self, step: Callable[[], None], slots: list[int], T: int) -> None:
        while self.pc < len(slots) - 1 and slots[self.pc] < T:
            assert self.cutter is not None
            self.cutter.begun = False
            step()

    def _end_round(self) -> None:
        """The program ended: join the last cut round (END), which every rank joins."""
        cutter = self.cutter
        if cutter is None or cutter.ended:
            return
        if cutter.contributed is None:
            cutter.contribute(END)
        self._cut(lambda T: None)

    def _cut(self, catch_up: Callable[[int], None]) -> None:
        """Steps 1-3 of `rpd_mpi.mpi.cut`; a final cut then stops the job (Stopped)."""
        cutter = self.cutter
        assert cutter is not None
        T, code = cutter.agree()
        catch_up(T)
        if T >= END:                     # some rank had ended: everyone ran to the end
            cutter.ended = True
            cutter.settle()
            return
        cutter.take(self.checkpoint, self.updates_done(), self.rec.now(), code)
        if code == CUT_FINAL:
            self.comm.stop.code = STOP_SIGNAL    # every rank: the job stops here
            raise Stopped(f"stopped at the checkpoint {getattr(cutter, 'path', '')}")
