"""The output policy, the lock on --out, disk full and bounded collectives, on real processes.

Every case runs the CLI as a subprocess in a temporary folder and checks the exit code, the
one `rpd-mpi: error:` line, and the file system afterwards: inputs unchanged byte for byte,
a FIFO or device node still what it was, nothing new left behind. Device nodes, FIFOs and
the small tmpfs for the disk-full case are made here, in the temporary folder (root only for
mknod and mount; skipped otherwise), never the system's.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from rpd_mpi.ledger import read_run
from rpd_mpi.outputs import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_WRITE

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
SMALL = ["--stages", "2", "--microbatches", "6", "--dim", "8", "--examples", "16",
         "--batch-size", "4"]
ROOT = os.geteuid() == 0


def cli(cwd: Path, *args: str, limit: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "-k", "5", str(limit), sys.executable, "-m", "rpd_mpi",
                           *args], capture_output=True, text=True, cwd=cwd, timeout=limit + 20)


def mpi(cwd: Path, n: int, *args: str, limit: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "-k", "5", str(limit), MPIEXEC, "-n", str(n),
                           sys.executable, "-m", "rpd_mpi", "train", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=limit + 20)


def one_error(res: subprocess.CompletedProcess, *words: str) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rpd-mpi: error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def listing(folder: Path) -> dict[str, bytes | str]:
    """Every entry of `folder`: regular files by content, others by kind."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.iterdir()):
        mode = os.lstat(p).st_mode
        out[p.name] = p.read_bytes() if stat.S_ISREG(mode) else stat.filemode(mode)
    return out


def test_existing_ledger_needs_force_and_force_replaces_it(tmp_path: Path) -> None:
    assert cli(tmp_path, "simulate", *SMALL, "--out", "run.h5").returncode == EXIT_OK
    before = listing(tmp_path)
    res = cli(tmp_path, "simulate", *SMALL, "--lr", "0.1", "--out", "run.h5")
    assert res.returncode == EXIT_BAD_INPUT
    one_error(res, "--out", "exists", "--force")
    assert listing(tmp_path) == before
    res = cli(tmp_path, "simulate", *SMALL, "--lr", "0.1", "--out", "run.h5", "--force")
    assert res.returncode == EXIT_OK, res.stderr
    assert read_run(tmp_path / "run.h5").attrs["lr"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        if not ROOT:
            pytest.skip("mknod of a character device needs root")
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))   # like /dev/null, made here
    elif kind == "dir":
        path.mkdir()
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "symlink":
        (tmp_path / "target.h5").write_bytes(b"precious")
        path.symlink_to(tmp_path / "target.h5")
    return path


@pytest.mark.parametrize("kind,word", [("fifo", "FIFO"), ("chardev", "character device"),
                                       ("dir", "directory"), ("socket", "socket"),
                                       ("symlink", "symbolic link")])
def test_out_that_is_not_a_regular_file_is_refused(tmp_path: Path, kind: str,
                                                   word: str) -> None:
    path = _special(tmp_path, kind)
    before = listing(tmp_path)
    for force in ([], ["--force"]):
        res = cli(tmp_path, "simulate", *SMALL, "--out", str(path), *force)
        assert res.returncode == EXIT_BAD_INPUT
        one_error(res, "--out", word)
    assert listing(tmp_path) == before                  # the node is still what it was


def _inputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=rng.standard_normal((16, 8)), y=rng.standard_normal(16))
    (tmp_path / "run.toml").write_text('[schedule]\nstages = 2\nmicrobatches = 4\n')


@pytest.mark.parametrize("flag,name", [("--data", "data.npz"), ("--config", "run.toml"),
                                       ("--data", "alias.npz")])
def test_out_equal_to_an_input_is_refused(tmp_path: Path, flag: str, name: str) -> None:
    _inputs(tmp_path)
    os.link(tmp_path / "data.npz", tmp_path / "alias.npz")     # the same file, other name
    before = listing(tmp_path)
    args = ["--data", "data.npz"] if flag == "--data" else ["--config", "run.toml"]
    res = cli(tmp_path, "simulate", "--microbatches", "4", *args, "--batch-size", "4",
              "--out", name, "--force")
    assert res.returncode == EXIT_BAD_INPUT
    one_error(res, "--out", "same file as", flag)
    assert listing(tmp_path) == before


def test_read_only_folder_fails_before_the_run(tmp_path: Path) -> None:
    if not ROOT:
        pytest.skip("mounting a read-only tmpfs needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], check=True)
    try:
        res = cli(tmp_path, "simulate", *SMALL, "--out", str(ro / "run.h5"))
        assert res.returncode == EXIT_BAD_INPUT
        one_error(res, "--out", "cannot create files", "Read-only")
        assert list(ro.iterdir()) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def _lock(tmp_path: Path, pid: int, host: str) -> Path:
    lock = tmp_path / "run.h5.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host, "job": "77", "run_id": "other-run",
                                "started": "earlier"}))
    return lock


