"""pytest-mpi side of the test harness: rank 0 reports the truth for all ranks.

Under ``mpiexec -n N python -m mpi4py -m pytest tests/mpi --with-mpi`` every rank runs the
same session. With ``--with-mpi`` (or ``--only-mpi``) this conftest:

* gives each rank its own temp root, ``<basetemp>/rank<r>`` (ranks racing on one root
  delete each other's directories);
* sends the console output of ranks > 0 to ``<rootdir>/.test-logs/mpi-n<N>-rank<r>.log``
  and lets only rank 0 write ``--junitxml``;
* replaces pytest-timeout's thread timer so that on a timeout every rank writes its stacks
  (rank 0 to the console, the others to their logs) before the first exit ends the job;
* gathers the outcome of each test phase (setup, call, teardown) from all ranks and gives
  every rank the merged outcome: a test fails if it failed on any rank, or if its outcome
  differs across ranks, and the report names the ranks and the first error line.

The gathers are collectives inside hooks, so every rank must reach them in the same order.
All ranks collect the same items (checked once after collection); setup and teardown run
for every item; the merged setup outcome, identical on all ranks, decides whether the call
phase runs. Without ``--with-mpi`` this file does nothing and does not import mpi4py.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_COMM = pytest.StashKey[Any]()
_DETAIL_CHARS = 3000  # tail of another rank's failure text shown in rank 0's report
_DUMP_GRACE_S = 1.0  # after a timeout, time for the other ranks to write their stacks


@dataclass(frozen=True)
class RankOutcome:
    """What one rank saw in one phase of one test (small: it is pickled and gathered)."""

    outcome: str  # "passed" | "failed" | "skipped"
    xfail: bool
    line: str  # first line of the error or skip reason, "" when passed
    detail: str  # tail of the failure text, "" unless failed


@dataclass(frozen=True)
class _Crash:
    """Stands in for pytest's reprcrash: the one-line message JUnit and -r summaries use."""

    path: str
    lineno: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.message}"


class _RankRepr:
    """Failure text of a merged report: summary line, own traceback, other ranks' tails."""

    def __init__(self, crash: _Crash, own: Any, others: list[tuple[int, str]]) -> None:
        self.reprcrash = crash
        self.own = own
        self.others = others

    def toterminal(self, tw: Any) -> None:
        tw.line(self.reprcrash.message, red=True, bold=True)
        if self.own is not None:
            if hasattr(self.own, "toterminal"):
                self.own.toterminal(tw)
            else:
                tw.line(str(self.own))
        for rank, detail in self.others:
            tw.sep("-", f"rank {rank}")
            tw.line(detail)

    def __str__(self) -> str:
        parts = [self.reprcrash.message]
        if self.own is not None:
            parts.append(str(self.own))
        parts += [f"--- rank {rank} ---\n{detail}" for rank, detail in self.others]
        return "\n".join(parts)


def _mpi_active(config: pytest.Config) -> bool:
    return bool(config.getoption("--with-mpi", False) or config.getoption("--only-mpi", False))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Per-rank temp root; ranks > 0 write no JUnit XML and log to a file."""
    if not _mpi_active(config):
        return
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    config.stash[_COMM] = comm
    base = config.option.basetemp
    if base is None:
        base = comm.bcast(tempfile.mkdtemp(prefix="pytest-mpi-") if comm.rank == 0 else None)
    Path(base).mkdir(parents=True, exist_ok=True)
    config.option.basetemp = str(Path(base) / f"rank{comm.rank}")
    if comm.rank > 0:
        config.option.xmlpath = None
        _redirect_output(config, comm.rank, comm.size)


def _redirect_output(config: pytest.Config, rank: int, size: int) -> None:
    """Point fds 1 and 2 at this rank's log, restarting pytest's capture so that it keeps them."""
    log_dir = config.rootpath / ".test-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:  # its saved fds would put the terminal back at the next suspend
        capman.stop_global_capturing()
    sys.stdout.flush()
    sys.stderr.flush()
    log = log_dir / f"mpi-n{size}-rank{rank}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if capman is not None:
        capman.start_global_capturing()
        capman.suspend_global_capture()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Wait for every rank to finish its XML and output before any rank exits.

    ``python -m mpi4py`` turns a nonzero exit status into ``MPI_Abort``, which kills the
    other ranks; without this barrier a failing rank could kill rank 0 mid-report.
    """
    comm = config.stash.get(_COMM, None)
    if comm is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        comm.Barrier()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Stop every rank together if the ranks did not collect the same tests."""
    comm = session.config.stash.get(_COMM, None)
    if comm is None:
        return
    ids = hashlib.sha256("\n".join(item.nodeid for item in session.items).encode()).hexdigest()
    views = comm.allgather((len(session.items), ids, session.testsfailed))
    if len(set(views)) > 1:
        listing = "; ".join(f"rank {r}: {n} tests, {e} errors" for r, (n, _, e) in enumerate(views))
        pytest.exit(f"ranks collected different tests ({listing})", returncode=3)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Gather this phase's outcome from all ranks and merge it into the report."""
    report = yield
    comm = item.config.stash.get(_COMM, None)
    if comm is None:
        return report
    try:
        _merge(report, comm.allgather(_local_outcome(report)), comm.rank, comm.size)
    except Exception:  # a harness bug: stop the whole job rather than leave ranks waiting
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
    return report


