"""A numpy-backed stand-in for cupy. THIS IS A MOCK, NOT CUPY.

The machines this project is built and tested on have no GPU (and no cupy), so the GPU code
paths (`rpd_mpi.backend`, `rpd_mpi.comm_gpu`, `--device cuda` in the runtime) are exercised
against this module: tests/test_gpu_mock.py puts this folder first on `sys.path` /
`PYTHONPATH` (or the module into `sys.modules`), and `benchmarks/gpu_check.py --dry-run`
does the same. It proves the control flow, the copy sequences and the protocols, not CUDA:
"device" arrays are host memory, streams and events run nothing asynchronously.

What it provides: `ndarray` (an np.ndarray subclass of module "cupy", so that
`kernels_lm.array_module` picks this module; it has no `__cuda_array_interface__`, so MPI
sees host memory) with `.get(stream, out)` (D2H), `.set(arr, stream)` (H2D) and `.data`
(a `MemoryPointer`); numpy's functions, their array results turned into `ndarray`;
`asarray`/`asnumpy`; `cuda`: `is_available`, `Device`, `Stream`, `Event`,
`get_current_stream`, `alloc_pinned_memory`, `Memory` (an mmap'd file under /dev/shm, so
that another process can open its "IPC handle"), `MemoryPointer`, `UnownedMemory`, and
`runtime` (`getDeviceCount`, `getDeviceProperties`, `ipcGetMemHandle`,
`ipcOpenMemHandle`, `ipcCloseMemHandle`). Every copy, synchronisation and IPC call is
appended to `calls` as a tuple (kind, ...), so tests can check what happened in what order.

Environment: FAKECUPY_GPUS = number of visible devices (default 1; 0 = no GPU).
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import os
import tempfile
import types
from typing import Any

import numpy as _np

__version__ = "0.0+numpy-mock"
MOCK = True
calls: list[tuple] = []          # (kind, ...) of every device-related call, in order
pinned_ranges: list[tuple[int, int]] = []      # (address, nbytes) of pinned host memory


def _log(*entry: Any) -> None:
    calls.append(entry)


def _addr(a: _np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def is_pinned(a: _np.ndarray) -> bool:
    """Does the host array a lie in memory from `cuda.alloc_pinned_memory`?"""
    p = _addr(a)
    return any(lo <= p and p + a.nbytes <= lo + n for lo, n in pinned_ranges)


class ndarray(_np.ndarray):
    """A "device" array: host memory that says it is cupy's."""

    def __new__(cls, shape: Any, dtype: Any = float, memptr: MemoryPointer | None = None,
                strides: Any = None, order: str = "C") -> ndarray:
        if memptr is None:
            return _np.ndarray.__new__(cls, shape, dtype, strides=strides, order=order)
        return _np.ndarray.__new__(cls, shape, dtype, buffer=memptr.mem.buffer,
                                   offset=memptr.ptr - memptr.mem.ptr, strides=strides,
                                   order=order)

    @property
    def data(self) -> MemoryPointer:          # type: ignore[override]
        return MemoryPointer(_Raw(_addr(self), self.nbytes), 0)

    def get(self, stream: Any = None, order: str = "C", out: _np.ndarray | None = None,
            blocking: bool = True) -> _np.ndarray:
        """Device -> host."""
        _log("d2h", _addr(self), None if out is None else _addr(out), _name(stream))
        if out is None:
            return _np.array(self.view(_np.ndarray), order=order)
        out[...] = self.view(_np.ndarray)
        return out

    def set(self, arr: _np.ndarray, stream: Any = None) -> None:
        """Host -> device."""
        _log("h2d", _addr(arr), _addr(self), _name(stream))
        self.view(_np.ndarray)[...] = arr


def _device(x: Any) -> Any:
    """numpy results as mock device arrays (recursively in tuples and lists)."""
    if type(x) is _np.ndarray:
        return x.view(ndarray)
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    if isinstance(x, list):
        return [_device(v) for v in x]
    return x


def __getattr__(name: str) -> Any:
    obj = getattr(_np, name)
    if isinstance(obj, (_np.ufunc, type, types.ModuleType)) or not callable(obj):
        return obj

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        return _device(obj(*args, **kwargs))
    wrapped.__name__ = name
    return wrapped


def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    if isinstance(a, ndarray) and (dtype is None or _np.dtype(dtype) == a.dtype):
        return a
    return _np.array(a, dtype=dtype, order=order or "K").view(ndarray)


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None,
            blocking: bool = True) -> _np.ndarray:
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    return _np.asarray(a)


def get_array_module(*args: Any) -> Any:
    import sys
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


class _Pool:
    def free_all_blocks(self) -> None:
        _log("free_all_blocks")


def get_default_memory_pool() -> _Pool:
    return _Pool()


def get_default_pinned_memory_pool() -> _Pool:
    return _Pool()


