"""The GPU path (`--device cuda`: backend, comm_gpu links, runtime) against a MOCK cupy.

No GPU exists on the machines where these tests run, so `cupy` here is the strict
numpy-backed mock of tests/fakecupy/cupy (first on `sys.path` for in-process tests, first on
PYTHONPATH for mpiexec jobs); it is a mock only because these machines cannot have a GPU.
These tests check what can be checked without one: device selection by local rank, the
error without cupy or without a GPU, the configuration flags, the order of copies,
synchronisations and MPI messages of each transport on 2 real MPI ranks, that the mock
catches each deliberately wrong link of tests/fakecupy/wrong_links.py, `rpd-mpi train
--device cuda` on 3 real ranks equal to the CPU simulator, that the CPU path never imports
cupy, that the package works without numba, and that benchmarks/gpu_check.py runs
(`--dry-run`). What they cannot show (CUDA streams running concurrently, IPC between real
device memories, bandwidths) is left to `bash jobs/gpu-check.sh` on a GPU (docs/GPU.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from rpd_mpi.mpi.backend import CPU, device_for, select
from rpd_mpi.config import ConfigError, RunConfig, RuntimeConfig
from rpd_mpi.mpi.train import check_world

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fakecupy"
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
TINY = ["--objective", "charlm", "--stages", "3", "--width", "16", "--heads", "2",
        "--context", "8", "--batch-size", "3", "--lr", "0.1", "--seed", "2"]


def load_wrong_links() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wrong_links", FAKE / "wrong_links.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def mock_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    env["PYTHONPATH"] = os.pathsep.join([str(FAKE), str(ROOT), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def mpirun(n: int, args: list[str], env: dict[str, str], limit: int = 90
           ) -> subprocess.CompletedProcess:
    return subprocess.run(["timeout", "-k", "5", str(limit), MPIEXEC, "-n", str(n),
                           sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=limit + 20)


# ----- backend ---------------------------------------------------------------------------------

def test_device_by_local_rank(fake_cupy: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKECUPY_GPUS", "4")
    assert [select("cuda", r).device_id for r in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [select("cuda", r, 2).device_id for r in range(4)] == [0, 1, 0, 1]
    assert {select("cuda", r, 1).device_id for r in range(5)} == {0}     # all share device 0
    be = select("cuda", 5)
    assert fake_cupy.cuda.Device().id == 1 and ("use_device", 1) in fake_cupy.calls
    d = be.describe()
    assert d["device"] == "cuda" and d["card"] == "FakeGPU (numpy mock)" and d["local_rank"] == 5
    with pytest.raises(ConfigError, match="--gpus-per-node: asks for 5 devices"):
        select("cuda", 0, 5)
    assert device_for(7, 3, None) == 1


def test_backend_copies(fake_cupy: ModuleType) -> None:
    be = select("cuda", 0)
    a = np.arange(6.0)
    dev = be.to_device(a)
    assert isinstance(dev, fake_cupy.ndarray) and dev.data.ptr != a.ctypes.data
    a[:] = -1                                   # pageable: the copy took the values at once
    host = be.to_host(dev * 2)
    assert type(host) is np.ndarray and np.array_equal(host, 2 * np.arange(6.0))
    be.synchronize()
    assert ("device_sync", 0) in fake_cupy.calls
    assert CPU.to_device(a) is a and CPU.to_host(a) is a       # the CPU path copies nothing
    assert CPU.xp is np and select("cpu", 3) is CPU


def test_clear_error_without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)             # import cupy -> ImportError
    with pytest.raises(ConfigError) as err:
        select("cuda", 0)
    assert str(err.value).startswith("--device: cuda needs cupy and a visible GPU (cannot "
                                     "import cupy")


def test_clear_error_without_gpu(fake_cupy: ModuleType, monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    monkeypatch.setenv("FAKECUPY_GPUS", "0")
    with pytest.raises(ConfigError, match=r"--device: cuda needs cupy and a visible GPU "
                                          r"\(.*is_available\(\) is False"):
        select("cuda", 0)


# ----- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    ({"transport": "ipc"}, "--transport: only --device cuda"),
    ({"gpu_aware_mpi": True, "transport": "direct"}, "--transport: only --device cuda"),
    ({"gpus_per_node": 2}, "--gpus-per-node: only --device cuda"),
    ({"device": "cuda", "transport": "nvlink"}, "--transport: must be one of staged, direct"),
    ({"device": "cuda", "transport": "direct"}, "--transport: direct .* needs --gpu-aware-mpi"),
    ({"device": "cuda", "gpu_aware_mpi": True}, "--gpu-aware-mpi: goes with --transport"),
    ({"device": "cuda", "gpus_per_node": -1}, "--gpus-per-node: must be an integer >= 0"),
])
def test_gpu_flags_are_validated(kwargs: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        RuntimeConfig(**kwargs)


def test_gpu_flags_from_the_command_line() -> None:
    from rpd_mpi.cli import parser
    from rpd_mpi.flags import FLAGS, TRAIN_FLAGS, config_from
    args = parser().parse_args(["train", "--device", "cuda", "--transport", "direct",
                                "--gpu-aware-mpi", "--gpus-per-node", "2"])
    rt = config_from(args, {**FLAGS, **TRAIN_FLAGS}).runtime
    assert (rt.device, rt.transport, rt.gpu_aware_mpi, rt.gpus_per_node) == \
        ("cuda", "direct", True, 2)
    assert config_from(parser().parse_args(["train"]), {**FLAGS, **TRAIN_FLAGS}).runtime == \
        RuntimeConfig()


@pytest.mark.parametrize("method, objective, message", [
    ("rpd", "charlm", "--method rpd runs on --device cpu only"),
    ("gpipe", "charlm", "--method gpipe runs on --device cpu only"),
    ("pd", "quadratic", "cuda runs --objective charlm"),
])
def test_train_refuses_what_cuda_does_not_run(method: str, objective: str, message: str
                                              ) -> None:
    from rpd_mpi.config import ObjectiveConfig, ScheduleConfig
    cfg = RunConfig(schedule=ScheduleConfig(method=method, stages=3),
                    objective=ObjectiveConfig(name=objective, **(
                        {} if objective == "charlm" else {"dim": 8})),
                    runtime=RuntimeConfig(device="cuda"))
    with pytest.raises(ConfigError, match=message):
        check_world(cfg, 3)
    ok = RunConfig(schedule=ScheduleConfig(method="localsgd", stages=3, trajectories=2),
                   objective=ObjectiveConfig(name="charlm"),
                   runtime=RuntimeConfig(device="cuda", transport="ipc"))
    check_world(ok, 3)


# ----- links and runs on real MPI ranks, mock GPU ----------------------------------------------

@pytest.mark.timeout(150)
def test_transports_move_bytes_in_the_promised_order(tmp_path: Path) -> None:
    """tests/fakecupy/links_check.py on 2 ranks: staged = non-blocking D2H into a pinned
    slot, its event synchronized, Isend of that slot / receive into pinned, H2D, compute
    waits; direct (the mock's CUDA-aware MPI) = sync, Isend of the device slot; ipc =
    handles once, D2D into the peer's ring, event sync, ready message, credits (a burst of 7
    sends into 4 slots never overwrites an untaken one); tags checked. The strict mock
    raises on any unordered access, so passing also means the real links keep its rules."""
    res = mpirun(2, [str(FAKE / "links_check.py")], mock_env(FAKECUPY_DIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr[-3000:]
    reports = [r for ln in res.stdout.splitlines() if ln.startswith("[")
               for r in json.loads(ln)]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    for r in reports:
        c = r["checks"]
        assert r["ok"] and c["tag_check"] and c["ipc_burst"] and c["staged_burst"]
        assert c["staged"] == {"isend": 7, "h2d": 7} and c["ipc"] == {"ready": 7, "d2d": 7}


WRONG = load_wrong_links().VARIANTS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", sorted(WRONG))
def test_the_mock_catches_a_wrong_link(variant: str, tmp_path: Path) -> None:
    """Each class of tests/fakecupy/wrong_links.py is a real link with one rule broken (a
    missing event synchronization or wait, a pinned slot reused early, a device array
    handed to a plain MPI, no IPC credit, no device id): on 2 ranks the mock must fail it
    with the expected message, where the real link passed the same exchange above."""
    # the ranks abort, so their IPC files stay behind: in tmp_path
    res = mpirun(2, [str(FAKE / "links_check.py"), "--variant", variant],
                 mock_env(FAKECUPY_DIR=str(tmp_path)), limit=60)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "VARIANT NOT CAUGHT" not in out, out[-3000:]
    assert "CAUGHT" in out and WRONG[variant][3] in out, out[-3000:]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport, extra", [
    ("staged", ["--method", "pd", "--microbatches", "7"]),
    ("ipc", ["--method", "pd", "--microbatches", "7"]),
    ("ipc", ["--method", "pd", "--microbatches", "6", "--order", "dynamic"]),
    ("staged", ["--method", "localsgd", "--trajectories", "2", "--local-steps", "2",
                "--microbatches", "8"]),
])
def test_train_on_mock_gpu_equals_the_simulator(tmp_path: Path, transport: str,
                                                extra: list[str]) -> None:
    from rpd_mpi.ledger.run_file import read_run
    from rpd_mpi.build import simulate_run
    out = tmp_path / "gpu.h5"
    res = mpirun(3, ["-m", "mpi4py", "-m", "rpd_mpi", "train", "--device", "cuda",
                     "--transport", transport, *TINY, *extra, "--out", str(out)],
                 mock_env(FAKECUPY_DIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = read_run(out)
    assert run.config["runtime"]["device"] == "cuda"
    assert [g["transport"] for g in run.attrs["gpus"]] == [transport] * 3
    assert [g["local_rank"] for g in run.attrs["gpus"]] == [0, 1, 2]
    assert {g["card"] for g in run.attrs["gpus"]} == {"FakeGPU (numpy mock)"}
    if "dynamic" in extra:      # the order follows arrivals: every update once, finite
        assert len(run.updates) == 3 * 6 and np.isfinite(run.updates.loss[
            run.updates.stage == 2]).all()
        return
    sim = simulate_run(RunConfig.from_dict(run.config))
    for a, b in zip(run.final_blocks, sim.final_blocks):
        assert np.abs(a - b).max() <= 1e-10 * max(1.0, np.abs(b).max())
    last = run.updates.stage == 2
    np.testing.assert_allclose(run.updates.loss[last], sim.updates.loss[sim.updates.stage == 2],
                               rtol=1e-10)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("transport", ["staged", "ipc"])
def test_float32_on_mock_gpu_tracks_the_simulator(tmp_path: Path, transport: str) -> None:
    """--dtype float32 on the device path: device and pinned link buffers of the stage dtype
    (a float64 buffer would make the mock refuse the copy), blocks kept in float32, the
    losses those of the simulator to float32 accuracy (the simulator applies float32
    gradients to float64 weights, so bits differ)."""
    from rpd_mpi.ledger.run_file import read_run
    from rpd_mpi.build import simulate_run
    out = tmp_path / "gpu32.h5"
    res = mpirun(3, ["-m", "mpi4py", "-m", "rpd_mpi", "train", "--device", "cuda",
                     "--transport", transport, *TINY, "--method", "pd", "--microbatches", "7",
                     "--dtype", "float32", "--out", str(out)],
                 mock_env(FAKECUPY_DIR=str(tmp_path)))
    assert res.returncode == 0, res.stderr[-3000:]
    run = read_run(out)
    assert run.config["objective"]["dtype"] == "float32"
    for b in run.final_blocks:
        assert np.all(b == b.astype(np.float32)), "a block left float32"
    sim = simulate_run(RunConfig.from_dict(run.config))
    last = run.updates.stage == 2
    np.testing.assert_allclose(run.updates.loss[last], sim.updates.loss[sim.updates.stage == 2],
                               rtol=1e-4)


@pytest.mark.timeout(150)
def test_direct_needs_a_cuda_aware_mpi(tmp_path: Path) -> None:
    """The venv's MPICH says it is not CUDA-aware: --transport direct is refused, once."""
    res = mpirun(3, ["-m", "rpd_mpi", "train", "--device", "cuda", "--transport", "direct",
                     "--gpu-aware-mpi", *TINY, "--out", str(tmp_path / "d.h5")], mock_env())
    if res.returncode == 0:
        pytest.skip("this MPI library claims CUDA awareness")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("rpd-mpi")]
    assert len(lines) == 1 and "--gpu-aware-mpi: the MPI library says it is not CUDA-aware" \
        in lines[0], res.stderr