def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """Under MPI, a thread timer that dumps this rank's stacks, waits briefly, then exits."""
    comm = item.config.stash.get(_COMM, None)
    if comm is None or settings.method != "thread":
        return None  # pytest-timeout's own timer
    timer = threading.Timer(settings.timeout, _timed_out, (item, settings.timeout, comm))
    timer.daemon = True

    def cancel() -> None:
        timer.cancel()
        timer.join()

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # pytest-timeout calls it
    timer.start()
    return True


def _timed_out(item: pytest.Item, timeout: float, comm: Any) -> None:
    """Report who waits where, on every rank at about the same time, then end the job.

    The timers of all ranks start together (each test begins after a gather), so all fire
    together too; the grace lets every rank write its stacks before any exit kills the rest.
    """
    capman = item.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.suspend_global_capture(in_=True)
    tw = item.config.get_terminal_writer()
    tw.line()
    tw.sep("+", f"Timeout ({timeout:g} s) on rank {comm.rank} of {comm.size}: {item.nodeid}")
    if comm.rank == 0 and comm.size > 1:
        tw.line(f"stacks of ranks > 0: .test-logs/mpi-n{comm.size}-rank<r>.log")
    tw.line(_stacks())
    tw.flush()
    sys.stdout.flush()
    time.sleep(_DUMP_GRACE_S)
    os._exit(1)


def _stacks() -> str:
    """Stacks of the other threads of this rank, without pytest's and libraries' frames."""
    here = threading.get_ident()
    texts = []
    for ident, frame in sys._current_frames().items():
        if ident == here:
            continue
        frames = [f for f in traceback.extract_stack(frame)
                  if "site-packages" not in f.filename and not f.filename.startswith("<")]
        texts.append(f"thread {ident}, innermost call last:\n"
                     + "".join(traceback.format_list(frames)))
    return "\n".join(texts)


def _local_outcome(report: pytest.TestReport) -> RankOutcome:
    if report.passed:
        return RankOutcome("passed", hasattr(report, "wasxfail"), "", "")
    detail = report.longreprtext[-_DETAIL_CHARS:] if report.failed else ""
    return RankOutcome(report.outcome, hasattr(report, "wasxfail"), _first_line(report), detail)


def _first_line(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        text = f"{Path(str(crash.path)).name}:{crash.lineno}: {crash.message}"
    elif isinstance(longrepr, tuple):  # a skip: (path, lineno, reason)
        text = str(longrepr[2])
    else:
        text = str(longrepr or "")
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else ""


def _merge(report: pytest.TestReport, outcomes: list[RankOutcome], rank: int, size: int) -> None:
    """Turn ``report`` into a failure if any rank failed or the ranks disagree."""
    failed = [r for r, o in enumerate(outcomes) if o.outcome == "failed"]
    kinds = sorted({o.outcome for o in outcomes})
    if failed:
        ranks = ", ".join(map(str, failed))
        first = failed[0]
        message = f"failed on rank {ranks} of {size}; rank {first}: {outcomes[first].line}"
    elif len(kinds) > 1 and not all(o.xfail for o in outcomes):
        by_kind = "; ".join(
            f"{k} on rank {', '.join(str(r) for r, o in enumerate(outcomes) if o.outcome == k)}"
            for k in kinds
        )
        skipped = next(r for r, o in enumerate(outcomes) if o.outcome == "skipped")
        message = f"outcome differs across ranks ({by_kind}); rank {skipped}: "
        message += outcomes[skipped].line
    else:
        return
    own = report.longrepr if report.failed else None
    others = [(r, outcomes[r].detail) for r in failed if r != rank]
    path, lineno = report.location[0], (report.location[1] or 0) + 1
    report.outcome = "failed"
    if hasattr(report, "wasxfail"):
        del report.wasxfail
    report.longrepr = _RankRepr(_Crash(path, lineno, f"MPI {report.when}: {message}"), own, others)
