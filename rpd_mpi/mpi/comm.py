"""The communication layer: with comm_gpu (device links), the only modules that import mpi4py.

Owns communicators (Dup of COMM_WORLD once; Split into a pipeline communicator per group and
a stage communicator per stage), the wait strategy (`Waiter`: spin or polite), and the
point-to-point `Link`s that move activations and gradients through preallocated buffers with
nonblocking, buffer-protocol calls posted ahead of use. Every message is tagged with its
microbatch id (mod TAG_MOD) and the tag and size are checked on arrival; a mismatch raises
instead of silently corrupting a run. `stage_links` sets up a stage's four links.

Importing this module initialises MPI (that is what importing mpi4py.MPI does); only the
`train` path imports it (the rest of `rpd_mpi.mpi`), never `simulate` or analysis.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, TypeVar

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


TAG_MOD = 32768   # MPI guarantees tags up to at least 32767
DEEP_RING_BYTES = 2 ** 20


def ring_depth(shape: tuple[int, ...], dtype: type) -> int:
    """Buffers per link: two (one message posted ahead) below 1 MiB, one from 1 MiB on.
    Posting ahead saves latency, not bandwidth, and a second buffer per link doubles the
    memory a stream of large messages cycles through: a raw mpi4py ping-pong that rotates
    two send and two receive buffers fell from 19.8 to 14.0 GB/s at 4 MiB and from 16.4 to
    14.5 at 16 MiB against one of each (2026-12-02; L3 here is 32 MiB for both ranks)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return 2 if nbytes < DEEP_RING_BYTES else 1


class RecvLink:
    """Messages from one peer on a communicator of their own, in microbatch order, `depth`
    receives posted ahead into preallocated buffers. The tag of each message is its
    microbatch id mod TAG_MOD and is checked on arrival, as is its size.

    `ready()` tests the next message; `take(mb)` waits for it and returns its buffer (valid
    until `release()`, which reposts the buffer for a later message).
    """

    def __init__(self, comm: MPI.Comm, peer: int, shape: tuple[int, ...], count: int,
                 waiter: Waiter, name: str, depth: int | None = None,
                 dtype: type = np.float64) -> None:
        depth = depth or ring_depth(shape, dtype)
        self.comm, self.peer, self.count = comm, peer, count
        self.waiter, self.name = waiter, name
        self.bufs: list[np.ndarray] = [np.empty(shape, dtype=dtype) for _ in range(depth)]
        self.reqs: list[MPI.Request | None] = [None] * depth
        self.statuses = [MPI.Status() for _ in range(depth)]
        self.arrived = [False] * depth
        self.next = 0                 # index of the next message to take
        self.posted = 0
        for _ in range(min(depth, count)):
            self._post()

    def _post(self) -> None:
        i = self.posted % len(self.bufs)
        self.reqs[i] = self.comm.Irecv(self.bufs[i], source=self.peer, tag=MPI.ANY_TAG)
        self.posted += 1

    def ready(self) -> bool:
        """True when the next message has arrived."""
        i = self.next % len(self.bufs)
        req = self.reqs[i]
        if not self.arrived[i] and req is not None:
            self.arrived[i] = req.Test(self.statuses[i])
        return self.arrived[i]

    def take(self, mb: int) -> np.ndarray:
        """The next message, which must belong to microbatch `mb`."""
        i = self.next % len(self.bufs)
        if self.reqs[i] is None and not self.arrived[i]:
            raise CommError(f"{self.name}: no receive posted for microbatch {mb}")
        if not self.ready():
            self.waiter.until([self.ready], lambda: f"{self.name} of microbatch {mb} "
                                                    f"from rank {self.peer}")
        self.reqs[i], self.arrived[i] = None, False
        buf, status = self.bufs[i], self.statuses[i]
        if status.Get_tag() != mb % TAG_MOD:
            raise CommError(f"{self.name}: expected microbatch {mb} from rank {self.peer}, "
                            f"got a message tagged {status.Get_tag()}")
        if status.Get_count(MPI.BYTE) != buf.nbytes:
            raise CommError(f"{self.name}: message of {status.Get_count(MPI.BYTE)} bytes, "
                            f"expected {buf.nbytes}")
        return buf

    def release(self) -> None:
        """Done with the buffer of `take`: post it for a later message."""
        self.next += 1
        if self.posted < self.count:
            self._post()

    def discard(self, sent: int) -> None:
        """After a stop: receive and drop the messages up to the `sent`-th the peer sent,
        then cancel the receives posted beyond them (no request is left pending)."""
        i = self.next % len(self.bufs)
        if self.posted > self.next and self.reqs[i] is None and not self.arrived[i]:
            self.release()                # taken by the op the stop interrupted
        while self.next < sent:
            if not self.ready():
                self.waiter.until([self.ready], lambda: f"{self.name} from rank {self.peer} "
                                                        f"(draining after a stop)")
            i = self.next % len(self.bufs)
            self.reqs[i], self.arrived[i] = None, False
            self.release()
        for i, req in enumerate(self.reqs):
            if req is not None:
                req.Cancel()
                req.Wait()
                self.reqs[i] = None


