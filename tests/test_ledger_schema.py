"""The self-describing ledger (schema version 2): units and descriptions on every dataset,
op codes and event fields, dimension scales that xarray (h5netcdf) names, provenance
attributes, and version 1 files that still read."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np
import pytest

import rpd_mpi
from rpd_mpi.api import open_run
from rpd_mpi.ledger import schema
from rpd_mpi.ledger.provenance import git_commit
from rpd_mpi.ledger.run_file import (READABLE_VERSIONS, SCHEMA_VERSION, LedgerError, read_run,
                                     write_run)
from rpd_mpi.records import EVENT_DTYPE, RunRecord

ROOT = Path(__file__).resolve().parents[1]
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "7"}
ARGS = ["simulate", "--stages", "3", "--microbatches", "6", "--dim", "6", "--examples", "12",
        "--batch-size", "2", "--quiet", "--out"]


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A simulator ledger written by a subprocess, with Slurm variables set; its argv."""
    out = tmp_path_factory.mktemp("schema") / "run.h5"
    args = [*ARGS, str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", *args], capture_output=True,
                         text=True, env={**env, **SLURM}, timeout=120, cwd=out.parent)
    assert res.returncode == 0, res.stderr
    return out, [str(Path(rpd_mpi.__file__).parent / "__main__.py"), *args]


def datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    found: dict[str, h5py.Dataset] = {}
    f.visititems(lambda name, obj: found.update({name: obj})
                 if isinstance(obj, h5py.Dataset) else None)
    return found


def test_every_dataset_has_units_and_description(sim_run: tuple[Path, list[str]]) -> None:
    path, _ = sim_run
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 2
        assert f.attrs["time_units"] == "slots"
        found = datasets(f)
        assert set(schema.DATASETS) - set(schema.OPTIONAL_DATASETS) <= set(found)
        for name, ds in found.items():
            assert isinstance(ds.attrs.get("units"), str), name
            assert ds.attrs.get("description"), name
        assert f["updates/time"].attrs["units"] == "slots"
        assert f["updates/delays"].attrs["units"] == "global updates"
        assert json.loads(f["events"].attrs["op_codes"]) == {"0": "idle", "1": "F", "2": "B",
                                                            "3": "avg"}
        assert json.loads(f["timeline/kind"].attrs["op_codes"])["2"] == "B"
        fields = json.loads(f["events"].attrs["fields"])
        assert tuple(fields) == EVENT_DTYPE.names
        assert fields["start"].endswith("[slots]") and fields["bytes"].endswith("[bytes]")


def test_xarray_names_the_dimensions(sim_run: tuple[Path, list[str]]) -> None:
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    path, _ = sim_run
    record = read_run(path)
    K, S = record.updates.delays.shape
    with xr.open_dataset(path, engine="h5netcdf", group="updates") as ds:
        assert dict(ds.sizes) == {"update": K, "stage": S}
        assert ds["delays"].dims == ("update", "stage")
        assert ds["loss"].dims == ("update",)
        assert ds["time"].attrs["units"] == "slots"
        np.testing.assert_array_equal(ds["delays"].values, record.updates.delays)
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        assert dict(ds.sizes) == {"event": record.events.size, "stage": S}
        assert ds["events"].dims == ("event",)
        np.testing.assert_array_equal(ds["stage"].values, np.arange(S))
    with xr.open_dataset(path, engine="h5netcdf", group="objective") as ds:
        assert dict(ds.sizes) == {"objective_point": record.objective.k.size}
        np.testing.assert_array_equal(ds["value"].values, record.objective.value)
    assert record.timeline_kind is not None
    with xr.open_dataset(path, engine="h5netcdf", group="timeline") as ds:
        assert ds["kind"].dims == ("slot", "stage")
        assert ds.sizes["slot"] == record.timeline_kind.shape[0]
    with xr.open_dataset(path, engine="h5netcdf", group="final_blocks",
                         phony_dims="sort") as ds:
        assert len(ds.data_vars) == S


def test_provenance(sim_run: tuple[Path, list[str]]) -> None:
    path, argv = sim_run
    attrs = open_run(path).attrs
    assert attrs["command_line"] == argv
    assert attrs["python_version"] == platform.python_version()
    for name in ("numpy", "numba", "h5py"):
        assert attrs[f"{name}_version"] == metadata.version(name), name
    assert attrs["mpi4py_version"] == ""              # a simulator run never loads mpi4py
    assert attrs["mpi_library"] == ""
    with h5py.File(path, "r") as f:
        assert f.attrs["package_version"] == metadata.version("rpd_mpi")
    created = datetime.datetime.fromisoformat(attrs["created"].replace("Z", "+00:00"))
    age = datetime.datetime.now(datetime.timezone.utc) - created
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=10)
    assert attrs["slurm_job_id"] == "4242"
    assert attrs["slurm_array_job_id"] == "4200" and attrs["slurm_array_task_id"] == "7"
    assert attrs["hosts"] and all(isinstance(h, str) for h in attrs["hosts"])
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=30)
        if head.returncode == 0:
            assert attrs["git_commit"] == head.stdout.strip()
    else:
        assert attrs["git_commit"] == ""


