"""numba kernels for the loops that dominate on the CPU.

Each kernel has a plain numpy reference next to it (`*_ref`) and a test that they agree.
`cache=True` keeps compiled code between runs; NUMBA_CACHE_DIR may point it at node-local
scratch on a cluster (several ranks starting at once share the cache safely). Without numba
installed (e.g. a GPU machine with only cupy), each kernel name is bound to its reference.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

numba: ModuleType | None    # the module, or None where numba is not installed
try:
    import numba
except ImportError:       # no numba: the numpy references run (see the end of this module)
    numba = None


def _shift_prediction(cols: np.ndarray, delta: np.ndarray, scale: float, p: np.ndarray,
                     w: np.ndarray) -> None:
    """w += scale * delta and p += scale * cols @ delta (cols: contiguous n x m block).

    fastmath lets the inner sums vectorise (reordered additions, ~1e-16 relative): this kernel
    only tracks objective values, never the weights the engines compare bit for bit."""
    n, m = cols.shape
    for j in range(m):
        w[j] += scale * delta[j]
    for i in range(n):
        acc = 0.0
        for j in range(m):
            acc += cols[i, j] * delta[j]
        p[i] += scale * acc


def shift_prediction_ref(cols: np.ndarray, delta: np.ndarray, scale: float, p: np.ndarray,
                         w: np.ndarray) -> None:
    """numpy reference of `shift_prediction`."""
    w += scale * delta
    p += scale * (cols @ delta)


shift_prediction = (numba.njit(cache=True, fastmath=True)(_shift_prediction)
                    if numba is not None else shift_prediction_ref)