class SendLink:
    """Messages to one peer through a ring of `depth` preallocated buffers.

    `buffer()` hands out the next ring buffer (once its previous send completed) so that a
    producer can write into it; `send(mb, payload)` sends it, copying only when `payload` is
    not that buffer.
    """

    def __init__(self, comm: MPI.Comm, peer: int, shape: tuple[int, ...], waiter: Waiter,
                 name: str, depth: int | None = None, dtype: type = np.float64) -> None:
        depth = depth or ring_depth(shape, dtype)
        self.comm, self.peer, self.waiter, self.name = comm, peer, waiter, name
        self.bufs: list[np.ndarray] = [np.empty(shape, dtype=dtype) for _ in range(depth)]
        self.reqs: list[MPI.Request | None] = [None] * depth
        self.sent = 0

    def buffer(self) -> np.ndarray:
        i = self.sent % len(self.bufs)
        req = self.reqs[i]
        if req is not None:
            self.waiter.wait([req], lambda: f"{self.name} buffer to rank {self.peer}")
            self.reqs[i] = None
        return self.bufs[i]

    def send(self, mb: int, payload: np.ndarray) -> None:
        buf = self.buffer()
        if payload is not buf:
            if payload.size != buf.size:
                raise CommError(f"{self.name}: payload of {payload.size} values, the link "
                                f"carries {buf.size}")
            buf.reshape(-1)[:] = payload.reshape(-1)
        self.reqs[self.sent % len(self.bufs)] = self.comm.Isend(buf, dest=self.peer,
                                                                tag=mb % TAG_MOD)
        self.sent += 1

    def drain(self) -> None:
        """Complete every outstanding send."""
        for i, r in enumerate(self.reqs):
            if r is not None:
                self.waiter.wait([r], lambda: f"{self.name} delivery to rank {self.peer}")
                self.reqs[i] = None


class InLink(Protocol):
    """What a stage needs of an incoming link (host `RecvLink` or a device link)."""

    def ready(self) -> bool: ...
    def take(self, mb: int) -> Any: ...
    def release(self) -> None: ...
    def discard(self, sent: int) -> None: ...


class OutLink(Protocol):
    """What a stage needs of an outgoing link (host `SendLink` or a device link)."""

    def send(self, mb: int, payload: Any) -> None: ...
    def drain(self) -> None: ...


@dataclass
class StageLinks:
    """The four links of one pipeline stage (None at the ends of the pipeline)."""

    act_in: InLink | None
    grad_in: InLink | None
    act_out: OutLink | None
    grad_out: OutLink | None

    def drain(self) -> None:
        """Complete every outstanding send of both outgoing links."""
        for link in (self.act_out, self.grad_out):
            if link is not None:
                link.drain()


def stage_links(comm: Comm, stage: int, stages: int, shape: tuple[int, ...],
                activations: int, gradients: int, waiter: Waiter,
                recv: Callable[..., InLink] = RecvLink,
                send: Callable[..., OutLink] = SendLink, dtype: Any = np.float64) -> StageLinks:
    """Links of `stage`: `activations` / `gradients` messages arrive from the stages before /
    after it; `recv` / `send` make the links (device links on a GPU); buffers of `dtype`."""
    first, last = stage == 0, stage == stages - 1
    return StageLinks(
        act_in=None if first else recv(comm.act_comm, stage - 1, shape, activations, waiter,
                                       "activation", dtype=dtype),
        grad_in=None if last else recv(comm.grad_comm, stage + 1, shape, gradients, waiter,
                                       "gradient", dtype=dtype),
        act_out=None if last else send(comm.act_comm, stage + 1, shape, waiter, "activation",
                                       dtype=dtype),
        grad_out=None if first else send(comm.grad_comm, stage - 1, shape, waiter, "gradient",
                                         dtype=dtype))
