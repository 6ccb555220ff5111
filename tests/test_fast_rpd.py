"""The bulk RPD engine (engines.fast_rpd) equals the stage-by-stage one (rpd.simulate_python)
exactly: final blocks, every column of the updates, the objective, for every delay source.

Data come from the project's own generators (whatever they draw), never from fixed values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rpd_mpi.build import replayed_delays, to_record
from rpd_mpi.config import ObjectiveConfig, RunConfig, ScheduleConfig
from rpd_mpi.engines import fast_rpd
from rpd_mpi.engines import rpd as rpd_module
from rpd_mpi.engines.rpd import (FAST_MIN_UPDATES, RPDPlan, rpd_plan, simulate_python,
                                 simulate_rpd)
from rpd_mpi.engines.sim import simulate
from rpd_mpi.ledger import write_run
from rpd_mpi.objectives import build_model, kernels
from rpd_mpi.records import Trace
from rpd_mpi.schedule.delays import update_order
from rpd_mpi.schedule.generate import generate

UPDATE_COLUMNS = ("stage", "group", "trajectory", "microbatch", "batch", "version",
                  "local_staleness", "delays", "loss", "grad_norm", "time")


def fast(model: object, lr: float, plan: RPDPlan, **kw: object) -> Trace:
    """The bulk engine (what `simulate_rpd` runs for block-linear models of >= 256 updates)."""
    return fast_rpd.simulate_rpd_fast(model, lr, plan.stage, plan.batch, plan.delays,
                                      **kw)             # type: ignore[arg-type]


def assert_identical(fast: Trace, ref: Trace) -> None:
    assert np.array_equal(fast.final_weights, ref.final_weights), \
        np.abs(fast.final_weights - ref.final_weights).max()
    for name in UPDATE_COLUMNS:
        a, b = getattr(fast.updates, name), getattr(ref.updates, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.array_equal(a, b, equal_nan=True), name
    for name in ("time", "k", "value"):
        assert np.array_equal(getattr(fast.objective, name), getattr(ref.objective, name)), name
    assert fast.divergence == ref.divergence and fast.stopped == ref.stopped


def _model(name: str, S: int, noise: float = 0.3, **kw: object):
    dim = 70 if S == 64 else 23          # 70 = 64 x 1 + 6: two block widths at S = 64
    return build_model(name, S, dim=dim, examples=80, batch_size=4, seed=7, noise=noise, **kw)


def _replay(S: int, K: int, tmp: Path | None = None) -> np.ndarray:
    """PD delays of a timeline with at least K updates; via a written ledger when `tmp`."""
    N = -(-K // S) + 1
    tl = generate("pd", S, N)
    if tmp is None:
        return update_order(tl).delays
    model = _model("quadratic", S, noise=0.0)
    cfg = RunConfig(schedule=ScheduleConfig(method="pd", stages=S, microbatches=N),
                    objective=ObjectiveConfig(name="quadratic", dim=model.dim, examples=80,
                                              batch_size=4), lr=0.01, seed=7)
    record = to_record(cfg, model, simulate(tl, model, 0.01), tl, engine="sim",
                       delta=int(update_order(tl).delays.max()))
    path = tmp / f"pd_S{S}.h5"
    write_run(path, record)
    return replayed_delays(str(path), S, K)


def _plan(S: int, K: int, batches: int, source: str, tmp: Path) -> tuple[RPDPlan, int]:
    if source in ("pd", "ledger"):
        replay = _replay(S, K, tmp if source == "ledger" else None)
        delta = int(replay[:K].max())
        return rpd_plan(K, S, batches, delta, source, seed=3, replay=replay), delta
    delta = 2 * S + 1
    return rpd_plan(K, S, batches, delta, source, seed=3), delta


@pytest.mark.parametrize("S", [2, 8, 64])
@pytest.mark.parametrize("source", ["uniform", "max", "zero", "pd", "ledger"])
def test_fast_equals_reference_on_every_delay_source(S: int, source: str,
                                                     tmp_path: Path) -> None:
    K = 200 if S == 64 else 300
    for name in (("logistic", "quadratic") if S == 64 else ("quadratic", "tridiag",
                                                             "logistic")):
        model = _model(name, S)
        plan, delta = _plan(S, K, model.num_batches, source, tmp_path)
        clock = np.repeat(np.arange(1, K + 1), 3)[:K]          # several updates per slot
        got = fast(model, 0.02, plan, delta=delta, clock=clock)
        assert_identical(got, simulate_python(model, 0.02, plan, delta=delta, clock=clock))
        assert len(got.updates) == K and got.objective.k[-1] == K


def test_simulate_rpd_uses_the_fast_path_for_long_runs(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    model = _model("logistic", 8)
    plan = rpd_plan(400, 8, model.num_batches, 3, "uniform", seed=1)
    used: list[int] = []
    real = rpd_module.simulate_rpd_fast

    def spy(*args: object, **kw: object) -> Trace:
        used.append(1)
        return real(*args, **kw)                         # type: ignore[arg-type]

    monkeypatch.setattr(rpd_module, "simulate_rpd_fast", spy)
    calls: list[int] = []
    got = simulate_rpd(model, 0.05, plan, delta=3, eval_every=7, progress=calls.append)
    assert used == [1] and calls == list(range(1, 401))
    assert_identical(got, simulate_python(model, 0.05, plan, delta=3, eval_every=7))
    short = rpd_plan(FAST_MIN_UPDATES - 1, 8, model.num_batches, 3, "uniform", seed=1)
    assert_identical(simulate_rpd(model, 0.05, short, delta=3),
                     simulate_python(model, 0.05, short, delta=3))
    assert used == [1]                                   # the short run: the reference


def test_noise_of_skipped_stages_is_drawn_in_the_reference_order() -> None:
    """Stage s's generator draws at every update whose sampled stage is <= s; the rows the
    fast path keeps are exactly the reference's draws for the sampled block."""
    model = _model("quadratic", 4, noise=1.0)
    stage = np.array([3, 0, 2, 2, 1, 0, 3, 1])
    rows = fast_rpd.noise_rows(model, stage, 6)
    mods = [model.make_stage(s) for s in range(4)]
    for k, s_k in enumerate(stage):
        for s in range(3, s_k - 1, -1):             # the reference's backward, last first
            z = mods[s].rng.standard_normal(mods[s].size)
            if s == s_k:
                assert np.array_equal(rows[k, :z.size], z) and not rows[k, z.size:].any()
    assert not fast_rpd.noise_rows(_model("quadratic", 4, noise=0.0), stage, 6).any()


