"""The command line: real subprocesses, one-line errors with exit code 2, ledgers read back."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rpd_mpi.ledger.run_file import read_run

SMALL = ["--stages", "2", "--microbatches", "6", "--dim", "8", "--examples", "12",
         "--batch-size", "3"]


def rpd_mpi(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rpd_mpi", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args,flag", [
    (["--stages", "0"], "--stages"),
    (["--microbatches", "0"], "--microbatches"),
    (["--microbatches", "-3"], "--microbatches"),
    (["--method", "rpd", "--delta", "-1"], "--delta"),
    (["--method", "pd", "--trajectories", "4"], "--trajectories"),
    (["--method", "rpd", "--groups", "2"], "--groups"),
    (["--batch-size", "5"], "--batch-size"),
    (["--stages", "two"], "--stages"),
    (["--method", "pipedream"], "--method"),
    (["--objective", "charlm", "--stages", "2"], "--stages"),
    (["--lr", "0"], "--lr"),
    (["--method", "pd", "--delay-source", "max"], "--delay-source"),
    (["--method", "rpd", "--delay-source", "pd", "--delta", "5"], "--delta"),
    (["--method", "localsgd", "--trajectories", "2", "--noam", "2"], "--noam"),
    (["--method", "pd", "--flush", "2"], "--flush"),
])
def test_bad_input_is_one_line_exit_2_no_ledger(tmp_path, args, flag) -> None:
    out = tmp_path / "run.h5"
    base = {a: b for a, b in zip(SMALL[::2], SMALL[1::2])}
    for a, b in zip(args[::2], args[1::2]):
        base[a] = b
    flat = [x for kv in base.items() for x in kv]
    res = rpd_mpi("simulate", *flat, "--out", str(out))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpd-mpi: error:") and flag in lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_data_file_without_y_is_rejected(tmp_path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, X=np.ones((12, 4)))
    res = rpd_mpi("simulate", *SMALL, "--data", str(path), "--out", str(tmp_path / "r.h5"))
    assert res.returncode == 2 and "--data" in res.stderr and "'y'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.h5").exists()


def test_simulate_writes_a_ledger_that_report_reads(tmp_path) -> None:
    out = tmp_path / "run.h5"
    res = rpd_mpi("simulate", "--method", "pd", *SMALL, "--out", str(out), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    rec = read_run(out)
    assert summary["updates"] == len(rec.updates) == 12
    assert rec.attrs["method"] == "pd" and rec.config["schedule"]["stages"] == 2
    rep = json.loads(rpd_mpi("report", str(out), "--json").stdout)
    for key in ("method", "stages", "updates", "slots", "final_objective", "steady_max_delay",
                "utilization"):
        assert rep[key] == summary[key]
    assert rep["slots"] == 2 * 6 + 2 * 2 - 2


def test_data_file_is_used(tmp_path) -> None:
    rng = np.random.default_rng(0)
    X, w = rng.standard_normal((12, 6)), rng.standard_normal(6)
    np.savez(tmp_path / "d.npz", X=X, y=X @ w)
    out = tmp_path / "r.h5"
    res = rpd_mpi("simulate", *SMALL, "--data", str(tmp_path / "d.npz"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    rec = read_run(out)
    assert rec.attrs["dim"] == 6 and abs(rec.attrs["f_star"]) < 1e-20


def test_toml_config_and_flag_override(tmp_path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('lr = 0.01\n[schedule]\nmethod = "localsgd"\nstages = 2\nmicrobatches = 8\n'
                   'trajectories = 2\nlocal_steps = 2\n[objective]\ndim = 8\nexamples = 12\n'
                   'batch_size = 3\n')
    out = tmp_path / "r.h5"
    res = rpd_mpi("simulate", "--config", str(cfg), "--microbatches", "4", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rec = read_run(out)
    assert rec.config["schedule"]["microbatches"] == 4 and rec.config["lr"] == 0.01
    assert rec.updates.local_staleness.max() == 0
    cfg.write_text("[schedule]\nstagez = 3\n")
    bad = rpd_mpi("simulate", "--config", str(cfg), "--out", str(out))
    assert bad.returncode == 2 and "stagez" in bad.stderr


def test_delays_json_keys() -> None:
    res = rpd_mpi("delays", "--stages", "8", "--json")
    stats = json.loads(res.stdout)
    assert stats["stages"] == 8 and stats["microbatches"] == 80
    assert stats["steady_max"] == 60 and len(stats["per_stage_steady_max"]) == 8
    for key in ("slots", "steady_mean", "steady_p10", "startup_max"):
        assert key in stats


def test_report_rejects_unknown_schema(tmp_path) -> None:
    import h5py
    out = tmp_path / "run.h5"
    assert rpd_mpi("simulate", *SMALL, "--out", str(out)).returncode == 0
    with h5py.File(out, "a") as f:
        f.attrs["schema_version"] = 99
    res = rpd_mpi("report", str(out))
    assert res.returncode == 2 and "schema version 99" in res.stderr


def test_schedule_prints_the_grid() -> None:
    res = rpd_mpi("schedule", "--stages", "3", "--microbatches", "4")
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("# pd stages=3") and len(lines) == 4
    assert lines[3].split()[1:4] == [".", ".", "F0"]


def test_h5_data_file_with_f_star(tmp_path) -> None:
    import h5py
    rng = np.random.default_rng(1)
    X, w = rng.standard_normal((12, 5)), rng.standard_normal(5)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["X"], f["y"], f["f_star"] = X, X @ w, 0.0
    out = tmp_path / "r.h5"
    res = rpd_mpi("simulate", *SMALL, "--data", str(tmp_path / "d.h5"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert read_run(out).attrs["dim"] == 5
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["X"] = X
    res = rpd_mpi("simulate", *SMALL, "--data", str(tmp_path / "bad.h5"), "--out",
                  str(tmp_path / "r2.h5"))             # a new --out: r.h5 exists (issue 10)
    assert res.returncode == 2 and "--data" in res.stderr and "'y'" in res.stderr
