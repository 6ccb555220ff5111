"""A numpy-backed stand-in for cupy. THIS IS A MOCK, NOT CUPY.

The machines this project is built and tested on have no GPU (and no cupy), so the GPU code
paths (`rpd_mpi.mpi.backend`, `rpd_mpi.mpi.comm_gpu`, `--device cuda` in the runtime) run
against this package: tests put tests/fakecupy first on `sys.path` / `PYTHONPATH`, and
`benchmarks/gpu_check.py --dry-run` does the same. It checks control flow, copy sequences,
protocols and stream ordering; it runs no CUDA and measures nothing about a GPU.

It is meant to be at least as strict as cupy 14 where the project's code can go wrong:

- device arrays (`_array.ndarray`) are not numpy arrays: no buffer protocol, `np.asarray`
  and `__array__` raise (as cupy's do), numba cannot type them, and MPI given one fails
  (mpi4py finds no buffer); only `get()` / `asnumpy` reach the host. Mixing a numpy array
  into a device operation raises TypeError, as in cupy. FAKECUPY_CUDA_AWARE_MPI=1 exposes
  `__cuda_array_interface__` (a CUDA-aware MPI), checking that no stream still uses it;
- `get(stream, out, blocking)` / `set(arr, stream)` check type, dtype, shape and contiguity
  with cupy's messages; `get` blocks unless blocking=False, and is asynchronous only into
  pinned memory; `asarray` of a pinned host array is asynchronous;
- streams and events keep clocks; copies run only when something waits for them, a
  destination in pinned or IPC memory holds poison until then, and every access of device
  or pinned memory is checked against the accesses of other streams (`HazardError`): see
  _sched.py. The host reusing a pinned buffer before the copy that reads it was waited for
  is caught when the copy runs or when the host sees it complete;
- CUDA IPC: handles only for a plain `cuda.Memory`, never opened by the process that made
  them, `UnownedMemory` over a mapping needs this process's device id; interprocess
  events must disable timing (cupy raises otherwise).

Every copy, synchronisation and IPC call is appended to `calls` as a tuple (kind, ...).
Environment: FAKECUPY_GPUS = number of visible devices (default 1; 0 = no GPU);
FAKECUPY_DIR = where `cuda.Memory` files go (default: the temporary folder).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as _np

from cupy import cuda
from cupy._array import NO_IMPLICIT, _new, call, h2d, ndarray
from cupy._memory import addr, find_pinned, is_pinned, pool_alloc
from cupy._sched import HazardError, calls, get_current_stream

__version__ = "0.0+numpy-mock"
MOCK = True
__all__ = ["HazardError", "MOCK", "NO_IMPLICIT", "addr", "asarray", "asnumpy", "calls",
           "cuda", "find_pinned", "is_pinned", "ndarray"]

_VIEWS = {"reshape", "transpose", "swapaxes", "squeeze", "ravel", "expand_dims",
          "broadcast_to", "atleast_1d", "atleast_2d", "moveaxis", "diagonal"}


def _to_device(a: Any, dtype: Any = None, order: Any = None, blocking: bool = False
               ) -> ndarray:
    host = _np.asarray(a, dtype=dtype, order=order or "K")
    dev = _np.empty(host.shape, host.dtype)
    out = _new(dev, pool_alloc(dev))
    s = get_current_stream()
    h2d(out, host, s, "an H2D copy (asarray)")
    if blocking:
        s.synchronize()
    return out


def asarray(a: Any, dtype: Any = None, order: Any = None, *, copy: Any = None,
            blocking: bool = False) -> ndarray:
    """A device array of a (a itself when it already is one of that dtype). From host
    memory the copy is on the current stream: from pinned memory it runs later."""
    if isinstance(a, ndarray):
        if copy:
            return a.astype(dtype or a.dtype)
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _to_device(a, dtype, order, blocking)


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", ndmin: int = 0,
          *, blocking: bool = False) -> ndarray:
    if isinstance(obj, ndarray):
        return obj.astype(dtype or obj.dtype) if copy else asarray(obj, dtype)
    return _to_device(_np.array(obj, dtype=dtype, order=order, ndmin=ndmin), None, None,
                      blocking)


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    if not isinstance(a, ndarray):
        return _to_device(_np.ascontiguousarray(a, dtype=dtype))
    if a._a.flags.c_contiguous and (dtype is None or _np.dtype(dtype) == a.dtype):
        return a                                   # as cupy: the same object
    return call(_np.ascontiguousarray, (a,), {"dtype": dtype}, "ascontiguousarray")


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None,
            blocking: bool = True) -> _np.ndarray:
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return _np.asarray(a, order=order)


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    return ndarray(shape, dtype, order=order)


def empty_like(a: Any, dtype: Any = None, order: str = "K", subok: Any = None,
               shape: Any = None) -> ndarray:
    return ndarray(a.shape if shape is None else shape, dtype or a.dtype)


def get_array_module(*args: Any) -> Any:
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


class ufunc:
    """A numpy ufunc as a device kernel (with `at`, `reduce`, `outer`, `accumulate`)."""

    def __init__(self, uf: _np.ufunc) -> None:
        self._u, self.__name__ = uf, uf.__name__
        self.nin, self.nout = uf.nin, uf.nout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return call(self._u, args, kwargs, self.__name__)

    def at(self, a: ndarray, indices: Any, b: Any = None) -> None:
        call(self._u.at, (a, indices) + (() if b is None else (b,)), {},
             f"{self.__name__}.at", writes=(a,))

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return call(self._u.reduce, args, kwargs, f"{self.__name__}.reduce")

    def accumulate(self, *args: Any, **kwargs: Any) -> Any:
        return call(self._u.accumulate, args, kwargs, f"{self.__name__}.accumulate")

    def outer(self, *args: Any, **kwargs: Any) -> Any:
        return call(self._u.outer, args, kwargs, f"{self.__name__}.outer")


class _Pool:
    def free_all_blocks(self) -> None:
        cuda.log("free_all_blocks")


def get_default_memory_pool() -> _Pool:
    return _Pool()


def get_default_pinned_memory_pool() -> _Pool:
    return _Pool()


_CACHE: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """numpy's other functions as device kernels; types, constants and modules as numpy's."""
    if name.startswith("__") or name in ("testing", "random", "linalg", "fft"):
        raise AttributeError(name)
    if name in _CACHE:
        return _CACHE[name]
    obj = getattr(_np, name)
    if isinstance(obj, _np.ufunc):
        _CACHE[name] = ufunc(obj)
    elif isinstance(obj, (type, types.ModuleType)) or not callable(obj):
        return obj
    else:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            return call(obj, args, kwargs, name, view_op=name in _VIEWS)
        wrapped.__name__ = name
        _CACHE[name] = wrapped
    return _CACHE[name]

