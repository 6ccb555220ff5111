"""Failures of `rpd-mpi train` on real mpiexec jobs end fast, clearly, and leave nothing running.

Each case launches its own small job (so that the job's exit is what is observed) under an
outer `timeout`, and checks the message, the exit code and that no process survives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
ARGS = ["--method", "pd", "--microbatches", "8", "--dim", "8", "--examples", "16",
        "--batch-size", "4"]


def launch(n: int, *args: str, limit: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = subprocess.run(["timeout", "-k", "5", str(limit), MPIEXEC, "-n", str(n),
                          sys.executable, "-m", "rpd_mpi", "train", *args],
                         capture_output=True, text=True, timeout=limit + 20)
    return res, time.monotonic() - t0


def no_survivors(marker: str) -> bool:
    time.sleep(0.5)
    ps = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return ps.stdout.strip() == ""


def test_wrong_world_size_is_one_clear_line(tmp_path: Path) -> None:
    out = tmp_path / "ws.h5"
    res, _ = launch(3, *ARGS, "--stages", "4", "--out", str(out))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rpd-mpi")]
    assert len(lines) == 1 and "--stages" in lines[0] and "mpiexec -n 4" in lines[0]
    assert "Traceback" not in res.stderr
    assert not list(tmp_path.iterdir())


def test_bad_flag_under_mpiexec_prints_once(tmp_path: Path) -> None:
    res, _ = launch(2, *ARGS, "--stages", "2", "--lr", "-1", "--out", str(tmp_path / "x.h5"))
    assert res.returncode == 2
    assert res.stderr.count("rpd-mpi: error: --lr") == 1


def test_bad_replay_ledger_stops_before_the_run(tmp_path: Path) -> None:
    out = tmp_path / "r.h5"
    res, _ = launch(2, *ARGS, "--stages", "2", "--method", "rpd", "--delay-source", "ledger",
                    "--delays-from", str(tmp_path / "missing.h5"), "--out", str(out))
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rpd-mpi")]
    assert len(lines) == 1 and "--delays-from" in lines[0]
    assert not list(tmp_path.iterdir())          # no part files: nothing was started


def test_exception_on_one_rank_aborts_the_job(tmp_path: Path) -> None:
    out = tmp_path / "exc.h5"
    res, took = launch(4, *ARGS, "--stages", "4", "--fault", "raise:2:3", "--out", str(out))
    assert res.returncode != 0 and took < 30
    assert res.stderr.count("rpd-mpi: rank 2 (group 0, stage 2): RuntimeError: injected "
                            "fault at op 3") == 1
    assert not out.exists()                   # no run file; the parts stay, incomplete
    assert no_survivors(str(out))


def test_stall_on_one_rank_times_out_with_who_waits_for_what(tmp_path: Path) -> None:
    out = tmp_path / "stall.h5"
    res, took = launch(2, *ARGS, "--stages", "2", "--fault", "stall:1:2", "--timeout", "2",
                       "--wait", "polite", "--out", str(out))
    assert res.returncode != 0 and took < 30, (took, res.stderr)
    assert "rpd-mpi: rank 0 (group 0, stage 0): RecvTimeout: waited 2 s for" in res.stderr
    assert "from rank 1" in res.stderr
    assert not out.exists()
    assert no_survivors(str(out))


def test_parts_of_a_failed_run_are_marked_incomplete(tmp_path: Path) -> None:
    from rpd_mpi.ledger.parts import part_attrs, part_path
    out = tmp_path / "inc.h5"
    launch(2, *ARGS, "--stages", "2", "--fault", "raise:1:4", "--out", str(out))
    p = part_path(out, 1)
    if p.exists():                            # the aborted rank may not have flushed at all
        assert part_attrs(p)["complete"] is False or not part_attrs(p)["complete"]
    assert not out.exists()


def test_charlm_on_three_ranks_equals_simulator(tmp_path: Path) -> None:
    """S = 3 needs a 3-rank job, which the -n 2 / -n 4 MPI phases do not give."""
    import numpy as np
    from rpd_mpi.ledger.run_file import read_run
    args = ["--method", "pd", "--objective", "charlm", "--stages", "3", "--microbatches", "5",
            "--width", "16", "--heads", "2", "--context", "8", "--batch-size", "2",
            "--lr", "0.1", "--eval-every", "10"]
    res, _ = launch(3, *args, "--out", str(tmp_path / "mpi.h5"))
    assert res.returncode == 0, res.stderr
    sim = subprocess.run([sys.executable, "-m", "rpd_mpi", "simulate", *args, "--out",
                          str(tmp_path / "sim.h5")], capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    a, b = read_run(tmp_path / "mpi.h5"), read_run(tmp_path / "sim.h5")
    for x, y in zip(a.final_blocks, b.final_blocks):
        assert np.abs(x - y).max() <= 1e-10 * max(1.0, np.abs(y).max())
