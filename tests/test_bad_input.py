"""One line for every bad input (issue 10): simulate, train, report, tool and experiment.

Every case runs the command line as a subprocess (`python -m rpd_mpi ...`) with its working
directory in a fresh temporary folder that holds the case's input files, and asserts: the
exit code, exactly one stderr line `rpd-mpi: error: ...` naming the flag or the file, no
traceback, and the folder afterwards byte for byte as before (inputs unchanged, nothing new).
The `train` cases run as a single MPI process (a singleton launch) or, where the point is
printing once per job, under `mpiexec -n 2`. The cases of one table run a few at a time in
their own folders (`run_table`), each test then checks its own outcome.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import pytest

from rpd_mpi import budget
from rpd_mpi.build import simulate_run
from rpd_mpi.cli import launch_rank
from rpd_mpi.config import ConfigError, ObjectiveConfig, RunConfig, ScheduleConfig
from rpd_mpi.ledger import read_run, write_run
from rpd_mpi.ledger.run_file import LedgerError, is_complete

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
SMALL = ["--stages", "2", "--microbatches", "6", "--dim", "8", "--examples", "12",
         "--batch-size", "3"]
LM = ["--objective", "charlm", "--stages", "3", "--microbatches", "2", "--width", "8",
      "--context", "8", "--batch-size", "2"]
BIG = str(10 ** 12)          # far beyond any machine's memory, whatever the flag


def rpd_mpi(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpd_mpi", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def one_line(res: subprocess.CompletedProcess[str], *names: str) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("rpd-mpi: error: "), res.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- input files

def _npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _good() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 8))
    return {"X": X, "y": X @ rng.standard_normal(8)}


def _truncated(path: Path) -> None:
    _npz(path, **_good())
    path.write_bytes(path.read_bytes()[:300])


MAKERS: dict[str, Callable[[Path], None]] = {
    "empty.npz": lambda p: p.write_bytes(b""),
    "corrupt.npz": lambda p: p.write_bytes(b"PK\x03\x04 this is not a zip archive" * 8),
    "truncated.npz": _truncated,
    "fstar.npz": lambda p: _npz(p, **_good(), f_star=np.ones(2)),
    "good.npz": lambda p: _npz(p, **_good()),
    "text.npz": lambda p: p.write_text("X,y\n1,2\n"),
    "table.toml": lambda p: p.write_text("schedule = 5\n"),
    "out.toml": lambda p: p.write_text("out = 5\n"),
    "seed.toml": lambda p: p.write_text("seed = 1e20\n"),
    "bytes.toml": lambda p: p.write_bytes(b"lr = 0.1\n# \xff\xfe\n"),
    "delta.toml": lambda p: p.write_text('[schedule]\nmethod = "pd"\n[rpd]\ndelta = 3\n'),
    "objective.toml": lambda p: p.write_text('objective = "quadratic"\n'),
    "lr.toml": lambda p: p.write_text("lr = inf\n"),
    "lm.txt": lambda p: p.write_bytes(b"\xff\xfe\x00 not utf-8 \x80\x81" * 20),
}


def make_inputs(folder: Path) -> Path:
    """Every bad input file above and a good ledger run.h5, in `folder`."""
    for name, make in MAKERS.items():
        make(folder / name)
    _ledger(folder / "run.h5")
    return folder


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return make_inputs(tmp_path)


def check(folder: Path, args: list[str], *names: str) -> str:
    before = snapshot(folder)
    line = one_line(rpd_mpi(folder, *args), *names)
    assert snapshot(folder) == before, "the command changed the folder"
    return line


@dataclass(frozen=True)
class Outcome:
    """A command's result and its folder before and after."""

    res: subprocess.CompletedProcess[str]
    before: dict[str, bytes]
    after: dict[str, bytes]

    def check(self, *names: str) -> str:
        line = one_line(self.res, *names)
        assert self.after == self.before, "the command changed the folder"
        return line


