"""Schedules as data: the `Timeline`, its dependency rules, the generators and the validator.

A timeline holds, for every unit-time slot and every stage, one op (FWD/BWD, microbatch) or
nothing. Everything else in rpd_mpi (simulator, MPI programs, delays, plots) reads timelines;
nothing invents an ordering of its own.

The dependency rules of each schedule family are written once, in a `Rules` class, and are
used both by the generator (`generate`) and by the validator (`validate`). The per-stage
choice between a ready forward and a ready backward is the 1F1B rule of DESIGN 2.1
(`choose_1f1b`), shared with the MPI runtime's dynamic order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from rpd_mpi.records import BWD, FWD, IDLE

NEVER = np.iinfo(np.int64).max // 4   # "not finished yet" slot stamp
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
        return float(np.count_nonzero(self.kind)) / max(1, self.kind.size)


# ----------------------------------------------------------------------------- rules

class _State:
    """Progress of a schedule at the start of a slot (finish slots of every op)."""

    def __init__(self, stages: int, microbatches: int) -> None:
        self.fend = [[NEVER] * microbatches for _ in range(stages)]
        self.bend = [[NEVER] * microbatches for _ in range(stages)]
        self.nf = [0] * stages
        self.nb = [0] * stages

    def finish(self, op: int, mb: int, s: int, t: int) -> None:
        if op == FWD:
            self.fend[s][mb] = t
            self.nf[s] += 1
        else:
            self.bend[s][mb] = t
            self.nb[s] += 1


class Rules:
    """Data dependencies shared by every family: pipeline order in both directions."""

    def __init__(self, stages: int, microbatches: int) -> None:
        self.S, self.N = stages, microbatches

    def forward_ready(self, st: _State, mb: int, s: int, t: int) -> bool:
        return s == 0 or st.fend[s - 1][mb] < t

    def backward_ready(self, st: _State, mb: int, s: int, t: int) -> bool:
        if st.fend[s][mb] >= t:
            return False
        return s == self.S - 1 or st.bend[s + 1][mb] < t


class PDRules(Rules):
    """PipeDream 1F1B: at most `noam` microbatches in flight on stage 0."""

    def __init__(self, stages: int, microbatches: int, noam: int) -> None:
        super().__init__(stages, microbatches)
        self.noam = noam

    def forward_ready(self, st: _State, mb: int, s: int, t: int) -> bool:
        if s == 0:
            # stage 0 decides once per slot, so its counters hold start-of-slot values
            return st.nf[0] - st.nb[0] < self.noam
        return super().forward_ready(st, mb, s, t)


class LocalSGDRules(Rules):
    """Interleaved LocalSGD: trajectory order within a round and the round barrier."""

    def __init__(self, stages: int, microbatches: int, trajectories: int, local_steps: int):
        super().__init__(stages, microbatches)
        self.R, self.round = trajectories, trajectories * local_steps

    def forward_ready(self, st: _State, mb: int, s: int, t: int) -> bool:
        if not super().forward_ready(st, mb, s, t):
            return False
        if mb % self.round >= self.R and st.bend[s][mb - self.R] >= t:
            return False
        first = mb - mb % self.round
        return first == 0 or st.bend[0][first - 1] < t

    def round_end(self, mb: int) -> bool:
        return mb % self.round == self.round - 1 or mb == self.N - 1


class FlushRules(Rules):
    """GPipe-style flushes of `flush` microbatches (flush = 1 is the naive pipeline)."""

    def __init__(self, stages: int, microbatches: int, flush: int) -> None:
        super().__init__(stages, microbatches)
        self.flush = flush

    def forward_ready(self, st: _State, mb: int, s: int, t: int) -> bool:
        first = mb - mb % self.flush
        if s == 0 and first > 0 and st.bend[0][first - 1] >= t:
            return False
        return super().forward_ready(st, mb, s, t)

    def backward_ready(self, st: _State, mb: int, s: int, t: int) -> bool:
        last = min(mb - mb % self.flush + self.flush, self.N) - 1
        if s == self.S - 1 and st.fend[s][last] >= t:
            return False
        return super().backward_ready(st, mb, s, t)


def choose_1f1b(b_ready: bool, f_ready: bool, has_backward: bool, turn_backward: bool) -> int:
    """The 1F1B choice of DESIGN 2.1: returns BWD, FWD or IDLE."""
    if b_ready and (not has_backward or turn_backward or not f_ready):
        return BWD
    if f_ready:
        return FWD
    return IDLE


def make_rules(method: str, stages: int, microbatches: int, *, noam: int = 0,
               trajectories: int = 1, local_steps: int = 1, flush: int = 0) -> Rules:
    """The dependency rules of a schedule family."""
    if method == "pd":
        return PDRules(stages, microbatches, noam or stages)
    if method == "localsgd":
        return LocalSGDRules(stages, microbatches, trajectories, local_steps)
    if method == "gpipe":
        return FlushRules(stages, microbatches, flush or stages)
    if method == "naive":
        return FlushRules(stages, microbatches, 1)
    raise ValueError(f"unknown schedule method {method!r}; allowed: {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- generate

def generate(method: str, stages: int, microbatches: int, *, noam: int = 0,
             trajectories: int = 1, local_steps: int = 1, flush: int = 0) -> Timeline:
    """Run the family's rules slot by slot until the last backward on stage 0 (DESIGN 2.1)."""
    _check_sizes(stages, microbatches)
    rules = make_rules(method, stages, microbatches, noam=noam, trajectories=trajectories,
                       local_steps=local_steps, flush=flush)
    st = _State(stages, microbatches)
    has_b, turn_b = [False] * stages, [False] * stages
    kinds: list[list[int]] = []
    mbs: list[list[int]] = []
    averages: list[int] = []
    t = 0
    while st.nb[0] < microbatches:
        row_k, row_m = [IDLE] * stages, [-1] * stages
        for s in range(stages):
            op, mb = _decide(rules, st, s, t, has_b[s], turn_b[s])
            if op == IDLE:
                continue
            row_k[s], row_m[s] = op, mb
            has_b[s], turn_b[s] = next_turn(op, has_b[s], turn_b[s])
            st.finish(op, mb, s, t)
        if isinstance(rules, LocalSGDRules) and row_k[0] == BWD and rules.round_end(row_m[0]):
            averages.append(t)
        if not any(row_k):   # nothing ran, so nothing ever will: readiness is unchanged
            raise ScheduleError(f"{method} schedule deadlocks at slot {t}: no stage can run; "
                                f"backwards done per stage {st.nb}")
        kinds.append(row_k)
        mbs.append(row_m)
        t += 1
    return Timeline(np.array(kinds, dtype=np.int8).reshape(-1, stages),
                    np.array(mbs, dtype=np.int64).reshape(-1, stages), method, microbatches,
                    trajectories if method == "localsgd" else 1,
                    local_steps if method == "localsgd" else 1,
                    getattr(rules, "noam", 0), getattr(rules, "flush", 0), tuple(averages))


