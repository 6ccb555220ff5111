"""The HDF5 ledger (write/read round trip, rejections, part files) and the run summary."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import rpd_mpi
from rpd_mpi.ledger import parts as ledger_parts
from rpd_mpi.ledger import report
from rpd_mpi.ledger.run_file import SCHEMA_VERSION, LedgerError, read_arrays, read_run, write_run
from rpd_mpi.ledger.parts import PART_UPDATE_DTYPE, RankPart, read_part
from rpd_mpi.records import BWD, EVENT_DTYPE, FWD, IDLE, Objective, RunRecord, Updates

S, K = 3, 12


def make_record(seed: int = 0, timeline: bool = True) -> RunRecord:
    rng = np.random.default_rng(seed)
    updates = Updates(
        stage=rng.integers(0, S, K).astype(np.int32),
        group=np.zeros(K, np.int32),
        trajectory=rng.integers(0, 2, K).astype(np.int32),
        microbatch=rng.integers(0, 100, K),
        batch=rng.integers(0, 10, K),
        version=rng.integers(0, 5, K),
        local_staleness=rng.integers(0, 3, K),
        delays=rng.integers(0, 20, (K, S)),
        loss=rng.random(K),
        grad_norm=rng.random(K),
        time=np.sort(rng.random(K)),
    )
    events = np.zeros(2 * K, EVENT_DTYPE)
    for name in ("rank", "group", "stage", "trajectory", "microbatch", "version"):
        events[name] = rng.integers(0, 5, 2 * K)
    events["op"] = rng.integers(1, 3, 2 * K)
    events["start"] = rng.random(2 * K)
    events["end"] = events["start"] + rng.random(2 * K)
    events["wait"] = rng.random(2 * K)
    return RunRecord(
        attrs={"method": "pd", "stages": S, "groups": 1, "trajectories": 1, "seed": 7,
               "lr": 0.125, "engine": "sim", "static": True, "f_star": None,
               "hosts": ["a", "b"], "slurm": {"job": "42"}},
        config={"method": "pd", "stages": S, "lr": 0.125, "nested": {"x": [1, 2]}},
        updates=updates,
        objective=Objective(time=np.arange(4.0), k=np.arange(0, 12, 3),
                            value=rng.random(4)),
        final_blocks=[rng.random(n) for n in (4, 3, 3)],
        events=events,
        timeline_kind=rng.integers(0, 3, (8, S)).astype(np.int8) if timeline else None,
        timeline_mb=rng.integers(-1, 5, (8, S)) if timeline else None,
    )


def test_round_trip_every_array_and_attr(tmp_path: Path) -> None:
    record = make_record()
    path = tmp_path / "run.h5"
    write_run(path, record)
    back = read_run(path)
    assert back.attrs == record.attrs
    assert back.config == record.config
    for name in ("stage", "group", "trajectory", "microbatch", "batch", "version",
                 "local_staleness", "delays", "loss", "grad_norm", "time"):
        np.testing.assert_array_equal(getattr(back.updates, name), getattr(record.updates, name))
    np.testing.assert_array_equal(back.updates.k, np.arange(K))
    assert back.events.dtype == EVENT_DTYPE
    np.testing.assert_array_equal(back.events, record.events)
    for name in ("time", "k", "value"):
        np.testing.assert_array_equal(getattr(back.objective, name),
                                      getattr(record.objective, name))
    assert [b.shape for b in back.final_blocks] == [(4,), (3,), (3,)]
    for got, want in zip(back.final_blocks, record.final_blocks):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(back.timeline_kind, record.timeline_kind)
    np.testing.assert_array_equal(back.timeline_mb, record.timeline_mb)


def test_file_layout_and_header(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    write_run(path, make_record(timeline=False))
    with h5py.File(path, "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert bool(f.attrs["complete"]) is True
        assert f.attrs["package_version"] == rpd_mpi.__version__
        assert json.loads(f.attrs["config"])["nested"] == {"x": [1, 2]}
        np.testing.assert_array_equal(f["updates/k"][()], np.arange(K))
        assert f["updates/delays"].shape == (K, S)
        assert sorted(f["final_blocks"]) == ["block_000", "block_001", "block_002"]
        assert "timeline" not in f
    back = read_run(path)
    assert back.timeline_kind is None and back.timeline_mb is None


def test_large_arrays_are_compressed(tmp_path: Path) -> None:
    record = make_record()
    n = 5000
    record.updates = Updates(**{name: np.resize(getattr(record.updates, name), n)
                                for name in ("stage", "group", "trajectory", "microbatch",
                                             "batch", "version", "local_staleness", "loss",
                                             "grad_norm", "time")},
                             delays=np.resize(record.updates.delays, (n, S)))
    path = tmp_path / "run.h5"
    write_run(path, record)
    with h5py.File(path, "r") as f:
        assert f["updates/delays"].compression == "gzip"
        assert f["updates/loss"].compression is None
    np.testing.assert_array_equal(read_run(path).updates.delays, record.updates.delays)


def test_no_partial_left_after_success(tmp_path: Path) -> None:
    write_run(tmp_path / "run.h5", make_record())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_failed_write_leaves_neither_file(tmp_path: Path) -> None:
    record = make_record()
    record.updates.loss = record.updates.loss[:-1]      # wrong length
    with pytest.raises(LedgerError, match="updates.loss has shape"):
        write_run(tmp_path / "run.h5", record)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(LedgerError, match=f"directory {missing} does not exist"):
        write_run(missing / "run.h5", make_record())


def test_reserved_attr_name_rejected(tmp_path: Path) -> None:
    record = make_record()
    record.attrs["complete"] = True
    with pytest.raises(LedgerError, match="reserved"):
        write_run(tmp_path / "run.h5", record)


def test_unknown_schema_version_rejected(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    write_run(path, make_record())
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(LedgerError, match="has ledger schema version 99; "
                                          "this rpd_mpi reads version 1"):
        read_run(path)


def test_incomplete_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "run.h5"
    write_run(path, make_record())
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(LedgerError, match="is incomplete \\(the run did not finish writing"):
        read_run(path)


def test_missing_and_non_hdf5_files_rejected(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="does not exist"):
        read_run(tmp_path / "absent.h5")
    (tmp_path / "left.h5.partial").write_bytes(b"")
    with pytest.raises(LedgerError, match="partial exists"):
        read_run(tmp_path / "left.h5")
    text = tmp_path / "text.h5"
    text.write_text("not hdf5\n")
    with pytest.raises(LedgerError, match="is not an HDF5 file"):
        read_run(text)
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(LedgerError, match="not an rpd_mpi ledger"):
        read_run(tmp_path / "foreign.h5")


def test_read_arrays(tmp_path: Path) -> None:
    path = tmp_path / "data.h5"
    X, y = np.arange(12.0).reshape(4, 3), np.arange(4.0)
    with h5py.File(path, "w") as f:
        f["X"], f["y"], f["f_star"] = X, y, 0.5
    out = read_arrays(path, ["X", "y"], optional=["w_true", "f_star"])
    assert sorted(out) == ["X", "f_star", "y"]
    np.testing.assert_array_equal(out["X"], X)
    np.testing.assert_array_equal(out["y"], y)
    assert float(out["f_star"]) == 0.5
    with pytest.raises(LedgerError, match=f"data file {path} has no top-level dataset 'w_true'"):
        read_arrays(path, ["X", "w_true"])
    with pytest.raises(LedgerError, match="does not exist"):
        read_arrays(tmp_path / "absent.h5", ["X"])


def _event_rows(lo: int, hi: int) -> np.ndarray:
    rows = np.zeros(hi - lo, EVENT_DTYPE)
    rows["microbatch"] = np.arange(lo, hi)
    rows["op"] = FWD
    rows["start"] = np.arange(lo, hi) * 0.5
    return rows


def test_rank_part_appends_in_blocks(tmp_path: Path) -> None:
    path = ledger_parts.part_path(tmp_path / "run.h5", 3)
    assert path.name == "run.h5.rank00003.part"
    rng = np.random.default_rng(1)
    cuts = np.concatenate([[0], np.sort(rng.choice(np.arange(1, 2500), 40, replace=False)),
                           [2500]])
    sizes_on_disk = []
    with RankPart(path, rank=3) as part:
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            before = part._events.dataset.shape[0]
            part.append_events(_event_rows(lo, hi))
            after = part._events.dataset.shape[0]
            # a block is written exactly when >= 1024 rows are pending, and then all of them
            assert after == (hi if hi - before >= 1024 else before)
            sizes_on_disk.append(after)
        part.append_updates(np.zeros(5, PART_UPDATE_DTYPE))
        assert part._updates.dataset.shape[0] == 0          # still buffered
    assert 2 <= len(set(sizes_on_disk) - {0}) < 40          # a few blocks, not one per append
    part = read_part(path)
    events, updates = part.events, part.updates
    assert tuple(part) == (events, updates)          # also unpacks as a pair
    np.testing.assert_array_equal(events["microbatch"], np.arange(2500))
    np.testing.assert_array_equal(events, _event_rows(0, 2500))
    assert updates.dtype == PART_UPDATE_DTYPE and updates.shape == (5,)
    assert ledger_parts.part_attrs(path)["rank"] == 3


def test_rank_part_copies_caller_buffer_and_rejects_wrong_dtype(tmp_path: Path) -> None:
    path = tmp_path / "p.part"
    with RankPart(path, rank=0) as part:
        row = _event_rows(0, 1)
        part.append_events(row)
        row["microbatch"] = 99                  # caller reuses its buffer
        part.append_events(row)
        with pytest.raises(LedgerError, match="expected 1-D rows"):
            part.append_updates(np.zeros(2, EVENT_DTYPE))
    events, _ = read_part(path)
    assert events["microbatch"].tolist() == [0, 99]
    with pytest.raises(LedgerError, match="closed"):
        part.append_events(row)


def test_rank_part_exception_leaves_it_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "p.part"
    with pytest.raises(RuntimeError):
        with RankPart(path, rank=1) as part:
            part.append_events(_event_rows(0, 10))
            raise RuntimeError("rank failed")
    with pytest.raises(LedgerError, match="incomplete"):
        read_part(path)
    events, _ = read_part(path, allow_incomplete=True)
    assert events.shape == (10,)


# ----------------------------------------------------------------------------- report


def hand_record() -> RunRecord:
    """S=2, K=8 with known statistics; timeline of 5 slots x 2 stages, 6 busy cells."""
    k = 8
    delays = np.array([[0, 1], [2, 0], [9, 3], [1, 1],      # first half: 9 is startup
                       [4, 2], [0, 5], [3, 3], [2, 1]])     # steady: max 5, mean 20/8
    updates = Updates(
        stage=np.array([1, 0] * 4, np.int32), group=np.zeros(k, np.int32),
        trajectory=np.zeros(k, np.int32), microbatch=np.arange(k), batch=np.arange(k) % 3,
        version=np.arange(k) // 2, local_staleness=np.array([0, 1, 0, 2, 0, 1, 0, 1]),
        delays=delays, loss=np.arange(1.0, 9.0), grad_norm=np.ones(k), time=np.arange(1.0, 9.0),
    )
    kind = np.array([[FWD, IDLE], [FWD, FWD], [IDLE, BWD], [BWD, IDLE], [IDLE, BWD]], np.int8)
    return RunRecord(
        attrs={"method": "pd", "stages": 2, "groups": 1, "trajectories": 1, "engine": "sim",
               "objective": "quadratic", "f_star": 0.25},
        config={}, updates=updates,
        objective=Objective(time=np.array([0.0, 5.0]), k=np.array([0, 8]),
                            value=np.array([3.0, 1.0])),
        final_blocks=[np.zeros(2), np.zeros(2)], timeline_kind=kind,
        timeline_mb=np.zeros_like(kind, dtype=np.int64),
    )


def test_summarize_hand_record() -> None:
    d = report.summarize(hand_record())
    assert list(d) == list(report.SUMMARY_KEYS)
    assert d["method"] == "pd" and d["stages"] == 2 and d["engine"] == "sim"
    assert d["objective"] == "quadratic" and d["groups"] == 1 and d["trajectories"] == 1
    assert d["updates"] == 8 and d["slots"] == 5
    assert d["wall_time"] is None
    assert d["final_objective"] == 1.0 and d["final_gap"] == 0.75
    assert d["steady_max_delay"] == 5 and d["steady_mean_delay"] == 2.5
    assert d["max_local_staleness"] == 2
    assert d["utilization"] == 0.6
    assert d["mean_loss_last10pct"] == 8.0        # ceil(8/10) = 1 update: the last
    json.dumps(d)
    for value in d.values():
        assert not isinstance(value, np.generic)
    text = report.format_summary(d)
    assert "steady max delay" in text and "0.6" in text and len(text.splitlines()) == len(d)


def test_summarize_utilization_from_events() -> None:
    record = hand_record()
    record.timeline_kind = record.timeline_mb = None
    record.attrs["f_star"] = None
    record.attrs["engine"] = "mpi"                # measured events: seconds, not slots
    events = np.zeros(3, EVENT_DTYPE)
    events["op"] = [FWD, BWD, IDLE]
    events["start"] = [0.0, 1.0, 0.0]
    events["end"] = [2.0, 4.0, 4.0]              # wall 4 s, busy 2 + 3 s on 2 ranks
    record.events = events
    d = report.summarize(record)
    assert d["slots"] is None and d["final_gap"] is None
    assert d["wall_time"] == 4.0
    assert d["utilization"] == pytest.approx(5.0 / 8.0)


def test_summarize_survives_a_ledger_round_trip(tmp_path: Path) -> None:
    record = hand_record()
    write_run(tmp_path / "run.h5", record)
    assert report.summarize(read_run(tmp_path / "run.h5")) == report.summarize(record)