def run_table(root: Path, table: Sequence[tuple[list[str], ...]],
              command: Callable[[list[str]], list[str]],
              setup: Callable[[Path], object] = make_inputs) -> dict[str, Outcome]:
    """Run every case of `table` (args, *names) in its own input folder under `root`, three
    at a time; {case id: outcome}."""
    def one(i: int) -> Outcome:
        folder = root / f"case{i:03d}"
        folder.mkdir()
        setup(folder)
        before = snapshot(folder)
        res = rpd_mpi(folder, *command(list(table[i][0])))
        return Outcome(res, before, snapshot(folder))
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(one, range(len(table))))
    return {case_id(row[0]): o for row, o in zip(table, outcomes)}


def case_id(args: Sequence[str]) -> str:
    return " ".join(args)


def cases(table: Sequence[tuple[list[str], ...]]) -> pytest.MarkDecorator:
    """Parametrize a test over a table's case ids and their names to find in the line."""
    return pytest.mark.parametrize("key,names", [(case_id(a), n) for a, *n in table],
                                   ids=[case_id(a) for a, *_ in table])


# ----------------------------------------------------------------------------- simulate

SIMULATE_CASES = [
    (["--seed", "100000000000000000000000"], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--method", "rpd", "--delta", str(10 ** 12)], "--delta"),
    (["--method", "rpd", "--delta", "1e12"], "--delta"),
    (["--examples", BIG, "--batch-size", "1"], "--examples"),
    (["--dim", BIG], "--dim"),
    (["--microbatches", BIG], "--microbatches"),
    (["--micro", "8"], "--micro"),
    (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "-inf"], "--lr"),
    (["--noise", "inf"], "--noise"), (["--noise", "nan"], "--noise"),
    (["--objective", "logistic", "--lam", "inf"], "--lam"),
    (["--objective", "tridiag", "--mu", "inf"], "--mu"),
    (["--objective", "tridiag", "--mu", "nan"], "--mu"),
    (["--max-memory", "nan"], "--max-memory"), (["--max-memory", "-1"], "--max-memory"),
    (["--max-memory", "1e-9"], "--max-memory"),
    (["--method", "pd", "--delta", "3"], "--delta"),
    (["--method", "rpd", "--delay-source", "zero", "--delta", "3"], "--delta"),
    (["--width", "64"], "--width"), (["--heads", "4"], "--heads"),
    (["--context", "16"], "--context"),
    (["--objective", "logistic", "--mu", "0.5"], "--mu"),
    (["--objective", "quadratic", "--lam", "0.5"], "--lam"),
    (["--budget-slots", "1"], "--budget-slots"),
    (["--method", "gpipe", "--budget-slots", "2"], "--budget-slots"),
    (["--method", "localsgd", "--trajectories", str(10 ** 6)], "--trajectories"),
    (["--method", "localsgd", "--trajectories", "2", "--local-steps", str(10 ** 6)],
     "--local-steps"),
    (["--data", "empty.npz"], "--data", "empty.npz"),
    (["--data", "corrupt.npz"], "--data", "corrupt.npz"),
    (["--data", "truncated.npz"], "--data", "truncated.npz"),
    (["--data", "fstar.npz"], "--data", "fstar.npz"),
    (["--data", "text.npz"], "--data", "text.npz"),
    (["--data", "missing.npz"], "--data", "missing.npz"),
    (["--data", "good.npz", "--dim", "16"], "--dim", "good.npz"),     # the file sets d and n
    (["--data", "good.npz", "--examples", "24"], "--examples", "good.npz"),
    (["--config", "table.toml"], "--config", "table.toml", "[schedule]"),
    (["--config", "out.toml"], "--config", "out.toml", "out"),
    (["--config", "seed.toml"], "--config", "seed.toml", "seed"),
    (["--config", "bytes.toml"], "--config", "bytes.toml"),
    (["--config", "delta.toml"], "--config", "delta.toml", "[rpd] delta"),
    (["--config", "objective.toml"], "--config", "objective.toml", "objective"),
    (["--config", "lr.toml"], "--config", "lr.toml", "lr"),
    (["--config", "missing.toml"], "--config", "missing.toml"),
]

