"""The `Timeline`: a unit-time schedule as data (docs/DESIGN.md 2).

A timeline holds, for every unit-time slot and every stage, one op (FWD/BWD, microbatch) or
nothing. Everything else in rpd_mpi (simulator, MPI programs, delays, plots) reads timelines;
nothing invents an ordering of its own. The generators are in `schedule.generate`, the
dependency rules in `schedule.rules`, the text grid in `schedule.text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

METHODS = ("pd", "localsgd", "gpipe", "naive")


class ScheduleError(ValueError):
    """A timeline breaks a dependency rule; the message shows the grid with the cell marked."""


@dataclass(frozen=True)
class Timeline:
    """A unit-time schedule: `kind[t, s]` in {IDLE, FWD, BWD}, `mb[t, s]` (-1 when idle).

    `averages` lists the slots at whose end LocalSGD averages its trajectories;
    `flush` > 0 means backward gradients are accumulated and applied once per flush of
    `flush` microbatches (GPipe, naive); 0 means every backward updates its block (PD).
    """

    kind: np.ndarray
    mb: np.ndarray
    method: str
    microbatches: int
    trajectories: int = 1
    local_steps: int = 1
    noam: int = 0
    flush: int = 0
    averages: tuple[int, ...] = field(default=())
    truncated: bool = False       # cut at a slot budget: not every op is present

    @property
    def slots(self) -> int:
        return int(self.kind.shape[0])

    @property
    def stages(self) -> int:
        return int(self.kind.shape[1])

    def op_slots(self, op: int) -> np.ndarray:
        """N x S array: slot of op (FWD or BWD) of (mb, stage); -1 where absent."""
        out = np.full((self.microbatches, self.stages), -1, dtype=np.int64)
        t, s = np.nonzero(self.kind == op)
        out[self.mb[t, s], s] = t
        return out

    def truncate(self, budget: int) -> "Timeline":
        """The first `budget` slots (ops after the budget never run)."""
        if budget >= self.slots:
            return self
        kept = tuple(a for a in self.averages if a < budget)
        return replace(self, kind=self.kind[:budget].copy(), mb=self.mb[:budget].copy(),
                       averages=kept, truncated=True)

    def utilization(self) -> float:
        """Busy cells / all cells."""
        return busy_fraction(self.kind)


def busy_fraction(kind: np.ndarray) -> float:
    """Unit-time utilization of a T x S op grid: busy cells / all cells."""
    return float(np.count_nonzero(kind)) / max(1, kind.size)
