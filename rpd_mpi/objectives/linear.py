"""Block-linear models (the paper's toys) split into pipeline stages.

Owns `build_model`, `BlockLinearModel` (full objective/gradient, f*, L, block slices) and
`StageModule` (one per pipeline group and stage: forward, backward, last-stage loss and the
stage's gradient-noise generator). Stage s adds X_b[:, slice_s] @ w_s to the running
prediction; the last stage applies the loss; backward passes the prediction gradient on
unchanged. Data generation and f* live in `rpd_mpi.objectives.problems`. Pure numpy.

Shared arrays (X, y and their per-stage/per-batch views) are read-only and shared by every
stage module. `full_objective` reuses internal buffers, so it is not thread-safe.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rpd_mpi.objectives.kernels import shift_prediction, shift_prediction_ref
from rpd_mpi.objectives.partition import check_partition
from rpd_mpi.objectives.problems import (LOSS_KIND, Problem, generate_problem, load_problem,
                                         smoothness)


def _squares_batch(p: np.ndarray, y: np.ndarray, inv_b: float) -> tuple[float, np.ndarray]:
    """Batch loss 0.5 mean((p - y)^2) and its gradient (p - y) / b."""
    r = p - y
    loss = 0.5 * float(r @ r) * inv_b
    r *= inv_b
    return loss, r


def _logistic_batch(p: np.ndarray, y: np.ndarray, inv_b: float) -> tuple[float, np.ndarray]:
    """Batch loss mean(softplus(p) - y p) and its gradient (sigmoid(p) - y) / b."""
    sp = np.logaddexp(0.0, p)
    loss = (float(sp.sum()) - float(y @ p)) * inv_b
    g = np.exp(p - sp)  # sigmoid(p), stable: p - softplus(p) = -softplus(-p)
    g -= y
    g *= inv_b
    return loss, g


_BATCH_LOSS = {"squares": _squares_batch, "logistic": _logistic_batch}


def block_slices(dim: int, stages: int, counts: Sequence[int] | None = None) -> list[slice]:
    """`stages` contiguous slices of range(dim), sizes dim // stages, remainder first, or
    the sizes `counts` (--partition; ValueError unless `stages` of them >= 1 sum to dim)."""
    base, extra = divmod(dim, stages)
    if counts:
        check_partition(counts, dim, stages)
    sizes = list(counts) if counts else [base + (s < extra) for s in range(stages)]
    bounds = np.cumsum([0] + sizes)
    return [slice(int(bounds[s]), int(bounds[s + 1])) for s in range(stages)]


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


class StageModule:
    """Stage s of one pipeline group: forward/backward on its block, loss on the last stage.

    `batch` is the batch index i (rows [i b, (i + 1) b)). Gradients returned by backward
    carry Gaussian noise of std `noise` drawn from this module's own generator.
    """

    def __init__(self, model: BlockLinearModel, s: int, group: int) -> None:
        self.stage = s
        self.group = group
        self.slice = model.slices[s]
        self.size = self.slice.stop - self.slice.start
        self.is_last = s == model.stages - 1
        self.rng = np.random.default_rng([model.seed, group, s])
        self._xb = model._batch_cols[s]
        self._yb = model._batch_y
        self._inv_b = 1.0 / model.batch_size
        self._lam = model.lam
        self._noise = model.noise
        self._batch_loss = _BATCH_LOSS[model.kind]

    def forward(self, w_s: np.ndarray, a_in: np.ndarray | None,
                batch: int) -> tuple[np.ndarray, None]:
        """a_out = a_in + X_b[:, slice_s] @ w_s (a new array; a_in None means zeros)."""
        a_out = self._xb[batch] @ w_s
        if a_in is not None:
            a_out += a_in
        return a_out, None

    def backward(self, w_s: np.ndarray, cache: None, g_out: np.ndarray,
                 batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(X_b[:, slice_s]^T g_out [+ lam w_s] [+ noise], g_out unchanged)."""
        g_w = g_out @ self._xb[batch]
        if self._lam:
            g_w += self._lam * w_s
        if self._noise:
            g_w += self._noise * self.rng.standard_normal(self.size)
        return g_w, g_out

    def loss(self, a_out: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
        """(mean batch loss without the regulariser, d loss / d prediction)."""
        return self._batch_loss(a_out, self._yb[batch], self._inv_b)


class BlockLinearModel:
    """A block-linear objective on (X, y) with w split into `stages` contiguous blocks."""

    examples: int   # rows of X
    dim: int        # columns of X

    def __init__(self, name: str, problem: Problem, *, stages: int, batch_size: int,
                 seed: int, noise: float, lam: float,
                 partition: Sequence[int] | None = None) -> None:
        self.name = name
        self.kind = LOSS_KIND[name]
        self.X = _readonly(problem.X)
        self.y = _readonly(problem.y)
        self.examples, self.dim = self.X.shape
        self.stages, self.batch_size, self.seed = stages, batch_size, seed
        self.num_batches = self.examples // batch_size
        self.noise = float(noise)
        self.lam = float(lam) if self.kind == "logistic" else 0.0
        self.w_true = problem.w_true
        self.f_star = problem.f_star
        self.L = smoothness(self.X, self.kind, self.lam)
        self.slices = block_slices(self.dim, stages, partition)
        self.partition = tuple(sl.stop - sl.start for sl in self.slices)
        self._cols = [np.ascontiguousarray(self.X[:, sl]) for sl in self.slices]
        self._cols_t = [np.ascontiguousarray(cols.T) for cols in self._cols]   # the tracker's
        self._batch_cols = [self._split_rows(cols) for cols in self._cols]
        self._batch_y = self._split_rows(self.y)
        self._pred = np.empty(self.examples)
        self._scratch = np.empty(self.examples)

    def _split_rows(self, arr: np.ndarray) -> list[np.ndarray]:
        """Read-only row views arr[i b:(i + 1) b] for every batch i."""
        b = self.batch_size
        return [_readonly(arr[i * b:(i + 1) * b]) for i in range(self.num_batches)]

    def init_weights(self) -> np.ndarray:
        """The full weight vector zeros(d); blocks are the views w[slices[s]]."""
        return np.zeros(self.dim)

    def make_stage(self, s: int, group: int = 0) -> StageModule:
        """The stage module of pipeline group `group`, stage `s`."""
        if not 0 <= s < self.stages:
            raise ValueError(f"stage must be in [0, {self.stages}), got {s}")
        return StageModule(self, s, group)

    def full_objective(self, w: np.ndarray) -> float:
        """Mean loss over all n rows at the full vector w (+ (lam/2)||w||^2, logistic)."""
        p = np.matmul(self.X, w, out=self._pred)
        inv_n = 1.0 / self.examples
        if self.kind == "squares":
            p -= self.y
            return 0.5 * float(p @ p) * inv_n
        sp = np.logaddexp(0.0, p, out=self._scratch)
        data = (float(sp.sum()) - float(self.y @ p)) * inv_n
        return data + 0.5 * self.lam * float(w @ w)

    def activation_shape(self, s: int) -> tuple[int, ...]:
        """Shape of the activation stage s sends on (and of the gradient it receives back)."""
        return (self.batch_size,)

    def objective_tracker(self, w: np.ndarray) -> "ObjectiveTracker":
        """An incremental evaluator of `full_objective` along a moving w (see below)."""
        return ObjectiveTracker(self, w)

    def full_gradient(self, w: np.ndarray) -> np.ndarray:
        """Gradient of `full_objective` at w, shape (d,)."""
        p = self.X @ w
        if self.kind == "logistic":
            p = np.exp(p - np.logaddexp(0.0, p))
        p -= self.y
        g: np.ndarray = p @ self.X
        g *= 1.0 / self.examples
        if self.lam:
            g += self.lam * w
        return g


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value}")


