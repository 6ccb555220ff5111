"""Per-stage programs and the text form of a timeline.

`stage_program(tl, s)` is what an MPI rank executes in static order: stage s's ops in slot
order, with an AVG op after each LocalSGD round end. `render` prints the grid (one row per
stage, one column per slot) and `parse` reads that text back into a Timeline (round trip).
"""

from __future__ import annotations

import re

import numpy as np

from rpd_mpi.records import AVG, BWD, FWD, IDLE
from rpd_mpi.schedule import Timeline, cell_text

PROGRAM_DTYPE = np.dtype([("op", "i1"), ("mb", "i8"), ("slot", "i8")])


def stage_program(tl: Timeline, s: int) -> np.ndarray:
    """Stage s's ops (op, mb, slot) in execution order; AVG (mb = round) after round ends."""
    slots = np.nonzero(tl.kind[:, s])[0]
    ops = [(int(tl.kind[t, s]), int(tl.mb[t, s]), int(t)) for t in slots]
    for r, a in enumerate(tl.averages):
        ops.append((AVG, r, a))
    ops.sort(key=lambda o: (o[2], o[0] == AVG))   # an average follows the ops of its slot
    return np.array(ops, dtype=PROGRAM_DTYPE)


def render(tl: Timeline, width: int = 0) -> str:
    """The grid as text: a header line, then `s<stage>` rows of cells like F3, B0, '.'."""
    width = width or max(2, len(str(max(tl.microbatches - 1, 0))) + 2)
    head = (f"# {tl.method} stages={tl.stages} microbatches={tl.microbatches} "
            f"slots={tl.slots} trajectories={tl.trajectories} local_steps={tl.local_steps} "
            f"noam={tl.noam} flush={tl.flush} averages={','.join(map(str, tl.averages))} "
            f"truncated={int(tl.truncated)}")
    rows = [head]
    for s in range(tl.stages):
        cells = (cell_text(int(k), int(m)) for k, m in zip(tl.kind[:, s], tl.mb[:, s]))
        rows.append(f"s{s:<3} " + " ".join(c.rjust(width) for c in cells))
    return "\n".join(rows)


_HEAD = re.compile(r"# (\w+) stages=(\d+) microbatches=(\d+) slots=(\d+) trajectories=(\d+) "
                   r"local_steps=(\d+) noam=(\d+) flush=(\d+) averages=([\d,]*) "
                   r"truncated=([01])")


def parse(text: str) -> Timeline:
    """Read `render`'s output back; ValueError on a malformed grid."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    m = _HEAD.fullmatch(lines[0].strip()) if lines else None
    if not m:
        raise ValueError("first line must be the '# <method> stages=...' header of render()")
    method, S, N, T, R, H, noam, flush, avgs, cut = m.groups()
    kind = np.zeros((int(T), int(S)), dtype=np.int8)
    mb = np.full((int(T), int(S)), -1, dtype=np.int64)
    for s, line in enumerate(lines[1:]):
        cells = line.split()[1:]
        if len(cells) != int(T):
            raise ValueError(f"stage {s}: {len(cells)} cells, header says {T} slots")
        for t, c in enumerate(cells):
            kind[t, s], mb[t, s] = _cell(c)
    averages = tuple(int(a) for a in avgs.split(",") if a)
    return Timeline(kind, mb, method, int(N), int(R), int(H), int(noam), int(flush), averages,
                    cut == "1")


def _cell(c: str) -> tuple[int, int]:
    if c == ".":
        return IDLE, -1
    if c[0] in "FB" and c[1:].isdigit():
        return (FWD if c[0] == "F" else BWD), int(c[1:])
    raise ValueError(f"bad cell {c!r}: expected F<mb>, B<mb> or '.'")
