"""The output policy: what `--out` may name, run ids, and the lock one run holds on its --out.

Checked on every rank before any computing (docs/DESIGN.md 6):
- `--out` is a regular file or does not exist yet; devices, FIFOs, sockets, directories and
  symbolic links are refused, and so is any path that is the same file as an input of the run
  (`--data`, `--config`, `--delays-from`);
- an existing ledger is replaced only with `--force`, and even then the old file stays intact
  until the new one is complete (the run writes `<out>.<run id>.partial` and renames it);
- the folder must accept a new file (probed by creating and removing one, so that read-only
  mounts and pseudo file systems fail here, not after the run).
Every file a run creates next to `--out` carries its run id, and the run holds `<out>.lock`
(which names its pid, host, Slurm job and run id) from the check to the end, so two runs on
one `--out` can never touch each other's files: the second is refused, naming the first.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.ledger import LedgerError, write_run
from rpd_mpi.ledger.run_file import WRITE_ERRORS, io_reason
from rpd_mpi.records import RunRecord

#: Exit codes of `simulate` and `train` (README "Exit codes").
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_WRITE, EXIT_STOPPED = 0, 1, 2, 3, 4, 5


def stopped_line(record: RunRecord) -> str:
    """The one line of a run a signal stopped (its ledger holds the updates so far)."""
    text = (f"stopped by {record.attrs.get('stopped_by')} after {len(record.updates)} block "
            f"updates; {record.config.get('out')} holds them (status = stopped)")
    if record.attrs.get("checkpoint"):
        text += f"; checkpoint {record.attrs['checkpoint']}; rerun with --resume"
    return text

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def new_run_id() -> str:
    """A run id: UTC start time, then 6 random hex digits (sortable, unique enough)."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def inputs_of(cfg: RunConfig, config_file: str = "") -> dict[str, str]:
    """The run's input files by flag (only those given)."""
    named = {"--data": cfg.objective.data, "--config": config_file,
             "--delays-from": cfg.rpd.delays_from}
    return {flag: path for flag, path in named.items() if path}


def check_out(out: str, inputs: dict[str, str], force: bool = False, probe: str = "") -> None:
    """Refuse an `--out` the policy does not allow (ConfigError naming --out)."""
    path = Path(out)
    _check_kind(path)
    for flag, name in inputs.items():
        if path.exists() and Path(name).exists() and os.path.samefile(path, name):
            raise ConfigError("--out", f"{out} is the same file as {flag} {name}; the ledger "
                                       f"would replace an input of the run")
    if path.exists() and not force:
        raise ConfigError("--out", f"{out} exists; give --force to replace it (the old file "
                                   f"stays intact until the new ledger is complete)")
    _check_folder(path, probe or f".{path.name}.probe-{os.getpid()}")


def _check_kind(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise ConfigError("--out", f"cannot examine {path}: {err.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError("--out", f"{path} is a symbolic link; name the ledger file itself")
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise ConfigError("--out", f"{path} is {kind}; it must name a regular file "
                                       f"(a new one, or an old ledger with --force)")


def _check_folder(path: Path, probe_name: str) -> None:
    folder = path.absolute().parent
    if not folder.is_dir():
        raise ConfigError("--out", f"directory {folder} does not exist")
    probe = folder / probe_name
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        raise ConfigError("--out", f"cannot create files in {folder}: {err.strerror}") from None
    os.close(fd)
    probe.unlink()


@dataclass(frozen=True)
class Owner:
    """Who holds an --out: written into its lock file."""

    pid: int
    host: str
    job: str
    run_id: str
    started: str

    def describe(self) -> str:
        job = f", Slurm job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}, run {self.run_id}, started {self.started}"


def lock_path(out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    return path.with_name(path.name + ".lock")


class OutLock:
    """`<out>.lock`, created exclusively; a lock left by a dead process on this host is taken
    over, any other is refused with a line naming its owner."""

    def __init__(self, out: str, run_id: str) -> None:
        self.path = lock_path(out)
        self.owner = Owner(os.getpid(), socket.gethostname(),
                           os.environ.get("SLURM_JOB_ID", ""), run_id,
                           time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_clear()
                continue
            except OSError as err:
                raise ConfigError("--out", f"cannot create {self.path}: {err.strerror}") \
                    from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner.__dict__, f)
            self.held = True
            return
        raise ConfigError("--out", f"{self.path} keeps reappearing; another run is starting "
                                   f"on the same --out")

    def _refuse_or_clear(self) -> None:
        other = _read_owner(self.path)
        if other is not None and other.host == self.owner.host and not _alive(other.pid):
            self.path.unlink(missing_ok=True)        # stale: its process is gone
            return
        who = other.describe() if other is not None else "an unreadable lock file"
        raise ConfigError("--out", f"{self.path.with_suffix('')} is being written by another "
                                   f"run ({who}); wait for it, choose another --out, or remove "
                                   f"{self.path} if that run is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _read_owner(path: Path) -> Owner | None:
    try:
        return Owner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _alive(pid: int) -> bool:
    """Is process `pid` running? A zombie (ended, not yet reaped: the ranks of a killed
    mpiexec can stay so for a while) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):       # no /proc (not Linux): trust kill(0)
        return True
    return state not in ("Z", "X")


class WriteFailed(OSError):
    """Writing a run's ledger failed (disk full, quota, I/O error): one line, exit 4."""


def write_out(out: str, record: RunRecord, run_id: str) -> None:
    """`write_run` with the output policy's failure mode: any error while writing leaves no
    file that could pass for complete (the partial file is removed) and raises WriteFailed."""
    try:
        write_run(out, record, run_id)
    except WRITE_ERRORS as err:
        raise WriteFailed(f"writing {out}: {io_reason(err)}") from None
    except LedgerError as err:
        raise WriteFailed(f"writing {out}: {err}") from None
