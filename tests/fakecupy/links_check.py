"""Two ranks exchange device arrays over each GPU transport, against the MOCK cupy.

Run by tests/test_gpu_mock.py as `mpiexec -n 2 python tests/fakecupy/links_check.py
[--variant NAME]` with this folder first on PYTHONPATH (no GPU exists where the tests run,
so `cupy` is the strict numpy mock next to this file). Rank 0 sends microbatches 0..N-1 to
rank 1 (activation direction), rank 1 sends each back doubled (gradient direction), both
check every value; then a burst of N sends into a receiver that sleeps first. Values are
checked by device kernels whose results are read only at the end, so the harness adds no
synchronisation that could hide a missing one in the links. Then each rank checks, in the
mock's call log, the order of copies, synchronisations and MPI sends that the transport
promises (docs/GPU.md). Rank 0 prints one JSON line, the list of both ranks' reports.

With `--variant NAME` it runs one deliberately wrong link of wrong_links.py instead, and
any exception (the mock's HazardError, mpi4py refusing a device array, a value that was
overwritten) is printed and aborts the job: the test requires that it fails, and how.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterator

import cupy  # the mock: this folder is first on sys.path

from rpd_mpi.mpi.comm import Comm, CommError, Waiter
from rpd_mpi.mpi.comm_gpu import Links, make_links
from wrong_links import VARIANTS

assert getattr(cupy, "MOCK", False), "links_check.py must run against the mock cupy"
N, SHAPE = 7, (3, 4)     # N > the 4 IPC slots: the sender must wait for credits


def addr(a: Any) -> int:
    return a.data.ptr if isinstance(a, cupy.ndarray) else cupy.addr(a)


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


@contextlib.contextmanager
def cuda_aware(on: bool) -> Iterator[None]:
    """The mock's model of a CUDA-aware MPI (device arrays expose a pointer) while on."""
    if on:
        os.environ["FAKECUPY_CUDA_AWARE_MPI"] = "1"
    try:
        yield
    finally:
        os.environ.pop("FAKECUPY_CUDA_AWARE_MPI", None)


def all_true(oks: list[Any]) -> bool:
    return all(bool(ok) for ok in oks)        # the only host reads of the values


def exchange(links: Links, comm: Comm, waiter: Waiter) -> tuple[list[tuple[Any, ...]], bool]:
    me, oks = comm.stage, []
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
            oks.append((got == 2 * (mb + 0.25)).all())
            back.release()
        else:
            got = inp.take(mb)
            assert isinstance(got, cupy.ndarray), type(got)
            oks.append((got == mb + 0.25).all())
            ret.send(mb, 2 * got)
            inp.release()
    (out if me == 0 else ret).drain()
    return cupy.calls[start:], all_true(oks)


def burst(links: Links, comm: Comm, waiter: Waiter) -> bool:
    """Rank 0 sends N messages while rank 1 is still asleep: a sender that overwrote a slot
    before the receiver released it (IPC credits, ring reuse) would corrupt a value."""
    if comm.stage == 0:
        out = links.send(comm.act_comm, 1, SHAPE, waiter, "activation")
        for mb in range(N):
            out.send(mb, cupy.full(SHAPE, 10.0 + mb))
        out.drain()
        return True
    inp = links.recv(comm.act_comm, 0, SHAPE, N, waiter, "activation")
    time.sleep(0.2)
    oks = []
    for mb in range(N):
        oks.append((inp.take(mb) == 10.0 + mb).all())
        inp.release()
    return all_true(oks)


def first(log: list[tuple[Any, ...]], pred: Callable[[tuple[Any, ...]], bool],
          after: int = -1) -> int:
    for i in range(after + 1, len(log)):
        if pred(log[i]):
            return i
    raise AssertionError(f"no call matching after #{after}: {log[after + 1:after + 8]}")


