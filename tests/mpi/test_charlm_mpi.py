"""Static-order PD on the character LM equals the simulator (float64), on real ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI

from rpd_mpi.config import ObjectiveConfig, RunConfig, RuntimeConfig, ScheduleConfig
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.build import simulate_run
from rpd_mpi.mpi.train import train

WORLD = MPI.COMM_WORLD


@pytest.mark.mpi(min_size=3)
def test_charlm_static_pd_equals_simulator(mpi_tmp_path: Path) -> None:
    S = WORLD.size
    cfg = RunConfig(schedule=ScheduleConfig(method="pd", stages=S, microbatches=6),
                    objective=ObjectiveConfig(name="charlm", width=16, heads=2, context=8,
                                              batch_size=3),
                    runtime=RuntimeConfig(timeout=60.0), lr=0.1, seed=2, eval_every=12,
                    out=str(mpi_tmp_path / "lm.h5"))
    assert train(lambda: cfg) == 0
    if WORLD.rank == 0:
        mpi, sim = read_run(cfg.out), simulate_run(cfg)
        for a, b in zip(mpi.final_blocks, sim.final_blocks):
            assert np.abs(a - b).max() <= 1e-10 * max(1.0, np.abs(b).max())
        assert np.isfinite(mpi.updates.loss).all() and mpi.attrs["vocab"]
        np.testing.assert_allclose(mpi.updates.loss[mpi.updates.stage == S - 1],
                                   sim.updates.loss[sim.updates.stage == S - 1], rtol=1e-10)
