"""Provenance of a run: when, with what software, from which checkout and command (pure).

`provenance()` returns the attributes `rpd_mpi.build.to_record` puts on every ledger
(docs/LEDGER.md "Provenance"). It never imports mpi4py (importing it initialises MPI): the
mpi4py version is recorded only when mpi4py is already loaded, i.e. in an MPI run.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from rpd_mpi import __version__

#: Distributions whose versions are recorded as `<name>_version` (mpi4py: see module doc).
VERSIONED = ("numpy", "numba", "h5py")
SLURM_VARS = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
              "slurm_array_task_id": "SLURM_ARRAY_TASK_ID"}
_GIT_TIMEOUT = 5.0


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else `rpd_mpi.__version__`."""
    return distribution_version("rpd_mpi") or __version__


def distribution_version(name: str) -> str:
    """The version of an installed distribution; '' when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a Z suffix, to the second."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def source_checkout() -> Path | None:
    """The git checkout this package runs from (its parent holds .git), or None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / ".git").exists() else None


def git_commit(root: Path | None = None) -> str:
    """The commit HEAD points to in the checkout the package runs from; '' when there is none.

    Reads .git/HEAD and the ref (loose or packed) without running git; falls back to
    `git rev-parse HEAD` (5 s timeout) for layouts it does not know.
    """
    root = source_checkout() if root is None else root
    if root is None:
        return ""
    try:
        return _read_head(root / ".git") or _rev_parse(root)
    except (OSError, UnicodeDecodeError):
        return _rev_parse(root)


def _git_dir(dot_git: Path) -> Path:
    """The git directory: .git itself, or where a worktree's `.git` file points."""
    if dot_git.is_file():
        text = dot_git.read_text(encoding="utf-8").strip()
        if text.startswith("gitdir:"):
            target = Path(text.partition(":")[2].strip())
            return target if target.is_absolute() else (dot_git.parent / target).resolve()
    return dot_git


def _read_head(dot_git: Path) -> str:
    git_dir = _git_dir(dot_git)
    head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
    if not head.startswith("ref:"):
        return head if _is_sha(head) else ""
    ref = head.partition(":")[2].strip()
    common = git_dir
    if (git_dir / "commondir").is_file():             # a worktree: refs live in the main repo
        common = (git_dir / (git_dir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in (git_dir, common):
        loose = base / ref
        if loose.is_file():
            sha = loose.read_text(encoding="utf-8").strip()
            return sha if _is_sha(sha) else ""
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref and _is_sha(sha):
                return sha
    return ""


def _rev_parse(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=_GIT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and _is_sha(sha) else ""


def _is_sha(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text)


def provenance() -> dict[str, object]:
    """The provenance attributes of a run made by this process: strings ('' = unknown), and
    `command_line`, sys.argv as a list (the ledger stores it as JSON). `package_version` is
    not among them: the ledger writer sets it (a reserved attribute)."""
    attrs: dict[str, object] = {
        "created": utc_now(),
        "git_commit": git_commit(),
        "command_line": list(sys.argv),
        "python_version": platform.python_version(),
        **{f"{name}_version": distribution_version(name) for name in VERSIONED},
        "mpi4py_version": distribution_version("mpi4py") if "mpi4py" in sys.modules else "",
    }
    attrs.update({name: os.environ.get(var, "") for name, var in SLURM_VARS.items()})
    return attrs
