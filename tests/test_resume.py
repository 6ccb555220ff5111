"""Checkpoints and --resume of the simulator: real processes, real signals, real files.

A run with `--checkpoint-every` is killed (SIGKILL after its first checkpoint, or SIGTERM,
which checkpoints at the stop), resumed with the same command plus `--resume`, and its ledger
compared with an uninterrupted run's: every updates array, the objective, the events and the
final blocks equal exactly. The MPI counterpart is tests/test_resume_mpi.py.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from rpd_mpi import checkpoint
from rpd_mpi.ledger import read_run
from rpd_mpi.records import RunRecord

SIM = [sys.executable, "-m", "rpd_mpi", "simulate", "--quiet"]


def same_run(a: RunRecord, b: RunRecord, *, timing: bool = True) -> None:
    """Everything of two runs that does not depend on measured time is equal (timing=True:
    delays, objective and events too, as in the simulator)."""
    for f in dataclasses.fields(a.updates):
        if not timing and f.name in ("start", "end", "delays", "staleness"):
            continue
        x, y = getattr(a.updates, f.name), getattr(b.updates, f.name)
        assert np.array_equal(x, y, equal_nan=True), f"updates.{f.name} differ"
    for x, y in zip(a.final_blocks, b.final_blocks):
        assert np.array_equal(x, y), "final blocks differ"
    if timing:
        for f in dataclasses.fields(a.objective):
            assert np.array_equal(getattr(a.objective, f.name), getattr(b.objective, f.name))
        assert np.array_equal(a.events, b.events)


def _checkpoints(out: Path) -> list[str]:
    return sorted(glob.glob(f"{out}.*.ckpt/step-*"))


def _wait_for_checkpoint(out: Path, job: subprocess.Popen, limit: float = 60) -> None:
    t0 = time.monotonic()
    while not [p for p in _checkpoints(out) if not p.endswith(".tmp")]:
        assert job.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() - t0 < limit, "no checkpoint within the limit"
        time.sleep(0.02)


RUNS = {
    "pd": ["--method", "pd", "--stages", "4", "--microbatches", "6000"],
    "localsgd-groups": ["--method", "localsgd", "--stages", "3", "--groups", "2",
                        "--trajectories", "2", "--local-steps", "3", "--microbatches", "3000"],
    "gpipe": ["--method", "gpipe", "--stages", "4", "--microbatches", "6000"],
    "naive": ["--method", "naive", "--stages", "3", "--microbatches", "2500"],
    "rpd-uniform": ["--method", "rpd", "--stages", "4", "--microbatches", "1500",
                    "--delay-source", "uniform"],
    "rpd-pd": ["--method", "rpd", "--stages", "4", "--microbatches", "1500",
               "--delay-source", "pd"],
    "rpd-max": ["--method", "rpd", "--stages", "3", "--microbatches", "1500",
                "--delay-source", "max"],
    "rpd-zero": ["--method", "rpd", "--stages", "3", "--microbatches", "1500",
                 "--delay-source", "zero"],
    "charlm": ["--method", "pd", "--stages", "3", "--objective", "charlm", "--width", "16",
               "--heads", "2", "--context", "16", "--microbatches", "600", "--eval-every", "20"],
}
LINEAR = ["--objective", "logistic", "--noise", "0.3", "--dim", "32", "--examples", "200"]


@pytest.mark.parametrize("name", list(RUNS))
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_simulation_resumes_to_the_same_run(tmp_path: Path, name: str,
                                                     how: str) -> None:
    flags = RUNS[name] + ([] if name == "charlm" else LINEAR)
    subprocess.run(SIM + flags + ["--out", "full.h5"], cwd=tmp_path, check=True, timeout=120)
    out = tmp_path / "run.h5"
    cmd = SIM + flags + ["--out", str(out), "--checkpoint-every", "0.05"]
    job = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(out, job)
    job.send_signal(getattr(signal, how))
    _, err = job.communicate(timeout=60)
    if job.returncode == 0:
        pytest.skip("the run finished before the signal landed")   # a very fast machine
    assert job.returncode == (-9 if how == "SIGKILL" else 5), err
    if how == "SIGTERM":       # the stop checkpoints: the stopped ledger is there too
        assert read_run(out).attrs["status"] == "stopped"
    res = subprocess.run(cmd + ["--resume"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resumed run" in res.stderr
    full, resumed = read_run(tmp_path / "full.h5"), read_run(out)
    same_run(full, resumed)
    if name == "charlm":                 # the held-out losses are part of the state too
        assert full.objective.validation is not None
        assert np.array_equal(full.objective.validation, resumed.objective.validation)
    assert resumed.attrs["resumed"] >= 1
    segments = json.loads(resumed.attrs["segments"])
    assert segments[-1]["cause"] == "complete" and len(segments) >= 2
    assert not _checkpoints(out), "a complete run leaves no checkpoint behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.h5", "run.h5"]


def test_resume_without_a_checkpoint_starts_afresh(tmp_path: Path) -> None:
    flags = RUNS["pd"][:-1] + ["50"] + LINEAR
    res = subprocess.run(SIM + flags + ["--out", "a.h5", "--resume"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert read_run(tmp_path / "a.h5").attrs["status"] == "complete"


def test_a_different_configuration_is_refused_naming_the_field(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    cmd = SIM + RUNS["pd"] + LINEAR + ["--out", str(out), "--checkpoint-every", "0.05"]
    job = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(out, job)
    job.kill()
    job.wait(timeout=30)
    res = subprocess.run(cmd + ["--resume", "--lr", "0.5"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpd-mpi: error: --lr: differs from the "
                                                   "checkpoint"), res.stderr
    # runtime knobs may change: --quiet, --checkpoint-every, --timeout
    ok = subprocess.run(cmd[:-1] + ["0.5", "--resume"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_the_writer_keeps_the_old_step_until_the_new_one_is_complete(tmp_path: Path) -> None:
    from rpd_mpi.config import RunConfig
    cfg = RunConfig(out=str(tmp_path / "x.h5"), checkpoint_every=1.0)
    w = checkpoint.SimCheckpoints(cfg, "RID", [])
    w.save({"a": 1}, 10, "checkpoint")
    first = checkpoint.latest(cfg.out)
    assert first is not None and first.load(0) == {"a": 1} and first.run_id == "RID"
    step = w.begin()                       # a second step half written: not complete
    w.put(step, 0, {"a": 2})
    again = checkpoint.latest(cfg.out)
    assert again is not None and again.step == first.step and again.load(0) == {"a": 1}
    w.commit(step, 1, {"progress": 20})
    newest = checkpoint.latest(cfg.out)
    assert newest is not None and newest.load(0) == {"a": 2}
    assert len(_checkpoints(Path(cfg.out))) == 1        # the old step went