@pytest.mark.timeout(150)
def test_no_gpu_is_one_clear_line(tmp_path: Path) -> None:
    res = mpirun(3, ["-m", "rpd_mpi", "train", "--device", "cuda", *TINY, "--out",
                     str(tmp_path / "n.h5")], mock_env(FAKECUPY_GPUS="0"))
    assert res.returncode == 2
    assert res.stderr.count("rpd-mpi: error: --device: cuda needs cupy and a visible GPU") == 1
    assert not (tmp_path / "n.h5").exists()


# ----- the CPU path, numba, the GPU script ------------------------------------------------------

BLOCK_CUPY = """
import sys
class Block:                       # records every attempt to import cupy
    tried = []
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'cupy':
            Block.tried.append(name)
        return None
sys.meta_path.insert(0, Block())
"""


def test_cpu_path_never_imports_cupy(tmp_path: Path) -> None:
    code = BLOCK_CUPY + f"""
import rpd_mpi, rpd_mpi.cli, rpd_mpi.mpi.train, rpd_mpi.mpi.backend, rpd_mpi.mpi.comm_gpu
import rpd_mpi.objectives.charlm, rpd_mpi.mpi.stage_runner
from rpd_mpi.cli import main
import pytest
assert main(['simulate', '--objective', 'charlm', '--stages', '3', '--microbatches', '4',
             '--width', '8', '--heads', '2', '--context', '6', '--batch-size', '2',
             '--out', {str(tmp_path / 's.h5')!r}]) == 0
rc = pytest.main(['-q', '-p', 'no:cacheprovider', '-x', {str(ROOT / 'tests/test_charlm.py')!r},
                  {str(ROOT / 'tests/test_kernels_lm.py')!r}, '-k', 'not benchmark'])
assert rc == 0, rc
assert not Block.tried and 'cupy' not in sys.modules, Block.tried
print('NO-CUPY-OK')
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=600)
    assert res.returncode == 0 and "NO-CUPY-OK" in res.stdout, res.stdout[-2000:] + res.stderr


def test_package_works_without_numba() -> None:
    code = """
