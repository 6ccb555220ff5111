"""The Slurm batch scripts in jobs/, submitted for real to a one-node Slurm on this machine.

A module fixture installs Debian's slurm-wlm and munge when missing and brings up munged,
slurmctld and slurmd with all their files in a temporary directory (tests/slurm_node.sh); it
stops them at teardown. Skipped, with the reason, where that cannot be done: not root, no
apt-get, apt fails (no network), or RPD_SKIP_SLURM=1. Every subprocess runs under `timeout`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from rpd_mpi.ledger.run_file import read_run

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "tests" / "slurm_node.sh"
INSTALL_TIMEOUT = 330   # apt-get update + install on a cold machine; skip beyond that
JOB_TIMEOUT = 120       # one `sbatch --wait`; `sbatch --wait` blocks forever on a bad node
GPUS = 2                # fake GPUs declared on the node (GRES over mknod'd device files)
SMALL = ["--method", "pd", "--objective", "quadratic", "--microbatches", "6", "--dim", "8",
         "--examples", "30", "--batch-size", "5"]

pytestmark = pytest.mark.timeout(INSTALL_TIMEOUT + 270)


def _run(cmd: list[str], limit: float, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["timeout", "-k", "5", str(limit), *cmd], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, **kw)


class Cluster:
    """A running one-node cluster: its directory and the environment that reaches it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env.update(SLURM_CONF=str(directory / "slurm.conf"), RPD_VENV=sys.prefix)
        self.env = env

    def run(self, cmd: list[str], limit: float = 30, cwd: Path = ROOT,
            **env: str) -> subprocess.CompletedProcess:
        return _run(cmd, limit, cwd=cwd, env={**self.env, **env})

    def sbatch_wait(self, workdir: Path, *args: str, **env: str) -> str:
        """`sbatch --wait ARGS` from the repo root, the job running in workdir; its job id."""
        cmd = ["sbatch", "--wait", "--parsable", f"--chdir={workdir}",
               f"--output={workdir}/%x-%A_%a.out", *args]
        proc = self.run(cmd, JOB_TIMEOUT, **env)
        logs = "".join(p.read_text() for p in sorted(workdir.glob("*.out")))
        assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stderr}\n{logs}"
        return proc.stdout.strip().split(";")[0]

    def gpus(self) -> int:
        node = self.run(["scontrol", "show", "node"]).stdout
        found = re.search(r"Gres=gpu:(\d+)", node)
        return int(found.group(1)) if found else 0


@pytest.fixture(scope="module")
def slurm() -> Iterator[Cluster]:
    if os.environ.get("RPD_SKIP_SLURM"):
        pytest.skip("RPD_SKIP_SLURM is set")
    if os.geteuid() != 0:
        pytest.skip("not root: a one-node Slurm needs root (apt-get, munged, slurmd)")
    if not shutil.which("timeout"):
        pytest.skip("no `timeout` command (coreutils) to bound sbatch --wait")
    got = _run([str(NODE), "install"], INSTALL_TIMEOUT)
    if got.returncode in (124, 137):
        pytest.skip(f"installing slurm-wlm took more than {INSTALL_TIMEOUT} s")
    if got.returncode != 0:
        pytest.skip(f"cannot install slurm-wlm + munge: {got.stderr.strip()[-500:]}")
    directory = Path(tempfile.mkdtemp(prefix="rpd-slurm-"))  # short: holds munge's socket
    try:
        up = _run([str(NODE), "up", str(directory), "8", str(GPUS)], 90)
        assert up.returncode == 0, f"one-node Slurm did not come up:\n{up.stdout}{up.stderr}"
        yield Cluster(directory)
    finally:
        _run([str(NODE), "down", str(directory)], 60)
        shutil.rmtree(directory, ignore_errors=True)


def test_pipeline_sbatch_writes_ledger(slurm: Cluster, tmp_path: Path) -> None:
    job = slurm.sbatch_wait(tmp_path, "--ntasks=2", "jobs/pipeline.sbatch", *SMALL)
    run = read_run(tmp_path / f"pipeline-{job}.h5")
    assert run.attrs["engine"] == "mpi"
    assert run.attrs["world_size"] == run.attrs["stages"] == 2
    assert len(run.updates) == 2 * 6
    assert run.attrs["slurm_job_id"] == job


