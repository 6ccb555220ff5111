"""The strict MOCK cupy of tests/fakecupy, on its own: each rule it enforces, shown by code
that breaks it (no GPU exists where the tests run; that is the only reason for a mock).

Each test does in one process what a link or a benchmark could get wrong, and requires the
mock to refuse it the way cupy / CUDA / a non-CUDA-aware MPI would (or stricter, where the
project decided never to rely on a guess, e.g. UnownedMemory's device). The links
themselves are checked on 2 MPI ranks in tests/test_gpu_mock.py.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest

from rpd_mpi.mpi.pinned import pinned_array



@pytest.fixture
def cp(fake_cupy: ModuleType) -> ModuleType:
    """A fresh mock as `cupy` for this test only (tests/conftest.py)."""
    return fake_cupy


# ----- device memory is not host memory --------------------------------------------------

def test_device_arrays_have_no_way_to_the_host_but_get(cp: ModuleType) -> None:
    a = cp.arange(6.0)
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array"):
        np.asarray(a)
    with pytest.raises(TypeError):
        memoryview(a)                             # no buffer protocol
    assert not hasattr(a, "__array_interface__")
    assert not hasattr(a, "__cuda_array_interface__")      # a plain (not CUDA-aware) MPI
    with pytest.raises(TypeError, match="Unsupported type"):
        a + np.ones(6)                            # numpy operands, as cupy refuses them
    with pytest.raises(TypeError):
        np.ones(6) + a
    with pytest.raises(TypeError, match="no host view"):
        a.view(np.ndarray)
    assert np.array_equal(a.get(), np.arange(6.0)) and type(cp.asnumpy(a)) is np.ndarray
    assert type(np.exp(a)) is cp.ndarray and type(2.0 * a) is cp.ndarray   # as cupy's
    assert type(a.sum()) is cp.ndarray and float(a.sum()) == 15.0          # 0-d, not float


def test_numba_refuses_device_arrays(cp: ModuleType) -> None:
    numba = pytest.importorskip("numba")

    @numba.njit(cache=False)
    def first(x):  # type: ignore[no-untyped-def]
        return x[0]
    assert first(np.arange(3.0)) == 0.0
    with pytest.raises(numba.core.errors.TypingError):
        first(cp.arange(3.0))


@pytest.mark.timeout(60)
def test_a_plain_mpi_refuses_device_arrays(cp: ModuleType,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """mpi4py finds no buffer in a device array (a non-CUDA-aware MPI with real cupy would
    be handed a device pointer and crash); with the mock's CUDA-aware MPI it works, once no
    stream still uses the buffer."""
    from mpi4py import MPI
    comm = MPI.COMM_SELF.Dup()
    try:
        a, b = cp.full(4, 3.0), cp.zeros(4)
        with pytest.raises(TypeError, match="expecting buffer"):
            comm.Isend(a, dest=0, tag=1)
        monkeypatch.setenv("FAKECUPY_CUDA_AWARE_MPI", "1")
        cp.cuda.get_current_stream().synchronize()
        req = comm.Irecv(b, source=0, tag=1)
        comm.Isend(a, dest=0, tag=1).Wait()
        req.Wait()
        assert np.array_equal(b.get(), np.full(4, 3.0))
    finally:
        comm.Free()


# ----- get / set arguments, as cupy checks them -------------------------------------------

def test_get_and_set_check_their_arguments(cp: ModuleType) -> None:
    a = cp.zeros((2, 3))
    with pytest.raises(TypeError, match="Only numpy.ndarray can be obtained"):
        a.get(out=[0.0] * 6)
    with pytest.raises(TypeError, match="float32 array cannot be obtained from float64"):
        a.get(out=np.empty((2, 3), np.float32))
    with pytest.raises(ValueError, match="Shape mismatch"):
        a.get(out=np.empty(6))
    with pytest.raises(RuntimeError, match="non-contiguous"):
        a.get(out=np.empty((2, 6))[:, ::2])
    with pytest.raises(TypeError, match="Only numpy.ndarray can be set"):
        a.set([1.0] * 6)
    with pytest.raises(TypeError, match="int64 array cannot be set to float64"):
        a.set(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="Shape mismatch"):
        a.set(np.zeros(6))
    with pytest.raises(RuntimeError, match="Cannot set to non-contiguous"):
        cp.zeros((2, 6))[:, ::2].set(np.zeros((2, 3)))
    a.set(np.ones((2, 3)))
    assert a.get(out=np.empty((2, 3), order="F")).flags.f_contiguous
    assert np.array_equal(a.get(), np.ones((2, 3)))


# ----- streams and events: a consumer before its producer's event --------------------------

def test_get_blocks_unless_told_not_to(cp: ModuleType) -> None:
    a, s = cp.arange(4.0), cp.cuda.Stream(non_blocking=True)
    host = pinned_array(cp, (4,), np.float64)
    cp.cuda.get_current_stream().synchronize()
    start = len(cp.calls)
    a.get(stream=s, out=host)                     # default: blocking, synchronizes s
    assert ("stream_sync", s.name) in cp.calls[start:] and np.array_equal(host, a.get())
    host[:] = 0
    start = len(cp.calls)
    a.get(stream=s, out=host, blocking=False)     # queued only: the pinned bytes are poison
    assert ("stream_sync", s.name) not in cp.calls[start:]
    assert np.isnan(host).all() and host.view(np.uint64)[0] == np.uint64(cp._sched.POISON)
    done = cp.cuda.Event(disable_timing=True)
    done.record(s)
    done.synchronize()                            # the host waits: now the bytes are there
    assert np.array_equal(host, np.arange(4.0))


def test_reading_a_copy_before_its_event_is_caught(cp: ModuleType) -> None:
    """A kernel on the compute stream reading what a side stream is still copying, and a
    side-stream copy of what a compute kernel may still be writing, raise HazardError;
    with the event waited for, both are fine."""
    s = cp.cuda.Stream(non_blocking=True)
    dev = cp.empty(4)
    dev.set(np.arange(4.0), stream=s)
    with pytest.raises(cp.HazardError, match="nothing orders them"):
        dev + 1
    copied = cp.cuda.Event(disable_timing=True)
    copied.record(s)
    cp.cuda.get_current_stream().wait_event(copied)
    assert np.array_equal((dev + 1).get(), np.arange(1.0, 5.0))
    made = cp.ones(4) * 5                         # a kernel on the compute stream
    host = pinned_array(cp, (4,), np.float64)
    with pytest.raises(cp.HazardError, match="D2H copy .* reads .* while kernel"):
        made.get(stream=s, out=host, blocking=False)
    ev = cp.cuda.Event(disable_timing=True)
    ev.record(cp.cuda.get_current_stream())
    s.wait_event(ev)
    made.get(stream=s, out=host)
    assert np.array_equal(host, np.full(4, 5.0))


def test_reusing_a_pinned_buffer_before_its_copy_is_caught(cp: ModuleType) -> None:
    """An H2D copy from pinned memory runs later; the host writing the buffer first (as
    MPI would, reposted too early) is caught, when the copy runs or when the host sees it
    complete. Waiting for the copy's event first is fine."""
    s = cp.cuda.Stream(non_blocking=True)
    host, dev = pinned_array(cp, (4,), np.float64), cp.empty(4)
    host[:] = 1.0
    dev.set(host, stream=s)
    host[:] = 2.0                                 # reused before the copy ran
    with pytest.raises(cp.HazardError, match="changed between the call and the copy"):
        s.synchronize()
    dev2 = cp.empty(4)
    host[:] = 3.0
    dev2.set(host, stream=s)
    ev = cp.cuda.Event(disable_timing=True)
    ev.record(s)
    cp.cuda.get_current_stream().wait_event(ev)   # the device has it, the host does not know
    host[:] = 4.0
    with pytest.raises(cp.HazardError, match="modified before the host saw the copy"):
        ev.synchronize()
    host[:] = 5.0
    dev2.set(host, stream=s)
    ev.record(s)
    ev.synchronize()
    host[:] = 6.0                                 # after the host saw it: fine
    cp.cuda.get_current_stream().wait_event(ev)
    assert np.array_equal(dev2.get(), np.full(4, 5.0))