def _validate(name: str, stages: int, batch_size: int, noise: float, mu: float,
              lam: float) -> None:
    """Argument checks that do not need the data."""
    if name not in LOSS_KIND:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(LOSS_KIND)}")
    _check_positive(stages=stages, batch_size=batch_size)
    for key, value in {"noise": noise, "mu": mu, "lam": lam}.items():
        if not value >= 0:
            raise ValueError(f"{key} must be >= 0, got {value}")


def _validate_shape(stages: int, batch_size: int, dim: int, examples: int) -> None:
    """Checks that tie stages and batch_size to the data shape."""
    if stages > dim:
        raise ValueError(f"stages ({stages}) must not exceed dim ({dim})")
    if examples % batch_size:
        raise ValueError(f"batch_size ({batch_size}) must divide examples ({examples})")


def build_model(name: str, stages: int, *, dim: int, examples: int, batch_size: int,
                seed: int, noise: float = 0.0, mu: float = 0.01, lam: float = 1e-4,
                data: dict[str, np.ndarray] | None = None,
                partition: Sequence[int] | None = None) -> BlockLinearModel:
    """Build the named block-linear model ("quadratic", "tridiag", "logistic").

    With `data` ({"X", "y"[, "w_true", "f_star"]}) the shape comes from X and `dim` and
    `examples` are ignored; otherwise the problem is generated from `seed`. `partition`:
    the coordinates of each stage (None: as equal as possible).
    """
    _validate(name, stages, batch_size, noise, mu, lam)
    if data is None:
        _check_positive(dim=dim, examples=examples)
        _validate_shape(stages, batch_size, dim, examples)
        problem = generate_problem(name, dim, examples, seed, mu, lam)
    else:
        problem = load_problem(name, data, lam)
        _validate_shape(stages, batch_size, problem.X.shape[1], problem.X.shape[0])
    return BlockLinearModel(name, problem, stages=stages, batch_size=batch_size,
                            seed=seed, noise=noise, lam=lam, partition=partition)


