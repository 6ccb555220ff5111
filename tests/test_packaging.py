"""Packaging: rpd_mpi is the only top-level package, and the console script works anywhere.

Subprocess tests, run with the venv that holds the package (binaries found next to
`sys.executable`, PYTHONPATH removed from every child's environment):

  installed     the installed distribution "rpd_mpi" provides the top-level name rpd_mpi and
                nothing else (top_level.txt, its RECORD files, the editable finder's mapping),
                and `import tools` finds nothing from a neutral folder;
  wheel         a wheel built from a copy of the checkout (`pip wheel --no-deps`) holds only
                the rpd_mpi package (no tools/, no tests/), every rpd_mpi module of the copy,
                and the `rpd-mpi` entry point;
  foreign cwd   from a folder outside the checkout that has its own `tools/` package (which
                prints WRONG TOOLS and raises when imported), `rpd-mpi tool timeline --help`
                and `python -m rpd_mpi tool timeline --help` print the real tool's help,
                `rpd-mpi experiment E1 --quick --out OUT` writes OUT/E1.md, and
                `rpd-mpi tool nosuchtool` exits 2 with one stderr line naming the valid tools.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path, PurePosixPath

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent                   # the venv's bin/, not resolved
RPD_MPI = BIN / "rpd-mpi"
DISTRIBUTION = "rpd_mpi"
WRONG = "WRONG TOOLS"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["COLUMNS"] = "80"                           # argparse wraps help to the terminal
    env["MPLBACKEND"] = "Agg"
    return env


def run(args: list[str | Path], cwd: Path,
        timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=child_env(), text=True,
                          capture_output=True, timeout=timeout)


def shown(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


# ----------------------------------------------------------------------------- top-level names

def _editable_mapping(source: str) -> set[str]:
    """The keys of `MAPPING = {...}` in a setuptools editable finder, read without importing."""
    for node in ast.parse(source).body:
        targets: list[ast.expr]
        if isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        if value is not None and any(isinstance(t, ast.Name) and t.id == "MAPPING"
                                     for t in targets):
            return set(ast.literal_eval(value))
    raise AssertionError("no MAPPING in the editable finder")


def installed_top_level(dist: importlib.metadata.Distribution) -> set[str]:
    """The top-level import names a distribution puts on sys.path, from its RECORD."""
    names: set[str] = set()
    for file in dist.files or []:
        parts = PurePosixPath(str(file)).parts
        first = parts[0]
        if first == ".." or first == "__pycache__" or first.endswith((".dist-info", ".egg-info")) \
                or first.endswith(".pth"):
            continue                                # scripts, metadata, path hooks
        if first.startswith("__editable__") and first.endswith("_finder.py"):
            names |= _editable_mapping(Path(str(dist.locate_file(file))).read_text())
            continue
        names.add(first.removesuffix(".py") if len(parts) == 1 else first)
    return names


@pytest.mark.timeout(300)
def test_installed_distribution_has_only_rpd_mpi(tmp_path: Path) -> None:
    # the install in the venv's site-packages, not the checkout's rpd_mpi.egg-info that a
    # sys.path entry for the checkout would find first (its "files" are the sdist's sources)
    site = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    found = list(importlib.metadata.distributions(name=DISTRIBUTION, path=site))
    assert len(found) == 1, f"{len(found)} installs of {DISTRIBUTION} in {site}"
    dist = found[0]
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert top_level == ["rpd_mpi"], f"top_level.txt of {DISTRIBUTION}: {top_level}"
    assert installed_top_level(dist) == {"rpd_mpi"}, sorted(installed_top_level(dist))
    # nothing named `tools` is importable from the venv (-I: no cwd, no PYTHONPATH, no user site)
    probe = run([sys.executable, "-I", "-c", "import importlib.util as u; "
                 "print(u.find_spec('tools'), u.find_spec('rpd_mpi') is not None)"], tmp_path)
    assert probe.returncode == 0, shown(probe)
    assert probe.stdout.split() == ["None", "True"], shown(probe)


IGNORED_IN_COPY = shutil.ignore_patterns(".git", ".mypy_cache", ".venv", "venv", "build", "dist",
                                         "*.egg-info",
                                         "__pycache__", ".pytest_cache", ".test-logs", "results",
                                         "*.h5", "*.pyc")


@pytest.mark.timeout(300)
def test_wheel_has_only_rpd_mpi(tmp_path: Path) -> None:
    # build from a copy: pip builds in the source folder, and the checkout is being edited
    src = tmp_path / "src"
    shutil.copytree(CHECKOUT, src, ignore=IGNORED_IN_COPY)
    out = tmp_path / "wheel"
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                "-w", out, src], tmp_path, timeout=280)
    if proc.returncode != 0 and ("No matching distribution found" in proc.stdout + proc.stderr):
        pytest.skip("pip cannot obtain the build backend (offline?):\n" + shown(proc))
    assert proc.returncode == 0, shown(proc)
    wheels = sorted(out.glob("rpd_mpi-*.whl"))
    assert len(wheels) == 1, f"{sorted(out.iterdir())}\n{shown(proc)}"
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        meta = [n for n in names if n.split("/")[0].endswith(".dist-info")]
        entry_points = whl.read(next(n for n in meta if n.endswith("/entry_points.txt"))).decode()
    top = {n.split("/")[0] for n in names} - {n.split("/")[0] for n in meta}
    assert top == {"rpd_mpi"}, f"top-level entries of {wheels[0].name}: {sorted(top)}"
    sources = {p.relative_to(src).as_posix() for p in (src / "rpd_mpi").rglob("*.py")}
    missing = sorted(sources - set(names))
    assert not missing, f"modules of the checkout missing from the wheel: {missing}"
    assert "rpd-mpi = rpd_mpi.entry:main" in entry_points, entry_points


# ----------------------------------------------------------------------------- a foreign cwd

@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A folder outside the checkout holding a decoy `tools/` package that must never load."""
    folder = tmp_path / "elsewhere"
    assert not folder.resolve().is_relative_to(CHECKOUT)
    decoy = folder / "tools"
    decoy.mkdir(parents=True)
    body = (f"import sys\nprint({WRONG!r}, __name__)\nprint({WRONG!r}, __name__, file=sys.stderr)\n"
            f"raise ImportError({WRONG!r} + ': ' + __name__)\n")
    for name in {"__init__", "timeline", *(p.stem for p in (CHECKOUT / "tools").glob("*.py"))}:
        (decoy / f"{name}.py").write_text(body)
    return folder