CHARLM_CASES = [
    (["--dim", "16"], "--dim"), (["--examples", "50"], "--examples"),
    (["--noise", "0.5"], "--noise"), (["--mu", "0.5"], "--mu"), (["--lam", "0.5"], "--lam"),
    (["--width", "100000"], "--width"),
    (["--data", "lm.txt"], "--data", "lm.txt"),
]


def _merged(base: list[str], extra: list[str]) -> list[str]:
    """`base` flags with those of `extra` replacing or added (flags with one value each)."""
    out = dict(zip(base[::2], base[1::2]))
    out.update(zip(extra[::2], extra[1::2]))
    return [x for kv in out.items() for x in kv]


def _small(args: list[str]) -> list[str]:
    """SMALL with `args`; with --data, without SMALL's --dim/--examples (the file sets them,
    and giving them is an error of its own)."""
    pairs = list(zip(SMALL[::2], SMALL[1::2]))
    if "--data" in args:
        pairs = [(k, v) for k, v in pairs if k not in ("--dim", "--examples")]
    return _merged([x for kv in pairs for x in kv], args)


def _simulate(args: list[str]) -> list[str]:
    out = [] if "out.toml" in args else ["--out", "new.h5"]
    return ["simulate", *_small(args), *out]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return run_table(tmp_path_factory.mktemp("simulate"), SIMULATE_CASES, _simulate)


@pytest.fixture(scope="module")
def simulated_lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return run_table(tmp_path_factory.mktemp("charlm"), CHARLM_CASES,
                     lambda a: ["simulate", *_merged(LM, a), "--out", "new.h5"])


@cases(SIMULATE_CASES)
def test_simulate_bad_input_is_one_line(simulated: dict[str, Outcome], key: str,
                                        names: list[str]) -> None:
    simulated[key].check(*names)


@cases(CHARLM_CASES)
def test_simulate_charlm_bad_input_is_one_line(simulated_lm: dict[str, Outcome], key: str,
                                               names: list[str]) -> None:
    simulated_lm[key].check(*names)


def test_memory_refusal_names_the_estimate_and_the_override(folder: Path) -> None:
    line = check(folder, ["simulate", *SMALL, "--microbatches", BIG, "--out", "new.h5"],
                 "--microbatches")
    assert "GiB" in line and "--max-memory" in line and "available" in line
    line = check(folder, ["simulate", *SMALL, "--max-memory", "0.000001", "--out", "new.h5"])
    assert "allowed by --max-memory" in line


# ----------------------------------------------------------------------------- train

TRAIN = ["train", "--stages", "1", "--microbatches", "4", "--dim", "8", "--examples", "12",
         "--batch-size", "3", "--out", "new.h5"]
