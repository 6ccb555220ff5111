"""What one MPI rank records: events, updates and block snapshots, appended to its part file.

Rows are buffered and appended in blocks (one h5py append per 1024 rows); small blocks are
snapshot after every update, large ones at the cadence the caller gives. `hold` emulates
compute for `--op-cost`.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from rpd_mpi.ledger.parts import PART_UPDATE_DTYPE, RankPart
from rpd_mpi.mpi.comm import Comm, wtime
from rpd_mpi.records import EVENT_DTYPE

SNAPSHOT_ALWAYS = 2 ** 16      # blocks up to this many values are snapshot at every update


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


class Recorder:
    """This rank's events, updates and snapshots, buffered and appended to its part file."""

    def __init__(self, part: RankPart, comm: Comm, t0: float, block_size: int,
                 every: int = 1, host: Callable[[Any], np.ndarray] = np.asarray) -> None:
        self.part, self.t0, self.host = part, t0, host      # host: device block -> numpy
        self.ids = (comm.rank, comm.group, comm.stage)
        self.events: list[tuple] = []
        self.updates: list[tuple] = []
        self.snap = np.zeros(1, dtype=snapshot_dtype(block_size))
        # small blocks: a snapshot after every update (exact objective curves); large ones
        # (charlm): every `every` updates, and always after the last (final blocks)
        self.every = 1 if block_size <= SNAPSHOT_ALWAYS else max(1, every)
        self.taken: dict[int, int] = {}      # copy -> version of its last snapshot

    def event(self, op: int, mb: int, traj: int, version: int, start: float, end: float,
              wait: float, nbytes: int = 0) -> None:
        r, g, s = self.ids
        self.events.append((r, g, s, traj, op, mb, version, start - self.t0, end - self.t0,
                            wait, nbytes))
        if len(self.events) >= 1024:
            self.flush_rows()

    def update(self, row: tuple, end: float, block: np.ndarray, copy: int, version: int
               ) -> None:
        self.updates.append(row)
        if version % self.every == 0:
            self.snapshot(end, block, copy, version)

    def snapshot(self, t: float, block: np.ndarray, copy: int, version: int) -> None:
        """The block of model copy `copy` as it is from time t on."""
        self.taken[copy] = version
        self.snap["time"], self.snap["version"], self.snap["copy"] = t - self.t0, version, copy
        self.snap["block"][0] = self.host(block)
        self.part.append_snapshots(self.snap)

    def flush_rows(self) -> None:
        if self.events:
            self.part.append_events(np.array(self.events, dtype=EVENT_DTYPE))
            self.events = []
        if self.updates:
            self.part.append_updates(np.array(self.updates, dtype=PART_UPDATE_DTYPE))
            self.updates = []
