"""Streams, events and happens-before bookkeeping of the MOCK cupy (not CUDA).

The model. Every operation on a stream (a kernel, a copy) gets the stream's next sequence
number. A stream's `clock` says, per stream, up to which operation this stream's later work
is ordered after (its own ops, plus what it waited for through `wait_event`). `HOST` is the
host's clock: what the host has seen complete (`Stream.synchronize`, `Event.synchronize`,
`Device.synchronize`, a blocking copy, `float()` of an array).

Kernels (numpy ops on fake arrays) run at once on the host, but count as work of the
current stream. Copies on a stream are deferred: the bytes move when something needs them
(a synchronize that covers the copy, a stream that waits for an event after it), so a
buffer read by the host or by MPI before its copy's event was synchronized really holds
stale or poisoned bytes. Every access of device or pinned memory is recorded per memory
region (`Tracked.touch`); an access by one stream that conflicts with an access by another
stream which neither its clock nor the host's orders before it raises `HazardError`.
"""

from __future__ import annotations

import ctypes
import itertools
import time
from collections import deque
from typing import Any, Callable

import numpy as _np

calls: list[tuple[Any, ...]] = []     # (kind, ...) of every device-related call, in order
HOST: dict[int, int] = {}             # stream id -> last op of it the host has seen complete
STREAMS: dict[int, "Stream"] = {}
SHARED: list["Tracked"] = []          # memory exported through IPC (see Tracked.shared)
RETIRE: list[tuple[int, int, Callable[[], None]]] = []   # checks run when the host sees an op
POISON = 0x7FF4DEADBEEF0BAD           # a signalling NaN: "these bytes are not valid yet"
_POISON_BYTES = POISON.to_bytes(8, "little")


TOKENS = itertools.count(1)          # keys of pending copies in Tracked.deferred_reads


class HazardError(RuntimeError):
    """The code under test broke CUDA's ordering rules (the fake caught a race)."""


def log(*entry: Any) -> None:
    calls.append(entry)


LATE: list[HazardError] = []          # caught where the caller swallows exceptions


def report_late(err: HazardError) -> None:
    """A hazard found inside an attribute that mpi4py probes with its errors silenced
    (`__cuda_array_interface__`): printed now, raised by the next call into the mock."""
    import sys
    print(f"fake cupy: {err}", file=sys.stderr, flush=True)
    LATE.append(err)


def raise_late() -> None:
    if LATE:
        raise LATE.pop(0)


# ----- poison: bytes that a pending copy has not written yet ---------------------------------

