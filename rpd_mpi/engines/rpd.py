"""Randomized PipeDream (DESIGN 2.6, Algorithm 1 of the paper): stale block SGD.

Iteration k reads every block i at the global index j_k^(i) (0 <= k - j_k^(i) <= delta),
samples a stage s_k and a batch m_k, runs the forward of m_k through all stages at the mixed
model z_k, the backward from the last stage down to s_k, and updates block s_k only.

`rpd_plan` draws (stage, batch, delays) for every iteration from one seeded generator, so any
process that calls it with the same arguments gets the same plan (the MPI ranks do). Only the
last delta + 1 versions of each block are kept (`BlockHistory`). Pure: no MPI, no h5py.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rpd_mpi.records import Objective, Trace, Updates, empty_events


@dataclass(frozen=True)
class RPDPlan:
    """Per-iteration stage s_k, batch m_k and delays k - j_k (K x S)."""

    stage: np.ndarray
    batch: np.ndarray
    delays: np.ndarray


def rpd_plan(updates: int, stages: int, num_batches: int, delta: int, source: str, seed: int,
             replay: np.ndarray | None = None) -> RPDPlan:
    """Draw the plan: stages, then batches, then (uniform source) delays, from one generator.

    `replay` (K' x S, K' >= updates) gives the delays for the sources `pd` and `ledger`.
    """
    rng = np.random.default_rng(seed)
    stage = rng.integers(stages, size=updates)
    batch = rng.integers(num_batches, size=updates)
    cap = np.minimum(delta, np.arange(updates))[:, None]
    if source == "uniform":
        delays = rng.integers(0, cap + 1, size=(updates, stages))
    elif source == "max":
        delays = np.broadcast_to(cap, (updates, stages)).copy()
    elif source == "zero":
        delays = np.zeros((updates, stages), dtype=np.int64)
    elif source in ("pd", "ledger"):
        delays = _replayed(replay, updates, stages)
    else:
        raise ValueError(f"unknown delay source {source!r}")
    return RPDPlan(stage, batch, delays.astype(np.int64))


def _replayed(replay: np.ndarray | None, updates: int, stages: int) -> np.ndarray:
    if replay is None or replay.shape[0] < updates or replay.shape[1] != stages:
        have = None if replay is None else replay.shape
        raise ValueError(f"replayed delays must be at least {updates} x {stages} (got {have})")
    d = np.asarray(replay[:updates], dtype=np.int64)
    bad = np.nonzero((d < 0) | (d > np.arange(updates)[:, None]))[0]
    if bad.size:
        raise ValueError(f"replayed delay of update {bad[0]} reads before the start: {d[bad[0]]}")
    return d.copy()


class BlockHistory:
    """The last `delta + 1` versions of one block, addressable by global update index."""

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


def simulate_rpd(model: Any, lr: float, plan: RPDPlan, *, delta: int,
                 clock: np.ndarray | None = None, eval_every: int = 1,
                 progress: Callable[[int], None] | None = None) -> Trace:
    """Run RPD for len(plan.stage) iterations. `clock[k]` is the time (slots) of update k;
    `progress(updates_done)` is called after every update when given."""
    S, K = model.stages, plan.stage.size
    w = model.init_weights()
    hist = [BlockHistory(w[sl], delta) for sl in model.slices]
    mods = [model.make_stage(s) for s in range(S)]
    time = clock[:K].astype(float) if clock is not None else np.arange(1, K + 1, dtype=float)
    rows, obj = [], ([0.0], [0], [model.full_objective(w)])
    for k in range(K):
        s_k, m_k = int(plan.stage[k]), int(plan.batch[k])
        reads = [h.at(k - int(d)) for h, d in zip(hist, plan.delays[k])]
        loss, g_w = _block_gradient(mods, [r[0] for r in reads], s_k, m_k)
        w[model.slices[s_k]] -= lr * g_w
        stale = hist[s_k].version - reads[s_k][1]
        hist[s_k].push(w[model.slices[s_k]], k)
        rows.append((s_k, m_k, reads[s_k][1], stale, loss, math.sqrt(float(g_w @ g_w))))
        if progress is not None:
            progress(k + 1)
        if _evaluate_now(time, k, eval_every):
            obj[0].append(time[k])
            obj[1].append(k + 1)
            obj[2].append(model.full_objective(w))
    updates = _rpd_updates(rows, plan, time)
    objective = Objective(np.array(obj[0]), np.array(obj[1], np.int64), np.array(obj[2]))
    return Trace(updates, objective, w.copy(), empty_events())


def _block_gradient(mods: list, blocks: list[np.ndarray], s_k: int, batch: int
                    ) -> tuple[float, np.ndarray]:
    """Forward through all stages at z_k, backward from the last stage down to s_k."""
    a, caches = None, []
    for mod, wb in zip(mods, blocks):
        a, cache = mod.forward(wb, a, batch)
        caches.append(cache)
    loss, g = mods[-1].loss(a, batch)
    for s in range(len(mods) - 1, s_k - 1, -1):
        g_w, g = mods[s].backward(blocks[s], caches[s], g, batch)
    return float(loss), g_w


def _evaluate_now(time: np.ndarray, k: int, every: int) -> bool:
    last = k == time.size - 1
    return last or (time[k + 1] != time[k] and int(time[k]) % every == 0)


def _rpd_updates(rows: list[tuple], plan: RPDPlan, time: np.ndarray) -> Updates:
    cols = list(zip(*rows)) if rows else [()] * 6
    K = len(rows)
    zeros = np.zeros(K, dtype=np.int64)
    return Updates(stage=np.array(cols[0], np.int64), group=zeros, trajectory=zeros.copy(),
                   microbatch=np.arange(K, dtype=np.int64), batch=np.array(cols[1], np.int64),
                   version=np.array(cols[2], np.int64),
                   local_staleness=np.array(cols[3], np.int64), delays=plan.delays[:K],
                   loss=np.array(cols[4], float), grad_norm=np.array(cols[5], float),
                   time=time[:K])
