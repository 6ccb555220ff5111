"""The speed paths of issue 14 give the same bits as the paths they replace.

- The objective tracker's shift: the numba kernel and its numpy version agree bit for bit on
  every shape, so the tracker may run numpy for its first shifts (a short run never imports
  numba) and numba afterwards.
- engines.fast_linear with one stack of equal-width stages runs a slot in two kernel calls
  (`_sim_close`: terms, updates and the next slot's forwards) and computes the gradient
  norms at the end: it equals the op-by-op engine for every method, with averages, flushes,
  noise and a tracker resync at every position within a slot.
- A tiny `rpd-mpi simulate` process never imports numba.

Data come from the project's own generators.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rpd_mpi.objectives import build_model
from rpd_mpi.objectives.kernels import HAVE_NUMBA, shift_prediction, shift_prediction_ref
from rpd_mpi.objectives.linear import BlockLinearModel, ObjectiveTracker
from rpd_mpi.schedule.generate import generate
from tests.test_fast_sim import METHODS, assert_identical, fast, reference


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 17, 64])
def test_shift_kernel_and_numpy_give_the_same_bits(n: int) -> None:
    rng = np.random.default_rng(n)
    for m in (1, 2, 3, 4, 5, 8, 9, 31, 33, 100):
        cols_t, delta = rng.standard_normal((m, n)), rng.standard_normal(m)
        p, w = rng.standard_normal(n), rng.standard_normal(m)
        p1, w1, p2, w2 = p.copy(), w.copy(), p.copy(), w.copy()
        shift_prediction(cols_t, delta, -0.7, p1, w1)
        shift_prediction_ref(cols_t, delta, -0.7, p2, w2)
        acc = cols_t[0] * delta[0]                # the defined order, written out
        for j in range(1, m):
            acc = acc + cols_t[j] * delta[j]
        assert np.array_equal(p1, p2) and np.array_equal(w1, w2), (m, n)
        assert np.array_equal(p2, p + -0.7 * acc), (m, n)


def test_tracker_switching_to_numba_changes_no_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("logistic", 4, dim=18, examples=24, batch_size=4, seed=1, noise=0.3,
                        partition=(4, 5, 4, 5))      # blocks of 96 and 120 values of X
    tl = generate("pd", 4, 30)
    runs = []
    # numba from the start, after 37 shifts, never, for the blocks over 100 values of X only
    for first, size in ((0, 1 << 20), (37, 1 << 20), (10 ** 9, 1 << 20), (10 ** 9, 100)):
        monkeypatch.setattr(ObjectiveTracker, "NUMPY_SHIFTS", first)
        monkeypatch.setattr(ObjectiveTracker, "NUMPY_SIZE", size)
        runs.append(reference(tl, model, 0.05))
    for other in runs[1:]:
        assert_identical(other, runs[0])


ONE_STACK = [(1, 6), (2, 12), (4, 24), (5, 10)]     # (S, dim): every stage as wide


@pytest.mark.parametrize("method,kw,groups", METHODS)
@pytest.mark.parametrize("name", ["quadratic", "logistic"])
def test_one_stack_path_equals_reference(method: str, kw: dict[str, int], groups: int,
                                         name: str) -> None:
    for S, dim in ONE_STACK:
        model = build_model(name, S, dim=dim, examples=48, batch_size=4, seed=3, noise=0.4)
        tl = generate(method, S, 13, **kw)
        for every in (1, 3):
            assert_identical(fast(tl, model, 0.03, groups=groups, eval_every=every),
                             reference(tl, model, 0.03, groups=groups, eval_every=every))


@pytest.mark.parametrize("resync", [1, 2, 3, 5, 7])
def test_resync_anywhere_in_a_slot(monkeypatch: pytest.MonkeyPatch, resync: int) -> None:
    """A small resync period puts the tracker's re-synchronisation at the first, a middle and
    the last update of slots, with and without the next slot's forwards waiting on it."""
    def tracker(self: BlockLinearModel, w: np.ndarray) -> ObjectiveTracker:
        return ObjectiveTracker(self, w, resync=resync)

    monkeypatch.setattr(BlockLinearModel, "objective_tracker", tracker)
    for method, kw, groups in METHODS:
        for S, dim in ((4, 24), (4, 23)):            # one stack, two stacks
            model = build_model("logistic", S, dim=dim, examples=40, batch_size=4, seed=5,
                                noise=0.2)
            tl = generate(method, S, 11, **kw)
            assert_identical(fast(tl, model, 0.04, groups=groups),
                             reference(tl, model, 0.04, groups=groups))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("S,dim", [(4, 16), (4, 23)])
def test_divergence_with_norms_checked_at_the_end_falls_back(S: int, dim: int) -> None:
    """The norms are checked at the end of the run: a run that blows up between objective
    evaluations still gives None (the reference reruns it and records the divergence)."""
    model = build_model("quadratic", S, dim=dim, examples=40, batch_size=4, seed=4)
    tl = generate("pd", S, 200)
    assert reference(tl, model, 50.0, eval_every=10 ** 6).divergence is not None
    assert fast(tl, model, 50.0, eval_every=10 ** 6) is None


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is what the check is about")
def test_tiny_simulate_never_imports_numba(tmp_path: Path) -> None:
    code = ("import sys\nfrom rpd_mpi.entry import main\n"
            f"code = main(['simulate', '--out', {str(tmp_path / 't.h5')!r}, '--quiet'])\n"
            "assert code == 0, code\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
