"""The one meaning of `--eval-every E` (docs/DESIGN.md 4): every E block updates.

Every engine records the full objective at the start, whenever the count of completed block
updates reaches a multiple of E, and at the end. The simulator and RPD on the PD clock check
at the end of each unit-time slot (so with E = 1: after every slot that completed an update);
the MPI assembly checks at each update's measured completion time. Large blocks on MPI ranks
are snapshot every `snapshot_every(E, S)` versions of their own (each stage applies about 1/S
of the updates), small ones after every update.
"""

from __future__ import annotations


def due(before: int, after: int, every: int) -> bool:
    """Did the update count pass a multiple of `every` going from `before` to `after`?"""
    return after // every > before // every


def snapshot_every(eval_every: int, stages: int) -> int:
    """Versions of one stage's block between snapshots of a large block on an MPI rank."""
    return max(1, eval_every // stages)
