"""Links between stages whose arrays live on GPUs (docs/DESIGN.md 4.4, docs/GPU.md).

Same API as `comm_links.RecvLink` / `comm_links.SendLink` (`ready`, `take(mb) -> buffer`, `release`;
`buffer`, `send(mb, payload)`, `drain`), the buffers being device arrays; the MPI part is
those classes themselves, composed, so the tag (= microbatch id) and size checks, the
posting ahead and the wait strategy are the CPU ones. Three transports (`make_links`):

- `staged` (default, any MPI): device -> pinned host ring slot (an asynchronous copy,
  `blocking=False`, on a stream of the link that first waits for the compute stream), and
  the copy's event synchronized right before the Isend from that pinned slot (MPI reads host
  memory outside any stream); Irecv into pinned memory, and on `take` an async copy into a
  device ring slot that the compute stream waits for (an event). The compute stream's reads
  of a slot are fenced by another event before a later copy overwrites it, and the pinned
  slot is reposted to MPI only after its copy's event was synchronized.
- `direct` (`--gpu-aware-mpi`): device buffers straight to a CUDA-aware MPI; the compute
  stream is synchronised before an Isend and before a slot is reposted for receiving.
- `ipc` (ranks of one node): the receiver allocates its device ring with one cudaMalloc and
  sends its CUDA IPC memory handle to the sender once (pickled, at construction); the sender
  opens it (`UnownedMemory` on this process's own device, so cupy never asks the driver
  which device the mapping belongs to), copies device-to-device into the receiver's slot on
  its own stream, waits for that copy (an event) and then sends a one-number "ready"
  message tagged with the microbatch id. The receiver takes the slot when "ready" arrives;
  when it releases the slot (after its host has seen its compute stream finish reading it)
  it sends a "credit" message, tagged with the microbatch that used the slot, and the
  sender writes message k into slot k % n only after the credit for message k - n. The
  ring has n = 2 x depth slots, the slack of the host links (depth receives posted ahead plus
  a send ring of depth), so IPC blocks no sooner than they do.
  Ready and credit messages run on the link's communicator in opposite directions
  (different sources, so they never match each other's receives).

cupy is never imported here: the array module `xp` comes from the rank's `Backend` (a test
passes a numpy-backed mock). Importing this module initialises MPI, like `comm`.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from rpd_mpi.mpi.comm import CommError, Waiter
from rpd_mpi.mpi.comm_links import RecvLink, SendLink
from rpd_mpi.mpi.pinned import current_device, device_ring, pinned_array

TRANSPORTS = ("staged", "direct", "ipc")
TAG_SETUP = 32767      # the IPC handshake (receiver -> sender, once, before any credit)


# ----- node and library facts ---------------------------------------------------------------

def local_rank(world: MPI.Comm) -> int:
    """This rank's index among the ranks of its node (collective over `world`)."""
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    try:
        return local.Get_rank()
    finally:
        local.Free()


