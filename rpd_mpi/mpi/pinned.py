"""Host and device memory helpers of the GPU links (docs/GPU.md), without MPI.

Kept out of `comm_gpu` (which imports mpi4py) so that what needs only a GPU, such as the
copy-rate section of benchmarks/gpu_check.py, does not load an MPI library. cupy is never
imported here: the array module `xp` is passed in (cupy, or the tests' mock).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np


def pinned_array(xp: ModuleType, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A numpy array in page-locked (pinned) host memory: copies to and from it can be
    asynchronous (`ndarray.get(stream=..., out=..., blocking=False)`, `ndarray.set(...,
    stream=...)`), and the caller must wait for their event before the host touches it."""
    count = math.prod(shape)
    mem = xp.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
    return np.frombuffer(mem, dtype, count).reshape(shape)


def device_ring(xp: ModuleType, mem: Any, shape: tuple[int, ...], dtype: Any, slots: int
                ) -> list[Any]:
    """`slots` device arrays of `shape`, one after the other in the allocation `mem`."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    return [xp.ndarray(shape, dtype, xp.cuda.MemoryPointer(mem, i * nbytes))
            for i in range(slots)]


def current_device(xp: ModuleType) -> int:
    """The CUDA device this process uses now (`backend.select` made it current)."""
    return int(xp.cuda.Device().id)