# ----- cuda ------------------------------------------------------------------------------------

def _name(stream: Any) -> str:
    return "null" if stream is None else getattr(stream, "name", "?")


class _Raw:
    """Memory at an address of this process (an array's data)."""

    def __init__(self, ptr: int, size: int) -> None:
        self.ptr, self.size, self.buffer = ptr, size, None


class Memory:
    """cudaMalloc: an mmap'd file under /dev/shm, so another process can map it (IPC)."""

    def __init__(self, size: int) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="fakecupy-", dir=folder)
        os.ftruncate(fd, max(size, 1))
        self.buffer = mmap.mmap(fd, max(size, 1))
        os.close(fd)
        self.size = size
        self.ptr = _addr(_np.frombuffer(self.buffer, _np.uint8))
        _ALLOCS[self.ptr] = self
        atexit.register(_unlink, self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


_ALLOCS: dict[int, Memory] = {}          # base address -> allocation made here
_OPENED: dict[int, mmap.mmap] = {}       # base address -> mapping of a peer's allocation


class UnownedMemory:
    def __init__(self, ptr: int, size: int, owner: Any, device_id: int | None = None) -> None:
        self.ptr, self.size, self.owner = ptr, size, owner
        self.buffer = _OPENED[ptr] if ptr in _OPENED else _ALLOCS[ptr].buffer


class MemoryPointer:
    def __init__(self, mem: Any, offset: int) -> None:
        self.mem, self.ptr = mem, mem.ptr + offset

    def copy_from_device_async(self, src: MemoryPointer, size: int, stream: Any = None
                               ) -> None:
        _log("d2d", src.ptr, self.ptr, size, _name(stream))
        ctypes.memmove(self.ptr, src.ptr, size)


class _PinnedMemory(bytearray):
    """Page-locked host memory (here: a bytearray), with its address."""


def alloc_pinned_memory(nbytes: int) -> _PinnedMemory:
    mem = _PinnedMemory(nbytes)
    ptr = _addr(_np.frombuffer(mem, _np.uint8)) if nbytes else 0
    pinned_ranges.append((ptr, nbytes))
    _log("pinned", ptr, nbytes)
    return mem


class Stream:
    _count = 0

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False
                 ) -> None:
        Stream._count += 1
        self.name = "null" if null else f"stream{Stream._count}"
        self.ptr = 0 if null else Stream._count

    def synchronize(self) -> None:
        _log("stream_sync", self.name)

    def wait_event(self, event: Event) -> None:
        _log("wait_event", self.name, event.id)

    def use(self) -> Stream:
        return self

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class Event:
    _count = 0

    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        Event._count += 1
        self.id = Event._count

    def record(self, stream: Stream | None = None) -> None:
        _log("record", self.id, _name(stream))

    def synchronize(self) -> None:
        _log("event_sync", self.id)

    def query(self) -> bool:
        return True


_NULL = Stream(null=True)


def get_current_stream() -> Stream:
    return _NULL


def _visible() -> int:
    return int(os.environ.get("FAKECUPY_GPUS", "1"))


class Device:
    current = 0

    def __init__(self, device: int | None = None) -> None:
        self.id = Device.current if device is None else int(device)

    def use(self) -> None:
        if not 0 <= self.id < _visible():
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id}")
        Device.current = self.id
        _log("use_device", self.id)

    def synchronize(self) -> None:
        _log("device_sync", self.id)


def _get_mem_handle(ptr: int) -> bytes:
    if ptr not in _ALLOCS:        # like CUDA: the base of a cudaMalloc, not a pool slice
        raise RuntimeError("cudaErrorInvalidValue: not the base of an allocation")
    _log("ipc_get", ptr)
    return _ALLOCS[ptr].path.encode()


def _open_mem_handle(handle: bytes, flags: int = 1) -> int:
    path = handle.decode()
    fd = os.open(path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    ptr = _addr(_np.frombuffer(mapping, _np.uint8))
    _OPENED[ptr] = mapping
    _log("ipc_open", ptr)
    return ptr


def _close_mem_handle(ptr: int) -> None:
    _log("ipc_close", ptr)
    _OPENED.pop(ptr)


runtime = types.SimpleNamespace(
    getDeviceCount=_visible,
    getDeviceProperties=lambda i: {"name": b"FakeGPU (numpy mock)", "totalGlobalMem": 0},
    runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0,
    ipcGetMemHandle=_get_mem_handle, ipcOpenMemHandle=_open_mem_handle,
    ipcCloseMemHandle=_close_mem_handle)

cuda = types.SimpleNamespace(
    is_available=lambda: _visible() > 0, runtime=runtime, Device=Device, Stream=Stream,
    Event=Event, get_current_stream=get_current_stream, Memory=Memory,
    MemoryPointer=MemoryPointer, UnownedMemory=UnownedMemory,
    alloc_pinned_memory=alloc_pinned_memory)
