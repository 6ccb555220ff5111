"""jobs/gpu-check.sh end to end on a stand-in for the GPU machine (MOCK cupy, no GPU here).

The GPU machine has python with cupy, numpy, numba, h5py and mpi4py but no MPI library and
no package index. The stand-in: a fresh venv of this machine's Python with only numpy,
h5py and mpi4py (installed from wheels with --no-index; numba is left out, it is optional
and the largest), a wheel folder made by the script's own `--prepare` (the only step that
uses the index), PIP_NO_INDEX=1, no MPI launcher or library on PATH or the loader path,
and the strict mock cupy of tests/fakecupy in place of cupy, because this machine has no
GPU. The fixture first shows that mpi4py in that venv cannot load an MPI library by
itself, so every MPI section that passes found libmpi through what the script set up.
A second test gives the stand-in a "system" MPI instead (a prefix on PATH and the loader
path, no wheel) and checks that the script uses it. Preparing needs the package index;
without one the tests skip.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fakecupy"
SCRIPT = str(ROOT / "jobs" / "gpu-check.sh")
DROP = ("VIRTUAL_ENV", "MPIEXEC", "LD_LIBRARY_PATH", "PYTHONPATH", "GPU_PREFIX", "GPU_WHEELS",
        "GPU_CHECK_MPI", "PYTHONHOME")

pytestmark = pytest.mark.timeout(300)


def bare_env(**extra: str) -> dict[str, str]:
    """This environment without any MPI: no launcher on PATH, no libmpi hints, no index."""
    env = {k: v for k, v in os.environ.items()
           if k not in DROP and not k.startswith(("MPI4PY_", "OMPI_", "PIP_", "I_MPI"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep)
        if p and not any((Path(p) / name).exists() for name in ("mpiexec", "mpirun")))
    env["PIP_NO_INDEX"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return {**env, **extra}


def run(cmd: list[str], env: dict[str, str], timeout: float = 240
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("gpu-target")
    wheels, deps, venv = base / "wheels", base / "deps", base / "venv"
    index = {k: v for k, v in bare_env().items() if not k.startswith("PIP_")}
    prep = run(["bash", SCRIPT, "--prepare"], {
        **index, "PYTHON": sys.executable, "GPU_WHEELS": str(wheels),
        "GPU_WHEELS_PYTHON_VERSION": f"{sys.version_info.major}.{sys.version_info.minor}"})
    if prep.returncode != 0:
        pytest.skip(f"cannot prepare the wheel folder (no package index?): "
                    f"{prep.stderr.strip()[-300:]}")
    assert list(wheels.glob("mpich-*.whl")), prep.stdout + prep.stderr
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("numpy", "h5py", "mpi4py")]
    got = run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--no-deps",
               "--dest", str(deps), *pins], index)
    if got.returncode != 0:
        pytest.skip(f"cannot download {pins}: {got.stderr.strip()[-300:]}")
    base_python = getattr(sys, "_base_executable", sys.executable)
    made = run([base_python, "-m", "venv", str(venv)], bare_env())
    assert made.returncode == 0, made.stderr
    py = venv / "bin" / "python"
    inst = run([str(py), "-m", "pip", "install", "--no-index", "--find-links", str(deps),
                "numpy", "h5py", "mpi4py"], bare_env())
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
    alone = run([str(py), "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                bare_env())
    assert alone.returncode != 0 and "cannot load MPI library" in alone.stderr, \
        "the stand-in must lack an MPI library: " + alone.stdout + alone.stderr
    assert run([str(py), "-c", "import cupy"], bare_env()).returncode != 0
    return {"base": base, "wheels": wheels, "python": py}


def report(out: Path) -> tuple[str, dict[str, Any]]:
    return (out / "gpu-check.md").read_text(), json.loads((out / "gpu-check.json").read_text())


def test_gpu_check_with_the_mpich_wheel_and_no_index(target: dict[str, Path]) -> None:
    """The script installs mpich from the wheel folder into a prefix, points mpi4py and the
    launcher at it, and every section of the dry run passes (none "not run"). A decoy
    `mpiexec` first on PATH, which would start singletons, is not used."""
    base, out, prefix = target["base"], target["base"] / "out-wheel", target["base"] / "prefix"
    decoy = base / "decoy"
    decoy.mkdir(exist_ok=True)
    (decoy / "mpiexec").write_text('#!/bin/sh\nshift 2\nexec "$@"\n')
    (decoy / "mpiexec").chmod(0o755)
    env = bare_env(PYTHON=str(target["python"]), GPU_WHEELS=str(target["wheels"]),
                   GPU_PREFIX=str(prefix), OUT=str(out), PYTHONPATH=str(FAKE))
    env["PATH"] = f"{decoy}{os.pathsep}{env['PATH']}"
    res = run(["bash", SCRIPT, "--dry-run", "--budget", "200"], env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "installing mpich-" in res.stdout and (prefix / "lib" / "libmpi.so.12").exists()
    assert "MPI library: MPICH Version:" in res.stdout, res.stdout
    assert f"{prefix}/lib/libmpi.so.12" in res.stdout
    text, raw = report(out)
    assert "DRY RUN against the numpy mock cupy" in text
    assert "not run" not in text.replace("direct: not run", "") and "FAILED" not in text, text
    assert f"launcher: {prefix}/bin/mpiexec" in text and "MPI: MPICH" in text, text
    assert raw["grad"]["pass"]
    assert [set(r) for r in raw["copies"]] == [{"MiB", "D2H", "H2D", "D2D", "D2H+sync"}] * 2
    assert all(v > 0 for r in raw["copies"] for v in r.values())
    assert [b["kind"] for b in raw["bandwidth"]][:3] == ["host", "staged", "ipc"]
    assert all(len(b["rows"]) == 2 and all(r["GB_s"] > 0 for r in b["rows"])
               for b in raw["bandwidth"])
    assert all(r["pass"] for r in raw["equivalence"]) and len(raw["equivalence"]) == 2
    assert [r["rc"] for r in raw["runs"]] == [0, 0, 0]


def test_gpu_check_with_a_system_mpi(target: dict[str, Path]) -> None:
    """No wheel, but an MPI on PATH and the loader path (installed here from the same wheel
    into a "system" folder): the script installs nothing, mpi4py finds that library by
    itself, and the launcher probe picks that mpiexec. `--budget 0` stops before the rank
    jobs: this test is about the set-up."""
    base, out = target["base"], target["base"] / "out-system"
    system = base / "system"
    inst = run([str(target["python"]), "-m", "pip", "install", "--no-index", "--no-deps",
                "--find-links", str(target["wheels"]), "--prefix", str(system), "mpich"],
               bare_env())
    assert inst.returncode == 0, inst.stderr
    empty = base / "no-wheels"
    empty.mkdir(exist_ok=True)
    env = bare_env(PYTHON=str(target["python"]), GPU_WHEELS=str(empty), OUT=str(out),
                   GPU_PREFIX=str(base / "unused"), LD_LIBRARY_PATH=str(system / "lib"),
                   PYTHONPATH=str(FAKE))
    env["PATH"] = f"{system / 'bin'}{os.pathsep}{env['PATH']}"
    res = run(["bash", SCRIPT, "--dry-run", "--budget", "0"], env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "using this machine's MPI" in res.stdout and "installing" not in res.stdout
    assert "MPI library: MPICH Version:" in res.stdout and "found by mpi4py itself" in \
        res.stdout, res.stdout
    assert not (base / "unused").exists()
    text, _ = report(out)
    assert f"launcher: {system}/bin/mpiexec (probe: 2 ranks" in text and "MPI: MPICH" in text


def test_gpu_check_without_pip(target: dict[str, Path]) -> None:
    """A python whose `-m pip` fails (a shadowing pip module): the script unpacks the
    wheel's bin/ and lib/ into the prefix itself, and mpi4py loads that library."""
    base, prefix = target["base"], target["base"] / "prefix-nopip"
    shadow = base / "shadow" / "pip"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text("")
    (shadow / "__main__.py").write_text("raise SystemExit('no pip here')\n")
    env = bare_env(PYTHON=str(target["python"]), GPU_WHEELS=str(target["wheels"]),
                   GPU_PREFIX=str(prefix), PYTHONPATH=str(shadow.parent))
    res = run(["bash", SCRIPT, "--setup-only"], env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no pip for" in res.stdout and "MPI library: MPICH Version:" in res.stdout
    assert os.access(prefix / "bin" / "mpiexec", os.X_OK)
    assert f"mpiexec: {prefix}/bin/mpiexec" in res.stdout
