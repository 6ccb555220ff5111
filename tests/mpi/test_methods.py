"""LocalSGD through allreduce groups and RPD on real ranks, each against the simulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from rpd_mpi.config import ObjectiveConfig, RPDConfig, RunConfig, RuntimeConfig, ScheduleConfig
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.objectives import build_model
from rpd_mpi.ledger.report import summarize
from rpd_mpi.build import simulate_run
from rpd_mpi.mpi.train import train

WORLD = MPI.COMM_WORLD
OBJ = ObjectiveConfig(name="logistic", dim=9, examples=24, batch_size=4)


def _close(a_blocks, b_blocks, rel: float = 1e-12) -> bool:
    diffs = [float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))
             for a, b in zip(a_blocks, b_blocks)]
    assert max(diffs) <= rel, f"final blocks differ by {diffs} (relative)"
    return True


def _localsgd(out: Path, stages: int, groups: int, R: int, H: int, N: int) -> RunConfig:
    return RunConfig(schedule=ScheduleConfig(method="localsgd", stages=stages, groups=groups,
                                             trajectories=R, local_steps=H, microbatches=N),
                     objective=OBJ, runtime=RuntimeConfig(timeout=30.0), lr=0.2, seed=3,
                     out=str(out))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("R,H,N", [(2, 2, 12), (3, 1, 10)])
def test_localsgd_equals_simulator(mpi_tmp_path: Path, R: int, H: int, N: int) -> None:
    S, G = (2, WORLD.size // 2) if WORLD.size % 2 == 0 else (WORLD.size, 1)
    cfg = _localsgd(mpi_tmp_path / f"lsgd-{R}-{H}.h5", S, G, R, H, N)
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        mpi, sim = read_run(cfg.out), simulate_run(cfg)
        assert _close(mpi.final_blocks, sim.final_blocks)
        assert mpi.updates.local_staleness.max() == 0
        assert sorted(zip(mpi.updates.group.tolist(), mpi.updates.trajectory.tolist(),
                          mpi.updates.microbatch.tolist(), mpi.updates.stage.tolist())) == \
            sorted(zip(sim.updates.group.tolist(), sim.updates.trajectory.tolist(),
                       sim.updates.microbatch.tolist(), sim.updates.stage.tolist()))
        summary = summarize(mpi)
        avg = mpi.events[mpi.events["op"] == 3]
        rounds = -(-N // (R * H))
        assert avg.size == S * G * rounds
        if G > 1:
            assert summary["allreduce_time"] > 0 and (avg["bytes"] > 0).all()


def _data_parallel(model, lr: float, groups: int, steps: int) -> np.ndarray:
    """Synchronous data-parallel SGD: every step averages the groups' batch gradients."""
    w, b = model.init_weights(), model.batch_size
    for t in range(steps):
        grads = []
        for g in range(groups):
            i = (g + groups * t) % model.num_batches
            X, y = model.X[i * b:(i + 1) * b], model.y[i * b:(i + 1) * b]
            p = 1.0 / (1.0 + np.exp(-(X @ w)))
            grads.append(X.T @ (p - y) / b + model.lam * w)
        w = w - lr * np.mean(grads, axis=0)
    return w


@pytest.mark.mpi(min_size=4)
def test_r1_h1_two_groups_is_synchronous_data_parallel_sgd(mpi_tmp_path: Path) -> None:
    cfg = _localsgd(mpi_tmp_path / "dp.h5", 2, 2, 1, 1, 7)
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        rec = read_run(cfg.out)
        model = build_model("logistic", 2, dim=9, examples=24, batch_size=4, seed=3)
        want = _data_parallel(model, 0.2, 2, 7)
        assert np.abs(np.concatenate(rec.final_blocks) - want).max() <= 1e-12


def _rpd(out: Path, source: str, **rpd) -> RunConfig:
    S = WORLD.size
    return RunConfig(schedule=ScheduleConfig(method="rpd", stages=S, microbatches=6),
                     rpd=RPDConfig(delay_source=source, **rpd),
                     objective=ObjectiveConfig(name="quadratic", dim=2 * S + 1, examples=24,
                                               batch_size=4, noise=0.05),
                     runtime=RuntimeConfig(timeout=30.0), lr=0.05, seed=11, out=str(out))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("source,delta", [("uniform", 5), ("max", 3), ("zero", None),
                                          ("pd", None)])
def test_rpd_equals_simulator(mpi_tmp_path: Path, source: str, delta: int | None) -> None:
    cfg = _rpd(mpi_tmp_path / f"rpd-{source}.h5", source, delta=delta)
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        mpi, sim = read_run(cfg.out), simulate_run(cfg)
        assert _close(mpi.final_blocks, sim.final_blocks)
        for field in ("stage", "batch", "microbatch", "version", "delays"):
            assert np.array_equal(getattr(mpi.updates, field), getattr(sim.updates, field))
        bound = mpi.attrs["delta"]
        assert (mpi.updates.delays <= bound).all() and (mpi.updates.delays >= 0).all()
        np.testing.assert_allclose(mpi.updates.loss, sim.updates.loss, rtol=1e-12)


@pytest.mark.mpi(min_size=2)
def test_rpd_replays_a_recorded_pd_runs_delays(mpi_tmp_path: Path) -> None:
    S = WORLD.size
    pd_cfg = RunConfig(schedule=ScheduleConfig(method="pd", stages=S, microbatches=6),
                       objective=ObjectiveConfig(dim=2 * S + 1, examples=24, batch_size=4),
                       runtime=RuntimeConfig(order="dynamic", timeout=30.0), lr=0.05,
                       out=str(mpi_tmp_path / "pd.h5"))
    assert train(lambda: pd_cfg) == 0
    cfg = _rpd(mpi_tmp_path / "replay.h5", "ledger", delays_from=pd_cfg.out)
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        pd, rpd = read_run(pd_cfg.out), read_run(cfg.out)
        assert np.array_equal(rpd.updates.delays, pd.updates.delays)
        assert _close(rpd.final_blocks, simulate_run(cfg).final_blocks)
