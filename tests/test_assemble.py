"""Part files that survive failures, and the assembly of a run file from them.

Pure tier: `RankPart.flush/counts/reopen/note`, a part written by a process killed with
SIGKILL, the streaming objective curve and the O(K log K) delays against the quadratic
reference algorithms they replaced, the snapshot byte budget. MPI tier (real mpiexec jobs):
`kill -9` of one rank, an exception on one rank, rank 0 killed during the assembly, each
turned into a ledger by `rpd-mpi assemble`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from rpd_mpi.build import build
from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.engines.cadence import snapshot_interval, snapshot_row_bytes
from rpd_mpi.ledger import LedgerError, read_run
from rpd_mpi.ledger.parts import (CHUNK_BYTES, RankPart, find_parts, iter_part_rows,
                                  part_attrs, part_path, read_part, read_part_dataset)
from rpd_mpi.mpi.assemble import recover
from rpd_mpi.mpi.measured import (SnapshotStream, fill_losses, forward_starts, global_updates,
                                  objective_curve)
from rpd_mpi.records import EVENT_DTYPE, FWD, UPDATE_ROW_DTYPE

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"
ROOT = Path(__file__).resolve().parents[1]


def _events(lo: int, hi: int) -> np.ndarray:
    rows = np.zeros(hi - lo, EVENT_DTYPE)
    rows["microbatch"] = np.arange(lo, hi)
    return rows


def _snap_dtype(d: int) -> np.dtype:
    return np.dtype([("time", "f8"), ("version", "i8"), ("copy", "i4"), ("block", "f8", (d,))])


# ----------------------------------------------------------------------------- parts


def test_flush_counts_and_reopen_cut_back_to_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "run.h5.rid.rank00001.part"
    part = RankPart(path, 1, snapshot_dtype=_snap_dtype(3), attrs={"run_id": "rid"})
    part.append_events(_events(0, 10))
    part.append_updates(np.zeros(4, UPDATE_ROW_DTYPE))
    snaps = np.zeros(2, _snap_dtype(3))
    snaps["version"] = [1, 2]
    part.append_snapshots(snaps)
    assert part.counts() == {"events": 10, "updates": 4, "snapshots": 2, "losses": 0}
    part.flush()                              # everything readable while still open
    events, updates = read_part(path, allow_incomplete=True)
    assert events.shape == (10,) and updates.shape == (4,)
    cut = part.counts()
    part.append_events(_events(10, 25))
    part.append_snapshots(snaps)
    part.close()
    assert part_attrs(path)["complete"] is True
    again = RankPart.reopen(path, 1, cut, snapshot_dtype=_snap_dtype(3))
    assert again.counts() == cut and part_attrs(path)["complete"] is False
    assert part_attrs(path)["closed"] is False          # a new segment: not closed yet
    again.append_events(_events(100, 103))
    again.close()
    events, _ = read_part(path)
    assert events["microbatch"].tolist() == [*range(10), 100, 101, 102]
    assert read_part_dataset(path, "snapshots")["version"].tolist() == [1, 2]
    assert part_attrs(path)["run_id"] == "rid"


def test_reopen_refuses_what_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "p.part"
    with RankPart(path, 0) as part:
        part.append_events(_events(0, 5))
    with pytest.raises(LedgerError, match="cannot cut events to 6 rows"):
        RankPart.reopen(path, 0, {"events": 6})
    with pytest.raises(LedgerError, match="not the part file of rank 2"):
        RankPart.reopen(path, 2, {"events": 1})
    with pytest.raises(LedgerError, match="does not exist"):
        RankPart.reopen(tmp_path / "none.part", 0, {})


def test_notes_round_trip_and_parts_are_found_by_run(tmp_path: Path) -> None:
    out = tmp_path / "run.h5"
    for run_id in ("a", "b"):
        for r in range(2):
            with RankPart(part_path(out, r, run_id), r,
                          attrs={"config": {"x": [1, 2]}, "device": None, "offset": 0.5}) as p:
                p.note(divergence={"what": "loss"}, signal="")
                assert p.attr("config") == {"x": [1, 2]} and p.attr("missing", 7) == 7
    (tmp_path / "run.h5.c.rank00000.partial").write_bytes(b"")
    (tmp_path / "other.h5.a.rank00000.part").write_bytes(b"")
    found = find_parts(out)
    assert sorted(found) == ["a", "b"] and sorted(found["a"]) == [0, 1]
    a = part_attrs(found["b"][1])
    assert a["config"] == {"x": [1, 2]} and a["device"] is None and a["offset"] == 0.5
    assert a["divergence"] == {"what": "loss"} and a["rank"] == 1
    with pytest.raises(ConfigError, match="--run-id: part files of 2 runs lie next to"):
        recover(str(out))
    with pytest.raises(ConfigError, match="do not say their configuration"):
        recover(str(out), run_id="a")          # parts without the run's notes


def test_a_part_killed_with_sigkill_opens_with_every_flushed_row(tmp_path: Path) -> None:
    """A real writer process killed with SIGKILL between flushes (HDF5 never closed)."""
    path = tmp_path / "killed.part"
    code = textwrap.dedent(f"""
        import os, signal, numpy as np
        from rpd_mpi.ledger.parts import RankPart
        from rpd_mpi.records import EVENT_DTYPE
        part = RankPart({str(path)!r}, 0, snapshot_dtype=np.dtype(
            [("time", "f8"), ("version", "i8"), ("copy", "i4"), ("block", "f8", (5000,))]))
        rows = np.zeros(700, EVENT_DTYPE)
        for i in range(30):
            rows["microbatch"] = np.arange(700 * i, 700 * (i + 1))
            part.append_events(rows)
            part.append_snapshots(np.zeros(3, part._snapshots.dtype))
            if i == 19:
                part.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr
    events, _ = read_part(path, allow_incomplete=True)
    assert events.shape[0] >= 20 * 700
    np.testing.assert_array_equal(events["microbatch"], np.arange(events.shape[0]))
    assert read_part_dataset(path, "snapshots").shape[0] >= 60
    assert part_attrs(path)["complete"] is False


