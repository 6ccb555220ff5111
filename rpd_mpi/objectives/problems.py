"""Data for the block-linear toy objectives: generation, loading, f* and smoothness L.

Owns the three problem generators (random quadratic, tridiagonal "Nesterov worst-case"
quadratic, logistic regression), validation of user-supplied data, the least-squares and
Newton solvers that give f*, and the smoothness constant L. Pure numpy, no file I/O:
`rpd_mpi.objectives.linear` turns a `Problem` into a pipelined model.

Losses (mean over the n rows of X, prediction p = X w):
    squares:  f(w) = (1/2n) ||X w - y||^2
    logistic: f(w) = (1/n) sum softplus(p_i) - y_i p_i  +  (lam/2) ||w||^2
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np

#: Problem name -> loss kind; the keys are the names `build_model` accepts.
LOSS_KIND: dict[str, str] = {"quadratic": "squares", "tridiag": "squares",
                             "logistic": "logistic"}


@dataclass(frozen=True)
class Problem:
    """A data set (X, y) plus what is known about its optimum."""

    X: np.ndarray
    y: np.ndarray
    w_true: np.ndarray | None
    f_star: float | None
    w_star: np.ndarray | None = None


def tridiag_hessian(dim: int, mu: float) -> np.ndarray:
    """A = tridiag(-1, 2, -1) + mu I, the (dim x dim) Nesterov worst-case Hessian."""
    A = np.diag(np.full(dim, 2.0 + mu))
    off = np.arange(dim - 1)
    A[off, off + 1] = -1.0
    A[off + 1, off] = -1.0
    return A


def make_quadratic(dim: int, examples: int, seed: int, mu: float, lam: float) -> Problem:
    """Random quadratic: X, w_true ~ N(0, 1), y = X w_true, f* = 0."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((examples, dim))
    w_true = rng.standard_normal(dim)
    return Problem(X, X @ w_true, w_true, 0.0)


def make_tridiag(dim: int, examples: int, seed: int, mu: float, lam: float) -> Problem:
    """Tridiagonal quadratic: X = sqrt(n) Q R with X^T X / n = A exactly, y = X w_true."""
    if examples < dim:
        raise ValueError(f"tridiag needs examples >= dim so that X^T X / n can equal A; "
                         f"got examples={examples}, dim={dim}")
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((examples, dim)))
    w_true = rng.standard_normal(dim)
    R = np.linalg.cholesky(tridiag_hessian(dim, mu)).T
    X = np.sqrt(examples) * (Q @ R)
    return Problem(X, X @ w_true, w_true, 0.0)


def logistic_labels(rng: np.random.Generator, X: np.ndarray, w_true: np.ndarray
                    ) -> np.ndarray:
    """y = binomial(1, sigmoid(X w_true)) drawn from `rng`, stored as float32 values (the
    paper's code: `rng.binomial(1, 1 / (1 + exp(-X @ w_true))).astype(np.float32)`), returned
    as float64 (0.0 and 1.0 are exact in both)."""
    p = 1.0 / (1.0 + np.exp(-(X @ w_true)))
    y: np.ndarray = rng.binomial(1, p).astype(np.float32).astype(np.float64)
    return y


def make_logistic(dim: int, examples: int, seed: int, mu: float, lam: float) -> Problem:
    """Logistic regression as in the paper's code: from one generator seeded with `seed`,
    X = standard normal (n x d), then w_true = standard normal (d), then the labels
    y = binomial(1, sigmoid(X w_true)) (`logistic_labels`); f* by Newton's method.

    (Before 2026-12-02 the labels were `uniform < sigmoid(X w)`: 98 % the same labels at
    seed 0, a different f*. That draw is gone; a logistic ledger written before then is not
    reproduced when its configuration is run again.)"""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((examples, dim))
    w_true = rng.standard_normal(dim)
    y = logistic_labels(rng, X, w_true)
    w_star, f_star = solve_logistic(X, y, lam)
    return Problem(X, y, w_true, f_star, w_star)