def _libmpi() -> ctypes.CDLL | None:
    """The MPI library this process loaded (from /proc/self/maps; None where unreadable)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({ln.split()[-1] for ln in maps if "libmpi" in ln.rsplit("/", 1)[-1]
                            and ".so" in ln})
    except OSError:
        return None
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def cuda_aware_mpi() -> tuple[bool | None, str]:
    """(claims CUDA awareness?, how that was determined); None when nothing says.

    Asks the library: `MPIX_Query_cuda_support()` (Open MPI, MPICH) or
    `MPIX_GPU_query_support(CUDA)` (MPICH); MPICH's `MPIR_CVAR_ENABLE_GPU=0` switches it off.
    """
    lib = _libmpi()
    if os.environ.get("MPIR_CVAR_ENABLE_GPU", "").strip() in ("0", "false", "no"):
        return False, "MPIR_CVAR_ENABLE_GPU=0 in the environment"
    if lib is not None and hasattr(lib, "MPIX_Query_cuda_support"):
        value = int(lib.MPIX_Query_cuda_support())
        return value == 1, f"MPIX_Query_cuda_support() = {value}"
    if lib is not None and hasattr(lib, "MPIX_GPU_query_support"):
        flag = ctypes.c_int(0)
        lib.MPIX_GPU_query_support(0, ctypes.byref(flag))       # 0 = MPIX_GPU_SUPPORT_CUDA
        return flag.value == 1, f"MPIX_GPU_query_support(CUDA) = {flag.value}"
    return None, "the MPI library offers no query; trusted --gpu-aware-mpi"


# ----- the composed host links (pinned_array, device_ring: rpd_mpi.mpi.pinned) -------------

def _payload(xp: ModuleType, payload: Any, size: int, name: str) -> Any:
    """payload as a contiguous device array, checked to carry `size` values."""
    if payload.size != size:
        raise CommError(f"{name}: payload of {payload.size} values, the link carries {size}")
    return xp.ascontiguousarray(payload)


class _RecvInto(RecvLink):
    """comm_links.RecvLink that receives into the buffers it is given (pinned or device memory)."""

    def __init__(self, bufs: list[Any], *args: Any, **kwargs: Any) -> None:
        self._given = bufs
        super().__init__(*args, **kwargs)

    def _post(self) -> None:
        self.bufs = self._given       # replaces the host ring the base made, before any post
        super()._post()


class _SendFrom(SendLink):
    """comm_links.SendLink that sends from the buffers it is given."""

    def __init__(self, bufs: list[Any], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bufs = bufs


# ----- staged: pinned host buffers, async copies --------------------------------------------

class StagedRecvLink:
    """Irecv into pinned host slots; `take` copies the message to a device slot (async)."""

    def __init__(self, xp: ModuleType, comm: MPI.Comm, peer: int, shape: tuple[int, ...],
                 count: int, waiter: Waiter, name: str, depth: int = 2,
                 dtype: Any = np.float64) -> None:
        self.xp, self.depth, self.next = xp, depth, 0
        pinned = [pinned_array(xp, shape, dtype) for _ in range(depth)]
        self.host = _RecvInto(pinned, comm, peer, shape, count, waiter, name, depth, dtype)
        self.dev = [xp.empty(shape, dtype=dtype) for _ in range(depth)]
        self.stream = xp.cuda.Stream(non_blocking=True)
        self.copied = [xp.cuda.Event(disable_timing=True) for _ in range(depth)]
        self.freed = [xp.cuda.Event(disable_timing=True) for _ in range(depth)]
        self.used = [False] * depth

    def ready(self) -> bool:
        return self.host.ready()

    def take(self, mb: int) -> Any:
        host = self.host.take(mb)
        i = self.next % self.depth
        if self.used[i]:                       # compute has finished reading the slot
            self.stream.wait_event(self.freed[i])
        self.dev[i].set(host, stream=self.stream)
        self.copied[i].record(self.stream)
        self.xp.cuda.get_current_stream().wait_event(self.copied[i])
        return self.dev[i]

    def release(self) -> None:
        i = self.next % self.depth
        self.freed[i].record(self.xp.cuda.get_current_stream())
        self.used[i] = True
        self.copied[i].synchronize()           # the pinned slot is read until the copy ends
        self.next += 1
        self.host.release()                    # reposts the pinned slot

    def discard(self, sent: int) -> None:
        """After a stop (`mpi.runner.drain_after_stop`): the host link drops the rest."""
        self.xp.cuda.get_current_stream().synchronize()
        self.host.discard(sent)


class StagedSendLink:
    """Async copy of the payload into a pinned slot on the link's stream, then Isend."""

    def __init__(self, xp: ModuleType, comm: MPI.Comm, peer: int, shape: tuple[int, ...],
                 waiter: Waiter, name: str, depth: int = 2, dtype: Any = np.float64) -> None:
        self.xp, self.shape, self.name = xp, shape, name
        pinned = [pinned_array(xp, shape, dtype) for _ in range(depth)]
        self.host = _SendFrom(pinned, comm, peer, shape, waiter, name, depth, dtype)
        self.dev = [xp.empty(shape, dtype=dtype) for _ in range(depth)]
        self.stream = xp.cuda.Stream(non_blocking=True)
        self.made = xp.cuda.Event(disable_timing=True)
        self.copied = xp.cuda.Event(disable_timing=True)

    def buffer(self) -> Any:
        """A device buffer a producer may fill and then `send`."""
        return self.dev[self.host.sent % len(self.dev)]

    def send(self, mb: int, payload: Any) -> None:
        src = _payload(self.xp, payload, math.prod(self.shape), self.name).reshape(self.shape)
        pinned = self.host.buffer()            # its previous Isend has completed
        self.made.record(self.xp.cuda.get_current_stream())
        self.stream.wait_event(self.made)      # copy after the kernels that made the payload
        src.get(stream=self.stream, out=pinned, blocking=False)    # queued, not waited for
        self.copied.record(self.stream)
        self.copied.synchronize()              # MPI reads the pinned slot: the bytes are there
        self.host.send(mb, pinned)             # Isend from the pinned slot, no copy

    def drain(self) -> None:
        self.host.drain()

    @property
    def sent(self) -> int:
        return self.host.sent


