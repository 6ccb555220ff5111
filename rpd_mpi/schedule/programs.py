"""Per-stage programs: what an MPI rank executes in static order (docs/DESIGN.md 4).

`stage_program(tl, s)` is stage s's ops in slot order, with an AVG op after each LocalSGD
round end.
"""

from __future__ import annotations

import numpy as np

from rpd_mpi.records import AVG
from rpd_mpi.schedule.timeline import Timeline

PROGRAM_DTYPE = np.dtype([("op", "i1"), ("mb", "i8"), ("slot", "i8")])


def stage_program(tl: Timeline, s: int) -> np.ndarray:
    """Stage s's ops (op, mb, slot) in execution order; AVG (mb = round) after round ends."""
    slots = np.nonzero(tl.kind[:, s])[0]
    ops = [(int(tl.kind[t, s]), int(tl.mb[t, s]), int(t)) for t in slots]
    for r, a in enumerate(tl.averages):
        ops.append((AVG, r, a))
    ops.sort(key=lambda o: (o[2], o[0] == AVG))   # an average follows the ops of its slot
    return np.array(ops, dtype=PROGRAM_DTYPE)
