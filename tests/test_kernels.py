"""numba kernels agree with their numpy references; the objective tracker with the model."""

import numpy as np

from rpd_mpi.objectives.kernels import shift_prediction, shift_prediction_ref
from rpd_mpi.objectives import build_model


def test_shift_prediction_matches_reference() -> None:
    rng = np.random.default_rng(0)
    cols_t, delta = rng.standard_normal((7, 50)), rng.standard_normal(7)   # X[:, block].T
    p1, w1 = rng.standard_normal(50), rng.standard_normal(7)
    p2, w2 = p1.copy(), w1.copy()
    shift_prediction(cols_t, delta, -0.3, p1, w1)
    shift_prediction_ref(cols_t, delta, -0.3, p2, w2)
    assert np.array_equal(p1, p2) and np.array_equal(w1, w2)      # the same bits


def test_tracker_follows_full_objective() -> None:
    rng = np.random.default_rng(1)
    for name in ("quadratic", "logistic"):
        model = build_model(name, 4, dim=10, examples=20, batch_size=5, seed=2)
        w = rng.standard_normal(10)
        tracker = model.objective_tracker(w)
        for _ in range(50):
            s = int(rng.integers(4))
            delta = rng.standard_normal(model.slices[s].stop - model.slices[s].start)
            tracker.shift(s, delta, 0.1)
            w[model.slices[s]] += 0.1 * delta
        assert abs(tracker.value() - model.full_objective(w)) < 1e-10 * abs(
            model.full_objective(w))