import sys
sys.modules['numba'] = None        # import numba -> ImportError, as on a GPU-only machine
import numpy as np
from rpd_mpi.objectives import kernels
from rpd_mpi.objectives import kernels_lm
from rpd_mpi.objectives.charlm import build_charlm
assert kernels.shift_prediction is kernels.shift_prediction_ref and not kernels_lm.HAVE_NUMBA
assert all(kernels_lm.kernel(n, np) is ref for n, (_, ref) in kernels_lm.KERNELS.items())
m = build_charlm(3, width=8, heads=2, context=6, batch_size=3, seed=5)
print(repr(m.full_objective(m.init_weights())))
"""
    plain = "from rpd_mpi.objectives.charlm import build_charlm\n" \
            "m = build_charlm(3, width=8, heads=2, context=6, batch_size=3, seed=5)\n" \
            "print(repr(m.full_objective(m.init_weights())))"
    values = []
    for source in (code, plain):
        res = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                             cwd=ROOT, timeout=120)
        assert res.returncode == 0, res.stderr
        values.append(float(res.stdout.split()[-1]))
    assert values[0] == pytest.approx(values[1], rel=1e-12)


@pytest.mark.timeout(400)
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py end to end on the mock: every section runs and reports."""
    out = tmp_path / "gpu-check.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                          "--dry-run", "--out", str(out)], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    text = out.read_text()
    assert "DRY RUN against the numpy mock cupy" in text and "FAILED" not in text
    assert "**PASS**" in text and "FakeGPU (numpy mock)" in text
    raw = json.loads(out.with_suffix(".json").read_text())
    assert all(r["pass"] for r in raw["equivalence"])
    assert [r["rc"] for r in raw["runs"]] == [0, 0, 0]
    kinds = [b["kind"] for b in raw["bandwidth"]]
    assert kinds[:3] == ["host", "staged", "ipc"]
    assert all(len(b["rows"]) == 2 and all(r["GB_s"] > 0 for r in b["rows"])
               for b in raw["bandwidth"])


