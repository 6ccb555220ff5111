"""What one MPI rank records: events, updates and block snapshots, appended to its part file.

Rows are buffered and appended in blocks (one h5py append per 1024 rows). Times are seconds
since the run's common t = 0 (`now`). Small blocks are snapshot after every update (exact
objective curves); large ones every `engines.cadence.snapshot_every` versions, and always
after the last. `hold` emulates compute for `--op-cost`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from rpd_mpi.engines.cadence import snapshot_every
from rpd_mpi.ledger.parts import RankPart
from rpd_mpi.ledger.run_file import WRITE_ERRORS, io_reason
from rpd_mpi.mpi.comm import Comm, wtime
from rpd_mpi.records import EVENT_DTYPE, UPDATE_ROW_DTYPE, UpdateRow

SNAPSHOT_ALWAYS = 2 ** 16      # blocks up to this many values are snapshot at every update
ROWS_PER_APPEND = 1024


def snapshot_dtype(block_size: int) -> np.dtype:
    return np.dtype([("time", "f8"), ("version", "i8"), ("copy", "i4"),
                     ("block", "f8", (block_size,))])


def hold(op_cost: float, start: float) -> None:
    """Emulated compute: keep the op busy until `op_cost` seconds after its start, sleeping
    (the core stays free, so the emulation means something on an oversubscribed machine)."""
    if op_cost:
        rest = op_cost - (wtime() - start)
        if rest > 0:
            time.sleep(rest)


class PartWriteFailed(RuntimeError):
    """Appending to this rank's part file failed (disk full, quota, I/O error)."""


class Recorder:
    """This rank's events, updates and snapshots, buffered and appended to its part file."""

    def __init__(self, part: RankPart, comm: Comm, t0: float, block_size: int,
                 eval_every: int = 1, host: Callable[[Any], np.ndarray] = np.asarray) -> None:
        self.part, self.t0, self.host = part, t0, host      # host: device block -> numpy
        self.ids = (comm.rank, comm.group, comm.stage)
        self.events: list[tuple[int | float, ...]] = []
        self.updates: list[UpdateRow] = []
        self.snap = np.zeros(1, dtype=snapshot_dtype(block_size))
        self.every = 1 if block_size <= SNAPSHOT_ALWAYS else \
            snapshot_every(eval_every, comm.stages)
        self.taken: dict[int, int] = {}      # copy -> version of its last snapshot

    def now(self) -> float:
        """Seconds since the run's t = 0."""
        return wtime() - self.t0

    def event(self, op: int, mb: int, traj: int, version: int, start: float, end: float,
              wait: float, nbytes: int = 0) -> None:
        """One executed op; `start` and `end` are MPI.Wtime() readings."""
        r, g, s = self.ids
        self.events.append((r, g, s, traj, op, mb, version, start - self.t0, end - self.t0,
                            wait, nbytes))
        if len(self.events) >= ROWS_PER_APPEND:
            self.flush_rows()

    def update(self, row: UpdateRow, block: Any, copy: int, version: int) -> None:
        """One block update (times in `row` since t = 0) and, at the cadence, a snapshot of
        the block as it is after it."""
        self.updates.append(row)
        if version % self.every == 0:
            self.snapshot(row.end, block, copy, version)

    def snapshot(self, t: float, block: Any, copy: int, version: int) -> None:
        """The block of model copy `copy` as it is from time t (since t = 0) on."""
        self.taken[copy] = version
        self.snap["time"], self.snap["version"], self.snap["copy"] = t, version, copy
        self.snap["block"][0] = self.host(block)
        self._write(self.part.append_snapshots, self.snap)

    def final_snapshots(self, blocks: list[Any], copies: list[int], versions: list[int]
                        ) -> None:
        """Snapshot every block whose last version has not been snapshot yet."""
        for block, copy, version in zip(blocks, copies, versions):
            if self.taken.get(copy) != version:
                self.snapshot(self.now(), block, copy, version)

    def flush_rows(self) -> None:
        if self.events:
            self._write(self.part.append_events, np.array(self.events, dtype=EVENT_DTYPE))
            self.events = []
        if self.updates:
            self._write(self.part.append_updates,
                        np.array(self.updates, dtype=UPDATE_ROW_DTYPE))
            self.updates = []

    def _write(self, append: Callable[[np.ndarray], None], rows: np.ndarray) -> None:
        try:
            append(rows)
        except WRITE_ERRORS as err:
            raise PartWriteFailed(f"writing {self.part.path}: {io_reason(err)}") from None