def check_staged(log: list[tuple[Any, ...]]) -> dict[str, int]:
    """Sender: a non-blocking D2H into a pinned slot on the link's stream, an event
    recorded there and synchronized, then the Isend of that very slot. Receiver: the MPI
    receive lands in pinned memory, then H2D from it on the link's stream, and the compute
    (null) stream waits for that copy."""
    sends = [i for i, c in enumerate(log) if c[0] == "isend"]
    assert len(sends) == N, sends
    for i in sends:
        d2h = max(j for j in range(i) if log[j][0] == "d2h")
        rec = first(log, lambda c: c[0] == "record" and c[2] == log[d2h][3], d2h)
        sync = first(log, lambda c: c[0] == "event_sync" and c[1] == log[rec][1], rec)
        assert log[d2h][3] != "null" and d2h < rec < sync < i, log[d2h:i + 1]
        assert not any(c[0] == "stream_sync" for c in log[d2h:rec]), "the D2H blocked"
        assert log[d2h][2] == log[i][2] and log[i][3], (log[d2h], log[i])
    recvs = [i for i, c in enumerate(log) if c[0] == "recvd"]
    assert len(recvs) == N and all(log[i][3] for i in recvs)
    for i in recvs:
        h2d = first(log, lambda c: c[0] == "h2d", i)
        assert log[h2d][1] == log[i][2] and log[h2d][3] != "null"
        first(log, lambda c: c[0] == "wait_event" and c[1] == "null", h2d)
    return {"isend": len(sends), "h2d": len(recvs)}


def check_direct(log: list[tuple[Any, ...]]) -> dict[str, int]:
    """The compute stream is synchronised before each Isend of a device (not pinned) slot."""
    sends = [i for i, c in enumerate(log) if c[0] == "isend"]
    assert len(sends) == N
    for i in sends:
        assert not log[i][3] and log[i - 1] == ("stream_sync", "null"), log[i - 2:i + 1]
    assert not any(c[0] in ("d2h", "h2d") for c in log)
    return {"isend": len(sends)}


def check_ipc(log: list[tuple[Any, ...]]) -> dict[str, int]:
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


def run_variant(name: str, comm: Comm, waiter: Waiter) -> None:
    """One wrong link through both scenarios; it must fail (see the module doc)."""
    kind, recv, send, _ = VARIANTS[name]
    links = Links(kind, lambda *a, **k: recv(cupy, *a, **k),
                  lambda *a, **k: send(cupy, *a, **k))
    with cuda_aware(kind == "direct" and name != "direct-without-cuda-aware-mpi"):
        _, ok = exchange(links, comm, waiter)
        assert ok, f"{name}: a value was wrong in the exchange"
        comm.barrier()
        assert burst(links, comm, waiter), f"{name}: a message was overwritten before its take"
    comm.barrier()
    print(f"rank {comm.rank}: VARIANT NOT CAUGHT: {name}", file=sys.stderr, flush=True)


def main() -> int:
    comm = Comm()
    if comm.size != 2:
        raise SystemExit("run with mpiexec -n 2")
    comm.split(2)
    waiter = Waiter("polite", 20.0)
    if "--variant" in sys.argv:
        try:
            run_variant(sys.argv[sys.argv.index("--variant") + 1], comm, waiter)
        except Exception:          # noqa: BLE001  (report how the wrong link was caught)
            print(f"rank {comm.rank}: CAUGHT\n{traceback.format_exc()}", file=sys.stderr,
                  flush=True)
            comm.abort(1)
        return 3
    checks: dict[str, Any] = {}
    for kind in ("staged", "direct", "ipc"):
        with cuda_aware(kind == "direct"):
            log, ok = exchange(make_links(kind, cupy), comm, waiter)
            assert ok, f"{kind}: a value was wrong in the exchange"
            checks[kind] = (check_staged(log) if kind == "staged" else
                            check_direct(log) if kind == "direct" else check_ipc(log))
            comm.barrier()
            checks[f"{kind}_burst"] = burst(make_links(kind, cupy), comm, waiter)
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
