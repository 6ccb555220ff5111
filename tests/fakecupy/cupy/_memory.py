"""Device memory, pinned memory, devices and CUDA IPC of the MOCK cupy (not CUDA).

"Device" memory is host memory the fake never hands out as a buffer: arrays keep it
private (see _array.py). `Memory` (a plain cudaMalloc) is an mmap'd file in a temporary
folder, so that another process can open its IPC handle and really share the bytes. Pinned
memory is a bytearray whose address range is registered, so that copies know it is pinned
(asynchronous) rather than pageable (synchronous for the host, as in CUDA).

IPC rules enforced as CUDA and cupy do: a handle is the base of a `Memory`, not a pool
slice; a process may not open its own handle; `UnownedMemory` over a peer's mapping must
be given this process's device (the fake does not guess it from the pointer).
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import tempfile
from typing import Any

import numpy as _np

from cupy._sched import (SHARED, TOKENS, HazardError, Stream, Tracked, host_sees,
                         host_sees_all, log, poison, poisoned, stream_of)


class CUDARuntimeError(RuntimeError):
    """cupy_backends.cuda.api.runtime.CUDARuntimeError, as raised by the mock."""


def addr(a: _np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def view_bytes(ptr: int, nbytes: int) -> _np.ndarray:
    """A uint8 numpy view of nbytes at ptr (for the fake's own copies and checks)."""
    return _np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))[:nbytes]


# ----- devices ---------------------------------------------------------------------------------

def visible() -> int:
    return int(os.environ.get("FAKECUPY_GPUS", "1"))


class Device:
    current = 0

    def __init__(self, device: int | None = None) -> None:
        self.id = Device.current if device is None else int(device)
        self._prev = Device.current

    def use(self) -> None:
        if not 0 <= self.id < visible():
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal "
                                   f"{self.id} (fake cupy: {visible()} visible)")
        Device.current = self.id
        log("use_device", self.id)

    def synchronize(self) -> None:
        log("device_sync", self.id)
        host_sees_all()

    def __enter__(self) -> Device:
        self._prev = Device.current
        self.use()
        return self

    def __exit__(self, *exc: Any) -> None:
        Device.current = self._prev

    @property
    def compute_capability(self) -> str:
        return "90"


# ----- allocations -----------------------------------------------------------------------------

PINNED: list[Tracked] = []          # every pinned allocation (kept: addresses never reused)
BY_BASE: dict[int, Tracked] = {}    # base address -> Memory allocation or opened IPC mapping
_FOLDER = os.environ.get("FAKECUPY_DIR") or tempfile.gettempdir()


try:
    byte_bounds = _np.lib.array_utils.byte_bounds
except AttributeError:           # numpy < 2
    byte_bounds = _np.byte_bounds


def bounds(a: _np.ndarray) -> tuple[int, int]:
    """[first, last) byte address of a view (any strides)."""
    if a.size == 0:
        return addr(a), addr(a)
    lo, hi = byte_bounds(a)
    return int(lo), int(hi)


def pool_alloc(a: _np.ndarray) -> Tracked:
    """The device allocation behind a fresh numpy array (a pool slice: no IPC handle)."""
    lo, hi = bounds(a)
    return Tracked(lo, hi - lo, "device array", a, Device.current)


def find_pinned(a: _np.ndarray) -> Tracked | None:
    p = addr(a)
    for t in PINNED:
        if t.base <= p and p + a.nbytes <= t.base + t.size:
            return t
    return None


def is_pinned(a: Any) -> bool:
    return isinstance(a, _np.ndarray) and find_pinned(a) is not None


class PinnedMemory(bytearray):
    """Page-locked host memory (cupy.cuda.PinnedMemoryPointer): a buffer with `ptr`."""

    ptr = 0


def alloc_pinned_memory(nbytes: int) -> PinnedMemory:
    mem = PinnedMemory(max(nbytes, 1))
    mem.ptr = addr(_np.frombuffer(mem, _np.uint8))
    poison(mem.ptr, nbytes)                      # uninitialised, as cudaHostAlloc leaves it
    PINNED.append(Tracked(mem.ptr, nbytes, "pinned host memory", mem, None))
    log("pinned", mem.ptr, nbytes)
    return mem


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


CLOCKS = 64                          # stream ids a shared host clock can hold


def _share(t: Tracked, mapping: mmap.mmap, size: int) -> None:
    """Views of the read table and host clock that follow `size` bytes in the file."""
    words = (size + 7) // 8
    body = (size + 7) // 8 * 8
    t.shared = (_np.frombuffer(mapping, _np.int64, 2 * words, body).reshape(words, 2),
                _np.frombuffer(mapping, _np.int64, CLOCKS, body + 16 * words))


def _file_size(size: int) -> int:
    return (size + 7) // 8 * 8 + 16 * ((size + 7) // 8) + 8 * CLOCKS


