"""The launch scripts in jobs/: they parse, and jobs/local.sh runs a real pipeline.

The Slurm scripts are submitted for real in tests/test_slurm.py.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rpd_mpi.ledger.run_file import read_run

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ROOT / "jobs" / "local.sh"
SCRIPTS = sorted([*ROOT.glob("jobs/*.sh"), *ROOT.glob("jobs/*.sbatch"),
                  ROOT / "tests" / "slurm_node.sh"])
SMALL = ["--method", "pd", "--objective", "quadratic", "--microbatches", "6", "--dim", "8",
         "--examples", "30", "--batch-size", "5"]


def local(*args: str, prefix: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    """jobs/local.sh ARGS under `timeout`, with rpd-mpi and mpiexec from this interpreter's venv."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    environ.update({"RPD_VENV": sys.prefix, **env})
    return subprocess.run(["timeout", "-k", "5", "120", *prefix, str(LOCAL), *args],
                          capture_output=True, text=True, env=environ, stdin=subprocess.DEVNULL)


def test_every_job_script_is_executable_and_parses() -> None:
    assert {p.name for p in SCRIPTS} >= {"local.sh", "pipeline.sbatch", "pipeline-gpu.sbatch",
                                         "sweep.sbatch", "slurm_node.sh",
                                         "pipeline-multinode.sbatch", "sweep-collect.sbatch",
                                         "sweep-chain.sh"}
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"
        parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{script}: {parsed.stderr}"


def test_local_runs_a_two_rank_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    got = local("2", *SMALL, "--out", str(out))
    assert got.returncode == 0, got.stderr
    run = read_run(out)
    assert run.attrs["engine"] == "mpi"
    assert run.attrs["world_size"] == run.attrs["stages"] == 2
    assert len(run.updates) == 2 * 6


@pytest.mark.skipif(not shutil.which("taskset"), reason="needs taskset (util-linux)")
@pytest.mark.parametrize("given, used", [((), "polite"), (("--wait", "spin"), "spin")])
def test_local_waits_politely_when_oversubscribed(tmp_path: Path, given: tuple[str, ...],
                                                  used: str) -> None:
    """On one core, two ranks oversubscribe: polite waits, unless --wait is given."""
    out = tmp_path / "run.h5"
    got = local("2", *SMALL, *given, "--out", str(out), prefix=("taskset", "-c", "0"))
    assert got.returncode == 0, got.stderr
    assert read_run(out).config["runtime"]["wait"] == used


def fake_mpiexec(tmp_path: Path, version: str) -> Path:
    """A venv whose mpiexec claims `version` and prints what it was asked to run."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    mpiexec = bin_dir / "mpiexec"
    mpiexec.write_text(f"""#!/bin/sh
