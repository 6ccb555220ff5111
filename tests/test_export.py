"""CSV/Parquet export and the Chrome trace of run files; the README's Python API block."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from rpd_mpi.analysis import TOOLS, export, trace
from rpd_mpi.api import open_run
from rpd_mpi.build import simulate_run
from rpd_mpi.config import RunConfig
from rpd_mpi.ledger import read_run, write_run
from rpd_mpi.records import UPDATE_FIELDS

pd = pytest.importorskip("pandas")
ROOT = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.fixture(scope="module")
def sim_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = RunConfig.from_dict({"schedule": {"method": "pd", "stages": 3, "microbatches": 6},
                               "objective": {"dim": 6, "examples": 12, "batch_size": 2}})
    path = tmp_path_factory.mktemp("export") / "run.h5"
    write_run(path, simulate_run(cfg))
    return path


def check_tables(path: Path, tables: dict[str, "pd.DataFrame"]) -> None:
    """The exported tables hold exactly the numbers read_run gives."""
    record = read_run(path)
    upd = tables["updates"]
    S = record.updates.delays.shape[1]
    assert list(upd.columns) == [*UPDATE_FIELDS, *(f"delay_{s}" for s in range(S))]
    for name in UPDATE_FIELDS:
        np.testing.assert_array_equal(upd[name].to_numpy(), getattr(record.updates, name))
    np.testing.assert_array_equal(upd[[f"delay_{s}" for s in range(S)]].to_numpy(),
                                  record.updates.delays)
    ev = tables["events"]
    for name in record.events.dtype.names or ():
        np.testing.assert_array_equal(ev[name].to_numpy(), record.events[name])
    assert set(ev["op_name"]) <= {"idle", "F", "B", "avg"}
    obj = tables["objective"]
    for name in ("time", "k", "value"):
        np.testing.assert_array_equal(obj[name].to_numpy(), getattr(record.objective, name))


def test_csv_round_trip(sim_ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "csv"
    assert export.main([str(sim_ledger), "--format", "csv", "--out", str(out)]) == 0
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    tables = {name: pd.read_csv(out / f"{name}.csv", **exact) for name in export.TABLES}
    check_tables(sim_ledger, tables)
    meta = json.loads((out / "run.json").read_text())
    assert meta["schema_version"] == 2 and meta["time_units"] == "slots"
    assert meta["units"]["updates"]["delay_0"] == "global updates"
    assert meta["attrs"]["method"] == "pd"


def test_parquet_round_trip(sim_ledger: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    out = tmp_path / "pq"
    assert export.main([str(sim_ledger), "--format", "parquet", "--out", str(out)]) == 0
    tables = {name: pd.read_parquet(out / f"{name}.parquet") for name in export.TABLES}
    check_tables(sim_ledger, tables)
    record = read_run(sim_ledger)
    assert tables["updates"]["stage"].dtype == record.updates.stage.dtype
    assert tables["events"]["op"].dtype == record.events["op"].dtype


def test_export_refuses_to_overwrite(sim_ledger: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "csv"
    assert export.main([str(sim_ledger), "--out", str(out)]) == 0
    before = (out / "updates.csv").stat().st_mtime_ns
    capsys.readouterr()
    assert export.main([str(sim_ledger), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and "updates.csv" in err
    assert (out / "updates.csv").stat().st_mtime_ns == before
    assert export.main([str(sim_ledger), "--out", str(out), "--force"]) == 0
    assert export.main([str(tmp_path / "missing.h5"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_through_the_tool_command(sim_ledger: Path, tmp_path: Path) -> None:
    assert "export" in TOOLS and "trace" in TOOLS
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", "tool", "export", str(sim_ledger),
                          "--format", "csv", "--out", str(tmp_path / "t")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == \
        ["events.csv", "objective.csv", "run.json", "updates.csv"]


def test_trace_of_a_simulator_run(sim_ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    assert trace.main([str(sim_ledger), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    record = read_run(sim_ledger)
    ops = [e for e in data["traceEvents"] if e.get("cat") == "op"]
    assert len(ops) == record.events.size
    assert "1 slot is drawn as 1000 us" in data["otherData"]["clock"]
    first = record.events[0]
    assert ops[0]["ts"] == first["start"] * 1000 and ops[0]["dur"] == 1000


def test_trace_of_an_rpd_simulation(tmp_path: Path) -> None:
    cfg = RunConfig.from_dict({"schedule": {"method": "rpd", "stages": 3},
                               "objective": {"dim": 6, "examples": 12, "batch_size": 2}})
    path = tmp_path / "rpd.h5"
    write_run(path, simulate_run(cfg))
    data = trace.chrome_trace(open_run(path))
    iters = [e for e in data["traceEvents"] if e.get("cat") == "iteration"]
    assert len(iters) == len(read_run(path).updates) > 0
    assert iters[0]["args"]["k"] == 0 and len(iters[0]["args"]["delays"]) == 3


@pytest.mark.timeout(180)
def test_trace_of_a_4_rank_mpi_run(tmp_path: Path) -> None:
    if not MPIEXEC.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    ledger = tmp_path / "mpi.h5"
    cmd = ["timeout", "150", str(MPIEXEC), "-n", "4", sys.executable, "-m", "rpd_mpi", "train",
           "--stages", "4", "--microbatches", "8", "--dim", "8", "--examples", "16",
           "--batch-size", "4", "--out", str(ledger)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "trace.json"
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", "tool", "trace", str(ledger),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())                       # valid JSON
    assert isinstance(data["traceEvents"], list)
    run = open_run(ledger)
    events = run.events
    ops = [e for e in data["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "op"]
    assert len(ops) == events.size > 0                       # one complete event per event
    assert sorted({e["pid"] for e in ops}) == [0, 1, 2, 3]   # one track per rank
    names = {e["pid"]: e["args"]["name"] for e in data["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {r: f"rank {r} (group 0, stage {r})" for r in range(4)}
    order = np.lexsort((events["start"], events["rank"]))
    got = sorted(ops, key=lambda e: (e["pid"], e["ts"]))
    for e, ev in zip(got, events[order]):
        assert e["pid"] == ev["rank"] and e["ts"] == pytest.approx(ev["start"] * 1e6)
        assert e["dur"] == pytest.approx((ev["end"] - ev["start"]) * 1e6, abs=1e-6)
        assert e["args"]["microbatch"] == ev["microbatch"]
        assert e["args"]["version"] == ev["version"] and e["args"]["bytes"] == ev["bytes"]
        assert set(e["args"]) >= {"wait", "trajectory"}
    assert data["otherData"]["time_units"] == "s"
    # the MPI run's provenance: mpi4py was loaded, so its version is recorded
    assert run.attrs["mpi4py_version"] == metadata.version("mpi4py")
    assert run.attrs["mpi_library"] and run.attrs["engine"] == "mpi"
    assert run.attrs["command_line"][1:] == cmd[8:]


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the README's Python API section has one python block"
    return str(blocks[0])


def test_readme_python_api_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_block(), "README.md (Python API)", "exec"), {})
    printed = capsys.readouterr().out
    assert "('update', 'stage') global updates" in printed
    assert (tmp_path / "run.h5").exists() and open_run(tmp_path / "run.h5").stages == 4
    assert os.getcwd() == str(tmp_path)