RECORDER_KILLED = """
import os, signal, sys
import numpy as np
from rpd_mpi.ledger.parts import RankPart
from rpd_mpi.mpi.comm import Comm, wtime
from rpd_mpi.mpi.recorder import FLUSH_SECONDS, Recorder, snapshot_dtype
comm = Comm()
part = RankPart(sys.argv[1], 0, snapshot_dtype=snapshot_dtype(4))
rec = Recorder(part, comm, wtime(), 4)
for mb in range(10):
    rec.event(1, mb, 0, 0, wtime(), wtime(), 0.0)
rec.flush()                                 # the checkpoint call: 10 rows on disk
counts = part.counts()
for mb in range(10, 15):
    rec.event(1, mb, 0, 0, wtime(), wtime(), 0.0)       # buffered only
t = wtime() + FLUSH_SECONDS + 0.1           # an op ending past the flush interval
rec.event(1, 15, 0, 0, t, t, 0.0)           # -> flushed by time, 16 rows
for mb in range(16, 20):
    rec.event(1, mb, 0, 0, wtime(), wtime(), 0.0)       # lost with the process
print(counts["events"], flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_recorder_flush_and_the_periodic_flush_survive_sigkill(tmp_path: Path) -> None:
    """A real Recorder on a real (1-rank) Comm, its process killed with SIGKILL."""
    path = tmp_path / "rec.part"
    res = subprocess.run([MPIEXEC, "-n", "1", sys.executable, "-m", "mpi4py", "-c",
                          RECORDER_KILLED, str(path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.stdout.split()[:1] == ["10"], res.stderr
    events, _ = read_part(path, allow_incomplete=True)
    assert events["microbatch"].tolist() == list(range(16))


def test_chunks_are_sized_in_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.part"
    with RankPart(path, 0, snapshot_dtype=_snap_dtype(200_000)) as part:
        part.append_snapshots(np.zeros(3, _snap_dtype(200_000)))
        assert part._snapshots is not None and part._snapshots.dataset.chunks == (1,)
        assert part._events.dataset.chunks == (1024,)
    # 3 rows of 1.6 MB: the file is about their size, not 1024 rows' (1.6 GB)
    assert path.stat().st_size < 3 * snapshot_row_bytes(200_000) + 2 ** 20
    blocks = list(iter_part_rows(path, "snapshots"))
    assert [b.shape[0] for b in blocks] == [1, 1, 1]
    assert CHUNK_BYTES // snapshot_row_bytes(200_000) == 0


def test_snapshot_interval_keeps_a_rank_within_its_budget() -> None:
    small = snapshot_interval(1, 4, 16, versions=10_000, copies=1, rounds=0,
                              budget_bytes=2 ** 30)
    assert small == 1
    row = snapshot_row_bytes(50_000)
    budget = 64 * 2 ** 20
    every = snapshot_interval(1, 4, 50_000, versions=400, copies=1, rounds=0,
                              budget_bytes=budget)
    assert (400 // every) * row <= budget < (400 // (every - 1)) * row
    assert snapshot_interval(1, 4, 50_000, 400, 1, 0, budget_bytes=row / 2) == 401
    two = snapshot_interval(1, 4, 50_000, 400, copies=2, rounds=10, budget_bytes=budget)
    assert 2 * (400 // two) * row + 20 * row <= budget


# ----------------------------------------------------------------------------- measured


def _reference_delays(rows: np.ndarray, events: np.ndarray, stages: int) -> np.ndarray:
    """The dict-and-list algorithm the O(K log K) version replaced."""
    order = np.lexsort((rows["group"], rows["stage"], rows["end"]))
    u = rows[order]
    delays = np.zeros((u.size, stages), dtype=np.int64)
    copy = u["group"] * (int(u["trajectory"].max()) + 1) + u["trajectory"]
    f = events[events["op"] == FWD]
    fs = {(int(g), int(m), int(s)): float(t) for g, m, s, t in
          zip(f["group"], f["microbatch"], f["stage"], f["start"])}
    for c in np.unique(copy):
        idx = np.nonzero(copy == c)[0]
        g = int(u["group"][idx[0]])
        starts = np.array([[fs[(g, int(m), s)] for s in range(stages)]
                           for m in u["microbatch"][idx]])
        delays[idx] = np.arange(idx.size)[:, None] - np.searchsorted(
            u["end"][idx], starts, side="right")
    return np.maximum(delays, 0)     # then clamped: below 0 is clock-offset error (DESIGN 2.3)


def _random_run(rng: np.random.Generator, G: int, R: int, N: int, S: int
                ) -> tuple[np.ndarray, np.ndarray]:
    rows = np.zeros(G * N * S, UPDATE_ROW_DTYPE)
    g, m, s = np.meshgrid(np.arange(G), np.arange(N), np.arange(S), indexing="ij")
    rows["group"], rows["microbatch"], rows["stage"] = g.ravel(), m.ravel(), s.ravel()
    rows["trajectory"] = rows["microbatch"] % R
    rows["end"] = rows["microbatch"] + (S - rows["stage"]) + rng.random(rows.size) * 3
    rows["loss"] = np.where(rows["stage"] == S - 1, rng.random(rows.size), np.nan)
    events = np.zeros(G * N * S, EVENT_DTYPE)
    events["group"], events["microbatch"], events["stage"] = g.ravel(), m.ravel(), s.ravel()
    events["op"] = FWD
    events["start"] = events["microbatch"] + events["stage"] - rng.random(events.size)
    return rows, events


def test_delays_and_losses_equal_the_reference_algorithm() -> None:
    rng = np.random.default_rng(3)
    rows, events = _random_run(rng, G=2, R=3, N=60, S=4)
    ref = _reference_delays(rows, events, 4)
    fill_losses(rows, 4)
    last = {(g, m): v for g, m, s, v in zip(rows["group"], rows["microbatch"], rows["stage"],
                                            rows["loss"]) if s == 3}
    assert all(v == last[(g, m)] for g, m, v in zip(rows["group"], rows["microbatch"],
                                                     rows["loss"]))
    u = global_updates(rows, forward_starts(events, 2, 60, 4), 4)
    np.testing.assert_array_equal(u.delays, ref)
    lost = forward_starts(events[events["microbatch"] != 7], 2, 60, 4)   # a part cut short
    d = global_updates(rows, lost, 4).delays
    assert (d[u.microbatch == 7] == -1).all()
    np.testing.assert_array_equal(d[u.microbatch != 7], ref[u.microbatch != 7])


def _reference_curve(model, snaps, times, every, copies):      # type: ignore[no-untyped-def]
    """The objective_curve the streaming pass replaced (a searchsorted per point)."""
    times = np.sort(times)
    split = [[rows[rows["copy"] == c] for c in range(copies)] for rows in snaps]

    def at(t: float) -> np.ndarray:
        w = model.init_weights()
        for sl, per_copy in zip(model.slices, split):
            total = np.zeros(sl.stop - sl.start)
            for mine in per_copy:
                i = int(np.searchsorted(mine["time"], t, side="right")) - 1
                total += mine["block"][i] if i >= 0 else w[sl]
            w[sl] = total / len(per_copy)
        return w
    values = [model.full_objective(model.init_weights())]
    values += [model.full_objective(at(float(times[k - 1])))
               for k in range(every, times.size, every)]
    final = at(np.inf)
    return np.array(values + [model.full_objective(final)]), final


@pytest.mark.parametrize("every,chunk", [(1, 1), (3, 7), (5, 1000)])
def test_streaming_objective_equals_the_reference(tmp_path: Path, every: int,
                                                  chunk: int) -> None:
    cfg = RunConfig.from_dict({"schedule": {"stages": 2}, "objective": {"dim": 6}})
    model = build(cfg)
    rng = np.random.default_rng(every)
    G, R = 2, 2
    per_stage, streams = [], []
    times = np.sort(rng.random(40) * 10)
    for s, sl in enumerate(model.slices):
        rows = []
        for g in range(G):
            snaps = np.zeros(25, _snap_dtype(sl.stop - sl.start))
            snaps["time"] = np.sort(rng.integers(0, 12, 25)).astype(float)   # ties too
            snaps["copy"] = g * R + rng.integers(0, R, 25)
            snaps["block"] = rng.normal(size=snaps["block"].shape)
            path = tmp_path / f"s{s}g{g}.part"
            with RankPart(path, 0, snapshot_dtype=snaps.dtype) as part:
                part.append_snapshots(snaps)
            streams.append(SnapshotStream(s, snaps["time"].copy(),
                                          lambda p=path: iter_part_rows(p, "snapshots", chunk)))
            rows.append(snaps)
        both = np.concatenate(rows)
        per_stage.append(both[np.argsort(both["time"], kind="stable")])
    obj, final = objective_curve(model, streams, times, every, G * R)
    ref_values, ref_final = _reference_curve(model, per_stage, times, every, G * R)
    np.testing.assert_array_equal(obj.value, ref_values)
    np.testing.assert_array_equal(final, ref_final)
    assert obj.k.tolist() == [0, *range(every, 40, every), 40]


# ----------------------------------------------------------------------------- MPI jobs

RUN = ["--method", "pd", "--microbatches", "400", "--dim", "16", "--examples", "32",
       "--batch-size", "4", "--op-cost", "0.01", "--quiet"]


def _mpiexec(n: int, argv: list[str], code: str = "") -> subprocess.Popen[str]:
    head = [sys.executable, "-m", "mpi4py", "-c", code] if code else \
        [sys.executable, "-m", "rpd_mpi"]
    return subprocess.Popen(["timeout", "-k", "5", "150", MPIEXEC, "-n", str(n), *head,
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def _rank_pids(marker: str, n: int) -> list[int]:
    """The pids of the job's n rank processes (python processes with `marker` in argv)."""
    for _ in range(200):
        ps = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
        pids = sorted(int(p) for p in ps.stdout.split()
                      if "python" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                      and "mpiexec" not in Path(f"/proc/{p}/cmdline").read_text(
                          errors="replace")) if ps.stdout else []
        if len(pids) == n:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"{n} ranks of {marker} never appeared")


