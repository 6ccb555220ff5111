"""The block update every engine shares (docs/DESIGN.md 2.2, 2.6, 2.7).

`BlockState` holds one stage's block for each model copy it serves, with the block versions,
the weight stash and the GPipe flush buffer; `apply` is the only place in rpd_mpi where an SGD
step `W -= lr * g` is applied to a block, and it returns the typed `UpdateRow` that describes
the update. The simulator (every stage of every copy in one process), the MPI stage runner
(one stage, R copies) and RPD (one block with a history of delta + 1 versions) all use it, so
they differ only in when ops run and how bytes move (`records.to_updates` turns their rows,
in global order, into `Updates`). `batch_of` is the one data-order rule.

Pure numpy (the blocks may live on a GPU: only `xp`-neutral array operations are used).
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Callable, NamedTuple

import numpy as np

from rpd_mpi.engines.health import Health
from rpd_mpi.records import UpdateRow


def batch_of(group: int, groups: int, mb: int, num_batches: int) -> int:
    """The dataset batch of microbatch `mb` in pipeline group `group` of `groups`:
    (group + groups * mb) mod B, so G = 1 reads the batches in cyclic order."""
    return (group + groups * mb) % num_batches


def flush_end(mb: int, flush: int, microbatches: int) -> bool:
    """Is `mb` the last microbatch of its flush?"""
    return mb % flush == flush - 1 or mb == microbatches - 1


class FlushBuffer:
    """Gradient sums per model copy until the flush ends (GPipe, naive; flush = 0: none)."""

    def __init__(self, flush: int, microbatches: int) -> None:
        self.flush, self.N = flush, microbatches
        self.sums: dict[int, list[Any]] = {}

    def add(self, copy: int, mb: int, g_w: Any) -> Any | None:
        """The gradient to apply now: g_w itself without flushes, the flush mean at its
        last backward, None (accumulated, nothing to apply) otherwise."""
        if not self.flush:
            return g_w
        acc = self.sums.setdefault(copy, [0.0, 0])
        acc[0], acc[1] = acc[0] + g_w, acc[1] + 1
        if not flush_end(mb, self.flush, self.N):
            return None
        del self.sums[copy]
        return acc[0] / acc[1]


class BlockHistory:
    """The last `delta + 1` versions of one block, addressable by global update index (RPD)."""

    def __init__(self, w0: np.ndarray, delta: int) -> None:
        self.ring = np.zeros((delta + 1, w0.size), dtype=w0.dtype)
        self.ring[0] = w0
        self.updated_at: list[int] = []     # global indices k at which this block changed
        self.depth = delta + 1

    @property
    def version(self) -> int:
        return len(self.updated_at)

    def at(self, j: int) -> tuple[np.ndarray, int]:
        """The block as it was after j global updates, and its version."""
        v = bisect.bisect_left(self.updated_at, j)
        if self.version - v >= self.depth:
            raise IndexError(f"version {v} is older than the {self.depth} kept")
        return self.ring[v % self.depth], v

    def push(self, w: np.ndarray, k: int) -> None:
        self.updated_at.append(k)
        self.ring[self.version % self.depth] = w


class Stashed(NamedTuple):
    """What F(mb, s) keeps for B(mb, s): the block it read, its version, the stage's cache."""

    block: Any
    version: int
    cache: Any