class ObjectiveTracker:
    """`full_objective` along a trajectory of w that changes one block at a time.

    Keeps the prediction p = X w and updates it with the changed block's columns only
    (n x d_s instead of n x d per evaluation); re-synchronises exactly every `resync` shifts
    so rounding cannot drift. The first `NUMPY_SHIFTS` shifts of blocks of at most
    `NUMPY_SIZE` values of X run the kernel's numpy version (the same bits; it holds an
    n x d_s temporary), so a short run never imports numba (~0.3 s with loading the kernel).
    """

    NUMPY_SHIFTS = 4096
    NUMPY_SIZE = 1 << 20

    def __init__(self, model: BlockLinearModel, w: np.ndarray, resync: int = 4096) -> None:
        self.model, self.w = model, np.array(w, dtype=float)
        self.p = model.X @ self.w
        self.blocks = [self.w[sl] for sl in model.slices]
        self.resync, self.shifts = resync, 0

    def shift(self, s: int, delta: np.ndarray, scale: float = 1.0) -> None:
        """w[slice_s] += scale * delta."""
        cols_t = self.model._cols_t[s]
        shift = shift_prediction_ref if self.shifts < self.NUMPY_SHIFTS and \
            cols_t.size <= self.NUMPY_SIZE else shift_prediction
        shift(cols_t, delta, scale, self.p, self.blocks[s])
        self.shifts += 1
        if self.shifts % self.resync == 0:
            np.matmul(self.model.X, self.w, out=self.p)

    def value(self) -> float:
        """full_objective(w) from the tracked prediction."""
        m, inv_n = self.model, 1.0 / self.model.examples
        if m.kind == "squares":
            r = self.p - m.y
            return 0.5 * float(r @ r) * inv_n
        data = (float(np.logaddexp(0.0, self.p).sum()) - float(m.y @ self.p)) * inv_n
        return data + 0.5 * m.lam * float(self.w @ self.w)