def _assemble(out: Path, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpd_mpi", "assemble", str(out), *more],
                          capture_output=True, text=True, timeout=120)


def test_kill_9_of_one_rank_leaves_parts_that_assemble_incomplete(tmp_path: Path) -> None:
    out = tmp_path / "killed.h5"
    job = _mpiexec(4, ["train", *RUN, "--stages", "4", "--out", str(out)])
    pids = _rank_pids(str(out), 4)
    time.sleep(5.0)                          # past the first periodic flush
    os.kill(pids[2], signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode != 0 and not out.exists()
    parts = find_parts(out)
    (run_id, ranks), = parts.items()
    for r, path in ranks.items():            # every part opens, with rows of its rank
        events, updates = read_part(path, allow_incomplete=True)
        assert events.shape[0] > 0 and (events["rank"] == r).all()
    res = _assemble(out)
    assert res.returncode == 0, res.stderr
    assert "is incomplete (the part files stay)" in res.stderr
    record = read_run(out)
    assert record.attrs["status"] == "incomplete" and "rank 2" in record.attrs["missing"]
    assert 0 < len(record.updates) < 1600 and record.attrs["run_id"] == run_id
    assert record.attrs["command_line"][1] == "train"     # the run's, not assemble's
    rep = subprocess.run([sys.executable, "-m", "rpd_mpi", "report", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0 and "incomplete (rank " in rep.stdout
    assert find_parts(out)                   # an incomplete ledger keeps the parts
    again = _assemble(out)
    assert again.returncode == 2 and again.stderr.startswith("rpd-mpi: error: --out:")
    assert _assemble(out, "--force").returncode == 0


def test_an_exception_on_one_rank_keeps_its_rows_and_its_error(tmp_path: Path) -> None:
    out = tmp_path / "raise.h5"
    job = _mpiexec(2, ["train", *RUN, "--stages", "2", "--fault", "raise:1:300",
                       "--out", str(out)])
    job.communicate(timeout=120)
    assert job.returncode != 0
    (_, ranks), = find_parts(out).items()
    events, _ = read_part(ranks[1], allow_incomplete=True)
    assert events.shape[0] == 300                 # every op before the fault, none lost
    assert "injected fault at op 300" in part_attrs(ranks[1])["error"]
    assert _assemble(out).returncode == 0
    assert "rank 1: failed (RuntimeError: injected fault" in read_run(out).attrs["missing"]


KILL_IN_ASSEMBLY = """
import os, signal, sys
import rpd_mpi.mpi.train as train
from rpd_mpi.cli import main
from rpd_mpi.ledger.run_file import write_run
original = train.assemble
def assemble(*args, **kwargs):
    write_run(sys.argv[1], original(*args, **kwargs))   # what the run would have written
    os.kill(os.getpid(), signal.SIGKILL)
train.assemble = assemble
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("method,extra", [("pd", []), ("rpd", ["--updates", "300"]),
                                          ("localsgd", ["--groups", "2"])])
def test_rank_0_killed_while_assembling_gives_the_same_ledger(tmp_path: Path, method: str,
                                                              extra: list[str]) -> None:
    args = ["--method", method, "--stages", "2", "--microbatches", "60", "--dim", "16",
            "--examples", "32", "--batch-size", "4", "--quiet", *extra]
    n = 4 if method == "localsgd" else 2
    out, ref = tmp_path / "k.h5", tmp_path / "ref.h5"
    job = _mpiexec(n, [str(ref), "train", *args, "--out", str(out)], code=KILL_IN_ASSEMBLY)
    job.communicate(timeout=120)
    assert not out.exists() and ref.exists()
    res = _assemble(out)
    assert res.returncode == 0, res.stderr
    assert not find_parts(out)              # complete: the parts are gone, as after a run
    a, b = read_run(out), read_run(ref)
    assert a.attrs["status"] == b.attrs["status"] == "complete"
    for name in ("stage", "group", "microbatch", "batch", "version", "loss", "grad_norm",
                 "time", "delays"):
        np.testing.assert_array_equal(getattr(a.updates, name), getattr(b.updates, name))
    np.testing.assert_array_equal(a.events, b.events)
    np.testing.assert_array_equal(a.objective.value, b.objective.value)
    for x, y in zip(a.final_blocks, b.final_blocks):
        np.testing.assert_array_equal(x, y)
    for key in ("run_id", "hosts", "clock_offsets", "mpi_library", "world_size", "delta"):
        assert a.attrs[key] == b.attrs[key], key
    # and an undisturbed run of the same configuration: every timing-independent array
    plain = tmp_path / "plain.h5"
    job = _mpiexec(n, ["train", *args, "--out", str(plain)])
    job.communicate(timeout=120)
    assert job.returncode == 0
    c = read_run(plain)
    order_a = np.lexsort((a.updates.microbatch, a.updates.group, a.updates.stage))
    order_c = np.lexsort((c.updates.microbatch, c.updates.group, c.updates.stage))
    for name in ("stage", "group", "microbatch", "batch", "version", "loss", "grad_norm"):
        np.testing.assert_array_equal(getattr(a.updates, name)[order_a],
                                      getattr(c.updates, name)[order_c])
    for x, y in zip(a.final_blocks, c.final_blocks):
        np.testing.assert_array_equal(x, y)


def test_assemble_refuses_without_parts(tmp_path: Path) -> None:
    res = _assemble(tmp_path / "none.h5")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"rpd-mpi: error: OUT: no part files none.h5.<run id>.rankNNNNN.part next to "
        f"{tmp_path / 'none.h5'}: nothing to assemble"]


def test_a_bad_snapshot_budget_is_one_line() -> None:
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", "train", "--snapshot-budget", "-1",
                          "--out", "never.h5"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert res.returncode == 2 and not (ROOT / "never.h5").exists()
    assert res.stderr.strip() == ("rpd-mpi: error: --snapshot-budget: must be a finite "
                                  "number >= 0 (got -1.0)")