def test_a_running_run_on_the_same_out_is_named_and_refused(tmp_path: Path) -> None:
    lock = _lock(tmp_path, os.getpid(), socket.gethostname())     # this test is alive
    res = cli(tmp_path, "simulate", *SMALL, "--out", "run.h5")
    assert res.returncode == EXIT_BAD_INPUT
    one_error(res, "--out", "another run", f"pid {os.getpid()}", "Slurm job 77", "other-run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5.lock"] and lock.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    _lock(tmp_path, dead.pid, socket.gethostname())
    res = cli(tmp_path, "simulate", *SMALL, "--out", "run.h5")
    assert res.returncode == EXIT_OK, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_a_lock_of_a_zombie_is_taken_over(tmp_path: Path) -> None:
    """A process that ended but was not reaped (the ranks of a killed mpiexec) holds no lock."""
    zombie = subprocess.Popen(["true"])
    for _ in range(200):                         # ended, and deliberately not waited for
        with open(f"/proc/{zombie.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    try:
        _lock(tmp_path, zombie.pid, socket.gethostname())
        res = cli(tmp_path, "simulate", *SMALL, "--out", "run.h5")
        assert res.returncode == EXIT_OK, res.stderr
    finally:
        zombie.wait()


def test_train_refuses_a_second_run_on_the_same_out_once(tmp_path: Path) -> None:
    first = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "rpd_mpi", "train",
                              *SMALL, "--microbatches", "40", "--op-cost", "0.05", "--wait",
                              "polite", "--out", "run.h5"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(200):                     # until the first run holds the lock
            if (tmp_path / "run.h5.lock").exists():
                break
            time.sleep(0.05)
        res = mpi(tmp_path, 2, *SMALL, "--out", "run.h5")
        assert res.returncode == EXIT_BAD_INPUT
        one_error(res, "--out", "being written by another run")   # printed once, 2 ranks
    finally:
        out, err = first.communicate(timeout=120)
    assert first.returncode == EXIT_OK, err
    assert len(read_run(tmp_path / "run.h5").updates) == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_train_existing_out_without_force_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "run.h5").write_bytes(b"old")
    res = mpi(tmp_path, 2, *SMALL, "--out", "run.h5")
    assert res.returncode == EXIT_BAD_INPUT
    one_error(res, "--out", "exists")
    assert (tmp_path / "run.h5").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    if not ROOT:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _nothing_complete(folder: Path) -> None:
    assert not (folder / "run.h5").exists()
    assert not list(folder.glob("*.partial")) and not list(folder.glob("*.lock"))
    for part in folder.glob("*.part"):           # what is left says it is incomplete
        import h5py
        try:
            with h5py.File(part, "r") as f:
                assert f.attrs.get("complete") is not True and not f.attrs.get("complete")
        except OSError:
            pass                                # not even readable: cannot pass for complete


@pytest.mark.timeout(180)
def test_disk_full_in_simulate_is_one_line(full_disk: Path) -> None:
    res = cli(full_disk, "simulate", "--stages", "4", "--microbatches", "400", "--dim", "64",
              "--out", "run.h5")
    assert res.returncode == EXIT_WRITE
    one_error(res, "writing run.h5", "No space left on device")
    _nothing_complete(full_disk)


@pytest.mark.timeout(180)
def test_disk_full_in_train_is_one_line_no_crash(full_disk: Path) -> None:
    res = mpi(full_disk, 2, "--stages", "2", "--microbatches", "2000", "--dim", "64",
              "--wait", "polite", "--out", "run.h5")
    assert res.returncode == EXIT_WRITE, res.stderr[-2000:]   # not a segfault (-11/139)
    one_error(res, "No space left on device", "no ledger was written")
    _nothing_complete(full_disk)


@pytest.mark.timeout(60)
def test_a_stalled_collective_ends_within_the_timeout(tmp_path: Path) -> None:
    t0 = time.monotonic()
    res = mpi(tmp_path, 2, "--method", "localsgd", "--stages", "1", "--groups", "2",
              "--microbatches", "8", "--dim", "8", "--examples", "16", "--batch-size", "4",
              "--timeout", "3", "--fault", "stall:1:2", "--out", "run.h5", limit=40)
    took = time.monotonic() - t0
    assert res.returncode == EXIT_FAILED and took < 3 + 15, (took, res.stderr)
    assert "RecvTimeout: waited 3 s for the LocalSGD allreduce" in res.stderr
    assert not (tmp_path / "run.h5").exists() and not (tmp_path / "run.h5.lock").exists()


@pytest.mark.timeout(180)
def test_a_cold_numba_cache_does_not_count_against_the_timeout(tmp_path: Path) -> None:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}   # cold: empty
    res = subprocess.run(["timeout", "-k", "5", "150", MPIEXEC, "-n", "3", sys.executable,
                          "-m", "rpd_mpi", "train", "--objective", "charlm", "--stages", "3",
                          "--microbatches", "6", "--width", "16", "--heads", "2", "--context",
                          "8", "--batch-size", "2", "--timeout", "1", "--out", "lm.h5"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=170)
    assert res.returncode == EXIT_OK, res.stderr[-2000:]
    assert len(read_run(tmp_path / "lm.h5").updates) == 18