_GENERATORS: dict[str, Callable[[int, int, int, float, float], Problem]] = {
    "quadratic": make_quadratic, "tridiag": make_tridiag, "logistic": make_logistic,
}


def generate_problem(name: str, dim: int, examples: int, seed: int,
                     mu: float, lam: float) -> Problem:
    """Generate the named problem from `seed` (see the module docstring)."""
    return _GENERATORS[name](dim, examples, seed, mu, lam)


@functools.lru_cache(maxsize=4)
def shared_problem(name: str, dim: int, examples: int, seed: int, mu: float, lam: float
                   ) -> Problem:
    """`generate_problem`, kept for the next call with the same arguments (runs that share
    one data set: seeds of a sweep; forked workers inherit it). The arrays are shared: read
    them, never write (`load_problem` copies them)."""
    return generate_problem(name, dim, examples, seed, mu, lam)


def problem_arrays(problem: Problem) -> dict[str, np.ndarray]:
    """A generated problem as the arrays of a data file ({X, y, w_true, f_star}), so that
    `load_problem` takes it back unchanged (f* is not solved again)."""
    arrays = {"X": problem.X, "y": problem.y}
    if problem.w_true is not None:
        arrays["w_true"] = problem.w_true
    if problem.f_star is not None:
        arrays["f_star"] = np.array(problem.f_star)
    return arrays


def least_squares_value(X: np.ndarray, y: np.ndarray) -> float:
    """min_w (1/2n) ||X w - y||^2, via np.linalg.lstsq."""
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    r = X @ w - y
    n: int = X.shape[0]
    return 0.5 * float(r @ r) / n