TRAIN_CASES = [
    (["--timeout", "inf"], "--timeout"), (["--timeout", "nan"], "--timeout"),
    (["--op-cost", "nan"], "--op-cost"), (["--op-cost", "inf"], "--op-cost"),
    (["--op-cost", "100"], "--op-cost"), (["--lr", "inf"], "--lr"),
    (["--noise", "nan"], "--noise"), (["--seed", "100000000000000000000000"], "--seed"),
    (["--data", "empty.npz"], "--data", "empty.npz"),
    (["--data", "corrupt.npz"], "--data", "corrupt.npz"),
    (["--data", "truncated.npz"], "--data", "truncated.npz"),
    (["--data", "fstar.npz"], "--data", "fstar.npz"),
    (["--config", "table.toml"], "--config", "table.toml"),
    (["--microbatches", BIG], "--microbatches"),
    (["--micro", "8"], "--micro"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return run_table(tmp_path_factory.mktemp("train"), TRAIN_CASES, lambda a: [*TRAIN, *a])


@cases(TRAIN_CASES)
def test_train_bad_input_is_one_line(trained: dict[str, Outcome], key: str,
                                     names: list[str]) -> None:
    trained[key].check(*names)


def test_train_fault_rank_outside_the_job(folder: Path) -> None:
    check(folder, [*TRAIN, "--fault", "raise:9:0"], "--fault")


def test_fault_rank_is_checked_against_the_world_size() -> None:
    cfg = RunConfig.from_dict({"runtime": {"fault": "raise:3:0"}})
    cfg.check_fault_rank(4)
    with pytest.raises(ConfigError, match="--fault: rank must be in 0..1"):
        cfg.check_fault_rank(2)


def _mpiexec(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["timeout", "-k", "5", "90", MPIEXEC, "-n", "2", sys.executable,
                           "-m", "rpd_mpi", *args], cwd=folder, text=True,
                          capture_output=True, timeout=120)


@pytest.mark.parametrize("args,name", [
    (["--micro", "8"], "--micro"),                      # argparse, before MPI starts
    (["--stages", "two"], "--stages"),
    (["--data", "corrupt.npz"], "corrupt.npz"),         # the agreement round
])
def test_errors_under_mpiexec_print_once(folder: Path, args: list[str], name: str) -> None:
    before = snapshot(folder)
    res = _mpiexec(folder, "train", *_small(["--stages", "2", *args]), "--out",
                   "new.h5")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rpd-mpi: error: ") and name in lines[0]
    assert snapshot(folder) == before


@pytest.mark.parametrize("env,expected", [
    ({}, None), ({"PMI_RANK": "0"}, 0), ({"PMI_RANK": "3"}, 3), ({"PMIX_RANK": "1"}, 1),
    ({"OMPI_COMM_WORLD_RANK": "2"}, 2), ({"SLURM_PROCID": "5"}, 5), ({"PMI_RANK": "x"}, None),
])
def test_launch_rank_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                          env: dict[str, str], expected: int | None) -> None:
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID",
                 "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_rank() == expected


# ----------------------------------------------------------------------------- ledgers

def _ledger(path: Path) -> Path:
    cfg = RunConfig(schedule=ScheduleConfig(stages=2, microbatches=4),
                    objective=ObjectiveConfig(dim=8, examples=12, batch_size=3))
    write_run(path, simulate_run(cfg))
    return path


BAD_ATTRS = [
    ("config", "{bad json"), ("config", 5), ("config", "[1, 2]"), ("json_attrs", "{"),
    ("complete", "no"), ("complete", "yes"), ("complete", 1), ("complete", np.int8(1)),
    ("stages", "abc"), ("schema_version", "1"),
    ("/updates/delays", None), ("/updates/loss", np.ones((2, 2))), ("/events", np.ones(3)),
]


def _bad_ledgers(folder: Path) -> None:
    """bad<i>.h5: a ledger with attribute (or dataset) i of BAD_ATTRS replaced."""
    good = _ledger(folder / "run.h5").read_bytes()
    for i, (name, value) in enumerate(BAD_ATTRS):
        (folder / f"bad{i}.h5").write_bytes(good)
        with h5py.File(folder / f"bad{i}.h5", "a") as f:
            if name.startswith("/"):          # a dataset: removed, or replaced by `value`
                del f[name]
                if value is not None:
                    f[name] = value
            else:
                f.attrs[name] = value


REPORT_CASES = [(["report", f"bad{i}.h5", *extra], f"bad{i}.h5")
                for i in range(len(BAD_ATTRS)) for extra in ([], ["--json"])]


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return run_table(tmp_path_factory.mktemp("report"), REPORT_CASES, lambda a: a,
                     _bad_ledgers)


@pytest.mark.parametrize("i", range(len(BAD_ATTRS)),
                         ids=[f"{n}={v!r}" for n, v in BAD_ATTRS])
@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["text", "json"])
def test_report_of_a_bad_ledger_is_one_line(reported: dict[str, Outcome], i: int,
                                            extra: list[str]) -> None:
    reported[case_id(["report", f"bad{i}.h5", *extra])].check(f"bad{i}.h5")


