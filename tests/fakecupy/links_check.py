"""Two ranks exchange device arrays over each GPU transport, against the MOCK cupy.

Run by tests/test_gpu_mock.py as `mpiexec -n 2 python tests/fakecupy/links_check.py` with
this folder first on PYTHONPATH (no GPU exists where the tests run, so `cupy` is the numpy
mock next to this file). Rank 0 sends microbatches 0..N-1 to rank 1 (activation direction),
rank 1 sends each back doubled (gradient direction), both take and check every value; then
each rank checks, in the mock's call log, the order of copies, synchronisations and MPI
sends that the transport promises (docs/GPU.md). Rank 0 prints one JSON line, the list of
both ranks' reports; any failed check raises, so the job exits nonzero.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

import cupy  # the mock: this folder is first on sys.path
import numpy as np

from rpd_mpi.mpi.comm import Comm, CommError, Waiter
from rpd_mpi.mpi.comm_gpu import make_links

assert getattr(cupy, "MOCK", False), "links_check.py must run against the mock cupy"
N, SHAPE = 7, (3, 4)     # N > the 4 IPC slots: the sender must wait for credits


def addr(a: Any) -> int:
    return int(a.__array_interface__["data"][0])


def logged(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """Wrap an MPI-side call of a composed comm link so that it shows in the call log."""
    def call(mb: int, *args: Any) -> Any:
        out = fn(mb, *args)
        buf = args[0] if args else out
        cupy.calls.append((kind, mb, addr(buf), cupy.is_pinned(buf)))
        return out
    return call


def wire(link: Any) -> None:
    """Log the Isends and completed receives of the comm.*Link inside a device link."""
    for attr in ("host", "link", "arrived", "ready_out"):
        inner = getattr(link, attr, None)
        if inner is None:
            continue
        if hasattr(inner, "send"):
            inner.send = logged(inner.send, "isend")
        if hasattr(inner, "take"):
            inner.take = logged(inner.take, "recvd")


def exchange(kind: str, comm: Comm, waiter: Waiter) -> list[tuple]:
    links = make_links(kind, cupy)
    me = comm.stage
    start = len(cupy.calls)
    if me == 0:
        out = links.send(comm.act_comm, 1, SHAPE, waiter, "activation")
        back = links.recv(comm.grad_comm, 1, SHAPE, N, waiter, "gradient")
    else:
        inp = links.recv(comm.act_comm, 0, SHAPE, N, waiter, "activation")
        ret = links.send(comm.grad_comm, 0, SHAPE, waiter, "gradient")
    for link in ((out, back) if me == 0 else (inp, ret)):
        wire(link)
    for mb in range(N):
        if me == 0:
            out.send(mb, cupy.full(SHAPE, mb + 0.25))
            got = back.take(mb)
            assert isinstance(got, cupy.ndarray), type(got)
            assert np.all(got.view(np.ndarray) == 2 * (mb + 0.25)), (kind, mb)
            back.release()
        else:
            got = inp.take(mb)
            assert isinstance(got, cupy.ndarray), type(got)
            assert np.all(got.view(np.ndarray) == mb + 0.25), (kind, mb)
            ret.send(mb, 2 * got)
            inp.release()
    (out if me == 0 else ret).drain()
    return cupy.calls[start:]


def burst(kind: str, comm: Comm, waiter: Waiter) -> bool:
    """Rank 0 sends N messages while rank 1 is still asleep: a sender that overwrote a slot
    before the receiver released it (IPC credits, ring reuse) would corrupt a value."""
    links = make_links(kind, cupy)
    if comm.stage == 0:
        out = links.send(comm.act_comm, 1, SHAPE, waiter, "activation")
        for mb in range(N):
            out.send(mb, cupy.full(SHAPE, 10.0 + mb))
        out.drain()
        return True
    inp = links.recv(comm.act_comm, 0, SHAPE, N, waiter, "activation")
    time.sleep(0.2)
    for mb in range(N):
        ok = bool(np.all(inp.take(mb).view(np.ndarray) == 10.0 + mb))
        inp.release()
        if not ok:
            return False
    return True


def first(log: list[tuple], pred: Callable[[tuple], bool], after: int = -1) -> int:
    for i in range(after + 1, len(log)):
        if pred(log[i]):
            return i
    raise AssertionError(f"no call matching after #{after}: {log[after + 1:after + 8]}")


def check_staged(log: list[tuple]) -> dict[str, int]:
    """Sender: D2H into a pinned slot on the link's stream, stream sync, then the Isend of
    that very slot. Receiver: the MPI receive lands in pinned memory, then H2D from it on
    the link's stream, and the compute (null) stream waits for that copy."""
    sends = [i for i, c in enumerate(log) if c[0] == "isend"]
    assert len(sends) == N, sends
    for i in sends:
        d2h = max(j for j in range(i) if log[j][0] == "d2h")
        sync = first(log, lambda c: c[0] == "stream_sync", d2h)
        assert d2h < sync < i and log[d2h][2] == log[i][2] and log[i][3], (log[d2h], log[i])
    recvs = [i for i, c in enumerate(log) if c[0] == "recvd"]
    assert len(recvs) == N and all(log[i][3] for i in recvs)
    for i in recvs:
        h2d = first(log, lambda c: c[0] == "h2d", i)
        assert log[h2d][1] == log[i][2] and log[h2d][3] != "null"
        first(log, lambda c: c[0] == "wait_event" and c[1] == "null", h2d)
    return {"isend": len(sends), "h2d": len(recvs)}


