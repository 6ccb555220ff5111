"""numba CPU kernels of the character language model, with array-module references.

Each kernel `name` (a `@_njit(cache=True)` loop over contiguous float arrays, with
numpy's error model: divisions are not checked for zero) has a reference `name_ref` written
for an array module `xp` (numpy, or cupy later) that computes the same values; tests require
agreement to 1e-10 in float64. `kernel(name, xp)` picks what the model calls: the numba
kernel for numpy arrays when it is in `NUMBA_FASTER` (measured by
benchmarks/bench_kernels.py), the reference otherwise (and always for non-numpy arrays).
The references of GELU use tanh; the kernels the equal sigmoid form u sigmoid(2 z).

Shapes: rows are flattened leading axes. LayerNorm x (n, c); GELU any contiguous array seen
as 1-D; cross-entropy logits (n, v) with int targets (n,); causal softmax scores (m, t, t);
embedding scatter ids (n,) and rows g (n, c). cupy is imported only when a cupy array
arrives (`array_module`); importing this module imports numba and compiles nothing until a
kernel is called (then it compiles, or loads from numba's cache). Without numba installed (a
GPU machine may have only cupy) the kernels stay plain Python functions and `kernel` always
picks the references.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from types import ModuleType
from typing import Any, Callable

import numpy as np

#: numba is installed (looked up without importing it: numba is imported, and each kernel
#: compiled or loaded from the cache, at the kernel's first call; docs/DESIGN.md 8).
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def _njit(**options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """numba.njit(**options) applied at the first call, or leave the function as it is when
    numba is missing."""
    if not HAVE_NUMBA:
        return lambda fn: fn

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            if not compiled:
                import numba
                compiled.append(numba.njit(**options)(fn))
            return compiled[0](*args)
        return call
    return wrap


GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


def array_module(x: Any) -> ModuleType:
    """numpy, or cupy for a cupy array (cupy is imported only then)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy  # noqa: PLC0415  (optional dependency)
        module: ModuleType = cupy
        return module
    return np


# ----- LayerNorm ------------------------------------------------------------------------

@_njit(cache=True, error_model="numpy")
def layernorm_forward(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, mean, rstd): y = (x - mean) * rstd * g + b over the last axis of x (n, c)."""
    n, c = x.shape
    y, mean, rstd = np.empty_like(x), np.empty(n, x.dtype), np.empty(n, x.dtype)
    for i in range(n):
        m = 0.0
        for j in range(c):
            m += x[i, j]
        m /= c
        v = 0.0
        for j in range(c):
            d = x[i, j] - m
            v += d * d
        r = 1.0 / math.sqrt(v / c + eps)
        for j in range(c):
            y[i, j] = (x[i, j] - m) * r * g[j] + b[j]
        mean[i], rstd[i] = m, r
    return y, mean, rstd


def layernorm_forward_ref(x: Any, g: Any, b: Any, eps: float) -> tuple[Any, Any, Any]:
    mean = x.mean(axis=1)
    d = x - mean[:, None]
    rstd = 1.0 / (array_module(x).sqrt((d * d).mean(axis=1) + eps))
    return d * rstd[:, None] * g + b, mean, rstd


@_njit(cache=True, error_model="numpy")
def layernorm_backward(gy: np.ndarray, x: np.ndarray, g: np.ndarray, mean: np.ndarray,
                       rstd: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gx, gg, gb) of LayerNorm: gx = rstd (gh - mean(gh) - xh mean(gh xh)), gh = gy g."""
    n, c = x.shape
    gx, gg, gb = np.empty_like(x), np.zeros(c, x.dtype), np.zeros(c, x.dtype)
    for i in range(n):
        m, r = mean[i], rstd[i]
        s1 = 0.0
        s2 = 0.0
        for j in range(c):
            xh = (x[i, j] - m) * r
            gh = gy[i, j] * g[j]
            s1 += gh
            s2 += gh * xh
            gg[j] += gy[i, j] * xh
            gb[j] += gy[i, j]
        s1 /= c
        s2 /= c
        for j in range(c):
            xh = (x[i, j] - m) * r
            gx[i, j] = r * (gy[i, j] * g[j] - s1 - xh * s2)
    return gx, gg, gb