def test_complete_must_be_exactly_true(tmp_path: Path) -> None:
    path = _ledger(tmp_path / "ok.h5")
    assert read_run(path).updates.stage.size > 0
    assert is_complete(np.bool_(True)) and is_complete(True)
    for value in (1, "yes", "True", np.int64(1), np.bool_(False), None):
        assert not is_complete(value)
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = "True"
    with pytest.raises(LedgerError, match="ok.h5 is incomplete"):
        read_run(path)


@pytest.mark.parametrize("command", [
    ["report", "run.h5"], ["report", "run.h5", "run.h5"], ["report", "run.h5", "--json"],
    ["schedule", "--stages", "4", "--microbatches", "2000"], ["schedule", "--json"],
    ["delays", "--stages", "4"], ["delays", "--json"],
])
def test_a_closed_pipe_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    _ledger(tmp_path / "run.h5")
    proc = subprocess.Popen([sys.executable, "-m", "rpd_mpi", *command], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()                       # the reader is gone before anything is written
    err = proc.stderr.read()
    assert proc.wait(timeout=120) in (0, 141), err
    assert err == "", err


# ----------------------------------------------------------------------------- TOML paths

def test_toml_paths_are_relative_to_the_toml_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _npz(tmp_path / "sub" / "d.npz", **_good())
    (tmp_path / "sub" / "run.toml").write_text(
        'out = "o.h5"\n[objective]\ndata = "d.npz"\nbatch_size = 3\n'
        "[schedule]\nstages = 2\nmicrobatches = 4\n")
    res = rpd_mpi(tmp_path, "simulate", "--config", "sub/run.toml")
    assert res.returncode == 0, res.stderr
    record = read_run(tmp_path / "sub" / "o.h5")
    assert record.config["objective"]["data"] == "sub/d.npz" and record.attrs["dim"] == 8
    res = rpd_mpi(tmp_path, "simulate", "--config", "sub/run.toml", "--out", "flag.h5")
    assert res.returncode == 0 and (tmp_path / "flag.h5").exists()   # flags: from the cwd
    (tmp_path / "sub" / "d.npz").rename(tmp_path / "d.npz")           # not next to the TOML
    check(tmp_path, ["simulate", "--config", "sub/run.toml", "--out", "x.h5"], "sub/d.npz")


# ----------------------------------------------------------------------------- tools

TOOL_CASES = [
    (["tool", "delays_vs_s", "--per-stage", "-1", "--stages", "2,4"], "--per-stage"),
    (["tool", "delays_vs_s", "--per-stage", "x"], "--per-stage"),
    (["tool", "delays_vs_s", "--per", "5"], "--per"),
    (["tool", "delays_vs_s", "--jobs", "0"], "--jobs"),
    (["tool", "delays_vs_s", "--stages", "0"], "--stages"),
    (["tool", "delays_vs_s", "--stages", "2-100000000"], "--stages"),
    (["tool", "delays_vs_s", "--stages", "100000"], "--stages"),
    (["tool", "delays_vs_s", "--stages", "2,4", "--out", "no/such/dir"], "--out", "no/such"),
    (["tool", "curves", "run.h5", "--out", "no/dir/x.png"], "--out", "no/dir"),
    (["tool", "curves", "run.h5", "--out", "."], "--out"),
    (["tool", "curves", "run.h5", "--out", "x.txt"], "--out", "x.txt"),
    (["tool", "curves", "run.h5", "--x", "time"], "--x"),
    (["tool", "curves", "run.h5", "--labels", "a,b"], "--labels"),
    (["tool", "curves", "missing.h5"], "missing.h5"),
    (["tool", "timeline", "--stages", "0"], "--stages"),
    (["tool", "timeline", "--microbatches", BIG], "--microbatches"),
    (["tool", "timeline", "--window", "5:1"], "--window"),
    (["tool", "timeline", "run.h5", "--stages", "8"], "--stages", "run.h5"),
    (["tool", "timeline", "--out", "no/dir/t.png"], "--out"),
    (["tool", "sweep", *SMALL, "--lr-lo", "-5000"], "--lr-lo"),
    (["tool", "sweep", *SMALL, "--lr-lo", "-1", "--lr-hi", "-3"], "--lr-hi"),
    (["tool", "sweep", *SMALL, "--lr-lo", "-100", "--lr-hi", "0"], "--lr-hi"),
    (["tool", "sweep", *SMALL, "--jobs", "0"], "--jobs"),
    (["tool", "sweep", *SMALL, "--index", "-1"], "--index"),
    (["tool", "sweep", *SMALL, "--name", "a/b"], "--name"),
    (["tool", "sweep", *SMALL, "--out", "no/such/dir"], "--out"),
    (["tool", "sweep", *SMALL, "--noise", "inf"], "--noise"),
    (["tool", "sweep", *SMALL, "--seed", "-1"], "--seed"),
    (["tool", "theory", "run.h5", "--every", "0"], "--every"),
    (["tool", "theory", "run.h5", "--out", "no/dir/t.png"], "--out"),
    (["tool", "mpi_compare", "--op-cost", "inf"], "--op-cost"),
    (["tool", "mpi_compare", "--stages", "0"], "--stages"),
    (["tool", "mpi_compare", "--out", "no/such/dir"], "--out"),
    (["tool", "nosuchtool"], "nosuchtool"),
    (["experiment", "E1", "--jobs", "0"], "--jobs"),
    (["experiment", "E1", "--out", "no/such/dir"], "--out"),
    (["experiment", "E9"], "E9"),
    (["experiment", "E1", "--qu"], "--qu"),
]


@pytest.fixture(scope="module")
def tooled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return run_table(tmp_path_factory.mktemp("tools"), TOOL_CASES, lambda a: a)


@cases(TOOL_CASES)
def test_tool_bad_input_is_one_line(tooled: dict[str, Outcome], key: str,
                                    names: list[str]) -> None:
    tooled[key].check(*names)


def test_a_tool_out_dir_may_be_new(tmp_path: Path) -> None:
    res = rpd_mpi(tmp_path, "tool", "delays_vs_s", "--stages", "2,4,6", "--out", "new")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "new" / "delays_vs_s.md").exists()