@pytest.mark.parametrize("command, engine", [("simulate", "sim"), ("train", "mpi")])
def test_sweep_array_one_ledger_per_step_size(slurm: Cluster, tmp_path: Path, command: str,
                                              engine: str) -> None:
    tasks = "--ntasks=2" if command == "train" else "--ntasks=1"
    job = slurm.sbatch_wait(tmp_path, "--array=0-1", tasks, "jobs/sweep.sbatch", "--stages", "2",
                            *SMALL, LR_LO="-7", RPD_CMD=command)
    for i in (0, 1):
        run = read_run(tmp_path / "results" / "sweep" / job / f"lr_{i}.h5")
        assert run.attrs["engine"] == engine
        assert run.attrs["lr"] == 2.0 ** (-7 + i)
        assert len(run.updates) == 2 * 6


def test_second_sweep_keeps_the_first_and_user_flags_win(slurm: Cluster, tmp_path: Path) -> None:
    """Each array job writes its own folder; a --lr given to the script wins over the grid's."""
    first = slurm.sbatch_wait(tmp_path, "--array=0-1", "jobs/sweep.sbatch", "--stages", "2",
                              *SMALL, LR_LO="-7")
    second = slurm.sbatch_wait(tmp_path, "--array=0-1", "jobs/sweep.sbatch", "--stages", "2",
                               *SMALL, "--lr", "0.0625", LR_LO="-7")
    assert first != second
    for i in (0, 1):
        assert read_run(tmp_path / "results" / "sweep" / first / f"lr_{i}.h5").attrs["lr"] == \
            2.0 ** (-7 + i)
        assert read_run(tmp_path / "results" / "sweep" / second / f"lr_{i}.h5").attrs["lr"] == \
            0.0625


def test_sweep_chain_collects_after_the_array(slurm: Cluster, tmp_path: Path) -> None:
    """jobs/sweep-chain.sh: the array, then `tool sweep --collect` with --dependency=afterok
    (submitted at once: without the dependency it would start before the ledgers exist)."""
    got = slurm.run([str(ROOT / "jobs" / "sweep-chain.sh"), "-7", "-6", "--stages", "2", *SMALL],
                    2 * JOB_TIMEOUT, cwd=tmp_path, CHAIN_WAIT="1")
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert got.returncode == 0, f"{got.stdout}\n{got.stderr}\n{logs}"
    words = got.stdout.split()
    assert words[0] == "sweep" and words[2] == "collect", got.stdout
    sweep, collect = words[1], words[3].split(";")[0]
    folder = tmp_path / "results" / "sweep" / sweep
    summary = json.loads((folder / "pd_sweep.json").read_text())
    assert sorted(p["lr"] for p in summary["points"]) == [2.0 ** -7, 2.0 ** -6]
    best = read_run(folder / "pd.h5")
    assert best.attrs["lr"] == summary["best_lr"]
    assert (tmp_path / f"rpd-sweep-collect-{collect}.out").exists()


def test_multinode_script_runs_on_one_node(slurm: Cluster, tmp_path: Path) -> None:
    """The 2-node example, shrunk to the one node here (command-line options beat #SBATCH)."""
    job = slurm.sbatch_wait(tmp_path, "--nodes=1", "--ntasks-per-node=2",
                            "jobs/pipeline-multinode.sbatch", *SMALL)
    run = read_run(tmp_path / f"pipeline-{job}.h5")
    assert run.attrs["world_size"] == run.attrs["stages"] == 2
    assert len(run.updates) == 2 * 6
    two = slurm.run(["sbatch", "--test-only", "jobs/pipeline-multinode.sbatch"])
    assert two.returncode != 0, "the example does not ask for 2 nodes"


def test_gpu_script_is_accepted_only_with_a_gpu_per_task(slurm: Cluster) -> None:
    if slurm.gpus() < GPUS:
        pytest.skip("mknod was refused, so the node has no fake GPUs")
    ok = slurm.run(["sbatch", "--test-only", f"--ntasks={GPUS}", "jobs/pipeline-gpu.sbatch"])
    assert ok.returncode == 0 and "to start at" in ok.stderr, ok.stderr
    too_many = slurm.run(["sbatch", "--test-only", f"--ntasks={GPUS + 1}",
                          "jobs/pipeline-gpu.sbatch"])
    assert too_many.returncode != 0, "the GPU script does not ask for one GPU per task"