def logistic_value_grad(X: np.ndarray, y: np.ndarray, lam: float,
                        w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(f(w), grad f(w), sigmoid(X w)) of the regularised mean logistic loss."""
    n = X.shape[0]
    p = X @ w
    sp = np.logaddexp(0.0, p)
    f = (float(sp.sum()) - float(y @ p)) / n + 0.5 * lam * float(w @ w)
    sig = np.exp(p - sp)
    return f, (sig - y) @ X / n + lam * w, sig


def _newton_direction(X: np.ndarray, sig: np.ndarray, lam: float,
                      g: np.ndarray) -> np.ndarray:
    """Solve (X^T diag(s) X / n + lam I) dx = -g with s = sig (1 - sig)."""
    Xs = X * np.sqrt(sig * (1.0 - sig) / X.shape[0])[:, None]
    H = Xs.T @ Xs
    H[np.diag_indices_from(H)] += lam
    try:
        return np.linalg.solve(H, -g)
    except np.linalg.LinAlgError as err:
        raise ValueError("logistic f*: singular Hessian (lam = 0 on separable data has no "
                         "minimiser); use lam > 0 or give f_star with the data") from err


def _line_search(X: np.ndarray, y: np.ndarray, lam: float, w: np.ndarray, f: float,
                 slope: float, dx: np.ndarray) -> np.ndarray:
    """Backtracking (Armijo) step along dx; a full step once the decrease is at rounding."""
    if -slope <= 1e-13 * (1.0 + abs(f)):
        full: np.ndarray = w + dx
        return full
    t = 1.0
    for _ in range(60):
        w_new = w + t * dx
        if logistic_value_grad(X, y, lam, w_new)[0] <= f + 1e-4 * t * slope:
            return w_new
        t *= 0.5
    return w


def solve_logistic(X: np.ndarray, y: np.ndarray, lam: float, *, gtol: float = 1e-11,
                   max_iter: int = 200) -> tuple[np.ndarray, float]:
    """Minimise the regularised logistic loss by damped Newton; returns (w*, f*).

    Stops when ||grad|| <= gtol * max(1, ||grad(0)||) or when a step no longer moves w
    (the floating-point floor). Raises ValueError if neither happens in `max_iter` steps.
    """
    w = np.zeros(X.shape[1])
    f, g, sig = logistic_value_grad(X, y, lam, w)
    tol = gtol * max(1.0, float(np.linalg.norm(g)))
    for _ in range(max_iter):
        if float(np.linalg.norm(g)) <= tol:
            return w, f
        dx = _newton_direction(X, sig, lam, g)
        w_new = _line_search(X, y, lam, w, f, float(g @ dx), dx)
        if np.array_equal(w_new, w):
            return w, f
        w = w_new
        f, g, sig = logistic_value_grad(X, y, lam, w)
    raise ValueError(f"logistic f*: Newton did not converge in {max_iter} steps "
                     f"(||grad|| = {np.linalg.norm(g):.3e}); use lam > 0 or give f_star")


def smoothness(X: np.ndarray, kind: str, lam: float) -> float:
    """L of the full objective: lmax(X^T X / n), times 1/4 plus lam for logistic.

    Uses the smaller Gram matrix (X^T X or X X^T: same nonzero spectrum); beyond 1024 x 1024
    a power iteration (relative change < 1e-12) instead of a full eigendecomposition."""
    n, d = X.shape
    gram = X.T @ X / n if d <= n else X @ X.T / n
    if gram.shape[0] <= 1024:
        lmax = float(np.linalg.eigvalsh(gram)[-1])
    else:
        lmax = _power_lmax(gram)
    return 0.25 * lmax + lam if kind == "logistic" else lmax


def _power_lmax(gram: np.ndarray, iters: int = 2000) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration."""
    n: int = gram.shape[0]
    v = np.random.default_rng(0).standard_normal(n)
    lam = 0.0
    for _ in range(iters):
        u = gram @ v
        new = float(np.linalg.norm(u))
        v = u / new
        if abs(new - lam) <= 1e-12 * new:
            break
        lam = new
    return new


def _float_array(data: dict[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    """data[key] as a fresh C-contiguous float64 array of `ndim` dims with finite values."""
    arr = np.array(data[key], dtype=np.float64, order="C", copy=True)
    if arr.ndim != ndim:
        raise ValueError(f"data[{key!r}] must be {ndim}-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"data[{key!r}] contains non-finite values")
    return arr


def _f_star(value: np.ndarray) -> float:
    """A given f* must be one finite number (a 0-d or one-element array)."""
    arr = np.asarray(value)
    if arr.size != 1 or arr.ndim > 1 or arr.dtype.kind not in "iuf":
        raise ValueError(f"data['f_star'] must be one number (0-d), got shape {arr.shape} "
                         f"and dtype {arr.dtype}")
    f_star = float(arr.reshape(()))
    if not np.isfinite(f_star):
        raise ValueError(f"data['f_star'] must be finite, got {f_star}")
    return f_star


def load_problem(name: str, data: dict[str, np.ndarray], lam: float) -> Problem:
    """Validate user data {X, y[, w_true, f_star]}; compute f* when it is not given."""
    missing = [key for key in ("X", "y") if key not in data]
    if missing:
        raise ValueError(f"data is missing {missing}; it needs 'X' (n x d) and 'y' (n,)")
    X, y = _float_array(data, "X", 2), _float_array(data, "y", 1)
    n, d = X.shape
    if n == 0 or d == 0 or y.shape != (n,):
        raise ValueError(f"data: X has shape {X.shape} and y {y.shape}; need X (n x d), "
                         f"y (n,), n, d >= 1")
    if LOSS_KIND[name] == "logistic" and (y.min() < 0.0 or y.max() > 1.0):
        raise ValueError("data: logistic labels y must lie in [0, 1]")
    w_true = _float_array(data, "w_true", 1) if "w_true" in data else None
    if w_true is not None and w_true.shape != (d,):
        raise ValueError(f"data['w_true'] has shape {w_true.shape}, expected ({d},)")
    if "f_star" in data:
        return Problem(X, y, w_true, _f_star(data["f_star"]))
    if LOSS_KIND[name] == "logistic":
        w_star, f_star = solve_logistic(X, y, lam)
        return Problem(X, y, w_true, f_star, w_star)
    return Problem(X, y, w_true, least_squares_value(X, y))