def test_gpu_check_wrapper_writes_under_out(tmp_path: Path) -> None:
    """jobs/gpu-check.sh with a stub python: where the report goes, and in wheel mode the
    offline install into the prefix and the variables that point mpi4py at it (the real
    run is tests/test_gpu_check_dryrun.py)."""
    text = (ROOT / "jobs" / "gpu-check.sh").read_text()
    assert os.access(ROOT / "jobs" / "gpu-check.sh", os.X_OK)
    assert "benchmarks/gpu_check.py" in text and "$OUT/gpu-check.md" in text
    assert "jobs/wheels/" in (ROOT / ".gitignore").read_text().split()
    stub = tmp_path / "python3"
    stub.write_text('#!/bin/sh\necho "args: $*"\necho "env: $MPI4PY_LIBMPI $MPIEXEC"\n')
    stub.chmod(0o755)
    empty, wheels = tmp_path / "none", tmp_path / "wheels"
    empty.mkdir()
    wheels.mkdir()
    (wheels / "mpich-9.9-py3-none-any.whl").write_text("")
    base = {k: v for k, v in os.environ.items() if k not in ("OUT", "MPIEXEC")}
    for out, want in ((str(tmp_path), f"--out {tmp_path}/gpu-check.md"),
                      ("", "--out docs/gpu-check.md")):
        env = {**base, "PYTHON": str(stub), "GPU_WHEELS": str(empty),
               **({"OUT": out} if out else {})}
        res = subprocess.run(["bash", str(ROOT / "jobs" / "gpu-check.sh")], capture_output=True,
                             text=True, env=env, timeout=60)
        assert res.returncode == 0 and want in res.stdout, res.stdout + res.stderr
        assert "using this machine's MPI" in res.stdout
    prefix = tmp_path / "prefix"
    env = {**base, "PYTHON": str(stub), "GPU_WHEELS": str(wheels), "GPU_PREFIX": str(prefix)}
    res = subprocess.run(["bash", str(ROOT / "jobs" / "gpu-check.sh"), "--dry-run"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    install = next(ln for ln in res.stdout.splitlines() if "pip install" in ln)
    for flag in ("--no-index", f"--find-links {wheels}", f"--prefix {prefix}", "mpich-9.9"):
        assert flag in install, install
    assert f"env: {prefix}/lib/libmpi.so.12 {prefix}/bin/mpiexec" in res.stdout, res.stdout
    assert res.stdout.rstrip().splitlines()[-2].endswith("--dry-run"), res.stdout
