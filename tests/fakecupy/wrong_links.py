"""Deliberately wrong GPU links, each breaking one rule the real links keep (MOCK cupy only).

tests/test_gpu_mock.py runs each through tests/fakecupy/links_check.py (`--variant NAME`,
2 real MPI ranks) and requires the strict mock to catch it with the message in `EXPECT`,
while the real classes of rpd_mpi.mpi.comm_gpu pass the same exchange. Each class is the
real one with one line left out or changed, so that what the test shows is that line.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rpd_mpi.mpi.comm_gpu import (DirectRecvLink, DirectSendLink, IpcRecvLink, IpcSendLink,
                                  StagedRecvLink, StagedSendLink, _payload)


class StagedSendNoSync(StagedSendLink):
    """Isend from the pinned slot without synchronizing the D2H copy's event."""

    def send(self, mb: int, payload: Any) -> None:
        src = _payload(self.xp, payload, math.prod(self.shape), self.name).reshape(self.shape)
        pinned = self.host.buffer()
        self.made.record(self.xp.cuda.get_current_stream())
        self.stream.wait_event(self.made)
        src.get(stream=self.stream, out=pinned, blocking=False)
        self.copied.record(self.stream)
        self.host.send(mb, pinned)                      # missing: self.copied.synchronize()


class StagedSendNoWait(StagedSendLink):
    """The D2H copy on the link's stream does not wait for the kernels of the payload."""

    def send(self, mb: int, payload: Any) -> None:
        src = _payload(self.xp, payload, math.prod(self.shape), self.name).reshape(self.shape)
        pinned = self.host.buffer()                     # missing: made.record + wait_event
        src.get(stream=self.stream, out=pinned, blocking=False)
        self.copied.record(self.stream)
        self.copied.synchronize()
        self.host.send(mb, pinned)


class StagedSendDevice(StagedSendLink):
    """Hands the device array itself to MPI (what a non-CUDA-aware MPI cannot take)."""

    def send(self, mb: int, payload: Any) -> None:
        src = _payload(self.xp, payload, math.prod(self.shape), self.name).reshape(self.shape)
        self.xp.cuda.get_current_stream().synchronize()
        self.host.buffer()
        self.host.bufs[self.host.sent % len(self.host.bufs)] = src
        self.host.send(mb, src)                         # Isend of device memory


class StagedRecvNoWait(StagedRecvLink):
    """The compute stream does not wait for the H2D copy into the slot it returns."""

    def take(self, mb: int) -> Any:
        host = self.host.take(mb)
        i = self.next % self.depth
        if self.used[i]:
            self.stream.wait_event(self.freed[i])
        self.dev[i].set(host, stream=self.stream)
        self.copied[i].record(self.stream)
        return self.dev[i]                              # missing: compute waits for copied


class StagedRecvEarlyRepost(StagedRecvLink):
    """Reposts the pinned slot to MPI before its H2D copy has been seen to complete."""

    def release(self) -> None:
        i = self.next % self.depth
        self.freed[i].record(self.xp.cuda.get_current_stream())
        self.used[i] = True                             # missing: copied[i].synchronize()
        self.next += 1
        self.host.release()


class StagedRecvNoFreed(StagedRecvLink):
    """The next H2D copy into a device slot does not wait for compute to finish with it."""

    def take(self, mb: int) -> Any:
        host = self.host.take(mb)
        i = self.next % self.depth                      # missing: wait_event(freed[i])
        self.dev[i].set(host, stream=self.stream)
        self.copied[i].record(self.stream)
        self.xp.cuda.get_current_stream().wait_event(self.copied[i])
        return self.dev[i]


class DirectSendNoSync(DirectSendLink):
    """Isend of a device slot while the kernel that filled it may still run."""

    def send(self, mb: int, payload: Any) -> None:
        buf = self.link.buffer()
        if payload is not buf:
            buf[...] = _payload(self.xp, payload, buf.size, self.name).reshape(self.shape)
        self.link.send(mb, buf)                         # missing: synchronize first


