"""A diverged run stops, keeps its ledger (status = "diverged"), and exits with code 3.

Each engine: the simulator (PD, RPD), and real mpiexec jobs for PD static and dynamic order,
LocalSGD with two allreduce groups, RPD and the character LM. Every case checks the exit
code, the one `rpd-mpi: error: diverged ...` line, a readable ledger saying where it
diverged, and that `report --json` is strict JSON (no NaN/Infinity).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rpd_mpi.ledger import read_run
from rpd_mpi.outputs import EXIT_DIVERGED

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
SMALL = ["--microbatches", "20", "--dim", "8", "--examples", "16", "--batch-size", "4"]


def _strict(text: str) -> dict:
    def refuse(const: str) -> None:
        raise ValueError(f"non-standard JSON constant {const}")
    return json.loads(text, parse_constant=refuse)


def _run(cmd: list[str], cwd: Path, limit: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "-k", "5", str(limit), *cmd], capture_output=True,
                          text=True, cwd=cwd, timeout=limit + 20)


def _check(res: subprocess.CompletedProcess, out: Path) -> None:
    assert res.returncode == EXIT_DIVERGED, (res.returncode, res.stderr[-2000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rpd-mpi:")]
    assert len(lines) == 1 and "diverged at update" in lines[0] and "--lr" in lines[0], lines
    assert "Traceback" not in res.stderr
    rec = read_run(out)
    assert rec.attrs["status"] == "diverged"
    assert rec.attrs["diverged_update"] == len(rec.updates)
    assert rec.attrs["diverged_what"].startswith(("loss", "gradient norm", "objective"))
    assert math.isfinite(float(rec.attrs["diverged_value"])) is False or \
        float(rec.attrs["diverged_value"]) > 0
    report = subprocess.run([sys.executable, "-m", "rpd_mpi", "report", str(out), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert report.returncode == 0, report.stderr
    summary = _strict(report.stdout)
    assert summary["status"].startswith("diverged at update")
    assert not list(out.parent.glob(f"{out.name}.*"))        # no parts, lock or partial left


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method,extra", [("pd", []), ("rpd", []),
                                          ("localsgd", ["--trajectories", "2"])])
def test_simulator_stops_on_divergence(tmp_path: Path, method: str, extra: list[str]) -> None:
    out = tmp_path / "d.h5"
    res = _run([sys.executable, "-m", "rpd_mpi", "simulate", "--method", method, "--stages",
                "4", *SMALL, *extra, "--lr", "1e6", "--out", str(out)], tmp_path)
    _check(res, out)
    assert len(read_run(out).updates) < 80                  # stopped early, not at the end


@pytest.mark.timeout(120)
def test_non_finite_gradient_stops_the_simulator(tmp_path: Path) -> None:
    out = tmp_path / "nan.h5"
    res = _run([sys.executable, "-m", "rpd_mpi", "simulate", "--stages", "2", *SMALL,
                "--lr", "1e150", "--diverge-factor", "0", "--out", str(out)], tmp_path)
    _check(res, out)
    assert not math.isfinite(float(read_run(out).attrs["diverged_value"]))


MPI_CASES = {
    "pd-static": (4, ["--method", "pd", "--stages", "4"]),
    "pd-dynamic": (4, ["--method", "pd", "--stages", "4", "--order", "dynamic"]),
    "localsgd-groups": (4, ["--method", "localsgd", "--stages", "2", "--groups", "2",
                            "--trajectories", "2", "--local-steps", "2"]),
    "rpd": (2, ["--method", "rpd", "--stages", "2"]),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", sorted(MPI_CASES))
def test_mpi_ranks_stop_together_on_divergence(tmp_path: Path, case: str) -> None:
    n, args = MPI_CASES[case]
    out = tmp_path / f"{case}.h5"
    res = _run([MPIEXEC, "-n", str(n), sys.executable, "-m", "rpd_mpi", "train", *args,
                *SMALL, "--lr", "1e6", "--timeout", "30", "--wait", "polite",
                "--out", str(out)], tmp_path, limit=120)
    _check(res, out)


@pytest.mark.timeout(240)
def test_charlm_divergence_on_ranks(tmp_path: Path) -> None:
    out = tmp_path / "lm.h5"
    res = _run([MPIEXEC, "-n", "3", sys.executable, "-m", "rpd_mpi", "train", "--method",
                "pd", "--objective", "charlm", "--stages", "3", "--microbatches", "30",
                "--width", "16", "--heads", "2", "--context", "8", "--batch-size", "2",
                "--lr", "1e4", "--timeout", "60", "--wait", "polite", "--out", str(out)],
               tmp_path, limit=200)
    _check(res, out)
