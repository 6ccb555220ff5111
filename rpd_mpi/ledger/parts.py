"""Per-rank part files of an MPI run: appended during the run, assembled into the run file.

Part of the ledger (with `rpd_mpi.ledger`, the only modules that import h5py); the layout is
in run_file.py's docstring and docs/LEDGER.md. Rows are buffered in memory and appended in
blocks, one resize per block (docs/DESIGN.md 9: per-row resizing is ~250x slower), in chunks
of about `CHUNK_BYTES` (a chunk is allocated whole, so its size is set in bytes, not rows).

A part is readable at any moment after a `flush()` (rows and HDF5 metadata on disk): a rank
killed with SIGKILL leaves everything up to its last flush. Its root attributes say what the
assembly needs without the run (`rpd-mpi assemble`): the configuration, run id and rank
layout, set at creation, and what a rank learns later (clock offset, stop, ...) via `note`.
`reopen` truncates a part to a checkpoint's row counts and appends again.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import h5py
import numpy as np

from rpd_mpi.ledger.run_file import (SCHEMA_VERSION, LedgerError, check_version, is_complete,
                                     open_ledger)
from rpd_mpi.records import EVENT_DTYPE, UPDATE_ROW_DTYPE

#: One row per block update, as a rank records it during an MPI run. `version` is the block
#: version read by F (= the version B updates); `start`/`end` are seconds since t = 0 of the
#: backward+update; global k and the delays are derived at assembly from these and the events.
PART_UPDATE_DTYPE = UPDATE_ROW_DTYPE     # one row per block update (records.UpdateRow)

#: RPD, last stage: the loss of iteration k (the only stage that knows it).
LOSS_DTYPE = np.dtype([("k", "i8"), ("loss", "f8")])

CHUNK_BYTES = 2 ** 20    # about this many bytes per chunk of a resizable dataset
CHUNK_ROWS = 1024        # and never more rows than this (a small run's file stays small)
BUFFER_BYTES = 2 ** 22   # rows buffered in memory before an append, at most this many bytes

#: datasets stored with gzip(1) + shuffle (rows of integers and times; the run file
#: compresses them the same way): a part is then about the size of the ledger's rows
COMPRESSED = ("events", "updates", "losses")

#: snapshot rows up to this many bytes are compressed too: their time, version and copy
#: fields are a large share of the row (quadratic d = 64 on 4 ranks: parts 2.5-3x larger
#: without), while large rows are float weights that gzip barely shrinks (11 % of a width-32
#: charlm block) at 137 ms per 7.7 MB against 5 ms stored plainly: a pause on the rank's
#: critical path every 4 MiB of snapshots (2026-12-02: 75 ms every 12 backward ops at width
#: 32, utilization 0.61 instead of 0.80)
GZIP_SNAPSHOT_ROW_BYTES = 2 ** 14

#: the datasets of a part file, in the order `counts()` lists them
DATASETS = ("events", "updates", "snapshots", "losses")


def chunk_rows(itemsize: int) -> int:
    """Rows per chunk for rows of `itemsize` bytes: ~CHUNK_BYTES, 1..CHUNK_ROWS rows."""
    return max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(1, itemsize)))


def part_path(run_path: str | os.PathLike[str], rank: int, run_id: str = "") -> Path:
    """Where rank `rank` of run `run_id` writes its part of the run file `run_path`:
    `<run>.<run_id>.rankNNNNN.part` (`<run>.rankNNNNN.part` without a run id)."""
    run_path = Path(run_path)
    tag = f".{run_id}" if run_id else ""
    return run_path.with_name(f"{run_path.name}{tag}.rank{rank:05d}.part")


class _Appender:
    """Buffered rows of one dtype, appended to a resizable dataset one block at a time."""

    def __init__(self, dataset: h5py.Dataset, buffer_rows: int) -> None:
        self.dataset = dataset
        self.dtype: np.dtype = dataset.dtype
        self.folder = os.path.dirname(os.path.abspath(dataset.file.filename))
        self.buffer = np.empty(buffer_rows, dtype=self.dtype)   # copies: callers reuse rows
        self.pending_rows = 0

    @classmethod
    def create(cls, f: h5py.File, name: str, dtype: np.dtype, buffer_rows: int) -> _Appender:
        rows = chunk_rows(dtype.itemsize)
        packed = name in COMPRESSED or (name == "snapshots"
                                        and dtype.itemsize <= GZIP_SNAPSHOT_ROW_BYTES)
        squeeze = {"compression": "gzip", "compression_opts": 1, "shuffle": True} \
            if rows > 1 and packed else {}
        dataset = f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                   chunks=(rows,), **squeeze)
        return cls(dataset, max(1, min(buffer_rows, BUFFER_BYTES // dtype.itemsize)))

    def append(self, rows: np.ndarray) -> None:
        rows = np.atleast_1d(rows)
        if rows.dtype != self.dtype or rows.ndim != 1:
            raise LedgerError(f"{self.dataset.name}: expected 1-D rows of {self.dtype}, "
                              f"got {rows.ndim}-D {rows.dtype}")
        end = self.pending_rows + rows.shape[0]
        if end < self.buffer.shape[0]:
            self.buffer[self.pending_rows:end] = rows
            self.pending_rows = end
        else:                                   # >= buffer_rows pending: write them all
            self._write(np.concatenate([self.buffer[:self.pending_rows], rows]))
            self.pending_rows = 0

    def rows(self) -> int:
        """Rows appended so far (written or still buffered)."""
        return int(self.dataset.shape[0]) + self.pending_rows

    def flush(self) -> None:
        if self.pending_rows:
            self._write(self.buffer[:self.pending_rows])
            self.pending_rows = 0

    def _write(self, block: np.ndarray) -> None:
        check_space(self.folder, block.nbytes)
        start = self.dataset.shape[0]
        self.dataset.resize((start + block.shape[0],))
        self.dataset[start:] = block


#: bytes a part file keeps free on its disk beyond each append (HDF5 metadata, the close)
SPACE_MARGIN = 64 * 1024


def check_space(folder: str, nbytes: int) -> None:
    """OSError(ENOSPC) before an append that would leave less than SPACE_MARGIN free: the
    part then stops cleanly and stays readable, instead of HDF5 meeting a full disk in the
    middle of a write (which left unreadable files and crashed the process at exit)."""
    st = os.statvfs(folder)
    if st.f_bavail * st.f_frsize < nbytes + SPACE_MARGIN:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), folder)


#: HDF5 objects of part files whose writes failed, kept alive on purpose (RankPart._abandon)
ABANDONED: list[object] = []


class RankPart:
    """One rank's part file, appended during a run; `close()` marks it complete.

    `attrs` (run id, configuration, rank layout, ...) become root attributes at creation;
    `note` adds more later. Used as a context manager, an exception inside the block still
    flushes the buffered rows but leaves the part marked incomplete (readable with
    `read_part(..., allow_incomplete=True)`).
    """

    def __init__(self, path: str | os.PathLike[str], rank: int, buffer_rows: int = 1024,
                 snapshot_dtype: np.dtype | None = None,
                 attrs: Mapping[str, Any] | None = None) -> None:
        path = Path(path)
        if not path.parent.is_dir():
            raise LedgerError(f"cannot write part {path}: directory {path.parent} does not exist")
        if buffer_rows < 1:
            raise LedgerError(f"buffer_rows must be >= 1, got {buffer_rows}")
        self.path, self.rank = path, rank
        self.sources: list[Callable[[], None]] = []    # hand their buffered rows to a flush
        self._file: h5py.File | None = h5py.File(path, "w")
        self._file.attrs.update({"schema_version": SCHEMA_VERSION, "kind": "rank_part",
                                 "rank": rank, "complete": False})
        self.note(**dict(attrs or {}))
        self._open(buffer_rows, snapshot_dtype, create=True)
        self._file.flush()                 # readable from the start, even if killed now

    def _open(self, buffer_rows: int, snapshot_dtype: np.dtype | None, create: bool) -> None:
        f = self._require_open()
        dtypes = {"events": EVENT_DTYPE, "updates": PART_UPDATE_DTYPE, "losses": LOSS_DTYPE,
                  "snapshots": snapshot_dtype}
        self._appenders: dict[str, _Appender] = {}
        for name in DATASETS:
            dtype = dtypes[name]
            if create and dtype is not None:
                self._appenders[name] = _Appender.create(f, name, dtype, buffer_rows)
            elif not create and name in f:
                self._appenders[name] = _Appender(f[name], max(1, min(
                    buffer_rows, BUFFER_BYTES // f[name].dtype.itemsize)))
        self._events, self._updates = self._appenders["events"], self._appenders["updates"]
        self._snapshots = self._appenders.get("snapshots")

    @classmethod
    def reopen(cls, path: str | os.PathLike[str], rank: int, counts: Mapping[str, int],
               snapshot_dtype: np.dtype | None = None, buffer_rows: int = 1024) -> RankPart:
        """An existing part opened for appending, every dataset cut to `counts` rows (the
        rows written after a checkpoint are dropped) and marked incomplete. LedgerError when
        it is not rank `rank`'s part, a count exceeds what the part holds, or the snapshot
        rows differ from `snapshot_dtype`."""
        path = Path(path)
        with open_ledger(path, "part file") as f:      # checks it exists and is HDF5
            check_version(f, path)
        self = cls.__new__(cls)
        self.path, self.rank = path, rank
        self.sources = []
        self._file = h5py.File(path, "r+")
        try:
            self._check_reopen(rank, counts, snapshot_dtype)
            for name, n in counts.items():
                self._file[name].resize((int(n),))
            self._file.attrs["complete"] = False
            self.note(closed=False, signal="", error="")   # this segment has not ended
            self._open(buffer_rows, None, create=False)
            self._file.flush()
        except BaseException:
            self._file.close()
            raise
        return self

    def _check_reopen(self, rank: int, counts: Mapping[str, int],
                      snapshot_dtype: np.dtype | None) -> None:
        f = self._require_open()
        if f.attrs.get("kind") != "rank_part" or int(f.attrs.get("rank", -1)) != rank:
            raise LedgerError(f"{self.path} is not the part file of rank {rank}")
        for name, n in counts.items():
            have = int(f[name].shape[0]) if name in f else -1
            if name not in DATASETS or not 0 <= int(n) <= have:
                raise LedgerError(f"{self.path}: cannot cut {name} to {n} rows (it holds "
                                  f"{max(have, 0)})")
        if snapshot_dtype is not None and "snapshots" in f and \
                f["snapshots"].dtype != snapshot_dtype:
            raise LedgerError(f"{self.path}: its snapshots are {f['snapshots'].dtype}, not "
                              f"{snapshot_dtype}")

    def note(self, **values: Any) -> None:
        """Set root attributes (str, bool, int, float natively; lists, dicts, None as JSON,
        their names listed in `json_attrs`, as in the run file)."""
        f = self._require_open()
        names = set(json.loads(str(f.attrs.get("json_attrs", "[]"))))
        for name, value in values.items():
            if name in ("schema_version", "kind", "rank", "complete", "json_attrs"):
                raise LedgerError(f"part attribute {name!r} is reserved")
            if isinstance(value, (str, bool, int, float, np.generic)):
                f.attrs[name] = value
                names.discard(name)
            else:
                f.attrs[name] = json.dumps(value, default=_plain_json)
                names.add(name)
        f.attrs["json_attrs"] = json.dumps(sorted(names))

    def attr(self, name: str, default: Any = None) -> Any:
        """A root attribute as `note` set it (JSON decoded), `default` when absent."""
        f = self._require_open()
        if name not in f.attrs:
            return default
        value = f.attrs[name]
        if name in json.loads(str(f.attrs.get("json_attrs", "[]"))):
            return json.loads(value)
        return value.item() if isinstance(value, np.generic) else value

    def append_events(self, rows: np.ndarray) -> None:
        """Buffer event rows (EVENT_DTYPE); written once `buffer_rows` have accumulated."""
        self._require_open()
        self._events.append(rows)

    def append_updates(self, rows: np.ndarray) -> None:
        """Buffer update rows (PART_UPDATE_DTYPE); written once `buffer_rows` accumulated."""
        self._require_open()
        self._updates.append(rows)

    def append_snapshots(self, rows: np.ndarray) -> None:
        """Buffer block snapshots (rows of the `snapshot_dtype` given at creation)."""
        self._require_open()
        if self._snapshots is None:
            raise LedgerError(f"part file {self.path} was created without snapshots")
        self._snapshots.append(rows)

    def append_losses(self, rows: np.ndarray) -> None:
        """Buffer (k, loss) rows of LOSS_DTYPE (RPD, last stage)."""
        self._require_open()
        self._appenders["losses"].append(rows)

    def counts(self) -> dict[str, int]:
        """Rows appended so far to each dataset (written or still buffered): what a
        checkpoint records, so that `reopen` can cut the part back to it."""
        self._require_open()
        return {name: a.rows() for name, a in self._appenders.items()}

    def flush(self) -> None:
        """Write all buffered rows and flush the file (data and HDF5 metadata) to disk: the
        part then opens cleanly with everything so far, whatever happens to the process."""
        f = self._require_open()
        for source in self.sources:
            source()
        for appender in self._appenders.values():
            appender.flush()
        f.flush()

    def close(self, complete: bool = True, flush: bool = True) -> None:
        """Flush (unless `flush=False`: after a failed append, the buffered rows are given
        up), mark the part complete (unless `complete=False`) and close. Idempotent."""
        if self._file is None:
            return
        try:
            if flush:
                self.flush()
            self._file.attrs["complete"] = bool(complete)
        except BaseException:
            self._abandon()
            raise
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None

    def _abandon(self) -> None:
        """A write failed (disk full): never touch this file's HDF5 objects again. Closing
        or freeing them retries the failed writes, prints h5py warnings and (freed by the
        interpreter's final garbage collection) crashed the process with a segmentation
        fault; so they are kept alive in `ABANDONED`, and a process that abandoned a part
        leaves with os._exit (`rpd_mpi.commands.cmd_train`)."""
        ABANDONED.append((self._file, self._appenders))
        self._file = None

    def _require_open(self) -> h5py.File:
        if self._file is None:
            raise LedgerError(f"part file {self.path} is closed")
        return self._file

    def __enter__(self) -> RankPart:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(complete=exc_type is None)


def _plain_json(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _check_part(f: h5py.File, path: str | os.PathLike[str], allow_incomplete: bool) -> None:
    check_version(f, path)
    if f.attrs.get("kind") != "rank_part":
        raise LedgerError(f"{path} is not an rpd_mpi rank part file")
    if not allow_incomplete and not is_complete(f.attrs.get("complete")):
        raise LedgerError(f"{path} is incomplete (the rank did not close its part)")


class PartRows(NamedTuple):
    """The event and update rows of a part file, in append order."""

    events: np.ndarray
    updates: np.ndarray


def read_part(path: str | os.PathLike[str], allow_incomplete: bool = False) -> PartRows:
    """The rows of a part file (`PartRows`: `.events`, `.updates`; unpacks as a pair)."""
    with open_ledger(path, "part file") as f:
        _check_part(f, path, allow_incomplete)
        return PartRows(f["events"][()], f["updates"][()])


def read_part_snapshots(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The block snapshots of a part file (None when it has none)."""
    with open_ledger(path, "part file") as f:
        return f["snapshots"][()] if "snapshots" in f else None


def read_part_dataset(path: str | os.PathLike[str], name: str,
                      allow_incomplete: bool = True) -> np.ndarray | None:
    """One whole dataset of a part file (None when the part has none of that name)."""
    with open_ledger(path, "part file") as f:
        _check_part(f, path, allow_incomplete)
        return f[name][()] if name in f else None


def iter_part_rows(path: str | os.PathLike[str], name: str,
                   chunk: int = 0) -> Iterator[np.ndarray]:
    """The rows of dataset `name` of a part file in blocks of about CHUNK_BYTES (or
    `chunk` rows), so that a reader holds one block at a time; nothing if it is absent."""
    with open_ledger(path, "part file") as f:
        if name not in f:
            return
        dataset = f[name]
        step = chunk or max(1, CHUNK_BYTES // dataset.dtype.itemsize)
        for lo in range(0, int(dataset.shape[0]), step):
            yield dataset[lo:lo + step]


def part_column(path: str | os.PathLike[str], name: str, column: str) -> np.ndarray:
    """One field of a compound dataset of a part file, read chunk by chunk (empty when the
    dataset is absent): e.g. the snapshot times without the blocks."""
    with open_ledger(path, "part file") as f:
        if name not in f:
            return np.zeros(0)
        dataset = f[name]
        n = int(dataset.shape[0])
        out = np.empty(n, dtype=dataset.dtype[column])
        step = max(1, CHUNK_BYTES // dataset.dtype.itemsize)
        for lo in range(0, n, step):
            out[lo:lo + step] = dataset.fields(column)[lo:min(n, lo + step)]
        return out


def part_rows(path: str | os.PathLike[str], name: str) -> int:
    """Rows of dataset `name` of a part file (0 when absent)."""
    with open_ledger(path, "part file") as f:
        return int(f[name].shape[0]) if name in f else 0


def part_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The root attributes of a part file (rank, complete, schema_version, kind, and what
    the run noted: run_id, config, world_size, ...), JSON attributes decoded."""
    with open_ledger(path, "part file") as f:
        raw = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    names = json.loads(str(raw.pop("json_attrs", "[]")))
    return {k: (json.loads(v) if k in names else v) for k, v in raw.items()}


_PART_TAIL = re.compile(r"^(?:(?P<id>[^.]+)\.)?rank(?P<rank>\d{5})\.part$")


def find_parts(run_path: str | os.PathLike[str]) -> dict[str, dict[int, Path]]:
    """The part files next to `run_path`: {run id: {rank: path}} ("" for parts named
    without a run id)."""
    run_path = Path(run_path)
    found: dict[str, dict[int, Path]] = {}
    folder = run_path.parent if str(run_path.parent) else Path(".")
    for path in sorted(folder.glob(f"{glob.escape(run_path.name)}.*part")):
        m = _PART_TAIL.match(path.name[len(run_path.name) + 1:])
        if m is None:
            continue
        found.setdefault(m.group("id") or "", {})[int(m.group("rank"))] = path
    return found

