"""Randomized PipeDream on the block-linear models in bulk (docs/DESIGN.md 2.6, 4).

The same algorithm as `rpd.simulate_python` (the reference, kept), bit for bit: the same
floating-point operations on the same operands in the same order, with the per-stage Python
work moved into a few calls per update:

* block versions: one S x D ring, block s's version v in row v mod D of s, where
  D = min(delta + 1, most versions any block reaches); the version each stage reads at update
  k is a search back from its newest version in that stage's update indices, known from the
  plan (`kernels.rpd_read`);
* the forward: the S partial predictions X_b[:, slice_s] @ z_s of batch b are ONE stacked
  `np.matmul` over a per-batch copy of X (each item is the same BLAS call on the same
  contiguous b x d_s operand as the reference's per-stage product, so the same bits); the
  stages' partials are summed in stage order, as the reference's `a_out += a_in` does;
* the backward computes only the sampled block's gradient. The gradient noise of stage s
  comes from that stage's own generator (`StageModule.rng`), which the reference advances at
  every update whose sampled stage is <= s (the backward passes through s) and throws away
  unless s is the sampled one. Those draws are made here in bulk, per stage, in the same
  order (numpy's `standard_normal(a + b)` is `standard_normal(a)` then `standard_normal(b)`),
  and only the rows that are used are kept (`noise_rows`).

The loss, the block gradient g @ X_b, the gradient norm and the objective are the very numpy
calls of the reference (numpy's exp/log and BLAS summation orders are not reproduced by hand).
Pure: no MPI, no h5py.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import numpy as np

from rpd_mpi import signals
from rpd_mpi.engines.cadence import due
from rpd_mpi.engines.health import Diverged, Health
from rpd_mpi.objectives import kernels
from rpd_mpi.objectives.linear import BlockLinearModel
from rpd_mpi.records import UPDATE_ROW_DTYPE, Objective, Trace, empty_events, to_updates

NOISE_CHUNK = 1 << 20          # normals drawn per call while skipping unused noise


def noise_rows(model: BlockLinearModel, stage: np.ndarray, width: int) -> np.ndarray:
    """K x width: row k is the noise the reference adds to the gradient of update k's
    sampled block (zero-padded to `width`), drawn from that stage's generator in the
    reference's order; zeros when the model has no noise."""
    K = stage.size
    out = np.zeros((K, width))
    if not model.noise:
        return out
    for s, sl in enumerate(model.slices):
        mine = np.nonzero(stage == s)[0]
        if not mine.size:
            continue
        m = sl.stop - sl.start
        passes = np.cumsum(stage <= s) - 1           # draws of stage s before update k
        need = passes[mine]                            # the draw index update k uses
        rng = np.random.default_rng([model.seed, 0, s])   # = StageModule(model, s, 0).rng
        per = max(1, NOISE_CHUNK // m)
        for first in range(0, int(need[-1]) + 1, per):
            count = min(per, int(need[-1]) + 1 - first)
            z = rng.standard_normal(count * m).reshape(count, m)
            lo, hi = np.searchsorted(need, [first, first + count])
            out[mine[lo:hi], :m] = z[need[lo:hi] - first]
    return out


class _Layout:
    """The model's blocks as stacks of consecutive stages of equal width (two stacks for
    the default split, remainder first; more for an uneven --partition)."""

    def __init__(self, model: BlockLinearModel) -> None:
        b = model.batch_size
        widths = [sl.stop - sl.start for sl in model.slices]
        self.bounds = np.array([sl.start for sl in model.slices] + [model.dim], np.int64)
        self.stacks: list[tuple[int, int, int]] = []     # (first stage, end stage, width)
        for s, m in enumerate(widths):
            if self.stacks and self.stacks[-1][2] == m:
                self.stacks[-1] = (self.stacks[-1][0], s + 1, m)
            else:
                self.stacks.append((s, s + 1, m))
        self.xs = []                 # per stack: B x (stages) x b x m, a batch's operands
        for lo, hi, m in self.stacks:
            cols = model.X[:, self.bounds[lo]:self.bounds[hi]]
            per = cols.reshape(model.num_batches, b, hi - lo, m).transpose(0, 2, 1, 3)
            self.xs.append(np.ascontiguousarray(per))
        self.width = max(widths)


def simulate_rpd_fast(model: BlockLinearModel, lr: float, stage: np.ndarray,
                      batch: np.ndarray, delays: np.ndarray, *, delta: int,
                      clock: np.ndarray | None = None, eval_every: int = 1,
                      progress: Callable[[int], None] | None = None,
                      diverge_factor: float = 0.0) -> Trace:
    """`rpd.simulate_python` for a block-linear model (same arguments, the plan's arrays)."""
    S, K, b = model.stages, stage.size, model.batch_size
    lay = _Layout(model)
    health = Health(diverge_factor)
    w = model.init_weights()
    stage = np.ascontiguousarray(stage, dtype=np.int64)
    delays = np.ascontiguousarray(delays, dtype=np.int64)
    order = np.argsort(stage, kind="stable")           # update indices grouped by stage
    starts = np.searchsorted(stage[order], np.arange(S + 1)).astype(np.int64)
    most = int(np.diff(starts).max()) if K else 0
    D = min(delta + 1, most + 1)
    ring = np.zeros((S, D, lay.width))                 # ring[s, v % D]: version v of block s
    z = np.zeros(model.dim)                            # the mixed model z_k
    zs = [z[lay.bounds[lo]:lay.bounds[hi]].reshape(hi - lo, m, 1) for lo, hi, m in lay.stacks]
    part = np.zeros((S, b, 1))                         # the S partial predictions
    parts = [part[lo:hi] for lo, hi, _ in lay.stacks]
    a = np.zeros(b)
    read = np.zeros(S, np.int64)                       # version each stage reads
    version = np.zeros(S, np.int64)                    # versions made so far
    noise = noise_rows(model, stage, lay.width)
    last = model.make_stage(S - 1)
    xcols, lam, sigma = model._batch_cols, model.lam, model.noise
    time = clock[:K].astype(float) if clock is not None else np.arange(1, K + 1, dtype=float)
    ver, stale, loss_k, norm_k = (np.zeros(K, np.int64), np.zeros(K, np.int64),
                                  np.zeros(K), np.zeros(K))
    obj_t, obj_k, obj_v = [0.0], [0], [model.full_objective(w)]
    counted, done = 0, 0
    divergence, stopped = None, ""
    try:
        for k in range(K):
            signals.check()
            s_k, m_k = int(stage[k]), int(batch[k])
            bad = kernels.rpd_read(k, delays[k], order, starts, version, ring, lay.bounds,
                                   delta + 1, z, read)
            if bad >= 0:
                raise IndexError(f"version {read[bad]} is older than the {delta + 1} kept")
            for xs, zz, pp in zip(lay.xs, zs, parts):
                np.matmul(xs[m_k], zz, out=pp)
            kernels.sum_stages(part, a)
            loss, g = last.loss(a, m_k)
            loss = float(loss)
            health.loss(loss, S - 1, k)
            lo, hi = int(lay.bounds[s_k]), int(lay.bounds[s_k + 1])
            g_w = g @ xcols[s_k][m_k]
            if lam or sigma:
                kernels.add_terms(g_w, z[lo:hi], lam, sigma, noise[k])
            norm = math.sqrt(float(g_w @ g_w))
            health.gradient(norm, s_k, k)
            v = int(version[s_k])
            kernels.rpd_step(w, ring, s_k, lo, hi, g_w, lr, (v + 1) % D)
            version[s_k] = v + 1
            ver[k], stale[k], loss_k[k], norm_k[k] = read[s_k], v - read[s_k], loss, norm
            done = k + 1
            if progress is not None:
                progress(done)
            if k == K - 1 or time[k + 1] != time[k]:
                if due(counted, done, eval_every) or k == K - 1:
                    obj_t.append(time[k])
                    obj_k.append(done)
                    obj_v.append(model.full_objective(w))
                    health.objective(obj_v[-1], done)
                counted = done
    except (Diverged, signals.SignalStop) as err:
        if isinstance(err, Diverged):
            divergence = replace(err.divergence, update=done)
        else:
            stopped = signals.name(err.signum)
        if obj_k[-1] != done:
            obj_t.append(time[done - 1] if done else 0.0)
            obj_k.append(done)
            obj_v.append(model.full_objective(w))
    rows = np.zeros(done, UPDATE_ROW_DTYPE)
    rows["stage"], rows["microbatch"], rows["batch"] = stage[:done], np.arange(done), \
        batch[:done]
    rows["version"], rows["local_staleness"] = ver[:done], stale[:done]
    rows["loss"], rows["grad_norm"] = loss_k[:done], norm_k[:done]
    rows["start"], rows["end"] = time[:done] - 1.0, time[:done]
    objective = Objective(np.array(obj_t), np.array(obj_k, np.int64), np.array(obj_v))
    return Trace(to_updates(rows, delays), objective, w.copy(), empty_events(), divergence,
                 stopped)

