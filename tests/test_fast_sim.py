"""The slot-at-a-time block-linear simulator (engines.fast_linear) equals the op-by-op engine
(engines.sim._Engine) exactly: weights, every update column, the objective, the events; for
PD, LocalSGD (1 and 2 groups), GPipe and naive, with gradient noise. `sim.simulate` uses it;
it declines (the reference runs) where it does not apply, including on divergence.

Data come from the project's own generators (whatever they draw), never from fixed values.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest

import rpd_mpi.engines.sim as sim
from rpd_mpi import signals
from rpd_mpi.engines.fast_linear import MIN_UPDATES, simulate_linear
from rpd_mpi.objectives import build_model
from rpd_mpi.objectives.charlm import build_charlm
from rpd_mpi.records import Trace
from rpd_mpi.schedule.generate import generate

UPDATE_COLUMNS = ("stage", "group", "trajectory", "microbatch", "batch", "version",
                  "local_staleness", "delays", "loss", "grad_norm", "time")


def reference(*args: object, **kw: object) -> Trace:
    """`sim.simulate` with the fast path switched off: the op-by-op engine."""
    saved = sim.simulate_linear
    sim.simulate_linear = lambda *a, **k: None        # type: ignore[assignment]
    try:
        return sim.simulate(*args, **kw)              # type: ignore[arg-type]
    finally:
        sim.simulate_linear = saved


def fast(*args: object, **kw: object) -> Trace | None:
    """The fast path, also for runs shorter than `MIN_UPDATES`."""
    return simulate_linear(*args, min_updates=0, **kw)    # type: ignore[arg-type]


def assert_identical(fast: Trace | None, ref: Trace) -> None:
    assert fast is not None
    assert np.array_equal(fast.final_weights, ref.final_weights), \
        np.abs(fast.final_weights - ref.final_weights).max()
    for name in UPDATE_COLUMNS:
        a, b = getattr(fast.updates, name), getattr(ref.updates, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.array_equal(a, b, equal_nan=True), name
    for name in ("time", "k", "value"):
        a, b = getattr(fast.objective, name), getattr(ref.objective, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert fast.events.dtype == ref.events.dtype and np.array_equal(fast.events, ref.events)
    assert fast.divergence == ref.divergence and fast.stopped == ref.stopped


METHODS = [("pd", {}, 1), ("pd", {"noam": 2}, 1),
           ("localsgd", {"trajectories": 2, "local_steps": 2}, 1),
           ("localsgd", {"trajectories": 2, "local_steps": 3}, 2),
           ("localsgd", {"trajectories": 3, "local_steps": 1}, 2),
           ("gpipe", {}, 1), ("gpipe", {"flush": 3}, 1), ("naive", {}, 1)]


@pytest.mark.parametrize("method,kw,groups", METHODS)
@pytest.mark.parametrize("name", ["quadratic", "tridiag", "logistic"])
def test_fast_equals_reference(method: str, kw: dict[str, int], groups: int,
                               name: str) -> None:
    for S, dim in ((1, 9), (3, 20), (4, 23)):         # 23 = 4 x 5 + 3: two block widths
        model = build_model(name, S, dim=dim, examples=48, batch_size=4, seed=3, noise=0.4)
        tl = generate(method, S, 13, **kw)
        assert_identical(fast(tl, model, 0.03, groups=groups, eval_every=2),
                         reference(tl, model, 0.03, groups=groups, eval_every=2))


def test_simulate_dispatches_to_the_fast_path_for_long_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("logistic", 4, dim=16, examples=40, batch_size=5, seed=1, noise=0.2)
    tl = generate("pd", 4, MIN_UPDATES // 4)
    used: list[int] = []

    def spy(*args: object, **kw: object) -> Trace | None:
        out = simulate_linear(*args, **kw)       # type: ignore[arg-type]
        used.append(out is not None)
        return out

    monkeypatch.setattr(sim, "simulate_linear", spy)
    slots: list[int] = []
    trace = sim.simulate(tl, model, 0.05, progress=slots.append)
    assert used == [True] and slots == list(range(1, tl.slots + 1))
    monkeypatch.undo()
    assert_identical(trace, reference(tl, model, 0.05))
    short = generate("pd", 4, 30)                  # too short to pay for the kernels
    assert simulate_linear(short, model, 0.05) is None
    assert_identical(fast(short, model, 0.05), sim.simulate(short, model, 0.05))


def test_tracker_resync_and_truncated_budget() -> None:
    """More than the tracker's 4096 shifts (it re-synchronises p = X w), a timeline cut at a
    budget (a partial flush never applies)."""
    model = build_model("quadratic", 8, dim=16, examples=24, batch_size=2, seed=2)
    tl = generate("pd", 8, 600)
    assert_identical(fast(tl, model, 0.01), reference(tl, model, 0.01))
    cut = generate("gpipe", 4, 40).truncate(50)
    model4 = build_model("quadratic", 4, dim=16, examples=24, batch_size=2, seed=2)
    assert_identical(fast(cut, model4, 0.02), reference(cut, model4, 0.02))


def test_divergence_falls_back_to_the_reference() -> None:
    model = build_model("quadratic", 4, dim=16, examples=40, batch_size=4, seed=4)
    tl = generate("pd", 4, 40)
    assert fast(tl, model, 3.0, diverge_factor=10.0) is None
    trace = sim.simulate(tl, model, 3.0, diverge_factor=10.0)
    assert trace.divergence is not None
    assert_identical(trace, reference(tl, model, 3.0, diverge_factor=10.0))


def test_other_models_and_uneven_partitions_use_the_reference() -> None:
    lm = build_charlm(3, width=8, heads=2, context=6, batch_size=2, seed=5)
    assert fast(generate("pd", 3, 3), lm, 0.1) is None
    try:
        model = build_model("quadratic", 4, dim=16, examples=40, batch_size=4, seed=4,
                            partition=(2, 3, 4, 7))
    except TypeError:
        pytest.skip("build_model has no partition argument in this tree")
    tl = generate("pd", 4, 9)
    assert fast(tl, model, 0.05) is None                  # four widths: more than two stacks
    assert len(sim.simulate(tl, model, 0.05).updates) == 36


def test_a_stop_signal_between_slots_matches_the_reference() -> None:
    model = build_model("logistic", 3, dim=12, examples=30, batch_size=3, seed=6, noise=0.1)
    tl = generate("localsgd", 3, 20, trajectories=2, local_steps=2)
    traces = []

    def stop_at(t: int) -> None:
        if t == 17:
            signal.raise_signal(signal.SIGTERM)

    try:
        for run in (fast, reference):
            with signals.catching():
                traces.append(run(tl, model, 0.05, groups=2, progress=stop_at))
    finally:
        with signals.catching():      # entering clears the recorded signal for later tests
            pass
    assert not signals.received()
    assert traces[0] is not None and traces[0].stopped == "SIGTERM"
    assert 0 < len(traces[0].updates) < 2 * 3 * 20
    assert_identical(traces[0], traces[1])