def poison(ptr: int, nbytes: int) -> None:
    """Fill nbytes at ptr with the poison pattern (uninitialised or not yet copied)."""
    if nbytes > 0:
        pattern = _POISON_BYTES * (nbytes // 8 + 1)
        ctypes.memmove(ptr, pattern, nbytes)


def poisoned(a: _np.ndarray) -> bool:
    """Does the host view a hold a poison word (8-byte dtypes only)?"""
    if a.dtype.itemsize != 8 or a.size == 0:
        return False
    words = _np.ascontiguousarray(a).reshape(-1).view(_np.uint64)
    return bool((words == _np.uint64(POISON)).any())


# ----- streams ---------------------------------------------------------------------------------

def seen(sid: int, seq: int, clock: dict[int, int] | None = None) -> bool:
    """Is op `seq` of stream `sid` ordered before work of `clock` (or seen by the host)?"""
    return seq <= HOST.get(sid, 0) or (clock is not None and seq <= clock.get(sid, 0))


def host_sees(clock: dict[int, int]) -> None:
    """The host has waited for everything in `clock`: run those ops, then the checks that
    were waiting for the host to see them complete."""
    raise_late()
    for sid, upto in list(clock.items()):
        if upto > HOST.get(sid, 0):
            HOST[sid] = upto
        STREAMS[sid].run(upto)
    for t in SHARED:                  # tell IPC peers which of our reads are complete
        _, clock_view = t.shared
        for sid, upto in HOST.items():
            if sid < len(clock_view):
                clock_view[sid] = upto
    due = [r for r in RETIRE if r[1] <= HOST.get(r[0], 0)]
    RETIRE[:] = [r for r in RETIRE if r[1] > HOST.get(r[0], 0)]
    for _, _, check in due:
        check()


def host_sees_all() -> None:
    for s in list(STREAMS.values()):
        host_sees(dict(s.clock))


class Stream:
    """cupy.cuda.Stream: ops get sequence numbers; copies wait in `queue` until needed."""

    _ids = itertools.count(1)
    null: "Stream"

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False
                 ) -> None:
        self.sid = 0 if null else next(Stream._ids)
        self.is_null, self.non_blocking = null, non_blocking
        self.name = "null" if null else f"stream{self.sid}"
        self.ptr = self.sid
        self.seq = 0
        self.clock: dict[int, int] = {self.sid: 0}
        self.queue: deque[tuple[int, Callable[[], None]]] = deque()
        STREAMS[self.sid] = self

    def __repr__(self) -> str:
        return f"<fake Stream {self.name}>"

    # -- internals used by arrays and copies
    def enqueue(self) -> int:
        """The sequence number of a new op on this stream (legacy default-stream rules: the
        null stream and blocking streams are ordered with each other)."""
        raise_late()
        if self.is_null:
            for s in list(STREAMS.values()):
                if not s.is_null and not s.non_blocking:
                    self.absorb(s.clock)
        elif not self.non_blocking:
            self.absorb(STREAMS[0].clock)
        self.seq += 1
        self.clock[self.sid] = self.seq
        return self.seq

    def kernel(self) -> int:
        """A kernel runs now on the host: first the deferred ops before it on this stream."""
        self.run(self.seq)
        return self.enqueue()

    def absorb(self, clock: dict[int, int]) -> None:
        """Later work of this stream follows everything in `clock` (and its bytes)."""
        for sid, upto in list(clock.items()):
            if sid == self.sid:
                continue
            if upto > self.clock.get(sid, 0):
                self.clock[sid] = upto
            STREAMS[sid].run(upto)

    def defer(self, seq: int, fn: Callable[[], None]) -> None:
        self.queue.append((seq, fn))

    def run(self, upto: int) -> None:
        """Execute the deferred ops with sequence number <= upto."""
        while self.queue and self.queue[0][0] <= upto:
            _, fn = self.queue.popleft()
            fn()

    # -- the cupy API
    def synchronize(self) -> None:
        log("stream_sync", self.name)
        host_sees(dict(self.clock))

    def wait_event(self, event: "Event") -> None:
        log("wait_event", self.name, event.id)
        if event.clock is not None:
            self.absorb(event.clock)

    def record(self, event: "Event | None" = None) -> "Event":
        event = event if event is not None else Event()
        event.record(self)
        return event

    def query(self) -> bool:
        host_sees(dict(self.clock))
        return True

    @property
    def done(self) -> bool:
        return self.query()

    def use(self) -> "Stream":
        _CURRENT[-1] = self
        return self

    def __enter__(self) -> "Stream":
        _CURRENT.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _CURRENT.pop()


NULL = Stream(null=True)
Stream.null = NULL
_CURRENT: list[Stream] = [NULL]


def get_current_stream() -> Stream:
    return _CURRENT[-1]


def stream_of(stream: Stream | None) -> Stream:
    return get_current_stream() if stream is None else stream


class Event:
    """cupy.cuda.Event: remembers the clock of the stream it was recorded on."""

    _ids = itertools.count(1)

    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        if interprocess and not disable_timing:      # as cupy.cuda.Event
            raise ValueError("Timing must be disabled for interprocess events")
        self.id = next(Event._ids)
        self.disable_timing, self.interprocess = disable_timing, interprocess
        self.clock: dict[int, int] | None = None
        self.time = 0.0
        self.ptr = self.id

    def record(self, stream: Stream | None = None) -> None:
        s = stream_of(stream)
        log("record", self.id, s.name)
        self.clock, self.time = dict(s.clock), time.perf_counter()

    def synchronize(self) -> None:
        log("event_sync", self.id)
        if self.clock is not None:
            host_sees(self.clock)

    def query(self) -> bool:
        if self.clock is not None:
            host_sees(self.clock)
        return True

    @property
    def done(self) -> bool:
        return self.query()