@pytest.mark.timeout(300)
def test_decoy_tools_is_live(elsewhere: Path) -> None:
    """The decoy works: code that imported `tools` from that folder would say so and fail."""
    proc = run([sys.executable, "-c", "import tools.timeline"], elsewhere)
    assert proc.returncode != 0 and WRONG in proc.stdout and WRONG in proc.stderr, shown(proc)


def real_timeline_help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    from rpd_mpi.analysis import timeline

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as stop:
        timeline.main(["--help"])
    assert stop.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["script", "module"])
def test_tool_help_ignores_a_local_tools_package(
        launcher: str, elsewhere: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    expected = real_timeline_help(capsys, monkeypatch)
    assert expected.startswith("usage: timeline"), expected
    command: list[str | Path] = \
        [RPD_MPI] if launcher == "script" else [sys.executable, "-m", "rpd_mpi"]
    proc = run([*command, "tool", "timeline", "--help"], elsewhere)
    assert WRONG not in proc.stdout + proc.stderr, shown(proc)
    assert proc.returncode == 0, shown(proc)
    assert proc.stdout == expected, shown(proc)


@pytest.mark.timeout(300)
def test_experiment_runs_outside_the_checkout(elsewhere: Path) -> None:
    out = elsewhere / "OUT"
    proc = run([RPD_MPI, "experiment", "E1", "--quick", "--out", out], elsewhere)
    assert WRONG not in proc.stdout + proc.stderr, shown(proc)
    assert proc.returncode == 0, shown(proc)
    listing = sorted(p.name for p in out.iterdir()) if out.is_dir() else "no OUT folder"
    assert (out / "E1.md").is_file(), f"{listing}\n{shown(proc)}"
    assert (out / "E1.md").read_text().startswith("# E1"), (out / "E1.md").read_text()[:200]


@pytest.mark.timeout(300)
def test_unknown_tool_is_one_error_line(elsewhere: Path) -> None:
    from rpd_mpi.analysis import TOOLS

    proc = run([RPD_MPI, "tool", "nosuchtool"], elsewhere)
    assert WRONG not in proc.stdout + proc.stderr, shown(proc)
    assert proc.returncode == 2, shown(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, shown(proc)
    assert lines[0].startswith("rpd-mpi: error:") and "nosuchtool" in lines[0], shown(proc)
    assert all(tool in lines[0] for tool in TOOLS), shown(proc)
    assert proc.stdout == "", shown(proc)
