"""Per-rank part files of an MPI run: appended during the run, assembled by rank 0 at the end.

Part of the ledger (with `rpd_mpi.ledger`, the only modules that import h5py); the layout is
in ledger.py's docstring and docs/LEDGER.md. Rows are buffered in memory and appended in
blocks, one resize per block (docs/DESIGN.md 9: per-row resizing is ~250x slower).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import h5py
import numpy as np

from rpd_mpi.ledger.run_file import (SCHEMA_VERSION, LedgerError, check_version, is_complete,
                                     open_ledger)
from rpd_mpi.records import EVENT_DTYPE, UPDATE_ROW_DTYPE

#: One row per block update, as a rank records it during an MPI run. `version` is the block
#: version read by F (= the version B updates); `start`/`end` are seconds since t = 0 of the
#: backward+update; global k and the delays are derived at assembly from these and the events.
PART_UPDATE_DTYPE = UPDATE_ROW_DTYPE     # one row per block update (records.UpdateRow)

_PART_CHUNK = 1024       # rows per chunk of a part file's resizable datasets


def part_path(run_path: str | os.PathLike[str], rank: int, run_id: str = "") -> Path:
    """Where rank `rank` of run `run_id` writes its part of the run file `run_path`:
    `<run>.<run_id>.rankNNNNN.part` (`<run>.rankNNNNN.part` without a run id)."""
    run_path = Path(run_path)
    tag = f".{run_id}" if run_id else ""
    return run_path.with_name(f"{run_path.name}{tag}.rank{rank:05d}.part")


class _Appender:
    """Buffered rows of one dtype, appended to a resizable dataset one block at a time."""

    def __init__(self, f: h5py.File, name: str, dtype: np.dtype, buffer_rows: int) -> None:
        self.dtype = dtype
        self.folder = os.path.dirname(os.path.abspath(f.filename))
        self.dataset = f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                                        chunks=(_PART_CHUNK,))
        self.buffer = np.empty(buffer_rows, dtype=dtype)   # copies: callers reuse their rows
        self.pending_rows = 0

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

    Used as a context manager, an exception inside the block still flushes the buffered rows
    but leaves the part marked incomplete (readable with `read_part(..., allow_incomplete=True)`).
    """

    def __init__(self, path: str | os.PathLike[str], rank: int, buffer_rows: int = 1024,
                 snapshot_dtype: np.dtype | None = None) -> None:
        path = Path(path)
        if not path.parent.is_dir():
            raise LedgerError(f"cannot write part {path}: directory {path.parent} does not exist")
        if buffer_rows < 1:
            raise LedgerError(f"buffer_rows must be >= 1, got {buffer_rows}")
        self.path, self.rank = path, rank
        self._file: h5py.File | None = h5py.File(path, "w")
        self._file.attrs.update({"schema_version": SCHEMA_VERSION, "kind": "rank_part",
                                 "rank": rank, "complete": False})
        self._events = _Appender(self._file, "events", EVENT_DTYPE, buffer_rows)
        self._updates = _Appender(self._file, "updates", PART_UPDATE_DTYPE, buffer_rows)
        self._snapshots = (_Appender(self._file, "snapshots", snapshot_dtype,
                                     max(1, min(buffer_rows, 2 ** 22 // snapshot_dtype.itemsize)))
                           if snapshot_dtype is not None else None)

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

    def flush(self) -> None:
        """Write all buffered rows and flush the file to disk."""
        f = self._require_open()
        self._events.flush()
        self._updates.flush()
        if self._snapshots is not None:
            self._snapshots.flush()
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

    def _abandon(self) -> None:
        """A write failed (disk full): never touch this file's HDF5 objects again. Closing
        or freeing them retries the failed writes, prints h5py warnings and (freed by the
        interpreter's final garbage collection) crashed the process with a segmentation
        fault; so they are kept alive in `ABANDONED`, and a process that abandoned a part
        leaves with os._exit (`rpd_mpi.commands.cmd_train`)."""
        ABANDONED.append((self._file, self._events, self._updates, self._snapshots))
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


def read_part(path: str | os.PathLike[str],
              allow_incomplete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(events, updates) of a part file, in append order."""
    with open_ledger(path, "part file") as f:
        check_version(f, path)
        if f.attrs.get("kind") != "rank_part":
            raise LedgerError(f"{path} is not an rpd_mpi rank part file")
        if not allow_incomplete and not is_complete(f.attrs.get("complete")):
            raise LedgerError(f"{path} is incomplete (the rank did not close its part)")
        return f["events"][()], f["updates"][()]


def read_part_snapshots(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The block snapshots of a part file (None when it has none)."""
    with open_ledger(path, "part file") as f:
        return f["snapshots"][()] if "snapshots" in f else None


def part_attrs(path: str | os.PathLike[str]) -> Mapping[str, Any]:
    """The root attributes of a part file (rank, complete, schema_version, kind)."""
    with open_ledger(path, "part file") as f:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
