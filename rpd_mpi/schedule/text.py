"""The text form of a timeline: `render` prints the grid, `parse` reads it back.

One row per stage, one column per slot, cells like `F3`, `B0` and `.` (idle), under a header
line that carries the timeline's parameters, so `parse(render(tl)) == tl`. `mark` shows the
grid around one cell in brackets, for error messages.
"""

from __future__ import annotations

import re

import numpy as np

from rpd_mpi.records import BWD, FWD, IDLE
from rpd_mpi.schedule.timeline import Timeline


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


def mark(tl: Timeline, t: int, s: int, width: int = 12) -> str:
    """The grid around slot t with the cell (t, s) marked by brackets."""
    lo, hi = max(0, t - width), min(tl.slots, t + width + 1)
    lines = [f"slots {lo}..{hi - 1}"]
    for stage in range(tl.stages):
        cells = []
        for slot in range(lo, hi):
            c = cell_text(int(tl.kind[slot, stage]), int(tl.mb[slot, stage]))
            cells.append(f"[{c}]" if (slot, stage) == (t, s) else f" {c} ")
        lines.append(f"s{stage:<3}" + "".join(f"{c:>7}" for c in cells))
    return "\n".join(lines)


def cell_text(op: int, mb: int) -> str:
    """One cell of the text form: 'F3', 'B0', '.' (idle)."""
    return "." if op == IDLE else f"{'F' if op == FWD else 'B'}{mb}"
