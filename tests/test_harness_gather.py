"""The MPI harness can fail: rank 0's report carries other ranks' failures, hangs end.

The MPI tests here run ``mpiexec -n 2 python -m mpi4py -m pytest`` on a small test file in a temp
dir, with a copy of tests/mpi/conftest.py, and reads rank 0's JUnit XML. These tests are
serial: the subprocess goes red, this suite does not. The last test checks the one
summary line of test.sh (tests/summarize.py).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("mpi4py")

CONFTEST = Path(__file__).parent / "mpi" / "conftest.py"

RANK1_DISAGREES = '''
import pytest
from mpi4py import MPI

comm = MPI.COMM_WORLD


@pytest.fixture
def broken_on_rank1():
    if comm.rank == 1:
        raise RuntimeError("fixture broke on rank 1")


def test_passes_everywhere():
    assert comm.allreduce(1) == comm.size


def test_fails_on_rank1_only():
    assert comm.rank != 1, "rank 1 disagrees"


def test_setup_fails_on_rank1_only(broken_on_rank1):
    comm.Barrier()  # rank 0 alone here would deadlock: the call must not run anywhere


def test_skips_on_rank0_only():
    if comm.rank == 0:
        pytest.skip("rank 0 only skip")


def test_still_in_step_afterwards():
    assert comm.allreduce(comm.rank) == comm.size * (comm.size - 1) // 2
'''

RANK0_HANGS = '''
from mpi4py import MPI


def test_hangs_on_rank0_only():
    if MPI.COMM_WORLD.rank == 0:
        MPI.COMM_WORLD.Barrier()
'''


@dataclass(frozen=True)
class MpiRun:
    """What one mpiexec'd pytest session left behind."""

    returncode: int
    console: str
    seconds: float
    junit: ET.Element | None


def _mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None or shutil.which("timeout") is None:
        pytest.skip("needs mpiexec and timeout")
    return found


def run_mpi_pytest(tmp_path: Path, source: str, test_timeout: int, outer: int = 60) -> MpiRun:
    """Run ``source`` as a test file under ``mpiexec -n 2`` the way test.sh does."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(source)
    xml = tmp_path / "junit.xml"
    cmd = ["timeout", "-k", "5", str(outer), _mpiexec(), "-n", "2",
           sys.executable, "-m", "mpi4py", "-m", "pytest", str(tmp_path), "--with-mpi",
           "-c", str(tmp_path / "pytest.ini"), "-p", "no:cacheprovider",
           f"--timeout={test_timeout}", "--timeout-method=thread",
           f"--basetemp={tmp_path / 'basetemp'}", f"--junitxml={xml}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=outer + 15)
    seconds = time.monotonic() - start
    junit = ET.parse(xml).getroot() if xml.exists() else None
    return MpiRun(proc.returncode, proc.stdout + proc.stderr, seconds, junit)


def _cases(junit: ET.Element) -> dict[str, ET.Element]:
    return {case.get("name", ""): case for case in junit.iter("testcase")}


def _problem(case: ET.Element, tag: str) -> str:
    found = case.find(tag)
    assert found is not None, f"{case.get('name')} has no <{tag}>"
    return found.get("message", "")


@pytest.fixture(scope="module")
def disagreeing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MpiRun]:
    """One run of RANK1_DISAGREES, shared by the tests that read its reports."""
    tmp_path = tmp_path_factory.mktemp("disagree")
    return tmp_path, run_mpi_pytest(tmp_path, RANK1_DISAGREES, test_timeout=30)


def test_rank0_reports_failures_of_rank1(disagreeing: tuple[Path, MpiRun]) -> None:
    _, run = disagreeing
    assert run.returncode != 0
    assert run.junit is not None, run.console
    cases = _cases(run.junit)
    assert len(cases) == 5
    for name in ("test_passes_everywhere", "test_still_in_step_afterwards"):
        assert list(cases[name]) == [], name
    failed = _problem(cases["test_fails_on_rank1_only"], "failure")
    assert "failed on rank 1 of 2" in failed and "rank 1 disagrees" in failed
    errored = _problem(cases["test_setup_fails_on_rank1_only"], "error")
    assert "failed on rank 1 of 2" in errored and "fixture broke on rank 1" in errored
    differs = _problem(cases["test_skips_on_rank0_only"], "failure")
    assert "outcome differs across ranks" in differs and "rank 0 only skip" in differs


def test_other_ranks_log_to_files(disagreeing: tuple[Path, MpiRun]) -> None:
    tmp_path, run = disagreeing
    assert run.console.count("test session starts") == 1
    log = (tmp_path / ".test-logs" / "mpi-n2-rank1.log").read_text()
    assert "test session starts" in log and "RuntimeError: fixture broke on rank 1" in log
    assert not (tmp_path / ".test-logs" / "mpi-n2-rank0.log").exists()


def _job_processes(tag: str) -> list[str]:
    """Command lines of live processes that mention ``tag`` (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if tag in text and str(os.getpid()) != cmdline.parent.name:
            found.append(text)
    return found


def test_hang_on_one_rank_ends_the_job(tmp_path: Path) -> None:
    run = run_mpi_pytest(tmp_path, RANK0_HANGS, test_timeout=1, outer=30)
    assert run.returncode not in (0, 124, 137), run.console  # pytest-timeout ended it
    assert run.seconds < 20
    assert run.junit is None
    assert "Timeout (1 s) on rank 0 of 2" in run.console  # each rank names where it waits:
    assert "MPI.COMM_WORLD.Barrier()" in run.console  # rank 0 in the test, rank 1 in the gather
    log = (tmp_path / ".test-logs" / "mpi-n2-rank1.log").read_text()
    assert "Timeout (1 s) on rank 1 of 2" in log and "pytest_runtest_makereport" in log
    if Path("/proc/self/cmdline").exists():
        assert _job_processes(str(tmp_path)) == []


JUNIT = """<testsuites><testsuite name="pytest">
<testcase classname="t" name="ok" /><testcase classname="t" name="bad"><failure message="boom"/>
</testcase><testcase classname="t" name="err"><error message="setup broke"/></testcase>
<testcase classname="t" name="skip"><skipped message="later"/></testcase></testsuite></testsuites>
"""


def _summarize(*phases: tuple[str, int, Path]) -> tuple[int, list[str]]:
    args = [sys.executable, str(Path(__file__).parent / "summarize.py")]
    for name, code, xml in phases:
        args += ["--phase", name, str(code), str(xml)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout.splitlines()


def test_summary_counts_all_phases_and_names_bad_ones(tmp_path: Path) -> None:
    mixed, empty = tmp_path / "mixed.xml", tmp_path / "empty.xml"
    mixed.write_text(JUNIT)
    empty.write_text('<testsuites><testsuite name="pytest" tests="0" /></testsuites>')
    code, lines = _summarize(("a", 0, empty), ("b", 5, empty))
    assert (code, lines[-1]) == (0, "0 passed, 0 failed, 0 skipped")
    code, lines = _summarize(("a", 1, mixed), ("b", 5, empty), ("c", 124, tmp_path / "none"))
    assert (code, lines[-1]) == (1, "1 passed, 2 failed, 1 skipped")
    assert any(line.startswith("PHASE FAILED: c: no readable JUnit XML") for line in lines)
    assert "FAILED [a] t::bad - boom" in lines and not any("PHASE FAILED: b" in x for x in lines)
    code, lines = _summarize(("a", 0, mixed))  # a zero exit does not hide failures
    assert code == 1 and lines[-2] == "PHASE FAILED: a: exit 0 but its XML lists failures"
