"""The communication layer: with comm_links (host links) and comm_gpu (device links), the only
modules that import mpi4py.

Owns communicators (Dup of COMM_WORLD once; Split into a pipeline communicator per group and
a stage communicator per stage), the wait strategy (`Waiter`: spin or polite), the job-wide
stop and cut flags (`StopFlag`), the protocol errors (`CommError`, `RecvTimeout`, `Stopped`)
and the bounded collectives. The point-to-point links that move activations and gradients
are in `comm_links`, built on this module.

Importing this module initialises MPI (that is what importing mpi4py.MPI does); only the
`train` path imports it (the rest of `rpd_mpi.mpi`), never `simulate` or analysis.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence, TypeVar

import numpy as np
from mpi4py import MPI

from rpd_mpi import signals

T = TypeVar("T")


class CommError(RuntimeError):
    """A message broke the protocol (wrong microbatch, wrong size)."""


class RecvTimeout(CommError):
    """A wait exceeded the configured timeout; the message says who waited for what."""


def wtime() -> float:
    return MPI.Wtime()


class Stopped(CommError):
    """Another rank asked the job to stop (`StopFlag`); this rank ends its program."""


STOP_TAG = 17
STOP_DIVERGED = 1             # a rank saw a non-finite loss or gradient
STOP_SIGNAL = 2               # a rank received SIGTERM, SIGINT or SIGUSR1 (rpd_mpi.signals)
STOP_WRITE = 3                # a rank could not write its part file (the largest code wins)
CUT_PERIODIC = 1              # cut flag: --checkpoint-every passed (rank 0's clock)
CUT_FINAL = 2                 # cut flag: a stop signal with checkpoints on: checkpoint, stop


class StopFlag:
    """A job-wide "stop now": `announce` sends one small message to every other rank on a
    communicator of its own (eager: it never blocks); `raised` tests for one (Iprobe, about
    a microsecond) and remembers its code. `settle` is collective: every rank receives every
    announcement made, so no message is left pending at the end."""

    def __init__(self, world: MPI.Comm, on_signal: int = STOP_SIGNAL) -> None:
        self.comm: MPI.Comm = world.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.on_signal = on_signal          # announced when this rank gets a stop signal
        self.code = 0                       # 0: no stop seen; else the first code seen
        self.sent: list[MPI.Request] = []
        self.received = 0
        self._buf = np.zeros(2, dtype=np.int64)

    def announce(self, code: int) -> None:
        """Ask every rank to stop (once per rank); `code` > 0 says why."""
        if self.sent or self.size == 1:
            self.code = self.code or code
            return
        self.code = self.code or code
        self._msg = np.array([code, self.rank], dtype=np.int64)
        self.sent = [self.comm.Isend(self._msg, dest=r, tag=STOP_TAG)
                     for r in range(self.size) if r != self.rank]

    def raised(self) -> bool:
        """Has any rank announced a stop (this one included)? A stop signal this rank
        received is announced here."""
        if self.on_signal and not self.sent and not self.code and signals.received():
            self.announce(self.on_signal)
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=STOP_TAG):
            self.comm.Recv(self._buf, source=MPI.ANY_SOURCE, tag=STOP_TAG)
            self.received += 1
            self.code = self.code or int(self._buf[0])
        return self.code != 0

    def settle(self, waiter: "Waiter") -> int:
        """Collective, at the end: receive every announcement, complete every send; returns
        the stop code (0: nobody stopped). Bounded by the waiter's timeout."""
        watched, waiter.stop = waiter.stop, None       # the waits below must not raise Stopped
        hook, waiter.on_cut = waiter.on_cut, None
        on_signal, self.on_signal = self.on_signal, 0  # nor announce: the count is taken
        try:
            return self._settle(waiter)
        finally:
            waiter.stop, waiter.on_cut, self.on_signal = watched, hook, on_signal

    def reset(self) -> None:
        """After `settle`: ready for the next announcement (the cut flag, once per cut)."""
        self.code = 0

    def _settle(self, waiter: "Waiter") -> int:
        mine = np.array([1 if self.sent else 0], dtype=np.int64)
        total = np.zeros(1, dtype=np.int64)
        waiter.collective(self.comm.Iallreduce(mine, total, op=MPI.SUM), "the stop agreement")
        expected = int(total[0]) - int(mine[0])
        while self.received < expected:
            waiter.until([self.raised_one], lambda: "a stop announcement")
        for req in self.sent:
            waiter.wait([req], lambda: "a stop announcement to be delivered")
        self.sent = []
        codes = np.array([self.code], dtype=np.int64)
        first = np.zeros(1, dtype=np.int64)
        waiter.collective(self.comm.Iallreduce(codes, first, op=MPI.MAX), "the stop agreement")
        self.code = int(first[0])
        return self.code

    def raised_one(self) -> bool:
        before = self.received
        self.raised()
        return self.received > before

    def free(self) -> None:
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()
            self.comm = MPI.COMM_NULL