def layernorm_backward_ref(gy: Any, x: Any, g: Any, mean: Any, rstd: Any
                           ) -> tuple[Any, Any, Any]:
    xh = (x - mean[:, None]) * rstd[:, None]
    gh = gy * g
    s1 = gh.mean(axis=1, keepdims=True)
    s2 = (gh * xh).mean(axis=1, keepdims=True)
    return rstd[:, None] * (gh - s1 - xh * s2), (gy * xh).sum(axis=0), gy.sum(axis=0)


# ----- GELU (tanh approximation, as GPT-2) ------------------------------------------------

@_njit(cache=True, error_model="numpy")
def gelu_forward(u: np.ndarray) -> np.ndarray:
    """0.5 u (1 + tanh(z)) = u sigmoid(2 z), z = k (u + c u^3), elementwise on 1-D u
    (the sigmoid form: scalar exp is much cheaper than scalar tanh)."""
    a = np.empty_like(u)
    for i in range(u.size):
        x = u[i]
        a[i] = x / (1.0 + math.exp(-2.0 * GELU_K * (x + GELU_C * x * x * x)))
    return a


def gelu_forward_ref(u: Any) -> Any:
    xp = array_module(u)
    return 0.5 * u * (1.0 + xp.tanh(GELU_K * (u + GELU_C * u * u * u)))


@_njit(cache=True, error_model="numpy")
def gelu_backward(u: np.ndarray, ga: np.ndarray) -> np.ndarray:
    """ga * gelu'(u) elementwise on 1-D arrays; with s = sigmoid(2 z):
    gelu' = s + 2 u s (1 - s) z'  (= 0.5 (1 + t) + 0.5 u (1 - t^2) z', t = tanh z)."""
    gu = np.empty_like(u)
    for i in range(u.size):
        x = u[i]
        s = 1.0 / (1.0 + math.exp(-2.0 * GELU_K * (x + GELU_C * x * x * x)))
        gu[i] = ga[i] * (s + 2.0 * x * s * (1.0 - s) * GELU_K * (1.0 + 3.0 * GELU_C * x * x))
    return gu


def gelu_backward_ref(u: Any, ga: Any) -> Any:
    xp = array_module(u)
    t = xp.tanh(GELU_K * (u + GELU_C * u * u * u))
    return ga * (0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * GELU_K
                 * (1.0 + 3.0 * GELU_C * u * u))


# ----- softmax cross-entropy -------------------------------------------------------------

