"""The point-to-point link layer: the `Link`s that move activations and gradients between
pipeline stages through preallocated buffers, with nonblocking, buffer-protocol calls posted
ahead of use (`RecvLink`, `SendLink`; `ring_depth` buffers each). Every message is tagged with
its microbatch id (mod TAG_MOD) and the tag and size are checked on arrival; a mismatch raises
`CommError` instead of silently corrupting a run. `InLink` / `OutLink` are what a stage needs
of a link (host links here, device links in comm_gpu); `stage_links` sets up a stage's four.

Built on `comm` (communicators, `Waiter`, errors); like it, importing this module initialises
MPI, so only the `train` path imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
from mpi4py import MPI

from rpd_mpi.mpi.comm import Comm, CommError, Waiter


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