def test_uneven_partition_uses_several_stacks() -> None:
    try:
        model = _model("logistic", 4, partition=(3, 3, 11, 6))
    except TypeError:
        pytest.skip("build_model has no partition argument in this tree")
    assert len(fast_rpd._Layout(model).stacks) == 3
    plan = rpd_plan(300, 4, model.num_batches, 6, "uniform", seed=2)
    assert_identical(fast(model, 0.03, plan, delta=6),
                     simulate_python(model, 0.03, plan, delta=6))


def test_divergence_stops_both_at_the_same_update() -> None:
    model = _model("quadratic", 8, noise=0.0)
    plan = rpd_plan(500, 8, model.num_batches, 10, "uniform", seed=4)
    got = fast(model, 5.0, plan, delta=10, diverge_factor=50.0)
    ref = simulate_python(model, 5.0, plan, delta=10, diverge_factor=50.0)
    assert got.divergence is not None and 0 < len(got.updates) < 500
    assert_identical(got, ref)


def test_a_read_older_than_delta_fails_in_both() -> None:
    model = _model("quadratic", 2, noise=0.0)
    plan = rpd_plan(50, 2, model.num_batches, 9, "max", seed=0)
    for run in (fast, simulate_python):
        with pytest.raises(IndexError, match="older than the 3 kept"):
            run(model, 0.01, plan, delta=2)


def test_numpy_references_of_the_kernels_give_the_same_run(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Without numba the kernels' numpy references run: the same bits again."""
    model = _model("logistic", 8)
    plan = rpd_plan(300, 8, model.num_batches, 20, "uniform", seed=5)
    compiled = fast(model, 0.03, plan, delta=20)
    for fn, ref in ((kernels._rpd_read, kernels.rpd_read_ref),
                    (kernels._sum_stages, kernels.sum_stages_ref),
                    (kernels._add_terms, kernels.add_terms_ref),
                    (kernels._rpd_step, kernels.rpd_step_ref)):
        monkeypatch.setitem(kernels._CACHE, fn, ref)
    assert_identical(fast(model, 0.03, plan, delta=20), compiled)
