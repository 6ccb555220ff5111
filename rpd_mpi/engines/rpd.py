"""Randomized PipeDream (docs/DESIGN.md 2.6, Algorithm 1 of the paper): stale block SGD.

Iteration k reads every block i at the global index j_k^(i) (0 <= k - j_k^(i) <= delta),
samples a stage s_k and a batch m_k, runs the forward of m_k through all stages at the mixed
model z_k, the backward from the last stage down to s_k, and updates block s_k only.

`rpd_plan` draws (stage, batch, delays) for every iteration from one seeded generator, so any
process that calls it with the same arguments gets the same plan (the MPI ranks do). Only the
last delta + 1 versions of each block are kept (`blocks.BlockHistory`, inside each stage's
`BlockState`, which applies every update). Pure: no MPI, no h5py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from rpd_mpi import signals
from rpd_mpi.engines.blocks import BlockState
from rpd_mpi.engines.cadence import due
from rpd_mpi.engines.fast_rpd import simulate_rpd_fast
from rpd_mpi.engines.health import Diverged, Health
from rpd_mpi.engines.resume import Checkpoints, restore_rngs, rng_states
from rpd_mpi.objectives.linear import BlockLinearModel
from rpd_mpi.objectives.protocol import Model, Stage
from rpd_mpi.records import Objective, Trace, UpdateRow, empty_events, row_array, to_updates


FAST_MIN_UPDATES = 256     # fewer updates: the reference is faster than loading the kernels


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
    return np.array(d)


def simulate_rpd(model: Model, lr: float, plan: RPDPlan, *, delta: int,
                 clock: np.ndarray | None = None, eval_every: int = 1,
                 progress: Callable[[int], None] | None = None,
                 diverge_factor: float = 0.0, checkpoints: Checkpoints | None = None,
                 resume: dict[str, Any] | None = None) -> Trace:
    """Run RPD for len(plan.stage) iterations. `clock[k]` is the time (slots) of update k
    (default: k + 1); the objective is recorded at the `--eval-every` cadence, checked when
    the clock moves on. `progress(updates_done)` is called after every update when given.
    A bad value (see `simulate`) stops the run with the updates before it.

    Block-linear models run `fast_rpd.simulate_rpd_fast` (the same bits, a few calls per
    update) unless the run is too short to pay for loading its compiled kernels; every other
    model the stage-by-stage `simulate_python`, which also takes checkpoints between updates
    (`checkpoints`) and continues from one (`resume`)."""
    if checkpoints is not None or resume is not None:
        return simulate_python(model, lr, plan, delta=delta, clock=clock,
                               eval_every=eval_every, progress=progress,
                               diverge_factor=diverge_factor, checkpoints=checkpoints,
                               resume=resume)
    if isinstance(model, BlockLinearModel) and plan.stage.size >= FAST_MIN_UPDATES:
        return simulate_rpd_fast(model, lr, plan.stage, plan.batch, plan.delays, delta=delta,
                                 clock=clock, eval_every=eval_every, progress=progress,
                                 diverge_factor=diverge_factor)
    return simulate_python(model, lr, plan, delta=delta, clock=clock, eval_every=eval_every,
                           progress=progress, diverge_factor=diverge_factor)


def simulate_python(model: Model, lr: float, plan: RPDPlan, *, delta: int,
                    clock: np.ndarray | None = None, eval_every: int = 1,
                    progress: Callable[[int], None] | None = None,
                    diverge_factor: float = 0.0, checkpoints: Checkpoints | None = None,
                    resume: dict[str, Any] | None = None) -> Trace:
    """`simulate_rpd` through the `Stage` protocol, one stage call at a time: any model; the
    reference the fast path is tested against (tests/test_fast_rpd.py)."""
    S, K = model.stages, plan.stage.size
    w = model.init_weights()
    health = Health(diverge_factor)
    states = [BlockState(s, [w[sl]], lr, history=delta, health=health)
              for s, sl in enumerate(model.slices)]
    mods = [model.make_stage(s) for s in range(S)]
    time = clock[:K].astype(float) if clock is not None else np.arange(1, K + 1, dtype=float)
    rows: list[UpdateRow] = []
    obj_t, obj_k, obj_v = [0.0], [0], [model.full_objective(w)]
    counted = 0                      # updates done when the objective was last checked
    divergence, stopped = None, ""
    first = 0

    def state(k: int) -> dict[str, Any]:
        return {"k": k, "w": w.copy(), "blocks": [st.checkpoint() for st in states],
                "rows": list(rows), "objective": (list(obj_t), list(obj_k), list(obj_v)),
                "counted": counted, "rngs": rng_states(mods)}
    if resume is not None:
        first, counted = int(resume["k"]), int(resume["counted"])
        w[...] = resume["w"]                 # in place: the blocks are views of w
        for st, saved in zip(states, resume["blocks"]):
            st.restore(saved)
        rows = list(resume["rows"])
        obj_t, obj_k, obj_v = (list(x) for x in resume["objective"])
        restore_rngs(mods, resume["rngs"])
    try:
        for k in range(first, K):
            try:
                signals.check()              # SIGTERM & co.: stop between updates
            except signals.SignalStop as err:
                if checkpoints is not None:
                    checkpoints.save(state(k), k, signals.name(err.signum))
                raise
            if checkpoints is not None and k > first and checkpoints.due():
                checkpoints.save(state(k), k, "checkpoint")
            s_k, m_k = int(plan.stage[k]), int(plan.batch[k])
            reads = [st.read_at(k - int(d)) for st, d in zip(states, plan.delays[k])]
            loss, g_w = _block_gradient(mods, [r[0] for r in reads], s_k, m_k)
            health.loss(loss, S - 1, k)
            row = states[s_k].apply(0, g_w, microbatch=k, batch=m_k, version=reads[s_k][1],
                                    loss=loss, start=time[k] - 1.0, end=time[k])
            assert row is not None                  # RPD has no flushes
            rows.append(row)
            if progress is not None:
                progress(k + 1)
            if k == K - 1 or time[k + 1] != time[k]:     # the clock moves on: the cadence
                if due(counted, k + 1, eval_every) or k == K - 1:
                    obj_t.append(time[k])
                    obj_k.append(k + 1)
                    obj_v.append(model.full_objective(w))
                    health.objective(obj_v[-1], k + 1)
                counted = k + 1
    except (Diverged, signals.SignalStop) as err:    # stop: keep the updates before it
        if isinstance(err, Diverged):
            divergence = replace(err.divergence, update=len(rows))
        else:
            stopped = signals.name(err.signum)
        if obj_k[-1] != len(rows):
            obj_t.append(time[len(rows) - 1] if rows else 0.0)
            obj_k.append(len(rows))
            obj_v.append(model.full_objective(w))
    objective = Objective(np.array(obj_t), np.array(obj_k, np.int64), np.array(obj_v))
    return Trace(to_updates(row_array(rows), plan.delays), objective, w.copy(), empty_events(),
                 divergence, stopped)


def _block_gradient(mods: list[Stage], blocks: list[np.ndarray], s_k: int, batch: int
                    ) -> tuple[float, np.ndarray]:
    """Forward through all stages at z_k, backward from the last stage down to s_k."""
    a: Any = None
    caches = []
    for mod, wb in zip(mods, blocks):
        a, cache = mod.forward(wb, a, batch)
        caches.append(cache)
    loss, g = mods[-1].loss(a, batch)
    g_w = g
    for s in range(len(mods) - 1, s_k - 1, -1):
        g_w, g = mods[s].backward(blocks[s], caches[s], g, batch)
    return float(loss), g_w