# ----- direct: device buffers to a CUDA-aware MPI --------------------------------------------

class DirectRecvLink:
    """Irecv straight into device slots (the MPI library must be CUDA-aware)."""

    def __init__(self, xp: ModuleType, comm: MPI.Comm, peer: int, shape: tuple[int, ...],
                 count: int, waiter: Waiter, name: str, depth: int = 2,
                 dtype: Any = np.float64) -> None:
        self.xp = xp
        dev = [xp.empty(shape, dtype=dtype) for _ in range(depth)]
        xp.cuda.get_current_stream().synchronize()     # allocated before MPI writes them
        self.link = _RecvInto(dev, comm, peer, shape, count, waiter, name, depth, dtype)

    def ready(self) -> bool:
        return self.link.ready()

    def take(self, mb: int) -> Any:
        return self.link.take(mb)

    def release(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()   # reads done before MPI rewrites it
        self.link.release()

    def discard(self, sent: int) -> None:
        """After a stop (`mpi.runner.drain_after_stop`): drop the rest of the messages."""
        self.xp.cuda.get_current_stream().synchronize()
        self.link.discard(sent)


class DirectSendLink:
    """Isend from a device slot once the compute stream has produced it."""

    def __init__(self, xp: ModuleType, comm: MPI.Comm, peer: int, shape: tuple[int, ...],
                 waiter: Waiter, name: str, depth: int = 2, dtype: Any = np.float64) -> None:
        self.xp, self.shape, self.name = xp, shape, name
        dev = [xp.empty(shape, dtype=dtype) for _ in range(depth)]
        self.link = _SendFrom(dev, comm, peer, shape, waiter, name, depth, dtype)

    def buffer(self) -> Any:
        return self.link.buffer()

    def send(self, mb: int, payload: Any) -> None:
        buf = self.link.buffer()
        if payload is not buf:
            buf[...] = _payload(self.xp, payload, buf.size, self.name).reshape(self.shape)
        self.xp.cuda.get_current_stream().synchronize()   # MPI reads it outside any stream
        self.link.send(mb, buf)

    def drain(self) -> None:
        self.link.drain()

    @property
    def sent(self) -> int:
        return self.link.sent


# ----- ipc: device-to-device copies into the peer's ring ----------------------------------

def _host_name() -> str:
    return MPI.Get_processor_name()


class IpcRecvLink:
    """A device ring the sender writes into through CUDA IPC; ready/credit messages on MPI."""

    def __init__(self, xp: ModuleType, comm: MPI.Comm, peer: int, shape: tuple[int, ...],
                 count: int, waiter: Waiter, name: str, depth: int = 2,
                 dtype: Any = np.float64) -> None:
        self.xp, self.slots, self.count, self.taken = xp, 2 * depth, count, 0
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        self.mem = xp.cuda.Memory(nbytes * self.slots)     # its own cudaMalloc: one handle
        self.dev = device_ring(xp, self.mem, shape, dtype, self.slots)
        handle = xp.cuda.runtime.ipcGetMemHandle(self.mem.ptr)
        setup = {"handle": handle, "nbytes": nbytes, "slots": self.slots, "count": count,
                 "host": _host_name()}
        self.setup = comm.isend(setup, dest=peer, tag=TAG_SETUP)
        self.arrived = RecvLink(comm, peer, (1,), count, waiter, name, depth, np.int64)
        self.credits = SendLink(comm, peer, (1,), waiter, f"{name} slot credit", depth,
                                np.int64)
        self.freed = xp.cuda.Event(disable_timing=True)
        self.mb = -1

    def ready(self) -> bool:
        return self.arrived.ready()

    def take(self, mb: int) -> Any:
        self.arrived.take(mb)          # the sender's copy into the slot completed before this
        self.mb = mb
        return self.dev[self.taken % self.slots]

    def release(self) -> None:
        self.arrived.release()
        self.freed.record(self.xp.cuda.get_current_stream())
        self.freed.synchronize()       # compute has read the slot: the sender may rewrite it
        j, self.taken = self.taken, self.taken + 1
        if j + self.slots < self.count:
            self.credits.send(self.mb, np.array([self.mb], dtype=np.int64))
        if self.taken == self.count:   # every credit the sender needs has been matched
            self.credits.drain()
            self.setup.wait()


class IpcSendLink:
    """Copies each payload into the receiver's slot (CUDA IPC), then says so over MPI."""

    def __init__(self, xp: ModuleType, comm: MPI.Comm, peer: int, shape: tuple[int, ...],
                 waiter: Waiter, name: str, depth: int = 2, dtype: Any = np.float64) -> None:
        self.xp, self.shape, self.name = xp, shape, name
        setup = comm.recv(source=peer, tag=TAG_SETUP)
        nbytes, n = math.prod(shape) * np.dtype(dtype).itemsize, setup["slots"]
        if setup["host"] != _host_name():
            raise CommError(f"{name}: --transport ipc needs both ranks on one node; rank "
                            f"{peer} is on {setup['host']}, this rank on {_host_name()}")
        if setup["nbytes"] != nbytes:
            raise CommError(f"{name}: the peer's slots hold {setup['nbytes']} bytes, this "
                            f"link sends {nbytes}")
        self.base = xp.cuda.runtime.ipcOpenMemHandle(setup["handle"])
        # this rank's own device: cupy then neither asks the driver which device owns the
        # pointer nor tries to enable peer access to a device this process may not see
        mem = xp.cuda.UnownedMemory(self.base, nbytes * n, self, current_device(xp))
        self.peer_slots, self.slots = device_ring(xp, mem, shape, dtype, n), n
        self.ready_out = SendLink(comm, peer, (1,), waiter, name, depth, np.int64)
        self.credits = RecvLink(comm, peer, (1,), max(0, setup["count"] - n), waiter,
                                f"{name} slot credit", depth, np.int64)
        self.stream = xp.cuda.Stream(non_blocking=True)
        self.made = xp.cuda.Event(disable_timing=True)
        self.copied = xp.cuda.Event(disable_timing=True)
        self.mbs, self.sent, self.granted = [-1] * n, 0, n - 1

    def buffer(self) -> Any:
        """The receiver's slot for the next message, once the receiver has freed it."""
        k = self.sent
        if k > self.granted:
            self.credits.take(self.mbs[k % self.slots])
            self.credits.release()
            self.granted = k
        return self.peer_slots[k % self.slots]

    def send(self, mb: int, payload: Any) -> None:
        dst = self.buffer()
        current = self.xp.cuda.get_current_stream()
        if payload is dst:
            self.copied.record(current)
        else:
            src = _payload(self.xp, payload, dst.size, self.name)
            self.made.record(current)
            self.stream.wait_event(self.made)
            dst.data.copy_from_device_async(src.data, dst.nbytes, self.stream)
            self.copied.record(self.stream)
        self.copied.synchronize()      # the bytes are in the receiver's slot
        self.mbs[self.sent % self.slots] = mb
        self.sent += 1
        self.ready_out.send(mb, np.array([mb], dtype=np.int64))

    def drain(self) -> None:
        self.ready_out.drain()
        if self.base is not None:
            self.peer_slots = []
            self.xp.cuda.runtime.ipcCloseMemHandle(self.base)
            self.base = None


# ----- the factory the runtime calls -----------------------------------------------------------

@dataclass(frozen=True)
class Links:
    """Constructors of a transport's links, with comm_links.RecvLink / comm_links.SendLink's arguments."""

    kind: str
    recv: Callable[..., Any]
    send: Callable[..., Any]


_CLASSES = {"staged": (StagedRecvLink, StagedSendLink),
            "direct": (DirectRecvLink, DirectSendLink),
            "ipc": (IpcRecvLink, IpcSendLink)}


def make_links(kind: str, xp: ModuleType) -> Links:
    """The links of transport `kind` for device arrays of module `xp`."""
    if kind not in _CLASSES:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)} (got {kind!r})")
    recv, send = _CLASSES[kind]
    return Links(kind, lambda *a, **k: recv(xp, *a, **k), lambda *a, **k: send(xp, *a, **k))


HOST_LINKS = Links("host", RecvLink, SendLink)