[ "$1" = --version ] && {{ echo '{version}'; exit 0; }}
echo "btl=$OMPI_MCA_btl root=$OMPI_ALLOW_RUN_AS_ROOT args $*"
""")
    mpiexec.chmod(0o755)
    return bin_dir.parent


@pytest.mark.skipif(not shutil.which("taskset"), reason="needs taskset (util-linux)")
def test_local_oversubscribes_open_mpi(tmp_path: Path) -> None:
    venv = fake_mpiexec(tmp_path, "mpiexec (Open MPI) 5.0.11")
    got = local("2", "--lr", "0.1", prefix=("taskset", "-c", "0"), RPD_VENV=str(venv))
    assert got.stdout.strip() == ("btl=^ofi root=1 args -n 2 --oversubscribe rpd-mpi train "
                                  "--stages 2 --wait polite --lr 0.1")


def test_local_adds_nothing_for_mpich_on_enough_cores(tmp_path: Path) -> None:
    venv = fake_mpiexec(tmp_path, "HYDRA build details:")
    got = local("1", "--lr", "0.1", RPD_VENV=str(venv))
    assert got.stdout.strip() == "btl= root= args -n 1 rpd-mpi train --stages 1 --lr 0.1"


def test_local_needs_a_stage_count() -> None:
    got = local("--stages", "2")
    assert got.returncode == 2 and "usage:" in got.stderr


# ----------------------------------------------------------------------------- sweep.sbatch
# Run as a plain bash script with the variables Slurm would set and a stand-in `srun` that
# runs its command here: what one array task does, without Slurm (tests/test_slurm.py submits
# it for real).

SWEEP = ROOT / "jobs" / "sweep.sbatch"


def sweep_task(tmp_path: Path, job: str, task: int, *args: str,
               **env: str) -> subprocess.CompletedProcess:
    """Array task `task` of array job `job`, in tmp_path, with this venv's rpd-mpi."""
    bin_dir = tmp_path / "venv" / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir(parents=True)
        (bin_dir / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')   # drop --mpi=...
        (bin_dir / "srun").chmod(0o755)
        (bin_dir / "rpd-mpi").symlink_to(Path(sys.prefix) / "bin" / "rpd-mpi")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ.update(SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID=str(int(job) + task),
                   SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(task),
                   RPD_VENV=str(bin_dir.parent), LR_LO="-7", **env)
    return subprocess.run(["timeout", "-k", "5", "120", "bash", str(SWEEP), *args],
                          capture_output=True, text=True, cwd=tmp_path, env=environ,
                          stdin=subprocess.DEVNULL)


def test_two_sweeps_do_not_overwrite_each_other(tmp_path: Path) -> None:
    for job, seed in (("101", "1"), ("202", "2")):
        for task in (0, 1):
            got = sweep_task(tmp_path, job, task, "--stages", "2", *SMALL, "--seed", seed)
            assert got.returncode == 0, got.stderr
    for job, seed in (("101", 1), ("202", 2)):
        for task in (0, 1):
            run = read_run(tmp_path / "results" / "sweep" / job / f"lr_{task}.h5")
            assert run.attrs["lr"] == 2.0 ** (-7 + task)
            assert run.config["seed"] == seed
    assert not list((tmp_path / "results" / "sweep").glob("*.h5"))


def test_sweep_user_flags_win(tmp_path: Path) -> None:
    """The script's --lr/--out come before the user's: argparse keeps the last."""
    mine = tmp_path / "mine.h5"
    got = sweep_task(tmp_path, "7", 1, "--stages", "2", *SMALL, "--lr", "0.03125",
                     "--out", str(mine))
    assert got.returncode == 0, got.stderr
    run = read_run(mine)
    assert run.attrs["lr"] == 0.03125 and run.config["out"] == str(mine)
    assert not (tmp_path / "results" / "sweep" / "7" / "lr_1.h5").exists()


def test_sweep_train_passes_the_task_count_as_stages(tmp_path: Path) -> None:
    """RPD_CMD=train: --stages $SLURM_NTASKS first, so a --stages of the user's still wins."""
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (bin_dir / "srun").chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ.update(SLURM_SUBMIT_DIR=str(tmp_path), SLURM_ARRAY_JOB_ID="9",
                   SLURM_ARRAY_TASK_ID="0", SLURM_NTASKS="3", RPD_VENV=str(bin_dir.parent),
                   RPD_CMD="train", LR_LO="-2")
    got = subprocess.run(["bash", str(SWEEP), "--stages", "4"], capture_output=True, text=True,
                         cwd=tmp_path, env=environ, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == ("srun --mpi=pmi2 rpd-mpi train --stages 3 --lr 0.25 --out "
                                  "results/sweep/9/lr_0.h5 --stages 4")


def test_sweep_chain_needs_a_grid() -> None:
    got = subprocess.run(["bash", str(ROOT / "jobs" / "sweep-chain.sh"), "-3"],
                         capture_output=True, text=True, timeout=30)
    assert got.returncode == 2 and "usage:" in got.stderr