def _check_sizes(stages: int, microbatches: int) -> None:
    if stages < 1:
        raise ValueError(f"stages must be >= 1 (got {stages})")
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1 (got {microbatches})")


def _decide(rules: Rules, st: _State, s: int, t: int, has_b: bool, turn_b: bool
            ) -> tuple[int, int]:
    nf, nb = st.nf[s], st.nb[s]
    f_ready = nf < rules.N and rules.forward_ready(st, nf, s, t)
    b_ready = nb < nf and rules.backward_ready(st, nb, s, t)
    op = choose_1f1b(b_ready, f_ready, has_b, turn_b)
    return op, (nb if op == BWD else nf)


def next_turn(op: int, has_b: bool, turn_b: bool) -> tuple[bool, bool]:
    """(has_backward, turn_backward) after running `op` (DESIGN 2.1)."""
    if op == BWD:
        return True, False
    return has_b, has_b


def timeline_for(method: str, stages: int, microbatches: int, *, noam: int = 0,
                 trajectories: int = 1, local_steps: int = 1, flush: int = 0,
                 budget: int = 0) -> Timeline:
    """A timeline, optionally meeting a slot budget: the smallest N whose timeline reaches
    `budget` slots, truncated at the budget (DESIGN 7). `microbatches` is then ignored."""
    kw = dict(noam=noam, trajectories=trajectories, local_steps=local_steps, flush=flush)
    if budget <= 0:
        return generate(method, stages, microbatches, **kw)
    lo, hi = 1, max(1, budget // 2)
    while generate(method, stages, hi, **kw).slots < budget:
        lo, hi = hi + 1, hi * 2
    while lo < hi:   # smallest N with slots >= budget (slots grow with N)
        mid = (lo + hi) // 2
        if generate(method, stages, mid, **kw).slots >= budget:
            hi = mid
        else:
            lo = mid + 1
    return generate(method, stages, lo, **kw).truncate(budget)


# ----------------------------------------------------------------------------- validate

def validate(tl: Timeline) -> None:
    """Check every op against the family's dependency rules; raise ScheduleError if broken.

    Checks: in-order ops per stage, dependencies at the slot the op runs, and (unless the
    timeline was truncated at a budget) that every (mb, stage) has exactly one forward and
    one backward.
    """
    rules = make_rules(tl.method, tl.stages, tl.microbatches, noam=tl.noam,
                       trajectories=tl.trajectories, local_steps=tl.local_steps, flush=tl.flush)
    st = _State(tl.stages, tl.microbatches)
    for t in range(tl.slots):
        for s in range(tl.stages):
            op, mb = int(tl.kind[t, s]), int(tl.mb[t, s])
            if op == IDLE:
                continue
            problem = _op_problem(rules, st, op, mb, s, t)
            if problem:
                raise ScheduleError(f"slot {t}, stage {s}: {problem}\n{mark(tl, t, s)}")
            st.finish(op, mb, s, t)
    if not tl.truncated and any(n != tl.microbatches for n in st.nf + st.nb):
        raise ScheduleError(f"timeline ends with unfinished microbatches: forwards per stage "
                            f"{st.nf}, backwards {st.nb}, expected {tl.microbatches} each")


def _op_problem(rules: Rules, st: _State, op: int, mb: int, s: int, t: int) -> str:
    expected = st.nf[s] if op == FWD else st.nb[s]
    name = "F" if op == FWD else "B"
    if mb != expected:
        return f"{name}{mb} out of order (next {name} on this stage is {name}{expected})"
    if op == BWD and mb >= st.nf[s]:
        return f"B{mb} before F{mb} on this stage"
    if mb >= rules.N:
        return f"microbatch {mb} outside 0..{rules.N - 1}"
    ready = rules.forward_ready if op == FWD else rules.backward_ready
    if not ready(st, mb, s, t):
        return f"{name}{mb} is not ready (its dependencies finish later)"
    return ""


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
