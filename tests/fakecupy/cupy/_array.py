"""The device array of the MOCK cupy: numpy memory that is never handed out.

`ndarray` is not a numpy array and has no buffer protocol, no `__array_interface__` and
no `__array__` (it raises, as cupy's does), so numpy, numba and MPI cannot read it: an
explicit `get()` (or `cupy.asnumpy`) is the only way to host memory. With
FAKECUPY_CUDA_AWARE_MPI=1 it exposes `__cuda_array_interface__`, which models a CUDA-aware
MPI (the bytes are host memory, so MPI can use the pointer); taking it checks that no
stream still uses the buffer. Operations run numpy on the private view `_a` as kernels of
the current stream (`call`); `get`/`set` check their arguments as cupy does and are stream
copies (see _sched.py for the model).
"""

from __future__ import annotations

import operator
import os
from typing import Any, Callable

import numpy as _np

from cupy._memory import (Device, MemoryPointer, addr, bounds, find_pinned, pool_alloc,
                          view_bytes)
from cupy._sched import (RETIRE, TOKENS, HazardError, Stream, Tracked, get_current_stream,
                         host_sees, log, poison, poisoned, report_late,
                         stream_of)

NO_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
               "construct a NumPy array explicitly.")


def _new(a: _np.ndarray, alloc: Tracked) -> ndarray:
    obj = object.__new__(ndarray)
    obj._a, obj._alloc = a, alloc
    return obj


def _adopt(a: _np.ndarray, parents: list[ndarray], s: Stream, seq: int, what: str,
           fresh_write: bool = True) -> ndarray:
    """A fake array over numpy result a: a view of a parent's allocation, or a new one."""
    lo, hi = bounds(a)
    for p in parents:
        t = p._alloc
        if a.size and t.base <= lo and hi <= t.base + t.size:
            return _new(a, t)
    t = pool_alloc(a)
    if fresh_write:
        t.touch(lo - t.base, hi - t.base, True, s, seq, f"kernel {what}")
    return _new(a, t)


def _unwrap(x: Any, reads: list[ndarray], host_ok: bool) -> Any:
    if isinstance(x, ndarray):
        reads.append(x)
        return x._a
    if isinstance(x, _np.ndarray):
        if host_ok:
            return x
        raise TypeError(f"Unsupported type {type(x)} (fake cupy, as cupy: a numpy array is "
                        f"not an operand of a device kernel; cupy.asarray it first)")
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v, reads, host_ok) for v in x)
    return x


def _result(res: Any, parents: list[ndarray], s: Stream, seq: int, what: str) -> Any:
    if isinstance(res, _np.ndarray):
        return _adopt(res, parents, s, seq, what)
    if isinstance(res, _np.generic):            # cupy reductions give 0-d arrays
        return _adopt(_np.asarray(res), [], s, seq, what)
    if type(res) in (list, tuple):
        return type(res)(_result(r, parents, s, seq, what) for r in res)
    return res


def call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], what: str,
         writes: tuple[ndarray, ...] = (), write_only: tuple[ndarray, ...] = (),
         host_ok: bool = False, view_op: bool = False) -> Any:
    """Run numpy's fn on the private views as a kernel of the current stream."""
    s = get_current_stream()
    reads: list[ndarray] = []
    a2 = [_unwrap(a, reads, host_ok) for a in args]
    k2 = {k: _unwrap(v, reads, host_ok) for k, v in kwargs.items()}
    outs = list(writes) + [o for o in reads if o is kwargs.get("out")]
    skip = {id(o) for o in write_only} | {id(o) for o in outs if o is kwargs.get("out")}
    seq = s.kernel()
    if view_op:                                  # a view reads nothing; a copy does
        res = fn(*a2, **k2)
        if isinstance(res, _np.ndarray) and res.size and any(
                p._alloc.base <= bounds(res)[0] and bounds(res)[1] <= p._alloc.base
                + p._alloc.size for p in reads):
            return _result(res, reads, s, seq, what)
    for x in reads:
        if id(x) in skip:
            continue
        lo, hi = x._range()
        x._alloc.touch(lo, hi, False, s, seq, f"kernel {what}")
        if poisoned(x._a):
            raise HazardError(f"kernel {what} on {s.name} reads {x._alloc.name} bytes "
                              f"[{lo}, {hi}) that hold poison: never written, or filled by a "
                              f"copy that had not completed when they were read")
    for x in outs:
        lo, hi = x._range()
        x._alloc.touch(lo, hi, True, s, seq, f"kernel {what}")
    if not view_op:
        res = fn(*a2, **k2)
    return _result(res, reads, s, seq, what)


