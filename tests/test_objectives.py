"""Pure tests of the block-linear objectives: gradients, f*, L, slices, noise and data."""

from __future__ import annotations

import numpy as np
import pytest

from rpd_mpi.objectives import BlockLinearModel, build_model
from rpd_mpi.objectives.linear import StageModule, block_slices
from rpd_mpi.objectives.problems import make_logistic, solve_logistic, tridiag_hessian

NAMES = ["quadratic", "tridiag", "logistic"]
SMALL = dict(dim=10, examples=20, batch_size=5, seed=3)


def small(name: str, stages: int = 3, **kw: float) -> BlockLinearModel:
    return build_model(name, stages, **{**SMALL, **kw})


def random_w(model: BlockLinearModel, seed: int = 7) -> np.ndarray:
    return 0.3 * np.random.default_rng(seed).standard_normal(model.dim)


def pipeline(model: BlockLinearModel, stages: list[StageModule], w: np.ndarray,
             batch: int) -> tuple[float, list[np.ndarray]]:
    """Forward through all stages, loss, backward; returns (batch loss, block gradients)."""
    a, caches = None, []
    for st in stages:
        a, cache = st.forward(w[st.slice], a, batch)
        caches.append(cache)
    loss, g = stages[-1].loss(a, batch)
    grads: list[np.ndarray] = [np.empty(0)] * len(stages)
    for st in reversed(stages):
        grads[st.stage], g = st.backward(w[st.slice], caches[st.stage], g, batch)
    return loss, grads


def stages_of(model: BlockLinearModel, group: int = 0) -> list[StageModule]:
    return [model.make_stage(s, group) for s in range(model.stages)]


def regularised_batch_loss(model: BlockLinearModel, w: np.ndarray, batch: int) -> float:
    loss = pipeline(model, stages_of(model), w, batch)[0]
    return loss + 0.5 * model.lam * float(w @ w)


def central_diff(fun, w: np.ndarray, h: float = 1e-6) -> np.ndarray:
    grad = np.empty_like(w)
    for j in range(w.size):
        e = np.zeros_like(w)
        e[j] = h
        grad[j] = (fun(w + e) - fun(w - e)) / (2 * h)
    return grad


