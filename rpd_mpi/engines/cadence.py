"""The one meaning of `--eval-every E` (docs/DESIGN.md 4): every E block updates.

Every engine records the full objective at the start, whenever the count of completed block
updates reaches a multiple of E, and at the end. The simulator and RPD on the PD clock check
at the end of each unit-time slot (so with E = 1: after every slot that completed an update);
the MPI assembly checks at each update's measured completion time. Large blocks on MPI ranks
are snapshot every `snapshot_every(E, S)` versions of their own (each stage applies about 1/S
of the updates), small ones after every update, and both less often when that would exceed
the rank's share of `--snapshot-budget` (`snapshot_interval`).
"""

from __future__ import annotations

import numpy as np

from rpd_mpi.records import BWD
from rpd_mpi.schedule.timeline import Timeline


def due(before: int, after: int, every: int) -> bool:
    """Did the update count pass a multiple of `every` going from `before` to `after`?"""
    return after // every > before // every


def snapshot_every(eval_every: int, stages: int) -> int:
    """Versions of one stage's block between snapshots of a large block on an MPI rank."""
    return max(1, eval_every // stages)


#: blocks up to this many values are snapshot after every update (exact objective curves)
SNAPSHOT_ALWAYS = 2 ** 16


def snapshot_row_bytes(block_values: int) -> int:
    """Bytes of one snapshot row of a part file: time, version, copy, the float64 block."""
    return 8 + 8 + 4 + 8 * block_values


def snapshot_interval(eval_every: int, stages: int, block_values: int, versions: int,
                      copies: int, rounds: int, budget_bytes: float) -> int:
    """Versions of one copy's block between snapshots on an MPI rank.

    Small blocks every version, large ones every `snapshot_every(E, S)`; then as many
    versions more as keep the rank's snapshots within `budget_bytes` (its share of
    `--snapshot-budget`): `versions` per copy over the run, `copies` copies, `rounds`
    LocalSGD averages (each snapshots every copy, whatever the interval). The final
    snapshot of each copy is always taken, outside the budget. 0 versions: the cadence only.
    """
    every = 1 if block_values <= SNAPSHOT_ALWAYS else snapshot_every(eval_every, stages)
    if versions <= 0:
        return every
    row = snapshot_row_bytes(block_values)
    fits = int((budget_bytes - rounds * copies * row) // (row * copies))  # per copy
    if fits < 1:
        return versions + 1                  # none before the final one
    return max(every, -(-versions // fits))


def rank_updates(tl: Timeline, stage: int, plan_stages: np.ndarray | None = None) -> int:
    """Block updates one MPI rank of `stage` makes over the run (all its copies): RPD the
    plan's iterations on that stage, otherwise the updating backwards of its timeline column
    (with flushes, one per flush)."""
    if plan_stages is not None:
        return int((plan_stages == stage).sum())
    backwards = int((tl.kind[:, stage] == BWD).sum())
    return -(-backwards // tl.flush) if tl.flush > 1 else backwards