@_njit(cache=True, error_model="numpy")
def softmax_xent(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean_i -log softmax(logits_i)[t_i], its gradient (softmax - onehot) / n)."""
    n, v = logits.shape
    grad = np.empty_like(logits)
    total = 0.0
    inv_n = 1.0 / n
    for i in range(n):
        m = logits[i, 0]
        for j in range(1, v):
            m = max(m, logits[i, j])
        z = 0.0
        for j in range(v):
            e = math.exp(logits[i, j] - m)
            grad[i, j] = e
            z += e
        total += math.log(z) + m - logits[i, targets[i]]
        scale = inv_n / z
        for j in range(v):
            grad[i, j] *= scale
        grad[i, targets[i]] -= inv_n
    return total * inv_n, grad


def softmax_xent_ref(logits: Any, targets: Any) -> tuple[float, Any]:
    xp = array_module(logits)
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = xp.exp(shifted)
    z = e.sum(axis=1)
    rows = xp.arange(n)
    loss = float((xp.log(z) - shifted[rows, targets]).mean())
    grad = e / (z[:, None] * n)
    grad[rows, targets] -= 1.0 / n
    return loss, grad


# ----- causal attention softmax ------------------------------------------------------------

@_njit(cache=True, error_model="numpy")
def causal_softmax_forward(s: np.ndarray, scale: float) -> np.ndarray:
    """att[m, i, j] = softmax_j<=i(scale s[m, i, j]), zero above the diagonal; s (m, t, t)."""
    mm, t, _ = s.shape
    att = np.zeros_like(s)
    for q in range(mm):
        for i in range(t):
            mx = s[q, i, 0]
            for j in range(1, i + 1):
                mx = max(mx, s[q, i, j])
            z = 0.0
            for j in range(i + 1):
                e = math.exp(scale * (s[q, i, j] - mx))
                att[q, i, j] = e
                z += e
            inv_z = 1.0 / z
            for j in range(i + 1):
                att[q, i, j] *= inv_z
    return att


def _causal_mask(xp: ModuleType, t: int) -> Any:
    return xp.triu(xp.ones((t, t), dtype=bool), k=1)


def causal_softmax_forward_ref(s: Any, scale: float) -> Any:
    xp = array_module(s)
    masked = xp.where(_causal_mask(xp, s.shape[-1]), -xp.inf, s * scale)
    e = xp.exp(masked - masked.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_njit(cache=True, error_model="numpy")
def causal_softmax_backward(att: np.ndarray, g_att: np.ndarray, scale: float) -> np.ndarray:
    """g_s = scale att (g_att - sum_j att g_att) on j <= i, zero above the diagonal."""
    mm, t, _ = att.shape
    gs = np.zeros_like(att)
    for q in range(mm):
        for i in range(t):
            dot = 0.0
            for j in range(i + 1):
                dot += att[q, i, j] * g_att[q, i, j]
            for j in range(i + 1):
                gs[q, i, j] = scale * att[q, i, j] * (g_att[q, i, j] - dot)
    return gs


def causal_softmax_backward_ref(att: Any, g_att: Any, scale: float) -> Any:
    dot = (att * g_att).sum(axis=-1, keepdims=True)
    return scale * att * (g_att - dot)


# ----- embedding scatter-add -------------------------------------------------------------

@_njit(cache=True, error_model="numpy")
def embedding_backward(ids: np.ndarray, g: np.ndarray, vocab: int) -> np.ndarray:
    """g_table[v] = sum of the rows g[i] with ids[i] == v; ids (n,), g (n, c)."""
    n, c = g.shape
    out = np.zeros((vocab, c), g.dtype)
    for i in range(n):
        row = ids[i]
        for j in range(c):
            out[row, j] += g[i, j]
    return out


def embedding_backward_ref(ids: Any, g: Any, vocab: int) -> Any:
    xp = array_module(g)
    out = xp.zeros((vocab, g.shape[1]), dtype=g.dtype)
    xp.add.at(out, ids, g)
    return out


# ----- dispatch --------------------------------------------------------------------------

KERNELS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "layernorm_forward": (layernorm_forward, layernorm_forward_ref),
    "layernorm_backward": (layernorm_backward, layernorm_backward_ref),
    "gelu_forward": (gelu_forward, gelu_forward_ref),
    "gelu_backward": (gelu_backward, gelu_backward_ref),
    "softmax_xent": (softmax_xent, softmax_xent_ref),
    "causal_softmax_forward": (causal_softmax_forward, causal_softmax_forward_ref),
    "causal_softmax_backward": (causal_softmax_backward, causal_softmax_backward_ref),
    "embedding_backward": (embedding_backward, embedding_backward_ref),
}

#: Kernels whose numba version beat numpy in benchmarks/bench_kernels.py on this project's
#: CPUs (float64, default and paper sizes); the others run their numpy reference on the CPU
#: too. softmax_xent is out: its cost is exp over (n, vocab), where numpy's vectorised exp
#: beats numba's scalar one (0.67x at the paper size, 1.0x at the default).
NUMBA_FASTER: frozenset[str] = frozenset(KERNELS) - {"softmax_xent"}


def kernel(name: str, xp: ModuleType) -> Callable[..., Any]:
    """The implementation of `name` the model runs for arrays of module `xp`."""
    fast, ref = KERNELS[name]
    return fast if xp is np and HAVE_NUMBA and name in NUMBA_FASTER else ref