# ----- copies between host and device ----------------------------------------------------

def h2d(dst: ndarray, src: _np.ndarray, s: Stream, what: str) -> int:
    """Copy host array src into dst on stream s: asynchronous from pinned memory (src must
    stay unchanged until the host has seen the copy complete), staged at once from
    pageable memory (as CUDA does)."""
    seq = s.enqueue()
    lo, hi = dst._range()
    dst._alloc.touch(lo, hi, True, s, seq, what)
    pinned = find_pinned(src)
    log("h2d", addr(src), addr(dst._a), s.name)
    if pinned is None:
        snap = src.copy()
        s.defer(seq, lambda: _np.copyto(dst._a, snap))
        return seq
    plo, phi = bounds(src)
    plo, phi = plo - pinned.base, phi - pinned.base
    pinned.touch(plo, phi, False, s, seq, f"{what} (reads pinned memory)")
    gen0, token = pinned.writes, next(TOKENS)
    snap0 = None if pinned.pending_write(plo, phi) else src.tobytes()
    pinned.deferred_reads[token] = (plo, phi)
    state: dict[str, Any] = {}

    def run() -> None:
        pinned.deferred_reads.pop(token, None)
        now = src.tobytes()
        if snap0 is not None and pinned.writes == gen0 and now != snap0:
            raise HazardError(f"{what} on {s.name}: its pinned source changed between the "
                              f"call and the copy (the host or MPI reused the buffer before "
                              f"the copy's event was synchronized)")
        if poisoned(src):
            raise HazardError(f"{what} on {s.name} reads poisoned pinned memory: the buffer "
                              f"was filled by a copy that had not completed when it was read "
                              f"(e.g. MPI sent it before the D2H copy's event was "
                              f"synchronized), or never filled")
        _np.copyto(dst._a, src)
        state["snap"], state["gen"] = now, pinned.writes

    def retire() -> None:
        if "snap" in state and pinned.writes == state["gen"] and src.tobytes() != state["snap"]:
            raise HazardError(f"{what} on {s.name}: its pinned source was modified before the "
                              f"host saw the copy complete (reused, e.g. reposted to MPI, "
                              f"before the copy's event was synchronized)")
    s.defer(seq, run)
    RETIRE.append((s.sid, seq, retire))
    return seq


def d2h(src: ndarray, out: _np.ndarray, s: Stream, what: str) -> None:
    """Copy src into host array out on stream s: asynchronous into pinned memory (out is
    poison until the copy has run), synchronous into pageable memory (as CUDA does)."""
    seq = s.enqueue()
    lo, hi = src._range()
    src._alloc.touch(lo, hi, False, s, seq, what)
    pinned = find_pinned(out)
    log("d2h", addr(src._a), addr(out), s.name)
    token = next(TOKENS)
    src._alloc.deferred_reads[token] = (lo, hi)

    def run() -> None:
        src._alloc.deferred_reads.pop(token, None)
        if poisoned(src._a):
            raise HazardError(f"{what} on {s.name} copies poisoned device memory (never "
                              f"written, or its own copy had not completed)")
        _np.copyto(out, src._a)
        if pinned is not None:
            pinned.writes += 1
    s.defer(seq, run)
    if pinned is None:
        host_sees(dict(s.clock))                # pageable: the call returns when done
        return
    plo, phi = bounds(out)
    pinned.touch(plo - pinned.base, phi - pinned.base, True, s, seq, what)
    if pinned.may_poison(plo - pinned.base, phi - pinned.base):
        poison(plo, phi - plo)                  # not valid until the copy has run


# ----- the array ---------------------------------------------------------------------------

