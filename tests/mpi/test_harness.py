"""The MPI test harness works: ranks talk, temp dirs are per rank or shared, output is split.

Runs under ``mpiexec -n N python -m mpi4py -m pytest tests/mpi --with-mpi`` (see test.sh).
That a failure on one rank reaches rank 0's report is checked by tests/test_harness_gather.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from mpi4py import MPI


@pytest.mark.mpi(min_size=2)
def test_allreduce_of_rank_ids() -> None:
    comm = MPI.COMM_WORLD
    assert comm.allreduce(comm.rank) == comm.size * (comm.size - 1) // 2


@pytest.mark.mpi(min_size=2)
def test_each_rank_has_its_own_tmp_path(tmp_path: Path) -> None:
    comm = MPI.COMM_WORLD
    paths = comm.allgather(str(tmp_path))
    assert len(set(paths)) == comm.size
    assert f"rank{comm.rank}" in tmp_path.parts


@pytest.mark.mpi(min_size=2)
def test_mpi_tmp_path_is_shared(mpi_tmp_path: Path) -> None:
    comm = MPI.COMM_WORLD
    (mpi_tmp_path / f"rank{comm.rank}.txt").write_text(str(comm.rank))
    comm.Barrier()
    files = sorted(mpi_tmp_path.glob("rank*.txt"))
    assert [f.name for f in files] == sorted(f"rank{r}.txt" for r in range(comm.size))
    assert sum(int(f.read_text()) for f in files) == comm.size * (comm.size - 1) // 2
    comm.Barrier()  # nobody leaves while another rank still reads


@pytest.mark.mpi(min_size=2)
def test_only_rank0_reports(request: pytest.FixtureRequest) -> None:
    comm = MPI.COMM_WORLD
    log = request.config.rootpath / ".test-logs" / f"mpi-n{comm.size}-rank{comm.rank}.log"
    assert log.exists() == (comm.rank > 0)
    if comm.rank > 0:
        assert request.config.option.xmlpath is None
