"""SIGTERM, SIGINT and SIGUSR1 stop a run without losing it: the ledger holds every update
done so far (`status = "stopped"`), one line says so, the exit code is 5. Real signals to real
processes: the simulator, one MPI rank, and mpiexec itself (which forwards them)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rpd_mpi.ledger import read_run
from rpd_mpi.outputs import EXIT_STOPPED

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
LONG = ["--stages", "4", "--microbatches", "400", "--dim", "8", "--examples", "16",
        "--batch-size", "4"]


def _wait_for_progress(err: Path, job: subprocess.Popen, limit: float = 60) -> None:
    """Until the run is under way (its first progress line), so the signal lands mid-run."""
    t0 = time.monotonic()
    while "[rpd-mpi]" not in err.read_text():
        assert job.poll() is None and time.monotonic() - t0 < limit, err.read_text()
        time.sleep(0.1)


def _check(job: subprocess.Popen, err: Path, out: Path, name: str, full: int) -> None:
    assert job.wait(timeout=60) == EXIT_STOPPED, err.read_text()[-2000:]
    lines = [ln for ln in err.read_text().splitlines() if ln.startswith("rpd-mpi:")]
    assert len(lines) == 1 and f"stopped by {name}" in lines[0], lines
    assert "Traceback" not in err.read_text()
    rec = read_run(out)
    assert rec.attrs["status"] == "stopped" and rec.attrs["stopped_by"] == name
    assert 0 < len(rec.updates) < full
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, err.name])


@pytest.mark.timeout(120)
def test_simulator_stops_on_sigterm(tmp_path: Path) -> None:
    err, out = tmp_path / "err.txt", tmp_path / "s.h5"
    with err.open("w") as e:
        # charlm: ~20 s uninterrupted here, so the signal lands mid-run (the compiled
        # block-linear path now finishes 320,000 updates before the first progress line;
        # its stop between slots is tested in tests/test_fast_sim.py)
        job = subprocess.Popen([sys.executable, "-m", "rpd_mpi", "simulate", "--objective",
                                "charlm", "--stages", "3", "--microbatches", "20000",
                                "--width", "8", "--heads", "2", "--context", "8",
                                "--batch-size", "2", "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=e, cwd=tmp_path)
        _wait_for_progress(err, job)
        job.send_signal(signal.SIGTERM)
        _check(job, err, out, "SIGTERM", 20000 * 3)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target,sig", [("rank", signal.SIGTERM), ("mpiexec", signal.SIGTERM),
                                        ("mpiexec", signal.SIGUSR1)])
def test_a_signal_stops_every_rank_and_keeps_the_run(tmp_path: Path, target: str,
                                                     sig: signal.Signals) -> None:
    err, out = tmp_path / "err.txt", tmp_path / "t.h5"
    with err.open("w") as e:
        job = subprocess.Popen([MPIEXEC, "-n", "4", sys.executable, "-m", "rpd_mpi", "train",
                                *LONG, "--op-cost", "0.01", "--wait", "polite", "--out",
                                str(out)], stdout=subprocess.DEVNULL, stderr=e, cwd=tmp_path)
        _wait_for_progress(err, job)
        if target == "mpiexec":
            job.send_signal(sig)
        else:                                    # one rank only: the others learn it by MPI
            ranks = subprocess.run(["pgrep", "-f", f"rpd_mpi train .*--out {out}"],
                                   capture_output=True, text=True).stdout.split()
            ranks = [p for p in ranks if int(p) != job.pid]
            assert ranks
            subprocess.run(["kill", f"-{sig.name[3:]}", ranks[-1]], check=True)
        _check(job, err, out, sig.name, 400 * 4)