# ----------------------------------------------------------------------------- estimates

def test_memory_estimate_names_the_dominant_flag() -> None:
    def largest(**kw: object) -> str:
        return budget.estimate(RunConfig.from_dict(kw)).largest.flag
    assert largest(schedule={"microbatches": 10 ** 7}) == "--microbatches"
    assert largest(objective={"examples": 10 ** 7, "batch_size": 1}) == "--examples"
    assert largest(objective={"dim": 10 ** 7}) == "--dim"
    assert largest(schedule={"method": "rpd"}, rpd={"delta": 10 ** 9}) == "--delta"
    assert largest(schedule={"method": "localsgd", "trajectories": 400, "microbatches": 400},
                   objective={"dim": 10 ** 5, "examples": 10, "batch_size": 1}) \
        == "--trajectories"
    assert largest(schedule={"stages": 3}, objective={"name": "charlm", "width": 4096}) \
        == "--width"


def test_memory_check_obeys_max_memory() -> None:
    small = RunConfig()
    budget.check_memory(small)
    with pytest.raises(ConfigError, match="allowed by --max-memory"):
        budget.check_memory(RunConfig(max_memory=1e-6))
    huge = RunConfig.from_dict({"schedule": {"microbatches": 10 ** 12}, "max_memory": 0})
    budget.check_memory(huge)                 # 0: no check
    assert budget.estimate(huge).total > 2 ** 50
    found = budget.available()
    assert found is None or found[0] > 0
    assert budget.estimate(small, ranks=4).total > budget.estimate(small).total
