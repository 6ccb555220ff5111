"""The block update rule shared by the simulator and the MPI runtime.

PD/LocalSGD: every backward updates its block. GPipe/naive (flush > 0): the backwards of a
flush accumulate, and the flush's last backward applies their mean. Pure numpy.
"""

from __future__ import annotations

import numpy as np


def flush_end(mb: int, flush: int, microbatches: int) -> bool:
    """Is `mb` the last microbatch of its flush?"""
    return mb % flush == flush - 1 or mb == microbatches - 1


class FlushBuffer:
    """Gradient sums per key (a model copy and stage) until the flush ends."""

    def __init__(self, flush: int, microbatches: int) -> None:
        self.flush, self.N = flush, microbatches
        self.sums: dict[object, list] = {}

    def add(self, key: object, mb: int, g_w: np.ndarray) -> np.ndarray | None:
        """The gradient to apply now: g_w itself without flushes, the flush mean at its
        last backward, None (accumulated, nothing to apply) otherwise."""
        if not self.flush:
            return g_w
        acc = self.sums.setdefault(key, [0.0, 0])
        acc[0], acc[1] = acc[0] + g_w, acc[1] + 1
        if not flush_end(mb, self.flush, self.N):
            return None
        del self.sums[key]
        return acc[0] / acc[1]
