"""The character-LM numba kernels agree with their array-module references (1e-10, float64),
and `kernel` dispatches numba only for numpy arrays."""

from __future__ import annotations

import types

import numpy as np
import pytest

from rpd_mpi.objectives import kernels_lm as K

TOL = 1e-10


def close(a: object, b: object) -> bool:
    """Arrays/tuples/floats equal to TOL (absolute, on values of order one)."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.abs(a - b).max(initial=0.0) < TOL)


def args_for(name: str, rng: np.random.Generator, n: int, c: int) -> tuple:
    """Random arguments of kernel `name`; n rows of width c (t = c for attention)."""
    x = 2.0 * rng.standard_normal((n, c)) + 0.5
    if name == "layernorm_forward":
        return x, rng.standard_normal(c), rng.standard_normal(c), 1e-5
    if name == "layernorm_backward":
        _, mean, rstd = K.layernorm_forward_ref(x, rng.standard_normal(c), 0.0, 1e-5)
        return rng.standard_normal((n, c)), x, rng.standard_normal(c), mean, rstd
    if name == "gelu_forward":
        return (3.0 * rng.standard_normal(n * c),)
    if name == "gelu_backward":
        return 3.0 * rng.standard_normal(n * c), rng.standard_normal(n * c)
    if name == "softmax_xent":
        return 4.0 * x, rng.integers(c, size=n)
    s = 3.0 * rng.standard_normal((n, c, c))
    if name == "causal_softmax_forward":
        return s, 0.35
    if name == "causal_softmax_backward":
        return K.causal_softmax_forward_ref(s, 0.35), rng.standard_normal((n, c, c)), 0.35
    assert name == "embedding_backward"
    return rng.integers(7, size=n), rng.standard_normal((n, c)), 7


@pytest.mark.parametrize("name", sorted(K.KERNELS))
@pytest.mark.parametrize("n,c", [(1, 1), (3, 5), (40, 32), (7, 65)])
def test_kernel_matches_reference(name: str, n: int, c: int) -> None:
    rng = np.random.default_rng([n, c])
    args = args_for(name, rng, n, c)
    fast, ref = K.KERNELS[name]
    assert close(fast(*args), ref(*args)), name


def test_references_are_correct_on_known_values() -> None:
    """Anchor the references (a shared mistake in kernel and reference must not pass)."""
    loss, g = K.softmax_xent_ref(np.array([[0.0, 0.0], [np.log(3.0), 0.0]]), np.array([0, 1]))
    assert loss == pytest.approx(0.5 * (np.log(2.0) + np.log(4.0)))
    assert np.allclose(g, [[-0.25, 0.25], [0.375, -0.375]])
    att = K.causal_softmax_forward_ref(np.zeros((1, 3, 3)), 1.0)
    assert np.allclose(att[0], [[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]])
    y, mean, rstd = K.layernorm_forward_ref(np.array([[1.0, 3.0]]), np.ones(2), np.zeros(2), 0.0)
    assert np.allclose(y, [[-1.0, 1.0]]) and mean[0] == 2.0 and rstd[0] == 1.0
    assert K.gelu_forward_ref(np.array([0.0]))[0] == 0.0
    assert K.gelu_forward_ref(np.array([10.0]))[0] == pytest.approx(10.0)


def test_causal_softmax_rows_are_causal_distributions() -> None:
    rng = np.random.default_rng(3)
    att = K.causal_softmax_forward(rng.standard_normal((4, 9, 9)), 0.5)
    assert np.allclose(att.sum(axis=-1), 1.0)
    assert not np.triu(att, k=1).any()


def test_dispatch_uses_numba_only_for_numpy() -> None:
    fake_xp = types.ModuleType("cupy_like")
    for name, (fast, ref) in K.KERNELS.items():
        assert K.kernel(name, fake_xp) is ref
        assert K.kernel(name, np) is (fast if name in K.NUMBA_FASTER else ref)
    assert K.array_module(np.zeros(2)) is np


def _as32(args: tuple) -> tuple:
    return tuple(a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float64
                 else a for a in args)


def _close32(a: object, b: object) -> bool:
    """float32 results: the same dtype, equal to 1e-4 relative to the values' scale."""
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_close32(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(b))
    a, b = np.asarray(a), np.asarray(b)
    same = a.dtype == b.dtype and (a.dtype != np.float64)
    scale = max(1.0, float(np.abs(b).max(initial=0.0)))
    return same and a.shape == b.shape and bool(np.abs(a - b).max(initial=0.0) <= 1e-4 * scale)


@pytest.mark.parametrize("name", sorted(K.KERNELS))
def test_float32_kernels_stay_float32_and_match(name: str) -> None:
    """The kernels are compiled for float32 too (numba specialises per dtype) and keep it."""
    rng = np.random.default_rng(5)
    args = _as32(args_for(name, rng, 9, 12))
    fast, ref = K.KERNELS[name]
    got, want = fast(*args), ref(*args)
    assert _close32(got, want), name
    first = got[0] if isinstance(got, tuple) else got
    assert getattr(first, "dtype", np.float32) == np.float32 or isinstance(first, float), name