class Comm:
    """World, pipeline and stage communicators of one rank: rank r is stage r % S of group
    r // S. Created once; pass it explicitly. Every collective is bounded by the waiter's
    timeout (`set_waiter`; before that a default one), with a message naming it."""

    AGREE_TIMEOUT = 600.0          # seconds, before the run's own --timeout is known

    def __init__(self) -> None:
        self.world: MPI.Comm = MPI.COMM_WORLD.Dup()
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.stages, self.group, self.stage = 1, self.rank, 0
        # made by `split`; MPI.COMM_NULL until then and after `free`
        self.pipe: MPI.Comm = MPI.COMM_NULL
        self.act_comm: MPI.Comm = MPI.COMM_NULL
        self.grad_comm: MPI.Comm = MPI.COMM_NULL
        self.stage_comm: MPI.Comm = MPI.COMM_NULL
        self.waiter = Waiter("polite", self.AGREE_TIMEOUT)
        self.stop = StopFlag(self.world)
        self.cut = StopFlag(self.world, on_signal=0)   # checkpoint cuts (rpd_mpi.mpi.cut)

    def signals_cut(self) -> None:
        """Checkpoints are on: a stop signal asks for a final cut instead of a stop."""
        self.stop.on_signal, self.cut.on_signal = 0, CUT_FINAL

    def cut_collective(self, send: np.ndarray, kind: str) -> tuple[MPI.Request, np.ndarray]:
        """A nonblocking collective of a cut on the cut flag's communicator: "max"
        (elementwise Iallreduce), "gather" (Iallgather: one row per rank) or "barrier"."""
        c = self.cut.comm
        if kind == "max":
            out = np.zeros_like(send)
            return c.Iallreduce(send, out, op=MPI.MAX), out
        if kind == "gather":
            out = np.zeros((self.size, send.size), dtype=send.dtype)
            return c.Iallgather(send, out), out
        return c.Ibarrier(), send

    def set_waiter(self, waiter: "Waiter") -> None:
        """Use `waiter` (the run's strategy and --timeout) for every wait from now on; it
        also watches the stop flag."""
        self.waiter = waiter
        waiter.stop, waiter.cut = self.stop, self.cut

    def split(self, stages: int) -> None:
        """Pipeline communicators per group (rank = stage; one for activations, one for
        gradients, so the directions never share a matching queue) and a stage
        communicator per stage (rank = group)."""
        self.stages = stages
        self.group, self.stage = divmod(self.rank, stages)
        self.pipe = self.world.Split(self.group, self.stage)
        self.act_comm, self.grad_comm = self.pipe.Dup(), self.pipe.Dup()
        self.stage_comm = self.world.Split(self.stage, self.group)

    def first_failure(self, failed: bool) -> int:
        """Agree on validation: the lowest rank that failed, or -1 if none did."""
        mine = np.array([self.rank if failed else self.size], dtype=np.int64)
        lowest = np.zeros(1, dtype=np.int64)
        self.waiter.collective(self.world.Iallreduce(mine, lowest, op=MPI.MIN),
                               "the agreement on the configuration")
        return -1 if int(lowest[0]) == self.size else int(lowest[0])

    def share(self, value: T) -> T:
        """Rank 0's `value` on every rank (after a bounded barrier)."""
        self.barrier("the start of the run")
        result: T = self.world.bcast(value, root=0)
        return result

    def clock_offset(self, rounds: int = 8) -> float:
        """Seconds to add to this rank's MPI.Wtime() to read rank 0's clock (Cristian's
        method over `rounds` ping-pongs, keeping the one with the shortest round trip)."""
        self.barrier("the clock synchronisation")      # everyone is here: no long waits
        best, offset = float("inf"), 0.0
        t = np.zeros(1)
        for r in range(1, self.size):
            for _ in range(rounds):
                if self.rank == r:
                    t1 = MPI.Wtime()
                    self.world.Send(t, dest=0, tag=7)
                    self.world.Recv(t, source=0, tag=7)
                    t2 = MPI.Wtime()
                    if t2 - t1 < best:
                        best, offset = t2 - t1, float(t[0]) - (t1 + t2) / 2
                elif self.rank == 0:
                    self.world.Recv(t, source=r, tag=7)
                    t[0] = MPI.Wtime()
                    self.world.Send(t, dest=r, tag=7)
        return offset

    def start_time(self) -> float:
        """A common t = 0 after a barrier, on rank 0's clock."""
        self.barrier("the start of the run")
        return float(self.world.bcast(MPI.Wtime(), root=0))

    def barrier(self, what: str = "the end of the run") -> None:
        """Every rank reaches this point (Ibarrier: bounded by the timeout)."""
        self.waiter.collective(self.world.Ibarrier(), f"every rank to reach {what}")

    def final_barrier(self) -> None:
        """The last meeting of a stopped job, after rank 0 wrote its ledger (which may take
        longer than --timeout): bounded by AGREE_TIMEOUT instead."""
        Waiter("polite", self.AGREE_TIMEOUT).collective(self.world.Ibarrier(),
                                                        "every rank to reach the end of the job")

    def gather(self, obj: T) -> list[T] | None:
        """Small end-of-run metadata to rank 0 (pickle is fine off the hot path)."""
        self.barrier("the end of the run")
        result: list[T] | None = self.world.gather(obj, root=0)
        return result

    def allreduce_mean(self, buf: np.ndarray, count: int) -> None:
        """In place: buf <- (sum over the stage communicator of buf) / count (bounded)."""
        self.waiter.collective(self.stage_comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM),
                               "the LocalSGD allreduce of this stage", cut=True)
        buf /= count

    def abort(self, code: int = 1) -> None:
        self.world.Abort(code)

    def free(self) -> None:
        self.stop.free()
        self.cut.free()
        for c in (self.act_comm, self.grad_comm, self.pipe, self.stage_comm, self.world):
            if c != MPI.COMM_NULL:
                c.Free()
        self.act_comm = self.grad_comm = self.pipe = self.stage_comm = MPI.COMM_NULL


