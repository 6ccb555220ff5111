"""What an engine hands to the ledger: one `RunRecord` per run, plain numpy arrays.

The simulator and the MPI runtime both fill a `RunRecord`; only `rpd_mpi.ledger` turns it
into HDF5 (and back). This module is pure: no h5py, no MPI.

Op codes (shared by schedules, events and ledgers):
    IDLE = 0, FWD = 1, BWD = 2, AVG = 3 (LocalSGD averaging, MPI events only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

IDLE, FWD, BWD, AVG = 0, 1, 2, 3
OP_NAMES = {IDLE: "idle", FWD: "F", BWD: "B", AVG: "avg"}

#: One row per executed op (MPI runs: measured seconds; simulator: unit-time slots).
#: `wait`: seconds blocked for the op's input; `bytes`: payload sent (F, B) or allreduced (AVG).
EVENT_DTYPE = np.dtype([
    ("rank", "i4"), ("group", "i4"), ("stage", "i4"), ("trajectory", "i4"),
    ("op", "i1"), ("microbatch", "i8"), ("version", "i8"),
    ("start", "f8"), ("end", "f8"), ("wait", "f8"), ("bytes", "i8"),
])

#: One row per block update, in global order k.
UPDATE_FIELDS = (
    "k", "stage", "group", "trajectory", "microbatch", "batch", "version",
    "local_staleness", "loss", "grad_norm", "time",
)


class UpdateRow(NamedTuple):
    """One block update, as every engine describes it (field order = `UPDATE_ROW_DTYPE`)."""

    stage: int
    group: int
    trajectory: int
    microbatch: int          # RPD: the iteration index k
    batch: int
    version: int             # version of the block read by F (= the version updated by B)
    local_staleness: int     # versions of this block applied between the read and the update
    loss: float              # last-stage loss of the microbatch (NaN where not known yet)
    grad_norm: float         # norm of the block gradient applied
    start: float             # when the backward began (slots or seconds)
    end: float               # when the update completed (slots or seconds)


UPDATE_ROW_DTYPE = np.dtype([
    ("stage", "i4"), ("group", "i4"), ("trajectory", "i4"),
    ("microbatch", "i8"), ("batch", "i8"), ("version", "i8"), ("local_staleness", "i8"),
    ("loss", "f8"), ("grad_norm", "f8"), ("start", "f8"), ("end", "f8"),
])


def row_array(rows: list[UpdateRow]) -> np.ndarray:
    """Rows as a structured array of `UPDATE_ROW_DTYPE`."""
    return np.array(rows, dtype=UPDATE_ROW_DTYPE) if rows else np.zeros(0, UPDATE_ROW_DTYPE)


def to_updates(rows: np.ndarray, delays: np.ndarray) -> Updates:
    """`Updates` from rows already in global order k and their K x S global delays."""
    return Updates(stage=rows["stage"].astype(np.int64), group=rows["group"].astype(np.int64),
                   trajectory=rows["trajectory"].astype(np.int64),
                   microbatch=rows["microbatch"].astype(np.int64),
                   batch=rows["batch"].astype(np.int64),
                   version=rows["version"].astype(np.int64),
                   local_staleness=rows["local_staleness"].astype(np.int64),
                   delays=np.array(delays[: rows.size], dtype=np.int64),
                   loss=rows["loss"].astype(float), grad_norm=rows["grad_norm"].astype(float),
                   time=rows["end"].astype(float))


def empty_events(n: int = 0) -> np.ndarray:
    """An events array of `n` zeroed rows."""
    return np.zeros(n, dtype=EVENT_DTYPE)


@dataclass
class Updates:
    """Block updates in global order (k = 0..K-1); `delays` is K x S (global delays)."""

    stage: np.ndarray
    group: np.ndarray
    trajectory: np.ndarray
    microbatch: np.ndarray
    batch: np.ndarray
    version: np.ndarray          # version of the block read by F (= version updated by B)
    local_staleness: np.ndarray  # block versions between read and update
    delays: np.ndarray           # K x S: k - j_k^(s')
    loss: np.ndarray             # last-stage loss of that microbatch
    grad_norm: np.ndarray        # norm of the block gradient applied
    time: np.ndarray             # slot (unit-time) or seconds since start (MPI) of completion

    def __len__(self) -> int:
        return int(self.stage.shape[0])

    @property
    def k(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)


@dataclass
class Objective:
    """The full objective at the chosen cadence: (time, k, value); `validation`: the held-out
    loss at the same points (char LM with a validation split), else None."""

    time: np.ndarray
    k: np.ndarray
    value: np.ndarray
    validation: np.ndarray | None = None


@dataclass
class RunRecord:
    """Everything one run leaves behind; written by `ledger.write_run`."""

    attrs: dict[str, Any]          # method, stages, groups, trajectories, ... (scalars/strings)
    config: dict[str, Any]         # the full configuration, stored as JSON
    updates: Updates
    objective: Objective
    final_blocks: list[np.ndarray]
    events: np.ndarray = field(default_factory=empty_events)
    timeline_kind: np.ndarray | None = None   # T x S unit-time schedule, if there is one
    timeline_mb: np.ndarray | None = None


@dataclass(frozen=True)
class Divergence:
    """Where a run diverged: what was bad, at which global update index, stage, microbatch."""

    what: str            # "loss", "gradient norm" or "objective"
    update: int          # block updates completed before it (the ledger's K; -1: not known
                         # yet where it was detected, filled in by the engine)
    stage: int
    microbatch: int
    value: float

    def describe(self, lr: float) -> str:
        where = f"microbatch {self.microbatch} on stage {self.stage}" if self.stage >= 0 \
            else "the full objective"
        return (f"diverged at update {self.update}: {self.what} of {where} is {self.value:.6g}"
                f"; --lr {lr:g} is probably too large")

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "Divergence":
        """Read back what `to_attrs` wrote into a ledger's attributes."""
        return cls(str(attrs.get("diverged_what")), int(attrs.get("diverged_update", -1)),
                   int(attrs.get("diverged_stage", -1)),
                   int(attrs.get("diverged_microbatch", -1)),
                   float(attrs.get("diverged_value", "nan")))

    def to_attrs(self) -> dict[str, object]:
        return {"diverged_what": self.what, "diverged_update": self.update,
                "diverged_stage": self.stage, "diverged_microbatch": self.microbatch,
                "diverged_value": str(self.value)}


@dataclass
class Trace:
    """What an engine produced: updates in global order, objective, final weights, events."""

    updates: Updates
    objective: Objective
    final_weights: np.ndarray      # the full vector (LocalSGD: averaged over copies)
    events: np.ndarray
    divergence: Divergence | None = None    # set when the run stopped as diverged
    stopped: str = ""                       # the signal that stopped the run (e.g. SIGTERM)