@pytest.mark.parametrize("name", NAMES)
def test_block_gradients_match_finite_differences(name: str) -> None:
    model = small(name)
    w = random_w(model)
    for batch in range(model.num_batches):
        _, grads = pipeline(model, stages_of(model), w, batch)
        fd = central_diff(lambda v: regularised_batch_loss(model, v, batch), w)
        for s, sl in enumerate(model.slices):
            np.testing.assert_allclose(grads[s], fd[sl], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_full_gradient_matches_finite_differences(name: str) -> None:
    model = small(name)
    w = random_w(model)
    fd = central_diff(model.full_objective, w)
    np.testing.assert_allclose(model.full_gradient(w), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_batch_gradients_average_to_full_gradient(name: str) -> None:
    model = small(name)
    w = random_w(model)
    stages = stages_of(model)
    total = np.zeros(model.dim)
    for batch in range(model.num_batches):
        grads = pipeline(model, stages, w, batch)[1]
        total += np.concatenate(grads)
    np.testing.assert_allclose(total / model.num_batches, model.full_gradient(w),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_full_objective_is_mean_of_batch_losses(name: str) -> None:
    model = small(name)
    for seed in (1, 2):  # twice: the internal buffers must not leak between calls
        w = random_w(model, seed)
        stages = stages_of(model)
        losses = [pipeline(model, stages, w, i)[0] for i in range(model.num_batches)]
        expected = np.mean(losses) + 0.5 * model.lam * float(w @ w)
        assert model.full_objective(w) == pytest.approx(expected, rel=1e-13)


def test_squares_objective_formula() -> None:
    model = small("quadratic")
    w = random_w(model)
    r = model.X @ w - model.y
    assert model.full_objective(w) == pytest.approx(0.5 * (r @ r) / model.examples,
                                                    rel=1e-13)


def test_logistic_loss_is_stable_for_large_predictions() -> None:
    model = small("logistic", stages=1, batch_size=20)
    st = model.make_stage(0)
    p = np.linspace(-800.0, 800.0, 20)
    loss, g = st.loss(p, 0)
    y = model.y
    expected = np.mean(np.maximum(p, 0.0) - y * p)  # softplus(p) = max(p, 0) here
    assert np.isfinite(loss) and loss == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(g, ((p > 0) - y) / 20, rtol=0, atol=1e-15)


def test_logistic_f_star_is_the_newton_optimum() -> None:
    model = small("logistic")
    w_star, f_star = solve_logistic(model.X, model.y, model.lam)
    assert f_star == model.f_star
    assert np.linalg.norm(model.full_gradient(w_star)) < 1e-8
    assert model.full_objective(w_star) == pytest.approx(f_star, rel=1e-14)
    assert f_star <= model.full_objective(model.w_true)
    assert f_star <= model.full_objective(model.init_weights())


def test_logistic_f_star_at_benchmark_size() -> None:
    problem = make_logistic(512, 600, 0, 0.01, 1e-4)
    model = build_model("logistic", 16, dim=512, examples=600, batch_size=5, seed=0)
    assert model.f_star == problem.f_star
    assert np.linalg.norm(model.full_gradient(problem.w_star)) < 1e-8
    assert 0.0 < model.f_star < model.full_objective(model.w_true)


def test_tridiag_hessian_is_exact() -> None:
    model = small("tridiag", mu=0.05)
    A = tridiag_hessian(model.dim, 0.05)
    assert A[0, 0] == 2.05 and A[0, 1] == -1.0 and A[1, 0] == -1.0 and A[0, 2] == 0.0
    np.testing.assert_allclose(model.X.T @ model.X / model.examples, A, rtol=0, atol=1e-10)
    assert model.f_star == 0.0
    assert model.full_objective(model.w_true) < 1e-20
    assert model.L == pytest.approx(np.linalg.eigvalsh(A)[-1], rel=1e-10)


def test_tridiag_batches_mix_rows() -> None:
    model = small("tridiag")
    first = model.X[:model.batch_size]
    assert np.count_nonzero(np.abs(first) > 1e-12) == first.size


def test_quadratic_optimum_and_smoothness() -> None:
    model = small("quadratic")
    assert model.f_star == 0.0
    assert model.full_objective(model.w_true) < 1e-20
    assert model.L == pytest.approx(np.linalg.norm(model.X, 2) ** 2 / model.examples,
                                    rel=1e-10)


def test_logistic_smoothness() -> None:
    model = small("logistic", lam=1e-3)
    lmax = np.linalg.norm(model.X, 2) ** 2 / model.examples
    assert model.L == pytest.approx(0.25 * lmax + 1e-3, rel=1e-10)


def test_slices_give_the_remainder_to_the_first_blocks() -> None:
    assert [(s.start, s.stop) for s in block_slices(10, 4)] == [(0, 3), (3, 6), (6, 8),
                                                                (8, 10)]
    assert [s.stop - s.start for s in block_slices(7, 7)] == [1] * 7
    model = small("quadratic", stages=4)
    assert [s.stop - s.start for s in model.slices] == [3, 3, 2, 2]
    assert model.num_batches == 4 and model.examples == 20 and model.dim == 10


def test_init_weights_and_forward_do_not_alias() -> None:
    model = small("quadratic")
    w = model.init_weights()
    assert w.dtype == np.float64 and w.shape == (10,) and not w.any()
    st = model.make_stage(1)
    a_in = np.arange(5.0)
    a_out, _ = st.forward(random_w(model)[st.slice], a_in, 2)
    assert a_out is not a_in
    np.testing.assert_array_equal(a_in, np.arange(5.0))
    cols = model.X[10:15, st.slice]
    np.testing.assert_allclose(a_out, a_in + cols @ random_w(model)[st.slice], rtol=1e-14)


def test_noiseless_backward_is_exact() -> None:
    model = small("quadratic")
    st = model.make_stage(2)
    g_out = np.random.default_rng(0).standard_normal(5)
    g_w, g_in = st.backward(random_w(model)[st.slice], None, g_out, 1)
    np.testing.assert_array_equal(g_in, g_out)
    np.testing.assert_allclose(g_w, model.X[5:10, st.slice].T @ g_out, rtol=1e-14)


@pytest.mark.parametrize("name", ["quadratic", "logistic"])
def test_noise_is_seeded_per_group_and_stage(name: str) -> None:
    clean, noisy = small(name), small(name, noise=0.5)
    w = random_w(clean)
    exact = pipeline(clean, stages_of(clean), w, 1)[1]
    first = pipeline(noisy, stages_of(noisy, group=2), w, 1)[1]
    again = pipeline(noisy, stages_of(noisy, group=2), w, 1)[1]
    other = pipeline(noisy, stages_of(noisy, group=3), w, 1)[1]
    for s, sl in enumerate(noisy.slices):
        np.testing.assert_array_equal(first[s], again[s])
        assert not np.allclose(first[s], other[s])
        draw = np.random.default_rng([SMALL["seed"], 2, s]).standard_normal(sl.stop - sl.start)
        np.testing.assert_allclose(first[s], exact[s] + 0.5 * draw, rtol=1e-12, atol=1e-14)


def test_noise_draws_follow_call_order() -> None:
    model = small("quadratic", noise=1.0)
    st, ref = model.make_stage(0), model.make_stage(0)
    w_s, g = np.zeros(4), np.zeros(5)
    first, second = st.backward(w_s, None, g, 0)[0], st.backward(w_s, None, g, 0)[0]
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.concatenate([first, second]),
                                  np.concatenate([ref.rng.standard_normal(4),
                                                  ref.rng.standard_normal(4)]))


def test_data_path_uses_given_arrays() -> None:
    rng = np.random.default_rng(11)
    X, y = rng.standard_normal((12, 6)), rng.standard_normal(12)
    model = build_model("quadratic", 2, dim=999, examples=999, batch_size=4, seed=0,
                        data={"X": X, "y": y})
    assert (model.dim, model.examples, model.num_batches) == (6, 12, 3)
    np.testing.assert_array_equal(model.X, X)
    assert model.w_true is None
    w_ls = np.linalg.solve(X.T @ X, X.T @ y)
    assert model.f_star == pytest.approx(model.full_objective(w_ls), rel=1e-10)
    assert model.f_star > 0.0


def test_data_path_passes_w_true_and_f_star_through() -> None:
    rng = np.random.default_rng(12)
    X = rng.standard_normal((8, 4))
    w_true = rng.standard_normal(4)
    model = build_model("tridiag", 4, dim=1, examples=1, batch_size=2, seed=0,
                        data={"X": X, "y": X @ w_true, "w_true": w_true,
                              "f_star": np.array(0.25)})
    assert model.f_star == 0.25
    np.testing.assert_array_equal(model.w_true, w_true)


def test_data_path_logistic_solves_for_f_star() -> None:
    source = small("logistic")
    model = build_model("logistic", 2, dim=1, examples=1, batch_size=10, seed=0,
                        data={"X": source.X, "y": source.y})
    assert model.f_star == pytest.approx(source.f_star, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="ridge"), "unknown model"),
    (dict(batch_size=3), "must divide"),
    (dict(stages=11), "must not exceed dim"),
    (dict(stages=0), "stages must be > 0"),
    (dict(noise=-1.0), "noise must be >= 0"),
    (dict(name="tridiag", examples=5, batch_size=5), "examples >= dim"),
])
def test_build_model_rejects_nonsense(kwargs: dict, match: str) -> None:
    args = {"name": "quadratic", "stages": 3, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(args.pop("name"), args.pop("stages"), **args)


@pytest.mark.parametrize("data, match", [
    ({"X": np.ones((6, 3)), "y": np.ones(5)}, "shape"),
    ({"X": np.ones(6), "y": np.ones(6)}, "2-D"),
    ({"y": np.ones(6)}, "missing"),
    ({"X": np.ones((6, 3)), "y": np.ones(6), "w_true": np.ones(4)}, "w_true"),
])
def test_build_model_rejects_bad_data(data: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model("quadratic", 1, dim=3, examples=6, batch_size=2, seed=0, data=data)


def test_logistic_data_rejects_labels_outside_unit_interval() -> None:
    data = {"X": np.ones((4, 2)), "y": np.array([0.0, 1.0, 2.0, 0.0])}
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        build_model("logistic", 1, dim=2, examples=4, batch_size=2, seed=0, data=data)