def get_elapsed_time(start: Event, end: Event) -> float:
    """Milliseconds between two recorded events (both must time, as in CUDA)."""
    for e in (start, end):
        if e.disable_timing:
            raise RuntimeError("cudaErrorInvalidResourceHandle (fake cupy): an event made "
                               "with disable_timing=True cannot be timed")
    end.synchronize()
    return (end.time - start.time) * 1e3


# ----- memory regions whose accesses are checked -----------------------------------------

class Tracked:
    """A region of device or pinned memory [base, base + size) and its recent accesses."""

    _ids = itertools.count(1)

    def __init__(self, base: int, size: int, kind: str, owner: Any,
                 device_id: int | None) -> None:
        self.base, self.size, self.kind, self.owner = base, size, kind, owner
        self.device_id = device_id
        self.name = f"{kind} #{next(Tracked._ids)}"
        self.closed = False
        self.writes = 0          # copies that wrote into it (pinned reuse checks)
        self.deferred_reads: dict[int, tuple[int, int]] = {}   # copies not yet run
        # IPC memory only: (per 8-byte word: (stream, op) of the last read here, this
        # process's host clock), in the shared file, so that a peer writing into it can
        # tell whether our kernels may still read those words
        self.shared: tuple[_np.ndarray, _np.ndarray] | None = None
        self.acc: dict[tuple[int, bool, int, int], tuple[int, str]] = {}

    def may_poison(self, lo: int, hi: int) -> bool:
        """No copy that has not run yet reads [lo, hi) (poisoning it would corrupt that)."""
        return not any(a < hi and lo < b for a, b in self.deferred_reads.values())

    def _prune(self) -> None:
        if len(self.acc) > 32:
            self.acc = {k: v for k, v in self.acc.items() if not seen(k[0], v[0])}

    def pending_write(self, lo: int, hi: int) -> bool:
        """Does a copy or kernel the host has not seen complete write into [lo, hi)?"""
        return any(w and a < hi and lo < b and not seen(sid, seq)
                   for (sid, w, a, b), (seq, _) in self.acc.items())

    def touch(self, lo: int, hi: int, write: bool, s: Stream, seq: int, what: str) -> None:
        """Op `seq` of stream s reads or writes [lo, hi): check, then remember it."""
        if self.closed:
            raise HazardError(f"{what} on {s.name} uses {self.name} after "
                              f"ipcCloseMemHandle")
        self._prune()
        for (sid, w, a, b), (other, other_what) in self.acc.items():
            if sid == s.sid or b <= lo or hi <= a or not (write or w):
                continue
            if not seen(sid, other, s.clock):
                raise HazardError(
                    f"{what} on {s.name} {'writes' if write else 'reads'} {self.name} "
                    f"bytes [{lo}, {hi}) while {other_what} (op {other} of "
                    f"{STREAMS[sid].name}) {'writes' if w else 'reads'} bytes [{a}, {b}) "
                    f"and nothing orders them: {s.name} never waited for an event recorded "
                    f"after it, and the host has not synchronized it")
        self.acc[(s.sid, write, lo, hi)] = (seq, what)
        if self.shared is not None and not write and s.sid < len(self.shared[1]):
            self.shared[0][lo // 8:(hi + 7) // 8] = (s.sid, seq)

    def peer_may_read(self, lo: int, hi: int) -> str | None:
        """IPC mapping of a peer's memory: a read of [lo, hi) by the peer that the peer's
        host has not seen complete (its kernels may still read these bytes)."""
        if self.shared is None:
            return None
        words, clock = self.shared
        seg = words[lo // 8:(hi + 7) // 8]
        late = seg[seg[:, 1] > clock[_np.minimum(seg[:, 0], len(clock) - 1)]]
        return None if not len(late) else f"op {late[0, 1]} of its stream {late[0, 0]}"

    def host_touch(self, lo: int, hi: int, what: str) -> None:
        """The host (MPI) reads or writes [lo, hi) now: every access must be complete."""
        for (sid, w, a, b), (other, other_what) in self.acc.items():
            if b <= lo or hi <= a or seen(sid, other):
                continue
            raise HazardError(f"{what}: {self.name} bytes [{lo}, {hi}) are still used by "
                              f"{other_what} (op {other} of {STREAMS[sid].name}), which the "
                              f"host has not synchronized")
