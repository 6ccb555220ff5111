"""The simulator equals the naive sequential reference (tests/reference.py) to 1e-12."""

import numpy as np
import pytest

from reference import reference_pipeline, reference_rpd
from rpd_mpi.objectives import build_model
from rpd_mpi.engines.blocks import BlockHistory
from rpd_mpi.engines.rpd import rpd_plan, simulate_rpd
from rpd_mpi.schedule.generate import generate
from rpd_mpi.engines.sim import simulate

OBJECTIVES = ["quadratic", "tridiag", "logistic"]


def _model(name: str, S: int, noise: float = 0.0):
    return build_model(name, S, dim=7, examples=12, batch_size=3, seed=5, noise=noise)


def _same(trace, ref) -> None:
    w, w_ref = trace.final_weights, ref["weights"]
    assert np.abs(w - w_ref).max() <= 1e-12 * max(1.0, np.abs(w_ref).max())
    u = trace.updates
    got = list(zip(u.stage.tolist(), u.group.tolist(), u.microbatch.tolist(),
                   u.version.tolist()))
    assert got == [r[:4] for r in ref["updates"]]
    assert np.allclose(u.loss, [r[4] for r in ref["updates"]], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("S,N", [(2, 5), (3, 8), (4, 9)])
def test_pd_equals_reference(name: str, S: int, N: int) -> None:
    model, tl = _model(name, S), generate("pd", S, N)
    _same(simulate(tl, model, 0.05), reference_pipeline(tl, model, 0.05))


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("G", [1, 2])
def test_localsgd_equals_reference(name: str, G: int) -> None:
    model = _model(name, 3)
    tl = generate("localsgd", 3, 14, trajectories=2, local_steps=2)
    _same(simulate(tl, model, 0.05, groups=G), reference_pipeline(tl, model, 0.05, groups=G))


@pytest.mark.parametrize("method", ["gpipe", "naive"])
def test_flush_methods_equal_reference(method: str) -> None:
    model, tl = _model("logistic", 3), generate(method, 3, 7)
    _same(simulate(tl, model, 0.1), reference_pipeline(tl, model, 0.1))


def test_gradient_noise_follows_the_stage_generators() -> None:
    model, tl = _model("quadratic", 3, noise=0.3), generate("pd", 3, 6)
    _same(simulate(tl, model, 0.05), reference_pipeline(tl, model, 0.05))


def test_forward_and_backward_see_the_same_version() -> None:
    model, tl = _model("quadratic", 4), generate("pd", 4, 16)
    trace = simulate(tl, model, 0.05)
    ev = trace.events
    f = {(m, s): v for op, m, s, v in zip(ev["op"], ev["microbatch"], ev["stage"],
                                          ev["version"]) if op == 1}
    u = trace.updates
    for s, m, v in zip(u.stage, u.microbatch, u.version):
        assert f[(m, s)] == v
    assert u.local_staleness.max() == 3


def test_localsgd_objective_is_at_the_average_and_staleness_zero() -> None:
    model = _model("quadratic", 2)
    tl = generate("localsgd", 2, 8, trajectories=2, local_steps=2)
    trace = simulate(tl, model, 0.05, eval_every=1)
    assert trace.updates.local_staleness.max() == 0
    assert trace.objective.value[-1] == pytest.approx(model.full_objective(trace.final_weights),
                                                      rel=1e-12)


@pytest.mark.parametrize("name", OBJECTIVES)
@pytest.mark.parametrize("source", ["uniform", "max", "zero"])
def test_rpd_equals_reference(name: str, source: str) -> None:
    model = _model(name, 3)
    plan = rpd_plan(40, 3, model.num_batches, 5, source, seed=3)
    trace = simulate_rpd(model, 0.05, plan, delta=5)
    ref = reference_rpd(model, 0.05, plan)
    assert np.abs(trace.final_weights - ref["weights"]).max() <= 1e-12
    assert (trace.updates.delays <= 5).all() and (trace.updates.stage == plan.stage).all()


def test_rpd_plan_is_deterministic_and_bounded() -> None:
    a = rpd_plan(100, 4, 10, 7, "uniform", seed=1)
    b = rpd_plan(100, 4, 10, 7, "uniform", seed=1)
    assert (a.delays == b.delays).all() and (a.stage == b.stage).all()
    assert (a.delays <= np.minimum(7, np.arange(100))[:, None]).all()
    assert a.delays.max() == 7


def test_block_history_keeps_only_delta_plus_one_versions() -> None:
    h = BlockHistory(np.zeros(2), delta=2)
    for k in (0, 3, 4):
        h.push(np.full(2, float(k + 1)), k)
    assert h.ring.shape[0] == 3
    assert h.at(5)[1] == 3 and h.at(4)[1] == 2 and h.at(1)[1] == 1
    with pytest.raises(IndexError):
        h.at(0)