class _Whole:
    """An allocation seen as cupy memory (for `ndarray.data`)."""

    def __init__(self, alloc: Tracked) -> None:
        self.alloc, self.ptr, self.device_id = alloc, alloc.base, alloc.device_id


class ndarray:
    """cupy.ndarray over private memory (see the module docstring)."""

    __array_priority__ = 100
    __slots__ = ("_a", "_alloc", "__weakref__")
    _a: _np.ndarray
    _alloc: Tracked

    def __init__(self, shape: Any, dtype: Any = float, memptr: MemoryPointer | None = None,
                 strides: Any = None, order: str = "C") -> None:
        if memptr is None:
            a = _np.empty(shape, dtype, order=order)
            alloc = pool_alloc(a)
            poison(addr(a), a.nbytes)
        else:
            alloc = memptr.alloc
            a = _np.ndarray(shape, dtype, buffer=view_bytes(alloc.base, alloc.size),
                            offset=memptr.offset, strides=strides, order=order)
        self._a, self._alloc = a, alloc

    def _range(self) -> tuple[int, int]:
        lo, hi = bounds(self._a)
        return lo - self._alloc.base, hi - self._alloc.base

    # -- metadata (no device access)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    base = property(lambda self: None)
    T = property(lambda self: self.transpose())
    real = property(lambda self: call(lambda a: a.real, (self,), {}, "real", view_op=True))

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(_Whole(self._alloc), addr(self._a) - self._alloc.base)

    @property
    def device(self) -> Device:
        return Device(self._alloc.device_id)

    def __len__(self) -> int:
        return len(self._a)

    # -- no implicit way to the host
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(NO_IMPLICIT)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        if os.environ.get("FAKECUPY_CUDA_AWARE_MPI") != "1":
            raise AttributeError("__cuda_array_interface__: the fake cupy exposes device "
                                 "pointers only with FAKECUPY_CUDA_AWARE_MPI=1 (a CUDA-aware "
                                 "MPI); a plain MPI cannot use device memory")
        lo, hi = self._range()
        try:
            self._alloc.host_touch(lo, hi, "MPI takes a device buffer "
                                           "(__cuda_array_interface__)")
        except HazardError as err:       # mpi4py silences errors raised here
            report_late(err)
        return {"shape": self.shape, "typestr": self.dtype.str, "descr": self.dtype.descr,
                "data": (addr(self._a), False), "version": 2,
                "strides": None if self._a.flags.c_contiguous else self.strides}

    def __array_ufunc__(self, uf: _np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        outs = kwargs.get("out", ())
        if any(isinstance(x, _np.ndarray) for x in (*inputs, *(
                outs if isinstance(outs, tuple) else (outs,)))):
            return NotImplemented
        if method == "__call__":
            return call(uf, inputs, kwargs, uf.__name__)
        return call(getattr(uf, method), inputs, kwargs, f"{uf.__name__}.{method}")

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if any(issubclass(t, _np.ndarray) for t in types):
            return NotImplemented
        return call(func, args, kwargs, func.__name__)

    # -- host copies (explicit)
    def get(self, stream: Stream | None = None, order: str = "C",
            out: _np.ndarray | None = None, blocking: bool = True) -> _np.ndarray:
        """Device -> host, with cupy's argument checks; asynchronous only into pinned
        memory with blocking=False."""
        s = stream_of(stream)
        src = self
        if out is not None:
            if not isinstance(out, _np.ndarray):
                raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
            if self.dtype != out.dtype:
                raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} "
                                f"array")
            if self.shape != out.shape:
                raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, actual "
                                 f"shape: {out.shape}")
            if not (out.flags.c_contiguous and self._a.flags.c_contiguous
                    or out.flags.f_contiguous and self._a.flags.f_contiguous):
                if not (out.flags.c_contiguous or out.flags.f_contiguous):
                    raise RuntimeError("`out` cannot be specified when copying to "
                                       "non-contiguous ndarray")
                with s:
                    src = call(_np.ascontiguousarray if out.flags.c_contiguous else
                               _np.asfortranarray, (self,), {}, "ascontiguousarray")
        else:
            out = _np.empty(self.shape, self.dtype, order="F" if order.upper() == "F" else "C")
        d2h(src, out, s, "a D2H copy (get)")
        if blocking:
            s.synchronize()
        return out

    def set(self, arr: _np.ndarray, stream: Stream | None = None) -> None:
        """Host -> device, with cupy's argument checks (asynchronous from pinned memory)."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: "
                             f"{arr.shape}")
        if self._a.flags.c_contiguous:
            arr = _np.ascontiguousarray(arr)
        elif self._a.flags.f_contiguous:
            arr = _np.asfortranarray(arr)
        else:
            raise RuntimeError("Cannot set to non-contiguous array")
        h2d(self, arr, stream_of(stream), "an H2D copy (set)")

    def item(self) -> Any:
        return self.get().item()

    def tolist(self) -> Any:
        return self.get().tolist()

    def tobytes(self, order: str = "C") -> bytes:
        return self.get().tobytes(order)

    def __float__(self) -> float:
        return float(self.get())

    def __int__(self) -> int:
        return int(self.get())

    def __bool__(self) -> bool:
        return bool(self.get())

    def __complex__(self) -> complex:
        return complex(self.get())

    def __repr__(self) -> str:
        return repr(self.get())

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return format(self.get(), spec)

    def __iter__(self) -> Any:
        for i in range(len(self)):
            yield self[i]

    # -- indexing
    def __getitem__(self, key: Any) -> Any:
        return call(operator.getitem, (self, key), {}, "getitem", host_ok=True, view_op=True)

    def __setitem__(self, key: Any, value: Any) -> None:
        call(operator.setitem, (self, key, value), {}, "setitem", writes=(self,),
             write_only=(self,), host_ok=True)

    # -- methods
    def view(self, dtype: Any = None) -> ndarray:
        if isinstance(dtype, type) and issubclass(dtype, _np.ndarray):
            raise TypeError("fake cupy, as cupy: view() takes a dtype; there is no host "
                            "view of device memory")
        return call(_np.ndarray.view, (self,) + (() if dtype is None else (dtype,)), {},
                    "view", view_op=True)

    def fill(self, value: Any) -> None:
        call(_np.ndarray.fill, (self, value), {}, "fill", writes=(self,), write_only=(self,))

    def sort(self, axis: int = -1) -> None:
        call(_np.ndarray.sort, (self,), {"axis": axis}, "sort", writes=(self,))


def _method(name: str, view: bool = False) -> Callable[..., Any]:
    fn = getattr(_np.ndarray, name)

    def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
        return call(fn, (self, *args), kwargs, name, view_op=view)
    method.__name__ = name
    return method


for _name in ("reshape", "transpose", "swapaxes", "ravel", "squeeze", "diagonal"):
    setattr(ndarray, _name, _method(_name, view=True))
for _name in ("copy", "astype", "flatten", "mean", "sum", "max", "min", "argmax", "argmin",
              "prod", "std", "var", "any", "all", "cumsum", "clip", "dot", "round", "conj",
              "repeat", "take", "nonzero", "argsort", "trace"):
    setattr(ndarray, _name, _method(_name))


def _binary(op: Callable[..., Any], name: str, reverse: bool = False) -> Callable[..., Any]:
    def method(self: ndarray, other: Any) -> Any:
        return call(op, (other, self) if reverse else (self, other), {}, name)
    return method


def _inplace(op: Callable[..., Any], name: str) -> Callable[..., Any]:
    def method(self: ndarray, other: Any) -> ndarray:
        call(op, (self, other), {}, name, writes=(self,))
        return self
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and",
              "or", "xor", "lshift", "rshift"):
    _op = getattr(operator, _name + "_" if _name in ("and", "or") else _name)
    setattr(ndarray, f"__{_name}__", _binary(_op, _name))
    setattr(ndarray, f"__r{_name}__", _binary(_op, _name, reverse=True))
    setattr(ndarray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}"), _name))
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(ndarray, f"__{_name}__", _binary(getattr(operator, _name), _name))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_name}__",
            (lambda op, n: lambda self: call(op, (self,), {}, n))(getattr(operator, _name),
                                                                   _name))
ndarray.__hash__ = None      # type: ignore[assignment]
