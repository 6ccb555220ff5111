"""Progress lines: written to a log (not a terminal) while a run goes, on rank 0 only."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rpd_mpi.progress import Progress

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_log_lines_at_a_steady_cadence(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    log = _Log()
    p = Progress(100, what="updates", stream=log)
    for done in range(1, 101):
        clock[0] += 0.25                          # 25 s in all
        p.tick(done, loss=1.0 / done)
    lines = log.getvalue().splitlines()
    assert 4 <= len(lines) <= 7 and lines[-1].startswith("[rpd-mpi] updates 100/100 (100%)")
    assert "ETA" in lines[0] and "elapsed" in lines[0] and "loss" in lines[0]
    quiet = _Log()
    q = Progress(100, enabled=False, stream=quiet)
    for done in range(1, 101):
        clock[0] += 0.25
        q.tick(done)
    assert quiet.getvalue() == ""


@pytest.mark.timeout(120)
def test_progress_reaches_a_log_file_while_mpiexec_runs(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("w") as err:
        job = subprocess.Popen(["timeout", "-k", "5", "90", MPIEXEC, "-n", "4", sys.executable,
                                "-m", "rpd_mpi", "train", "--stages", "4", "--microbatches",
                                "60", "--dim", "8", "--examples", "16", "--batch-size", "4",
                                "--op-cost", "0.1", "--wait", "polite", "--out", "run.h5"],
                               cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
        seen, running = "", False
        for _ in range(400):
            time.sleep(0.1)
            seen = log.read_text()
            if "[rpd-mpi] microbatches" in seen:
                running = job.poll() is None
                break
        assert job.wait(timeout=100) == 0
    assert running, seen                             # the line was there before the end
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("[rpd-mpi]")]
    assert len(lines) >= 2 and lines[-1].startswith("[rpd-mpi] microbatches 60/60")
