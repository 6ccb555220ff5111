"""The MPI runtime on real ranks: static order equals the simulator; dynamic order is sound.

Runs under `mpiexec -n 2` and `-n 4` (test.sh); S = the world size. Rank 0 compares the
ledger with a simulator run of the same configuration and every rank learns the verdict
through the harness's gathered outcomes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from rpd_mpi.config import ObjectiveConfig, RunConfig, RuntimeConfig, ScheduleConfig
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.records import BWD, FWD
from rpd_mpi.build import simulate_run
from rpd_mpi.mpi.train import train

WORLD = MPI.COMM_WORLD


def _cfg(out: Path, objective: str, N: int, order: str = "static", **runtime) -> RunConfig:
    S = WORLD.size
    return RunConfig(schedule=ScheduleConfig(method="pd", stages=S, microbatches=N),
                     objective=ObjectiveConfig(name=objective, dim=3 * S + 1, examples=24,
                                               batch_size=4, noise=0.1),
                     runtime=RuntimeConfig(order=order, timeout=30.0, **runtime),
                     lr=0.05, seed=7, out=str(out))


def _per_stage(u) -> dict[int, list[tuple[int, int]]]:
    return {s: list(zip(u.microbatch[u.stage == s].tolist(), u.version[u.stage == s].tolist()))
            for s in np.unique(u.stage).tolist()}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("objective", ["quadratic", "tridiag", "logistic"])
@pytest.mark.parametrize("N", [1, 5, 13])
def test_static_order_equals_simulator(mpi_tmp_path: Path, objective: str, N: int) -> None:
    cfg = _cfg(mpi_tmp_path / f"{objective}-{N}.h5", objective, N)
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        mpi, sim = read_run(cfg.out), simulate_run(cfg)
        for a, b in zip(mpi.final_blocks, sim.final_blocks):
            assert np.abs(a - b).max() <= 1e-12 * max(1.0, np.abs(b).max())
        assert _per_stage(mpi.updates) == _per_stage(sim.updates)
        assert mpi.attrs["engine"] == "mpi" and mpi.attrs["world_size"] == WORLD.size
        assert mpi.objective.value[-1] == pytest.approx(sim.objective.value[-1], rel=1e-12)


@pytest.mark.mpi(min_size=2)
def test_static_order_with_a_slot_budget(mpi_tmp_path: Path) -> None:
    S = WORLD.size
    cfg = RunConfig(schedule=ScheduleConfig(method="pd", stages=S, budget_slots=3 * S + 1),
                    objective=ObjectiveConfig(dim=2 * S, examples=12, batch_size=3),
                    runtime=RuntimeConfig(timeout=30.0), lr=0.1, out=str(mpi_tmp_path / "b.h5"))
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        mpi, sim = read_run(cfg.out), simulate_run(cfg)
        assert _per_stage(mpi.updates) == _per_stage(sim.updates)
        assert all(np.array_equal(a, b) for a, b in zip(mpi.final_blocks, sim.final_blocks))


def _check_dynamic(rec) -> None:
    S, N = rec.attrs["stages"], rec.attrs["microbatches"]
    u, ev = rec.updates, rec.events
    assert len(u) == S * N
    for s in range(S):                        # every microbatch updated once per stage
        assert sorted(u.microbatch[u.stage == s].tolist()) == list(range(N))
    f = {(int(m), int(s)): int(v) for op, m, s, v in
         zip(ev["op"], ev["microbatch"], ev["stage"], ev["version"]) if op == FWD}
    for m, s, v in zip(u.microbatch, u.stage, u.version):   # stash consistency
        assert f[(int(m), int(s))] == int(v)
    fstart = {(int(m), int(s)): t for op, m, s, t in
              zip(ev["op"], ev["microbatch"], ev["stage"], ev["start"]) if op == FWD}
    ends = u.time
    assert (np.diff(ends) >= 0).all()
    for k in range(len(u)):                   # delays = k - #updates ended before F(m_k, s')
        m = int(u.microbatch[k])
        j = [int((ends <= fstart[(m, sp)]).sum()) for sp in range(S)]
        assert u.delays[k].tolist() == [k - x for x in j]
    b = ev[ev["op"] == BWD]
    assert (b["end"] >= b["start"]).all() and (ev["wait"] >= 0).all()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("wait", ["polite", "spin"])
def test_dynamic_order_completes_and_is_consistent(mpi_tmp_path: Path, wait: str) -> None:
    cfg = _cfg(mpi_tmp_path / f"dyn-{wait}.h5", "quadratic", 12, order="dynamic", wait=wait)
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        _check_dynamic(read_run(cfg.out))


@pytest.mark.mpi(min_size=4)
def test_equal_op_costs_give_unit_time_delays(mpi_tmp_path: Path) -> None:
    S = WORLD.size
    cfg = _cfg(mpi_tmp_path / "cost.h5", "quadratic", 10 * S, op_cost=0.01, wait="polite")
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        rec = read_run(cfg.out)
        half = len(rec.updates) // 2
        measured = int(rec.updates.delays[half:].max())
        unit = (2 * S * S - S) // 2
        assert abs(measured - unit) <= S, (measured, unit)


@pytest.mark.mpi(min_size=2)
def test_eval_every_counts_block_updates_on_ranks(mpi_tmp_path: Path) -> None:
    from dataclasses import replace
    cfg = replace(_cfg(mpi_tmp_path / "every.h5", "quadratic", 9), eval_every=5)
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        mpi, sim = read_run(cfg.out), simulate_run(cfg)
        K = len(mpi.updates)
        assert mpi.objective.k.tolist() == [0, *range(5, K, 5), K]
        sim_k = sim.objective.k.tolist()          # the simulator: the same rule at slot ends
        assert all(b // 5 > a // 5 for a, b in zip(sim_k[:-2], sim_k[1:-1]))
