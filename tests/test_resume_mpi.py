"""Checkpoints and --resume on real MPI ranks: kill a running job, resume it, compare.

Each test runs the job once uninterrupted, then again with `--checkpoint-every`, kills it at
a random moment after its first checkpoint (SIGKILL to one rank: the job dies at once; or
SIGTERM to mpiexec: a final checkpoint, exit 5), resumes it with the same command plus
`--resume`, and compares the two ledgers: final blocks equal to 0.0 and every
timing-independent updates array equal, sorted by (group, stage, microbatch). A dynamic-order
run cannot equal another (its order follows arrival times); it must keep its invariants.
"""

from __future__ import annotations

import glob
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rpd_mpi.ledger import read_run
from rpd_mpi.records import RunRecord

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
DATA = ["--objective", "logistic", "--noise", "0.3", "--dim", "32", "--examples", "200",
        "--op-cost", "0.004", "--quiet", "--timeout", "20"]
RUNS = {
    "pd": ["--method", "pd", "--stages", "4", "--microbatches", "300"],
    "localsgd-groups": ["--method", "localsgd", "--stages", "2", "--groups", "2",
                        "--trajectories", "2", "--local-steps", "3", "--microbatches", "240"],
    "rpd": ["--method", "rpd", "--stages", "4", "--microbatches", "120",
            "--delay-source", "uniform"],
}
TIMING_FREE = ("stage", "microbatch", "batch", "version", "loss", "grad_norm", "trajectory",
               "group")


def _train(np_: int, flags: list[str]) -> list[str]:
    return [MPIEXEC, "-n", str(np_), sys.executable, "-m", "rpd_mpi", "train", *flags]


def _sorted(rec: RunRecord) -> dict[str, np.ndarray]:
    u = rec.updates
    order = np.lexsort((u.microbatch, u.stage, u.group))
    return {f: np.asarray(getattr(u, f))[order] for f in TIMING_FREE}


def same_math(a: RunRecord, b: RunRecord) -> None:
    for x, y in zip(a.final_blocks, b.final_blocks):
        assert float(np.abs(x - y).max()) == 0.0, "final blocks differ"
    sa, sb = _sorted(a), _sorted(b)
    for f in TIMING_FREE:
        assert np.array_equal(sa[f], sb[f], equal_nan=True), f"updates.{f} differ"


def _interrupt(tmp: Path, cmd: list[str], how: str) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, wait for its first complete checkpoint, then a random 0-0.5 s more, then
    SIGKILL one rank or SIGTERM mpiexec; then resume it. The resumed run's result."""
    err = open(tmp / "first.err", "w")
    job = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=err)
    t0 = time.monotonic()
    while not [p for p in glob.glob(str(tmp / "run.h5.*.ckpt/step-*")) if not p.endswith(".tmp")]:
        assert job.poll() is None, (tmp / "first.err").read_text()
        assert time.monotonic() - t0 < 90, "no checkpoint within 90 s"
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    if how == "SIGKILL":
        ranks = subprocess.run(["pgrep", "-f", f"rpd_mpi train .*--out {tmp / 'run.h5'}"],
                               capture_output=True, text=True).stdout.split()
        if ranks:
            subprocess.run(["kill", "-KILL", random.choice(ranks)])
    else:
        job.send_signal(signal.SIGTERM)
    code = job.wait(timeout=120)
    err.close()
    _wait_until_gone(tmp / "run.h5")
    if code == 0:
        pytest.skip("the run completed before the signal landed")
    if how == "SIGTERM":
        assert code == 5, (tmp / "first.err").read_text()
        text = (tmp / "first.err").read_text()
        assert "checkpoint" in text and "rerun with --resume" in text, text
    return subprocess.run(cmd + ["--resume"], cwd=tmp, capture_output=True, text=True,
                          timeout=180)


def _wait_until_gone(out: Path, limit: float = 90) -> None:
    """Until no process of the job is left: after one rank is killed, mpiexec may end before
    a surviving rank, which then waits in vain for the dead one until --timeout (what a
    scheduler's cleanup does at once). Resuming earlier would meet its lock on --out."""
    t0 = time.monotonic()
    while subprocess.run(["pgrep", "-f", f"rpd_mpi train .*--out {out}"],
                         capture_output=True).returncode == 0:
        assert time.monotonic() - t0 < limit, "the killed job's ranks did not end"
        time.sleep(0.1)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("name", list(RUNS))
def test_a_killed_job_resumes_to_the_uninterrupted_run(tmp_path: Path, name: str,
                                                       how: str) -> None:
    flags = RUNS[name] + DATA
    subprocess.run(_train(4, flags + ["--out", str(tmp_path / "full.h5")]), check=True,
                   cwd=tmp_path, capture_output=True, timeout=180)
    cmd = _train(4, flags + ["--out", str(tmp_path / "run.h5"), "--checkpoint-every", "0.3"])
    res = _interrupt(tmp_path, cmd, how)
    assert res.returncode == 0, res.stderr
    assert "rpd-mpi: resumed run" in res.stderr
    full, resumed = read_run(tmp_path / "full.h5"), read_run(tmp_path / "run.h5")
    same_math(full, resumed)
    assert resumed.attrs["status"] == "complete" and resumed.attrs["resumed"] >= 1
    segments = json.loads(resumed.attrs["segments"])
    assert [s["cause"] for s in segments][-1] == "complete"
    assert all(s["hosts"] for s in segments)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".err"))
    assert left == ["full.h5", "run.h5"], left        # no part, lock or checkpoint left


@pytest.mark.timeout(400)
def test_a_dynamic_order_job_survives_a_kill_with_its_invariants(tmp_path: Path) -> None:
    flags = ["--method", "pd", "--order", "dynamic", "--stages", "4",
             "--microbatches", "300"] + DATA
    cmd = _train(4, flags + ["--out", str(tmp_path / "run.h5"), "--checkpoint-every", "0.3"])
    res = _interrupt(tmp_path, cmd, "SIGKILL")
    assert res.returncode == 0, res.stderr
    rec = read_run(tmp_path / "run.h5")
    u = rec.updates
    pairs = set(zip(u.stage.tolist(), u.microbatch.tolist()))
    assert len(pairs) == len(u) == 4 * 300          # every stage updates once per microbatch
    assert (u.delays >= 0).all() and (u.local_staleness >= 0).all()
    for s in range(4):   # stash consistency: a stage's k-th update read a version <= k
        mine = u.stage == s
        rank = np.argsort(np.argsort(u.time[mine], kind="stable"), kind="stable")
        assert (u.version[mine] <= rank).all()
        assert np.array_equal(np.sort(u.version[mine] + u.local_staleness[mine]),
                              np.arange(mine.sum()))
    assert rec.attrs["resumed"] >= 1


def test_checkpoints_on_a_gpu_are_refused_on_every_rank_before_any_work(tmp_path: Path) -> None:
    res = subprocess.run(_train(3, ["--objective", "charlm", "--stages", "3", "--device", "cuda",
                                    "--checkpoint-every", "1", "--microbatches", "4",
                                    "--out", str(tmp_path / "x.h5")]),
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rpd-mpi:")]
    assert lines == ["rpd-mpi: error: --checkpoint-every: checkpoints and --resume run on "
                     "--device cpu only (device links are not drained to a cut)"], res.stderr
    assert list(tmp_path.iterdir()) == []          # nothing written, no lock left
