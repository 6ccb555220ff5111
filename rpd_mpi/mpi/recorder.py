"""What one MPI rank records: events, updates and block snapshots, appended to its part file.

Rows are buffered and appended in blocks (one h5py append per 1024 rows), and everything
buffered reaches the file (rows and HDF5 metadata) at least every `FLUSH_SECONDS`, at every
`flush()` (checkpoints) and before the part is given up after an exception (`salvage`), so a
part killed with SIGKILL still opens with all but the last seconds. Times are seconds since
the run's common t = 0 (`now`). Blocks are snapshot at the interval of
`engines.cadence.snapshot_interval` (every update for small blocks, fewer under the
`--snapshot-budget`), and always after the last update. `hold` emulates compute for
`--op-cost`. `part_notes` is what a part says about its run (for `rpd-mpi assemble`).
"""

from __future__ import annotations

import math
import socket
import time
from typing import Any, Callable

import numpy as np

from rpd_mpi.config import RunConfig
from rpd_mpi.engines.cadence import rank_updates, snapshot_interval
from rpd_mpi.ledger.parts import LOSS_DTYPE, RankPart
from rpd_mpi.ledger.provenance import provenance
from rpd_mpi.ledger.run_file import WRITE_ERRORS, io_reason
from rpd_mpi.mpi.comm import Comm, library_version, processor_name, wtime
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.records import EVENT_DTYPE, FWD, UPDATE_ROW_DTYPE, UpdateRow
from rpd_mpi.schedule.timeline import Timeline

ROWS_PER_APPEND = 1024
FLUSH_SECONDS = 2.0            # buffered rows and the HDF5 file reach the disk this often


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


def part_notes(cfg: RunConfig, comm: Comm, model: Model, tl: Timeline, run_id: str,
               plan_stages: np.ndarray | None = None) -> dict[str, Any]:
    """The root attributes a rank's part file starts with: the run id and configuration,
    the rank layout, host and MPI library, the snapshot interval, and (rank 0) provenance."""
    sl = model.slices[comm.stage]
    copies = tl.trajectories
    updates = rank_updates(tl, comm.stage, plan_stages)
    every = snapshot_interval(cfg.eval_every, cfg.schedule.stages, sl.stop - sl.start,
                              math.ceil(updates / copies), copies, len(tl.averages),
                              cfg.runtime.snapshot_budget * 2 ** 20 / comm.size)
    notes: dict[str, Any] = {
        "run_id": run_id, "config": cfg.to_dict(), "world_size": comm.size,
        "stage": comm.stage, "group": comm.group, "stages": cfg.schedule.stages,
        "groups": cfg.schedule.groups, "host": processor_name() or socket.gethostname(),
        "mpi_library": library_version(), "snapshot_every": every,
        "expected_updates": updates, "created": time.time()}
    if comm.rank == 0:
        notes["provenance"] = provenance()
    return notes


class Recorder:
    """This rank's events, updates and snapshots, buffered and appended to its part file."""

    def __init__(self, part: RankPart, comm: Comm, t0: float, block_size: int,
                 eval_every: int = 1, host: Callable[[Any], np.ndarray] = np.asarray) -> None:
        self.part, self.t0, self.host = part, t0, host      # host: device block -> numpy
        self.ids = (comm.rank, comm.group, comm.stage)
        self.events: list[tuple[int | float, ...]] = []
        self.updates: list[UpdateRow] = []
        self.snap = np.zeros(1, dtype=snapshot_dtype(block_size))
        noted = part.attr("snapshot_every")
        self.every = int(noted) if noted else \
            snapshot_interval(eval_every, comm.stages, block_size, 0, 1, 0, 0.0)
        self.taken: dict[int, int] = {}      # copy -> version of its last snapshot
        self.flushed_at = wtime()
        self.loss_source: np.ndarray | None = None   # RPD last stage: losses by iteration
        self.losses_done = self.losses_seen = 0
        part.sources.append(self.flush_rows)         # part.flush() takes our rows first

    def now(self) -> float:
        """Seconds since the run's t = 0."""
        return wtime() - self.t0

    def track_losses(self, losses: np.ndarray, first: int = 0) -> None:
        """RPD, last stage: append losses[k] to the part once the forward of k is recorded,
        from k = `first` on (a resumed run: the first iteration after the cut)."""
        self.loss_source = losses
        self.losses_done = self.losses_seen = first

    def event(self, op: int, mb: int, traj: int, version: int, start: float, end: float,
              wait: float, nbytes: int = 0) -> None:
        """One executed op; `start` and `end` are MPI.Wtime() readings."""
        r, g, s = self.ids
        self.events.append((r, g, s, traj, op, mb, version, start - self.t0, end - self.t0,
                            wait, nbytes))
        if op == FWD and self.loss_source is not None:
            self.losses_seen = mb + 1
        if end - self.flushed_at >= FLUSH_SECONDS:
            self.flush()
        elif len(self.events) >= ROWS_PER_APPEND:
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
        """Hand the buffered rows to the part (which writes them in blocks)."""
        if self.events:
            self._write(self.part.append_events, np.array(self.events, dtype=EVENT_DTYPE))
            self.events = []
        if self.updates:
            self._write(self.part.append_updates,
                        np.array(self.updates, dtype=UPDATE_ROW_DTYPE))
            self.updates = []
        if self.loss_source is not None and self.losses_seen > self.losses_done:
            k = np.arange(self.losses_done, self.losses_seen)
            rows = np.zeros(k.size, LOSS_DTYPE)
            rows["k"], rows["loss"] = k, self.loss_source[k]
            self._write(self.part.append_losses, rows)
            self.losses_done = self.losses_seen

    def checkpoint(self) -> dict[str, Any]:
        """What a resumed recorder needs besides the part's rows (`RankPart.reopen`)."""
        return {"taken": dict(self.taken), "losses": (self.losses_done, self.losses_seen)}

    def restore(self, state: dict[str, Any]) -> None:
        self.taken = dict(state["taken"])
        self.losses_done, self.losses_seen = state["losses"]

    def flush(self) -> None:
        """Every buffered row and the HDF5 file to disk (periodically, and at checkpoints)."""
        self.flush_rows()
        self._write(lambda _: self.part.flush(), np.zeros(0))
        self.flushed_at = wtime()

    def _write(self, append: Callable[[np.ndarray], None], rows: np.ndarray) -> None:
        try:
            append(rows)
        except WRITE_ERRORS as err:
            raise PartWriteFailed(f"writing {self.part.path}: {io_reason(err)}") from None


def salvage(part: RankPart, err: BaseException) -> None:
    """After an exception on this rank: its buffered rows and the error reach the part
    (left incomplete) before the job is aborted; a failure to write is swallowed, the
    original error is the one to report."""
    if part.closed:
        return
    try:
        part.note(error=f"{type(err).__name__}: {err}")
        part.flush()
    except Exception:          # noqa: BLE001 - the disk may be why the rank failed
        pass