def check_direct(log: list[tuple]) -> dict[str, int]:
    """The compute stream is synchronised before each Isend of a device (not pinned) slot."""
    sends = [i for i, c in enumerate(log) if c[0] == "isend"]
    assert len(sends) == N
    for i in sends:
        assert not log[i][3] and log[i - 1] == ("stream_sync", "null"), log[i - 2:i + 1]
    assert not any(c[0] in ("d2h", "h2d") for c in log)
    return {"isend": len(sends)}


def check_ipc(log: list[tuple]) -> dict[str, int]:
    """One handle each way at setup; each message: a device-to-device copy into the peer's
    slot, an event sync, then the small "ready" message; no host staging."""
    assert sum(c[0] == "ipc_get" for c in log) == 1 and sum(c[0] == "ipc_open" for c in log) == 1
    assert sum(c[0] == "ipc_close" for c in log) == 1
    sends = [i for i, c in enumerate(log) if c[0] == "isend"]
    assert len(sends) == N
    for i in sends:
        d2d = max(j for j in range(i) if log[j][0] == "d2d")
        first(log, lambda c: c[0] == "event_sync", d2d)
        assert log[d2d][4] != "null"
    slots = {c[2] for c in log if c[0] == "d2d"}
    assert len(slots) == 4, slots                 # a 4-slot ring in the peer's memory
    assert not any(c[0] in ("d2h", "h2d") for c in log)
    return {"ready": len(sends), "d2d": sum(c[0] == "d2d" for c in log)}


def tag_check_stays(comm: Comm, waiter: Waiter) -> bool:
    """An IPC message of microbatch 7 taken as microbatch 8 raises CommError."""
    links = make_links("ipc", cupy)
    if comm.stage == 0:
        link = links.send(comm.act_comm, 1, SHAPE, waiter, "activation")
        link.send(7, cupy.zeros(SHAPE))
        link.drain()
        return True
    link = links.recv(comm.act_comm, 0, SHAPE, 1, waiter, "activation")
    try:
        link.take(8)
    except CommError as err:
        return "expected microbatch 8" in str(err)
    return False


def main() -> int:
    comm = Comm()
    if comm.size != 2:
        raise SystemExit("run with mpiexec -n 2")
    comm.split(2)
    waiter = Waiter("polite", 30.0)
    checks: dict[str, Any] = {}
    for kind in ("staged", "direct", "ipc"):
        log = exchange(kind, comm, waiter)
        checks[kind] = (check_staged(log) if kind == "staged" else
                        check_direct(log) if kind == "direct" else check_ipc(log))
        comm.barrier()
        checks[f"{kind}_burst"] = burst(kind, comm, waiter)
        assert checks[f"{kind}_burst"], f"{kind}: a message was overwritten before its take"
        comm.barrier()
    checks["tag_check"] = tag_check_stays(comm, waiter)
    assert checks["tag_check"], "a mismatched microbatch id was not refused"
    comm.barrier()
    reports = comm.gather({"rank": comm.rank, "ok": True, "checks": checks})
    if comm.rank == 0:
        print(json.dumps(reports))
        sys.stdout.flush()
    comm.free()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