def test_git_commit_from_files(tmp_path: Path) -> None:
    """HEAD -> loose ref, packed ref, detached HEAD; no checkout -> ''."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha + "\n")
    assert git_commit(tmp_path) == sha
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert git_commit(tmp_path) == sha
    (git / "HEAD").write_text(sha[::-1] + "\n")
    assert git_commit(tmp_path) == sha[::-1]
    assert git_commit(None) in ("", git_commit())


def write_version_1(path: Path, record: RunRecord) -> None:
    """The schema 1 layout, as rpd_mpi 0.1 wrote it: no units, descriptions, scales or
    provenance attributes."""
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 1
        f.attrs["package_version"] = "0.1.0"
        f.attrs["config"] = json.dumps(record.config)
        json_names = []
        for name, value in record.attrs.items():
            if value is None or isinstance(value, (list, dict)):
                f.attrs[name] = json.dumps(value)
                json_names.append(name)
            else:
                f.attrs[name] = value
        f.attrs["json_attrs"] = json.dumps(json_names)
        upd = record.updates
        g = f.create_group("updates")
        g["k"] = upd.k
        for name in ("stage", "group", "trajectory"):
            g[name] = getattr(upd, name).astype("i4")
        for name in ("microbatch", "batch", "version", "local_staleness", "delays"):
            g[name] = getattr(upd, name).astype("i8")
        for name in ("loss", "grad_norm", "time"):
            g[name] = getattr(upd, name).astype("f8")
        f["events"] = record.events
        o = f.create_group("objective")
        for name in ("time", "k", "value"):
            o[name] = getattr(record.objective, name)
        b = f.create_group("final_blocks")
        b.attrs["count"] = len(record.final_blocks)
        for s, block in enumerate(record.final_blocks):
            b[f"block_{s:03d}"] = block
        if record.timeline_kind is not None:
            f["timeline/kind"] = record.timeline_kind.astype("i1")
        f.attrs["complete"] = True


def test_version_1_file_still_reads(sim_run: tuple[Path, list[str]], tmp_path: Path) -> None:
    path, _ = sim_run
    new = read_run(path)
    old_attrs = {k: v for k, v in new.attrs.items()
                 if k not in ("created", "git_commit", "command_line", "python_version",
                              "numpy_version", "numba_version", "h5py_version",
                              "mpi4py_version", "slurm_array_job_id", "slurm_array_task_id")}
    v1 = RunRecord(attrs=old_attrs, config=new.config, updates=new.updates,
                   objective=new.objective, final_blocks=new.final_blocks, events=new.events,
                   timeline_kind=new.timeline_kind)
    old = tmp_path / "v1.h5"
    write_version_1(old, v1)
    assert 1 in READABLE_VERSIONS
    run = open_run(old)
    assert run.schema_version == 1 and run.attrs == old_attrs
    np.testing.assert_array_equal(run.updates.delays, new.updates.delays)
    np.testing.assert_array_equal(run.events, new.events)
    assert run.time_units == "slots"                   # from the engine attribute
    if _has("pandas"):
        assert list(run.updates_frame().columns[-3:]) == ["delay_0", "delay_1", "delay_2"]
    # and a version 1 file rewritten by this version becomes a version 2 file
    write_run(tmp_path / "v2.h5", read_run(old))
    assert open_run(tmp_path / "v2.h5").schema_version == 2


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_unreadable_version_names_the_readable_ones(sim_run: tuple[Path, list[str]],
                                                    tmp_path: Path) -> None:
    path, _ = sim_run
    bad = tmp_path / "v3.h5"
    bad.write_bytes(path.read_bytes())
    with h5py.File(bad, "r+") as f:
        f.attrs["schema_version"] = 3
    with pytest.raises(LedgerError, match="schema version 3; this rpd_mpi reads version 1 or 2"):
        read_run(bad)


def test_frames_need_pandas(sim_run: tuple[Path, list[str]],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    run = open_run(sim_run[0])
    monkeypatch.setitem(sys.modules, "pandas", None)         # import pandas -> ImportError
    with pytest.raises(ImportError, match=r"pip install rpd_mpi\[analysis\]"):
        run.updates_frame()


def test_import_rpd_mpi_loads_no_api() -> None:
    code = ("import sys, rpd_mpi; bad = [m for m in ('rpd_mpi.api', 'pandas', 'h5py', "
            "'xarray', 'mpi4py') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