def library_version() -> str:
    # Open MPI's string ends in NUL, which HDF5 string attributes refuse
    return MPI.Get_library_version().replace("\x00", "").strip().splitlines()[0]


def processor_name() -> str:
    return MPI.Get_processor_name()


def node_size() -> int:
    """Ranks sharing this node."""
    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_size()
    finally:
        local.Free()


def auto_strategy(requested: str) -> str:
    """'spin' when every rank on this node has a core of its own, else 'polite'."""
    if requested != "auto":
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return "spin" if node_size() <= (cores or 1) else "polite"


class Waiter:
    """Waits on requests with a strategy and a timeout.

    `spin`: test in a tight loop (dedicated cores). `polite`: test in a tight loop for
    SPIN_FIRST seconds (a message about to land), then yield the core between tests until
    YIELD_UNTIL (sched_yield returns at once when no other process wants the core, so a
    large message, whose chunks MPICH moves only inside MPI calls of both ranks, still
    streams at full speed; sleeping here cost 0.05-0.3x of the raw bandwidth from 64 KiB to
    4 MiB), then sleep between tests with a backoff from 20 us (x1.5 per try) to SLEEP_MAX,
    so that oversubscribed ranks leave the core to the ones computing.
    """

    SPIN_FIRST = 5e-5
    YIELD_UNTIL = 2e-3
    SLEEP_MAX = 5e-4

    def __init__(self, strategy: str, timeout: float) -> None:
        if strategy not in ("spin", "polite"):
            raise ValueError(f"wait strategy must be spin or polite (got {strategy!r})")
        self.polite, self.timeout = strategy == "polite", timeout
        self.blocked = 0.0            # total seconds spent waiting
        self.stop: StopFlag | None = None     # a stop announced by any rank ends the wait
        self.cut: StopFlag | None = None      # a cut requested by any rank calls on_cut
        self.on_cut: Callable[[], None] | None = None   # may raise to leave the wait

    def wait(self, reqs: Sequence[MPI.Request], what: Callable[[], str]) -> int:
        """Block until one of `reqs` completes; return its index. RecvTimeout past timeout."""
        return self.until([r.Test for r in reqs], what)

    def collective(self, req: MPI.Request, what: str, cut: bool = False) -> None:
        """Complete a nonblocking collective; RecvTimeout past the timeout (a stop does not
        interrupt it: collectives are where the stopped ranks meet). `cut`: a checkpoint
        cut requested meanwhile is joined (the LocalSGD allreduce inside an op)."""
        stop, self.stop = self.stop, None
        hook, self.on_cut = self.on_cut, (self.on_cut if cut else None)
        try:
            self.until([req.Test], lambda: f"{what} (a rank is stalled, crashed or still "
                                           f"starting; --timeout {self.timeout:g})")
        finally:
            self.stop, self.on_cut = stop, hook

    def until(self, probes: Sequence[Callable[[], bool]], what: Callable[[], str]) -> int:
        """Block until one probe returns True; return its index. RecvTimeout past timeout;
        `Stopped` when another rank announced a stop meanwhile."""
        t0 = MPI.Wtime()
        sleep, spins = 2e-5, 0
        while True:
            for i, probe in enumerate(probes):
                if probe():
                    self.blocked += MPI.Wtime() - t0
                    return i
            spins += 1
            waited = MPI.Wtime() - t0
            if self.polite and waited > self.YIELD_UNTIL:
                time.sleep(sleep)
                sleep = min(sleep * 1.5, self.SLEEP_MAX)
            elif self.polite and waited > self.SPIN_FIRST:
                os.sched_yield()
            if self.polite or spins % 4096 == 0:
                if self.stop is not None and self.stop.raised():
                    self.blocked += MPI.Wtime() - t0
                    raise Stopped(f"stopped while waiting for {what()}")
                if self.on_cut is not None and self.cut is not None and self.cut.raised():
                    try:
                        self.on_cut()
                    except BaseException:
                        self.blocked += MPI.Wtime() - t0
                        raise
                if MPI.Wtime() - t0 > self.timeout:
                    raise RecvTimeout(f"waited {self.timeout:g} s for {what()}")