class IpcSendNoSync(IpcSendLink):
    """Says "ready" before the device-to-device copy into the peer's slot has completed."""

    def send(self, mb: int, payload: Any) -> None:
        dst = self.buffer()
        src = _payload(self.xp, payload, dst.size, self.name)
        self.made.record(self.xp.cuda.get_current_stream())
        self.stream.wait_event(self.made)
        dst.data.copy_from_device_async(src.data, dst.nbytes, self.stream)
        self.copied.record(self.stream)                 # missing: copied.synchronize()
        self.mbs[self.sent % self.slots] = mb
        self.sent += 1
        self.ready_out.send(mb, np.array([mb], dtype=np.int64))


class IpcRecvEarlyCredit(IpcRecvLink):
    """Gives a slot back (the credit) before its host has seen compute finish reading it."""

    def release(self) -> None:
        self.arrived.release()
        self.freed.record(self.xp.cuda.get_current_stream())   # missing: freed.synchronize()
        j, self.taken = self.taken, self.taken + 1
        if j + self.slots < self.count:
            self.credits.send(self.mb, np.array([self.mb], dtype=np.int64))
        if self.taken == self.count:
            self.credits.drain()
            self.setup.wait()


class IpcSendNoCredit(IpcSendLink):
    """Writes into slot k % n without waiting for the credit of message k - n."""

    def buffer(self) -> Any:
        return self.peer_slots[self.sent % self.slots]  # missing: credits.take


class IpcSendNoDevice(IpcSendLink):
    """Opens the peer's ring with UnownedMemory(ptr, size, owner): no device id."""

    def __init__(self, xp: Any, comm: Any, peer: int, shape: tuple[int, ...], *args: Any,
                 **kwargs: Any) -> None:
        real = xp.cuda.UnownedMemory
        xp.cuda.UnownedMemory = lambda ptr, size, owner, device_id=-1: real(ptr, size, owner)
        try:
            super().__init__(xp, comm, peer, shape, *args, **kwargs)
        finally:
            xp.cuda.UnownedMemory = real


# name -> (transport, receive class, send class, text the failure must contain)
VARIANTS: dict[str, tuple[str, type, type, str]] = {
    "staged-send-no-sync": ("staged", StagedRecvLink, StagedSendNoSync,
                            "reads poisoned pinned memory"),
    "staged-send-no-wait": ("staged", StagedRecvLink, StagedSendNoWait,
                            "nothing orders them"),
    "staged-send-device": ("staged", StagedRecvLink, StagedSendDevice,
                           "expecting buffer"),
    "staged-recv-no-wait": ("staged", StagedRecvNoWait, StagedSendLink,
                            "nothing orders them"),
    "staged-recv-early-repost": ("staged", StagedRecvEarlyRepost, StagedSendLink,
                                 "pinned source"),
    "staged-recv-no-freed": ("staged", StagedRecvNoFreed, StagedSendLink,
                             "nothing orders them"),
    "direct-send-no-sync": ("direct", DirectRecvLink, DirectSendNoSync,
                            "still used by kernel"),
    "direct-without-cuda-aware-mpi": ("direct", DirectRecvLink, DirectSendLink,
                                      "expecting buffer"),
    "ipc-send-no-sync": ("ipc", IpcRecvLink, IpcSendNoSync, "hold poison"),
    "ipc-recv-early-credit": ("ipc", IpcRecvEarlyCredit, IpcSendLink,
                              "may still be reading"),
    "ipc-send-no-credit": ("ipc", IpcRecvLink, IpcSendNoCredit,
                           "overwritten before its take"),
    "ipc-send-no-device": ("ipc", IpcRecvLink, IpcSendNoDevice,
                           "UnownedMemory over an IPC mapping without device_id"),
}