class BlockState:
    """One stage's block for each model copy it serves, with versions, stash and flush.

    `blocks[c]` is the (mutable, possibly shared view) block of copy c. With `history` > 0 the
    state also keeps the last history + 1 versions of copy 0 (RPD reads stale blocks by
    global index). `apply` updates a block in place; `last_step` is the step subtracted.
    """

    def __init__(self, stage: int, blocks: list[Any], lr: float, *, group: int = 0,
                 flush: FlushBuffer | None = None, history: int | None = None,
                 health: Health | None = None) -> None:
        self.stage, self.group, self.lr = stage, group, lr
        self.health = health or Health()
        self.blocks = blocks
        self.version = [0] * len(blocks)
        self.stash: dict[int, Stashed] = {}
        self.flush = flush or FlushBuffer(0, 0)
        self.history = BlockHistory(np.asarray(blocks[0]), history) \
            if history is not None else None
        self.last_step: Any = None

    def read(self, copy: int, key: int, cache: Any) -> int:
        """Stash the current block of `copy` under `key` (weight stashing); its version."""
        v = self.version[copy]
        self.stash[key] = Stashed(self.blocks[copy].copy(), v, cache)
        return v

    def take(self, key: int) -> Stashed:
        return self.stash.pop(key)

    def checkpoint(self, host: Callable[[Any], Any] = np.asarray) -> dict[str, Any]:
        """Everything but the blocks themselves (their owner saves those): versions, the
        stash of in-flight microbatches, the flush sums, the RPD history, the first loss.
        `host` copies a (device) array to numpy."""
        hist = self.history
        return {"version": list(self.version),
                "stash": {k: Stashed(host(v.block).copy(), v.version, _copy_tree(v.cache, host))
                          for k, v in self.stash.items()},
                "flush": {c: [_copy_tree(acc[0], host), acc[1]]
                          for c, acc in self.flush.sums.items()},
                "history": None if hist is None else
                {"ring": hist.ring.copy(), "updated_at": list(hist.updated_at)},
                "first_loss": self.health.first_loss}

    def restore(self, state: dict[str, Any], device: Callable[[Any], Any] = np.asarray
                ) -> None:
        """The inverse of `checkpoint` (the blocks are restored by their owner, in place);
        `device` moves a numpy array to where the blocks live."""
        self.version = list(state["version"])
        self.stash = {k: Stashed(device(v.block), v.version, _copy_tree(v.cache, device))
                      for k, v in state["stash"].items()}
        self.flush.sums = {c: [_copy_tree(acc[0], device), acc[1]]
                           for c, acc in state["flush"].items()}
        if state["history"] is not None:
            assert self.history is not None, "restoring an RPD history into a plain state"
            self.history.ring[...] = state["history"]["ring"]
            self.history.updated_at = list(state["history"]["updated_at"])
        self.health.first_loss = state["first_loss"]


    def read_at(self, j: int) -> tuple[Any, int]:
        """RPD: copy 0's block as it was after j global updates, and its version."""
        assert self.history is not None, "read_at needs a BlockState made with history"
        return self.history.at(j)

    def apply(self, copy: int, g_w: Any, *, microbatch: int, batch: int, version: int,
              trajectory: int = 0, loss: float = math.nan, start: float = 0.0,
              end: float | Callable[[], float] = 0.0) -> UpdateRow | None:
        """B's gradient for `copy`: accumulate it (inside a flush) or apply the SGD step
        `block -= lr * g`; the update's row, or None when nothing was applied. `end` is the
        completion time, or a clock read right after the step. A non-finite gradient raises
        `health.Diverged` before anything changes."""
        g_w = self.flush.add(copy, microbatch, g_w)
        if g_w is None:
            return None
        norm = math.sqrt(float(g_w @ g_w))
        self.health.gradient(norm, self.stage, microbatch)     # raises Diverged: not applied
        step = self.lr * g_w
        self.blocks[copy] -= step
        self.last_step = step
        stale = self.version[copy] - version
        self.version[copy] += 1
        if self.history is not None:
            self.history.push(np.asarray(self.blocks[copy]), microbatch)
        t_end = end() if callable(end) else end
        return UpdateRow(self.stage, self.group, trajectory, microbatch, batch, version, stale,
                         loss, norm, start, t_end)


def _copy_tree(value: Any, move: Callable[[Any], Any]) -> Any:
    """A copy of an array, or of the arrays in a tuple/list/dict of them (stage caches)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_copy_tree(v, move) for v in value)
    if isinstance(value, dict):
        return {k: _copy_tree(v, move) for k, v in value.items()}
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return np.array(move(value), copy=True) if move is np.asarray else move(value).copy()
    return value
