"""numba kernels for the loops that dominate on the CPU.

Each kernel has a plain numpy reference next to it (`*_ref`) and a test that they agree.
`cache=True` keeps compiled code between runs; NUMBA_CACHE_DIR may point it at node-local
scratch on a cluster (several ranks starting at once share the cache safely). Without numba
installed (e.g. a GPU machine with only cupy), each kernel runs its reference.

numba is imported, and each kernel compiled (or loaded from the cache), at the kernel's first
call, not when this module is imported: a run that never calls a kernel (a schedule, a
ledger tool, the char LM) does not pay numba's ~0.3 s import (docs/DESIGN.md 8). The public
names are plain functions that forward to the compiled kernel (`_compiled`).

The RPD kernels (`rpd_read`, `sum_stages`, `add_terms`, `rpd_step`) serve
`engines.fast_rpd`: they do only element-wise IEEE operations (no fastmath, so no fused or
reordered arithmetic) and copies, so they give the same bits as the numpy expressions of the
reference engine they replace.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import numpy as np

_CACHE: dict[Callable[..., Any], Callable[..., Any]] = {}


def _compiled(py_func: Callable[..., Any], ref: Callable[..., Any],
              fastmath: bool = False) -> Callable[..., Any]:
    """The numba-compiled `py_func` (compiled once per process), `ref` without numba."""
    fn = _CACHE.get(py_func)
    if fn is None:
        try:
            import numba
        except ImportError:     # no numba: the numpy reference runs
            fn = ref
        else:
            fn = numba.njit(cache=True, fastmath=fastmath)(py_func)
        _CACHE[py_func] = fn
    return fn


#: numba is installed (looked up without importing it). Without it the public names below
#: are bound to the numpy references themselves.
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


# ----------------------------------------------------------------------------- tracker

def _shift_prediction(cols_t: np.ndarray, delta: np.ndarray, scale: float, p: np.ndarray,
                      w: np.ndarray) -> None:
    """w += scale * delta and p += scale * (cols_t.T @ delta) (cols_t: the block's columns
    as a contiguous m x n array, X[:, slice_s].T).

    Plain IEEE arithmetic in a fixed order (no fastmath, no fused multiply-add): each
    p[i]'s sum adds the products cols_t[j, i] * delta[j] for j = 0, 1, ... in turn, so the
    numpy version `shift_prediction_ref` gives the same bits and a run can use either (the
    tracker uses numpy for its first shifts and never imports numba in a short run). The
    loop over i is the inner one: it vectorises without reordering any sum."""
    m, n = cols_t.shape
    for j in range(m):
        w[j] += scale * delta[j]
    acc = np.empty(n)
    d = delta[0]
    for i in range(n):
        acc[i] = cols_t[0, i] * d
    for j in range(1, m):
        d = delta[j]
        for i in range(n):
            acc[i] = acc[i] + cols_t[j, i] * d
    for i in range(n):
        p[i] += scale * acc[i]


def shift_prediction_ref(cols_t: np.ndarray, delta: np.ndarray, scale: float, p: np.ndarray,
                         w: np.ndarray) -> None:
    """numpy version of `shift_prediction`, bit for bit: the products, then their sum over
    the rows of cols_t in row order (an add-reduce over axis 0 of a C-contiguous array with
    more than one column runs as out += row, row by row; one column, or a non-contiguous
    input, takes the explicit loop)."""
    w += scale * delta
    prod = cols_t * delta[:, None]
    if prod.shape[1] > 1 and cols_t.flags.c_contiguous:
        acc = np.add.reduce(prod, axis=0)
    else:
        acc = prod[0].copy()
        for j in range(1, prod.shape[0]):
            acc += prod[j]
    p += scale * acc


def _compiled_shift() -> Callable[..., Any]:
    """The compiled `_shift_prediction`."""
    return _compiled(_shift_prediction, shift_prediction_ref)


def shift_prediction(cols_t: np.ndarray, delta: np.ndarray, scale: float, p: np.ndarray,
                     w: np.ndarray) -> None:
    """w += scale * delta and p += scale * (cols_t.T @ delta) (numba)."""
    _compiled_shift()(cols_t, delta, scale, p, w)


# ----------------------------------------------------------------------------- RPD

def _rpd_read(k: int, delays: np.ndarray, order: np.ndarray, starts: np.ndarray,
              version: np.ndarray, ring: np.ndarray, bounds: np.ndarray, keep: int,
              z: np.ndarray, read: np.ndarray) -> int:
    """z[slice_s] = block s as it was after k - delays[s] global updates, for every s;
    read[s] = its version: the number of s's updates before that index, found in s's update
    indices order[starts[s]:starts[s + 1]] by a galloping search back from its current
    `version[s]` (the recent, cached end of the list). `ring[s, v % D]` holds version v.
    Returns the first stage whose read is `keep` or more versions behind (-1: none)."""
    depth = ring.shape[1]
    for s in range(starts.size - 1):
        j = k - delays[s]
        base = starts[s]
        hi = version[s]                 # answer in [lo, hi]: updates before j
        step = 1
        lo = hi
        while lo > 0 and order[base + lo - 1] >= j:
            hi = lo - 1
            lo = max(0, lo - step)
            step *= 2
        while lo < hi:                  # first position in [lo, hi) with order >= j
            mid = (lo + hi) // 2
            if order[base + mid] < j:
                lo = mid + 1
            else:
                hi = mid
        read[s] = lo
        if version[s] - lo >= keep:
            return s
        row = lo % depth
        first = bounds[s]
        for c in range(bounds[s + 1] - first):
            z[first + c] = ring[s, row, c]
    return -1


def rpd_read_ref(k: int, delays: np.ndarray, order: np.ndarray, starts: np.ndarray,
                 version: np.ndarray, ring: np.ndarray, bounds: np.ndarray, keep: int,
                 z: np.ndarray, read: np.ndarray) -> int:
    """numpy reference of `rpd_read`."""
    for s in range(starts.size - 1):
        v = int(np.searchsorted(order[starts[s]:starts[s] + version[s]], k - delays[s]))
        read[s] = v
        if version[s] - v >= keep:
            return s
        m = bounds[s + 1] - bounds[s]
        z[bounds[s]:bounds[s + 1]] = ring[s, v % ring.shape[1], :m]
    return -1


def rpd_read(k: int, delays: np.ndarray, order: np.ndarray, starts: np.ndarray,
             version: np.ndarray, ring: np.ndarray, bounds: np.ndarray, keep: int,
             z: np.ndarray, read: np.ndarray) -> int:
    """See `_rpd_read` (numba)."""
    out: int = _compiled(_rpd_read, rpd_read_ref)(k, delays, order, starts, version, ring,
                                                  bounds, keep, z, read)
    return out


def _sum_stages(part: np.ndarray, a: np.ndarray) -> None:
    """a = part[0] + part[1] + ... + part[S - 1], added in stage order (part: S x b x 1)."""
    for i in range(a.size):
        acc = part[0, i, 0]
        for s in range(1, part.shape[0]):
            acc = part[s, i, 0] + acc
        a[i] = acc


def sum_stages_ref(part: np.ndarray, a: np.ndarray) -> None:
    """numpy reference of `sum_stages`."""
    a[:] = part[0, :, 0]
    for s in range(1, part.shape[0]):
        a[:] = part[s, :, 0] + a


def sum_stages(part: np.ndarray, a: np.ndarray) -> None:
    """See `_sum_stages` (numba)."""
    _compiled(_sum_stages, sum_stages_ref)(part, a)


def _add_terms(g: np.ndarray, w: np.ndarray, lam: float, sigma: float,
               noise: np.ndarray) -> None:
    """g += lam * w (if lam), then g += sigma * noise[:g.size] (if sigma)."""
    for j in range(g.size):
        x = g[j]
        if lam:
            x = x + lam * w[j]
        if sigma:
            x = x + sigma * noise[j]
        g[j] = x


def add_terms_ref(g: np.ndarray, w: np.ndarray, lam: float, sigma: float,
                  noise: np.ndarray) -> None:
    """numpy reference of `add_terms` (the reference engine's own expressions)."""
    if lam:
        g += lam * w
    if sigma:
        g += sigma * noise[:g.size]


def add_terms(g: np.ndarray, w: np.ndarray, lam: float, sigma: float,
              noise: np.ndarray) -> None:
    """See `_add_terms` (numba)."""
    _compiled(_add_terms, add_terms_ref)(g, w, lam, sigma, noise)


def _rpd_step(w: np.ndarray, ring: np.ndarray, s: int, lo: int, hi: int, g: np.ndarray,
              lr: float, row: int) -> None:
    """w[lo:hi] -= lr * g, then ring[s, row, :hi - lo] = w[lo:hi] (the new version)."""
    for j in range(hi - lo):
        step = lr * g[j]
        w[lo + j] = w[lo + j] - step
        ring[s, row, j] = w[lo + j]


def rpd_step_ref(w: np.ndarray, ring: np.ndarray, s: int, lo: int, hi: int, g: np.ndarray,
                 lr: float, row: int) -> None:
    """numpy reference of `rpd_step`."""
    w[lo:hi] -= lr * g
    ring[s, row, :hi - lo] = w[lo:hi]


def rpd_step(w: np.ndarray, ring: np.ndarray, s: int, lo: int, hi: int, g: np.ndarray,
             lr: float, row: int) -> None:
    """See `_rpd_step` (numba)."""
    _compiled(_rpd_step, rpd_step_ref)(w, ring, s, lo, hi, g, lr, row)


if not HAVE_NUMBA:      # no numba: the references themselves, no forwarding
    shift_prediction = shift_prediction_ref      # noqa: F811
    rpd_read = rpd_read_ref                      # noqa: F811
    sum_stages = sum_stages_ref                  # noqa: F811
    add_terms = add_terms_ref                    # noqa: F811
    rpd_step = rpd_step_ref                      # noqa: F811


# ----------------------------------------------------------------------------- simulator
#
# The block-linear simulator's per-slot kernels (`engines.fast_linear`). Their reference is
# the simulator itself (`engines.sim._Engine`): tests/test_fast_sim.py compares whole runs
# bit for bit. They need numba (without it `fast_linear` is not used). Ops are rows i0..i1 of
# an int64 table with the columns below: group, stage, microbatch, trajectory, data batch,
# the stage's index within its stack of equal-width stages, and POS, the op's row within its
# slot (for a stack's table) or its stack (for a slot's table of every backward).

G_, S_, MB, TR, BATCH, KS, POS = range(7)
# the compiled `_shift_prediction` and simulator kernels that other kernels call, set by
# `sim_kernels` before any kernel compiles
_SHIFT: Any = None
_TERMS: Any = None
_APPLY: Any = None
_FORWARD: Any = None


def _sim_forward(i0: int, i1: int, tab: np.ndarray, R: int, W: np.ndarray,
                 bounds: np.ndarray, xs: np.ndarray, stash: np.ndarray, stash_ver: np.ndarray,
                 version: np.ndarray, fversion: np.ndarray, abuf: np.ndarray,
                 wbuf: np.ndarray) -> None:
    """F ops i0..i1 of one stack: stash the current block and its version, and lay out the
    stacked matmul operands (abuf[n] = X_b of the stage, wbuf[n] = the block as m x 1)."""
    for i in range(i0, i1):
        n = i - i0
        g, s, mb, r = tab[i, 0], tab[i, 1], tab[i, 2], tab[i, 3]
        lo = bounds[s]
        for j in range(bounds[s + 1] - lo):
            v = W[g * R + r, lo + j]
            stash[g, mb, s, j] = v
            wbuf[n, j, 0] = v
        abuf[n] = xs[tab[i, 4], tab[i, 5]]
        ver = version[g, s, r]
        stash_ver[g, mb, s] = ver
        fversion[g, mb, s] = ver


def _sim_finish_backward(f0: int, f1: int, b0: int, b1: int, ftab: np.ndarray,
                         pbuf: np.ndarray, acts: np.ndarray, btab: np.ndarray,
                         glast: np.ndarray, xs: np.ndarray, gbuf: np.ndarray,
                         abuf: np.ndarray) -> None:
    """a_out = X_b w (+ a_in from the stage before) of F ops f0..f1, kept in acts; then the
    operands of B ops b0..b1 of the stack: gbuf[n] = the loss gradient (1 x b; every stage
    passes the prediction gradient on unchanged), abuf[n] = X_b of the stage. (A backward
    never needs this slot's forwards.)"""
    for i in range(f0, f1):
        n = i - f0
        g, s, mb = ftab[i, 0], ftab[i, 1], ftab[i, 2]
        for c in range(acts.shape[3]):
            if s:
                acts[g, mb, s, c] = pbuf[n, c, 0] + acts[g, mb, s - 1, c]
            else:
                acts[g, mb, s, c] = pbuf[n, c, 0]
    for i in range(b0, b1):
        n = i - b0
        gbuf[n, 0] = glast[btab[i, 0], btab[i, 2]]
        abuf[n] = xs[btab[i, 4], btab[i, 5]]


def _sim_terms(i0: int, i1: int, tab: np.ndarray, bounds: np.ndarray, gw: np.ndarray,
               lam: float, sigma: float, stash: np.ndarray, noise: np.ndarray, flush: int,
               N: int, acc: np.ndarray, cnt: np.ndarray, upad: np.ndarray,
               applied: np.ndarray) -> None:
    """g_w = X_b^T g (+ lam w_stash) (+ sigma noise) of B ops i0..i1, through the flush
    buffer: the gradients to apply go to upad[pos] (the slot's row of the op); applied[pos]
    says which do."""
    for i in range(i0, i1):
        n = i - i0
        g, s, mb, r, pos = tab[i, 0], tab[i, 1], tab[i, 2], tab[i, 3], tab[i, 6]
        m = bounds[s + 1] - bounds[s]
        for j in range(m):
            x = gw[n, 0, j]
            if lam:
                x = x + lam * stash[g, mb, s, j]
            if sigma:
                x = x + sigma * noise[g, s, mb, j]
            gw[n, 0, j] = x
        if flush:
            first = cnt[g, s, r] == 0
            for j in range(m):
                if first:
                    acc[g, s, r, j] = 0.0 + gw[n, 0, j]
                else:
                    acc[g, s, r, j] = acc[g, s, r, j] + gw[n, 0, j]
            cnt[g, s, r] += 1
            if not (mb % flush == flush - 1 or mb == N - 1):
                applied[pos] = False
                continue
            for j in range(m):
                gw[n, 0, j] = acc[g, s, r, j] / cnt[g, s, r]
            cnt[g, s, r] = 0
        for j in range(m):
            upad[pos, j] = gw[n, 0, j]
        applied[pos] = True


def _sim_apply(i0: int, i1: int, first: int, tab: np.ndarray, applied: np.ndarray,
               upad: np.ndarray, grads: np.ndarray, lr: float, R: int, W: np.ndarray,
               bounds: np.ndarray, version: np.ndarray, stash_ver: np.ndarray,
               losses: np.ndarray, cols0: np.ndarray, cols1: np.ndarray, scale: float,
               p: np.ndarray, tw: np.ndarray, step: np.ndarray, shifts: int, resync: int,
               t: int, nrows: int, rows_i: np.ndarray, rows_f: np.ndarray
               ) -> tuple[int, int, int]:
    """Apply the slot's updates (B ops i0..i1 of every stack, in (group, stage) order; the
    table's POS column is the op's stack) from op `first` on: W -= lr g, versions, the
    tracker's shift, the update rows (the gradient kept in grads[row] for the norms, which
    the caller computes at the end). Stops right after a shift that makes `shifts` a
    multiple of `resync` (the caller resynchronises the tracker). Returns (next op, rows,
    shifts)."""
    for i in range(first, i1):
        pos = i - i0
        if not applied[pos]:
            continue
        g, s, mb, r = tab[i, 0], tab[i, 1], tab[i, 2], tab[i, 3]
        lo = bounds[s]
        m = bounds[s + 1] - lo
        row = g * R + r
        for j in range(m):
            grads[nrows, j] = upad[pos, j]
            step[j] = lr * upad[pos, j]
            W[row, lo + j] = W[row, lo + j] - step[j]
        read = stash_ver[g, mb, s]
        stale = version[g, s, r] - read
        version[g, s, r] += 1
        cols = cols0[tab[i, 5]] if tab[i, 6] == 0 else cols1[tab[i, 5]]
        _SHIFT(cols, step[:m], scale, p, tw[lo:lo + m])
        shifts += 1
        rows_i[nrows, 0], rows_i[nrows, 1], rows_i[nrows, 2] = s, g, r
        rows_i[nrows, 3], rows_i[nrows, 4] = mb, tab[i, 4]
        rows_i[nrows, 5], rows_i[nrows, 6] = read, stale
        rows_f[nrows, 0] = losses[g, mb]
        rows_f[nrows, 2], rows_f[nrows, 3] = t, t + 1
        nrows += 1
        if shifts % resync == 0:
            return i + 1, nrows, shifts
    return i1, nrows, shifts


def _sim_close(b0: int, b1: int, a0: int, a1: int, f0: int, f1: int, t: int, nrows: int,
               shifts: int, btab: np.ndarray, gw: np.ndarray, lam: float, sigma: float,
               stash: np.ndarray, noise: np.ndarray, flush: int, N: int, acc: np.ndarray,
               cnt: np.ndarray, upad: np.ndarray, applied: np.ndarray, atab: np.ndarray,
               grads: np.ndarray, lr: float, R: int, W: np.ndarray, bounds: np.ndarray,
               version: np.ndarray, stash_ver: np.ndarray, losses: np.ndarray,
               cols0: np.ndarray, scale: float, p: np.ndarray, tw: np.ndarray,
               step: np.ndarray, resync: int, rows_i: np.ndarray, rows_f: np.ndarray,
               ftab: np.ndarray, xs: np.ndarray, fversion: np.ndarray, abuf: np.ndarray,
               wbuf: np.ndarray) -> tuple[int, int, int]:
    """One call for the end of slot t of a run with ONE stack (every stage as wide): its
    B terms (B ops b0..b1 of the stack), its updates (`_sim_apply` from op a0 of the slot's
    a0..a1), then, unless the updates stopped for a resync, the next slot's forwards (F
    ops f0..f1; the caller passes f1 = f0 where they must wait, e.g. for an average). The
    slot's numbers come first, the run's fixed arrays after them (the caller keeps those in
    one tuple). Returns `_sim_apply`'s (next op, rows, shifts)."""
    _TERMS(b0, b1, btab, bounds, gw, lam, sigma, stash, noise, flush, N, acc, cnt, upad,
           applied)
    nxt, nrows, shifts = _APPLY(a0, a1, a0, atab, applied, upad, grads, lr, R, W, bounds,
                                version, stash_ver, losses, cols0, cols0, scale, p, tw, step,
                                shifts, resync, t, nrows, rows_i, rows_f)
    if nxt == a1 and f1 > f0:
        _FORWARD(f0, f1, ftab, R, W, bounds, xs, stash, stash_ver, version, fversion, abuf,
                 wbuf)
    return nxt, nrows, shifts


SIM_KERNELS = ("_sim_forward", "_sim_finish_backward", "_sim_terms", "_sim_apply",
               "_sim_close")


def sim_kernels() -> dict[str, Callable[..., Any]]:
    """The simulator's kernels, compiled (numba must be installed: `HAVE_NUMBA`)."""
    global _SHIFT, _TERMS, _APPLY, _FORWARD
    _SHIFT = _compiled_shift()
    table = globals()
    out = {name: _compiled(table[name], table[name]) for name in SIM_KERNELS}
    _TERMS, _APPLY, _FORWARD = out["_sim_terms"], out["_sim_apply"], out["_sim_forward"]
    return out
