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
DATA_SMALL = ["--stages", "2", "--microbatches", "6", "--batch-size", "3"]   # --data sets d, n


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
    res = rpd_mpi("simulate", *DATA_SMALL, "--data", str(path), "--out", str(tmp_path / "r.h5"))
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
    res = rpd_mpi("simulate", *DATA_SMALL, "--data", str(tmp_path / "d.npz"), "--out", str(out))
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
    res = rpd_mpi("simulate", *DATA_SMALL, "--data", str(tmp_path / "d.h5"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert read_run(out).attrs["dim"] == 5
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["X"] = X
    res = rpd_mpi("simulate", *DATA_SMALL, "--data", str(tmp_path / "bad.h5"), "--out",
                  str(tmp_path / "r2.h5"))             # a new --out: r.h5 exists (issue 10)
    assert res.returncode == 2 and "--data" in res.stderr and "'y'" in res.stderr


# ----------------------------------------------------------------------------- issue 13: CLI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_the_package_metadata() -> None:
    import importlib.metadata
    res = rpd_mpi("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"rpd-mpi {importlib.metadata.version('rpd_mpi')}"


@pytest.mark.parametrize("command", ["tool", "experiment"])
@pytest.mark.parametrize("extra", [[], ["--help"], ["-h"]])
def test_tool_and_experiment_list_their_names(command, extra) -> None:
    import ast
    import importlib.util
    from rpd_mpi.analysis import TOOLS
    from rpd_mpi.experiments.registry import REGISTRY
    res = rpd_mpi(command, *extra)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    names = TOOLS if command == "tool" else (*REGISTRY, "all")
    listed = [line.split()[0] for line in lines if line.startswith("  ")]
    assert listed == list(names)
    for line in lines:
        if not line.startswith("  "):
            continue
        name, text = line.split(None, 1)
        if command == "experiment" and name in REGISTRY:
            assert text == REGISTRY[name][0]
        elif command == "tool":         # the module docstring's first line starts the text
            spec = importlib.util.find_spec(f"rpd_mpi.analysis.{name}")
            with open(spec.origin, encoding="utf-8") as f:
                first = ast.get_docstring(ast.parse(f.read())).splitlines()[0]
            assert first.startswith(text.removesuffix(" ...").split(". ")[0][:40])


@pytest.mark.parametrize("command, name", [("tool", "foo"), ("experiment", "E9")])
def test_unknown_tool_or_experiment_lists_the_valid_ones(command, name) -> None:
    from rpd_mpi.analysis import TOOLS
    res = rpd_mpi(command, name)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rpd-mpi: error:") and repr(name) in lines[0]
    for valid in (TOOLS if command == "tool" else ("E1", "E6", "all")):
        assert valid in lines[0]


def test_tool_help_reaches_the_tool() -> None:
    res = rpd_mpi("tool", "theory", "--help")
    assert res.returncode == 0 and "usage:" in res.stdout


def test_export_hands_its_arguments_to_the_export_module(tmp_path) -> None:
    pytest.importorskip("rpd_mpi.analysis.export")
    res = rpd_mpi("export", "--help")
    assert res.returncode == 0 and "usage:" in res.stdout, res.stderr
    run = tmp_path / "run.h5"
    assert rpd_mpi("simulate", *SMALL, "--out", str(run)).returncode == 0
    res = rpd_mpi("export", str(run), "--format", "csv", "--out", str(tmp_path / "csv"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "csv" / "updates.csv").exists()


@pytest.mark.parametrize("command", ["simulate", "train"])
def test_run_flags_are_grouped_with_choices(command) -> None:
    res = rpd_mpi(command, "--help")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    titles = ["schedule:", "RPD:", "LocalSGD:", "objective:", "runtime:", "output:"]
    at = [text.index(f"\n{t}\n") for t in titles]
    assert at == sorted(at)
    assert "--method {pd,rpd,localsgd,gpipe,naive}" in text
    assert "--objective {quadratic,tridiag,logistic,charlm}" in text
    assert "--delay-source {uniform,max,zero,pd,ledger}" in text
    assert text.index("\n  --trajectories") > text.index("\nLocalSGD:\n")
    assert text.index("\n  --out ") > text.index("\noutput:\n")
    assert "--print-config" in text and "--quiet" in text
    if command == "train":
        assert "--order {static,dynamic}" in text and "--wait {auto,spin,polite}" in text
        assert "--transport {staged,direct,ipc}" in text
        assert text.index("\n  --order {") > text.index("\nruntime:\n")


def test_type_errors_name_the_flag_once(tmp_path) -> None:
    res = rpd_mpi("simulate", "--stages", "two", "--out", str(tmp_path / "r.h5"))
    assert res.returncode == 2
    assert res.stderr.strip() == "rpd-mpi: error: --stages: must be an integer (got 'two')"


def _toml(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:          # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def _same_run(a, b) -> None:
    import dataclasses
    assert len(a.final_blocks) == len(b.final_blocks)
    for x, y in zip(a.final_blocks, b.final_blocks):
        assert x.dtype == y.dtype and np.array_equal(x, y)      # bit for bit
    for f in dataclasses.fields(a.updates):
        x, y = getattr(a.updates, f.name), getattr(b.updates, f.name)
        assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), f.name
    assert np.array_equal(a.objective.value, b.objective.value)
    assert {k: v for k, v in a.config.items() if k != "out"} == \
        {k: v for k, v in b.config.items() if k != "out"}


RUN = ["--method", "localsgd", "--trajectories", "2", "--local-steps", "2", "--stages", "2",
       "--microbatches", "8", "--dim", "8", "--examples", "12", "--batch-size", "3",
       "--lr", "0.0123456789", "--noise", "0.3", "--seed", "5", "--eval-every", "2"]


def test_print_config_then_config_reproduces_the_run(tmp_path) -> None:
    printed = rpd_mpi("simulate", *RUN, "--print-config", "--out", str(tmp_path / "a.h5"))
    assert printed.returncode == 0, printed.stderr
    assert not list(tmp_path.iterdir())                       # printed, did not run
    tree = _toml(printed.stdout)
    assert tree["lr"] == 0.0123456789 and tree["schedule"]["local_steps"] == 2
    assert tree["objective"]["noise"] == 0.3 and tree["out"] == str(tmp_path / "a.h5")
    os.mkdir(tmp_path / "cfg")
    (tmp_path / "cfg" / "run.toml").write_text(printed.stdout)  # another folder: paths hold
    assert rpd_mpi("simulate", *RUN, "--out", str(tmp_path / "a.h5")).returncode == 0
    res = rpd_mpi("simulate", "--config", str(tmp_path / "cfg" / "run.toml"), "--out",
                  str(tmp_path / "b.h5"))
    assert res.returncode == 0, res.stderr
    _same_run(read_run(tmp_path / "a.h5"), read_run(tmp_path / "b.h5"))
    again = rpd_mpi("simulate", "--config", str(tmp_path / "cfg" / "run.toml"), "--print-config")
    assert again.stdout == printed.stdout                      # a fixed point


def test_print_config_of_train_and_bad_values(tmp_path) -> None:
    res = rpd_mpi("train", "--order", "dynamic", "--quiet", "--print-config")
    assert res.returncode == 0, res.stderr
    tree = _toml(res.stdout)
    assert tree["runtime"]["order"] == "dynamic" and tree["quiet"] is True
    bad = rpd_mpi("simulate", "--stages", "0", "--print-config")
    assert bad.returncode == 2 and "--stages" in bad.stderr and not bad.stdout


def test_config_from_a_ledger_reruns_it_and_flags_win(tmp_path) -> None:
    a, b, c = (str(tmp_path / f"{x}.h5") for x in "abc")
    assert rpd_mpi("simulate", *RUN, "--out", a).returncode == 0
    res = rpd_mpi("simulate", "--config", a, "--out", b)
    assert res.returncode == 0, res.stderr
    _same_run(read_run(a), read_run(b))
    res = rpd_mpi("simulate", "--config", a, "--out", c, "--lr", "0.001", "--microbatches", "4")
    assert res.returncode == 0, res.stderr
    rec = read_run(c)
    assert rec.config["lr"] == 0.001 and rec.config["schedule"]["microbatches"] == 4
    assert rec.config["objective"]["noise"] == 0.3 and rec.config["seed"] == 5
    same = rpd_mpi("simulate", "--config", a)                  # its own out: refused
    assert same.returncode == 2 and "--out" in same.stderr
    bad = tmp_path / "notaledger.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    res = rpd_mpi("simulate", "--config", str(bad), "--out", str(tmp_path / "d.h5"))
    assert res.returncode == 2 and res.stderr.startswith("rpd-mpi: error: --config")
    assert len(res.stderr.strip().splitlines()) == 1


def test_example_config_files_run(tmp_path) -> None:
    """examples/demo.toml (the demo's PD run) and examples/E3.toml (E3's PD run)."""
    demo = tmp_path / "demo.h5"
    res = rpd_mpi("simulate", "--config", os.path.join(ROOT, "examples", "demo.toml"),
                  "--out", str(demo), "--json")
    assert res.returncode == 0, res.stderr
    rec = read_run(demo)
    assert rec.config["schedule"]["method"] == "pd" and rec.config["objective"]["name"] == \
        "logistic" and rec.config["runtime"]["op_cost"] == 0.002
    assert json.loads(res.stdout)["updates"] == 4 * 160
    e3 = tmp_path / "e3.h5"
    res = rpd_mpi("simulate", "--config", os.path.join(ROOT, "examples", "E3.toml"),
                  "--out", str(e3), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["stages"] == 16 and summary["slots"] == 1230
    assert abs(summary["final_objective"] - 2.73) < 0.01        # docs/RESULTS.md, E3: PD 2.73
    small = tmp_path / "e3-small.h5"
    res = rpd_mpi("simulate", "--config", os.path.join(ROOT, "examples", "E3.toml"),
                  "--stages", "4", "--microbatches", "20", "--budget-slots", "0",
                  "--out", str(small))
    assert res.returncode == 0, res.stderr
    assert read_run(small).config["objective"]["dim"] == 512