class Memory:
    """cudaMalloc of `size` bytes (its own allocation, so it has an IPC handle)."""

    def __init__(self, size: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix=f"fakecupy-{os.getpid()}-", dir=_FOLDER)
        os.ftruncate(fd, _file_size(size))
        self.buffer = mmap.mmap(fd, _file_size(size))
        os.close(fd)
        atexit.register(_unlink, self.path)
        self.size, self.device_id = size, Device.current
        self.ptr = addr(_np.frombuffer(self.buffer, _np.uint8))
        self.alloc = Tracked(self.ptr, size, "cudaMalloc", self.buffer, self.device_id)
        self.alloc.path = self.path
        poison(self.ptr, size)
        BY_BASE[self.ptr] = self.alloc


class UnownedMemory:
    """Memory cupy does not own (here: a peer's allocation opened through IPC)."""

    def __init__(self, ptr: int, size: int, owner: Any, device_id: int = -1) -> None:
        alloc = next((t for base, t in BY_BASE.items()
                      if base <= ptr and ptr + size <= base + t.size), None)
        if alloc is None:
            raise CUDARuntimeError("cudaErrorInvalidValue (fake cupy): UnownedMemory over "
                                   "memory the fake does not know")
        if alloc.kind == "IPC mapping" and device_id < 0:
            raise CUDARuntimeError(
                "fake cupy: UnownedMemory over an IPC mapping without device_id would ask "
                "cudaPointerGetAttributes for the device (and then enable peer access); "
                "pass this process's own device, device_id=cupy.cuda.Device().id")
        if device_id >= 0 and device_id != Device.current:
            raise CUDARuntimeError(f"fake cupy: UnownedMemory on device {device_id}, but "
                                   f"this process uses device {Device.current} (that would "
                                   f"need peer access)")
        self.ptr, self.size, self.owner, self.alloc = ptr, size, owner, alloc
        self.device_id = device_id if device_id >= 0 else Device.current


class MemoryPointer:
    """A position in an allocation; copies between positions are stream operations."""

    def __init__(self, mem: Any, offset: int) -> None:
        self.mem, self.alloc = mem, mem.alloc
        self.ptr = mem.ptr + offset
        self.offset = self.ptr - self.alloc.base
        self.device_id = getattr(mem, "device_id", Device.current)

    def copy_from_device_async(self, src: MemoryPointer, size: int,
                               stream: Stream | None = None) -> None:
        s = stream_of(stream)
        log("d2d", src.ptr, self.ptr, size, s.name)
        seq = s.enqueue()
        src.alloc.touch(src.offset, src.offset + size, False, s, seq, "a D2D copy (read)")
        self.alloc.touch(self.offset, self.offset + size, True, s, seq, "a D2D copy")
        late = self.alloc.peer_may_read(self.offset, self.offset + size)
        if late is not None:
            raise HazardError(f"a D2D copy on {s.name} writes bytes [{self.offset}, "
                              f"{self.offset + size}) of a peer's IPC memory that the peer's "
                              f"kernels ({late}) may still be reading: the peer gave the "
                              f"slot back before its host synchronized them")
        dst_ptr, src_ptr, token = self.ptr, src.ptr, next(TOKENS)
        if self.alloc.may_poison(self.offset, self.offset + size):
            poison(dst_ptr, size)        # undefined until the copy has run
        src.alloc.deferred_reads[token] = (src.offset, src.offset + size)
        src_alloc = src.alloc

        def run() -> None:
            src_alloc.deferred_reads.pop(token, None)
            if poisoned(view_bytes(src_ptr, size // 8 * 8).view(_np.uint64)):
                raise HazardError("a D2D copy reads poisoned bytes: its source was never "
                                  "written, or its own copy had not completed")
            ctypes.memmove(dst_ptr, src_ptr, size)
        s.defer(seq, run)

    def copy_from_device(self, src: MemoryPointer, size: int) -> None:
        self.copy_from_device_async(src, size, None)


# ----- IPC -------------------------------------------------------------------------------------

def ipc_get_mem_handle(ptr: int) -> bytes:
    t = BY_BASE.get(ptr)
    if t is None or t.kind != "cudaMalloc":
        raise CUDARuntimeError("cudaErrorInvalidValue: not the base of a cudaMalloc "
                               "allocation (a memory-pool slice has no IPC handle)")
    log("ipc_get", ptr)
    if t.shared is None:
        _share(t, t.owner, t.size)
        SHARED.append(t)
        host_sees({})                    # writes this process's host clock into the file
    return f"fakeipc:{os.getpid()}:{t.size}:{t.path}".encode()


def ipc_open_mem_handle(handle: bytes, flags: int = 1) -> int:
    _, pid, size, path = handle.decode().split(":", 3)
    if int(pid) == os.getpid():
        raise CUDARuntimeError("cudaErrorInvalidContext (fake cupy): a process may not open "
                               "its own IPC memory handle")
    fd = os.open(path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    ptr = addr(_np.frombuffer(mapping, _np.uint8))
    BY_BASE[ptr] = Tracked(ptr, int(size), "IPC mapping", mapping, None)
    _share(BY_BASE[ptr], mapping, int(size))
    log("ipc_open", ptr)
    return ptr


def ipc_close_mem_handle(ptr: int) -> None:
    if ptr not in BY_BASE or BY_BASE[ptr].kind != "IPC mapping":
        raise CUDARuntimeError("cudaErrorInvalidValue: not an opened IPC mapping")
    log("ipc_close", ptr)
    BY_BASE.pop(ptr).closed = True   # kept mapped (views may live on); any use now raises