def test_gpu_script_gives_each_stage_its_gpu(slurm: Cluster, tmp_path: Path) -> None:
    """rpd-mpi rejects --device cuda for now: a stand-in rpd-mpi reports what each task got."""
    if slurm.gpus() < GPUS:
        pytest.skip("mknod was refused, so the node has no fake GPUs")
    stub = tmp_path / "venv" / "bin" / "rpd-mpi"
    stub.parent.mkdir(parents=True)
    stub.write_text('#!/bin/sh\necho "task $SLURM_PROCID gpu $CUDA_VISIBLE_DEVICES args $*"\n')
    stub.chmod(0o755)
    slurm.sbatch_wait(tmp_path, f"--ntasks={GPUS}", "jobs/pipeline-gpu.sbatch",
                      "--microbatches", "6", RPD_VENV=str(stub.parents[1]))
    lines = sorted(
        line for p in tmp_path.glob("*.out") for line in p.read_text().splitlines()
        if line.startswith("task "))
    assert [line.split(" args ")[0] for line in lines] == ["task 0 gpu 0", "task 1 gpu 1"]
    for line in lines:
        assert line.split(" args ")[1].startswith(f"train --device cuda --stages {GPUS} --out ")
        assert line.endswith("--microbatches 6")


def test_a_stopped_job_requeues_and_resumes_to_the_uninterrupted_run(slurm: Cluster,
                                                                     tmp_path: Path) -> None:
    """jobs/pipeline-resumable.sbatch: USR1 to the batch script (what --signal=B:USR1@120
    sends near the time limit) makes the ranks take a final checkpoint and exit 5; the script
    requeues the job, the requeued run resumes (same job id, same --out) and ends with a
    complete ledger equal to an uninterrupted run's."""
    import time

    import numpy as np
    flags = ["--method", "pd", "--objective", "logistic", "--noise", "0.3", "--dim", "32",
             "--examples", "200", "--microbatches", "300", "--op-cost", "0.005", "--quiet"]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    ref = _run([mpiexec, "-n", "2", sys.executable, "-m", "rpd_mpi", "train", "--stages", "2",
                *flags, "--out", str(tmp_path / "full.h5")], 120)
    assert ref.returncode == 0, ref.stderr
    got = slurm.run(["sbatch", "--parsable", f"--chdir={tmp_path}", "--ntasks=2",
                     "jobs/pipeline-resumable.sbatch", *flags], 30, RPD_CHECKPOINT_EVERY="0.3")
    assert got.returncode == 0, got.stderr
    job = got.stdout.strip().split(";")[0]
    out = tmp_path / f"pipeline-{job}.h5"
    t0 = time.monotonic()
    while not [p for p in tmp_path.glob(f"{out.name}.*.ckpt/step-*")
               if not p.name.endswith(".tmp")]:
        assert time.monotonic() - t0 < 90, "no checkpoint within 90 s"
        time.sleep(0.05)
    sig = slurm.run(["scancel", "--signal=USR1", "--batch", job])
    assert sig.returncode == 0, sig.stderr
    log = tmp_path / f"rpd-resumable-{job}.out"
    while True:
        queued = slurm.run(["squeue", "-h", "-j", job]).stdout.strip()
        text = log.read_text() if log.exists() else ""
        if not queued and out.exists() and "start 2" in text:
            break
        assert time.monotonic() - t0 < 240, f"the job did not finish resumed:\n{text}"
        time.sleep(0.5)
    assert "requeueing" in text and "resumed run" in text, text
    full, resumed = read_run(tmp_path / "full.h5"), read_run(out)
    assert resumed.attrs["status"] == "complete" and resumed.attrs["resumed"] >= 1
    for x, y in zip(full.final_blocks, resumed.final_blocks):
        assert float(np.abs(x - y).max()) == 0.0
    order = [np.lexsort((r.updates.microbatch, r.updates.stage)) for r in (full, resumed)]
    for f in ("stage", "microbatch", "batch", "version", "loss", "grad_norm"):
        assert np.array_equal(getattr(full.updates, f)[order[0]],
                              getattr(resumed.updates, f)[order[1]]), f
