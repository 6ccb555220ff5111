"""cupy.cuda of the MOCK cupy: devices, streams, events, memory, IPC (see the package doc)."""

from __future__ import annotations

import types

from cupy._memory import (CUDARuntimeError, Device, Memory, MemoryPointer, UnownedMemory,
                          alloc_pinned_memory, ipc_close_mem_handle, ipc_get_mem_handle,
                          ipc_open_mem_handle, visible)
from cupy._sched import Event, Stream, get_current_stream, get_elapsed_time, log

__all__ = ["CUDARuntimeError", "Device", "Event", "Memory", "MemoryPointer", "Stream",
           "UnownedMemory", "alloc_pinned_memory", "get_current_stream", "get_elapsed_time",
           "is_available", "log", "runtime"]


def is_available() -> bool:
    return visible() > 0


def _set_device(i: int) -> None:
    Device(i).use()


runtime = types.SimpleNamespace(
    CUDARuntimeError=CUDARuntimeError, cudaIpcMemLazyEnablePeerAccess=1,
    getDeviceCount=visible, getDevice=lambda: Device.current, setDevice=_set_device,
    deviceSynchronize=lambda: Device().synchronize(),
    getDeviceProperties=lambda i: {"name": b"FakeGPU (numpy mock)", "totalGlobalMem": 0},
    runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0,
    ipcGetMemHandle=ipc_get_mem_handle, ipcOpenMemHandle=ipc_open_mem_handle,
    ipcCloseMemHandle=ipc_close_mem_handle)