def test_asarray_of_pinned_memory_is_asynchronous(cp: ModuleType) -> None:
    host = pinned_array(cp, (3,), np.float64)
    host[:] = 7.0
    dev = cp.asarray(host)                        # an H2D on the current stream, not done
    host[:] = 8.0
    with pytest.raises(cp.HazardError, match="pinned source changed"):
        dev.get()
    pageable = np.full(3, 7.0)
    dev = cp.asarray(pageable)                    # staged at once, as CUDA does
    pageable[:] = 8.0
    assert np.array_equal(dev.get(), np.full(3, 7.0))


def test_uninitialised_device_memory_is_poison(cp: ModuleType) -> None:
    with pytest.raises(cp.HazardError, match="hold poison"):
        cp.empty(3) * 2
    filled = cp.empty(3)
    filled[...] = 1.0
    assert float((filled * 2).sum()) == 6.0


# ----- IPC and events ------------------------------------------------------------------------

def test_ipc_and_event_rules(cp: ModuleType) -> None:
    mem = cp.cuda.Memory(64)
    handle = cp.cuda.runtime.ipcGetMemHandle(mem.ptr)
    with pytest.raises(cp.cuda.CUDARuntimeError, match="may not open its own IPC"):
        cp.cuda.runtime.ipcOpenMemHandle(handle)
    with pytest.raises(cp.cuda.CUDARuntimeError, match="not the base of a cudaMalloc"):
        cp.cuda.runtime.ipcGetMemHandle(cp.zeros(8).data.ptr)
    with pytest.raises(ValueError, match="Timing must be disabled for interprocess events"):
        cp.cuda.Event(interprocess=True)
    cp.cuda.Event(disable_timing=True, interprocess=True)
    quiet, timed = cp.cuda.Event(disable_timing=True), cp.cuda.Event()
    quiet.record()
    timed.record()
    assert cp.cuda.get_elapsed_time(timed, timed) == 0.0
    with pytest.raises(RuntimeError, match="disable_timing=True cannot be timed"):
        cp.cuda.get_elapsed_time(quiet, timed)
