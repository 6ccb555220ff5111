"""The dependency rules of each schedule family, written once (docs/DESIGN.md 2.1-2.4, 2.7).

A `Rules` object answers "is F(mb, s) / B(mb, s) ready at slot t" from the `State` at the
start of the slot; the generator and the validator (`schedule.generate`) and the MPI
runtime's dynamic order all ask the same objects. `choose_1f1b` and `next_turn` are the
per-stage 1F1B choice of docs/DESIGN.md 2.1.
"""

from __future__ import annotations

import numpy as np

from rpd_mpi.records import BWD, FWD, IDLE

NEVER = np.iinfo(np.int64).max // 4   # "not finished yet" slot stamp
METHODS = ("pd", "localsgd", "gpipe", "naive")


class State:
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


def noam_allows(forwards: int, backwards: int, noam: int) -> bool:
    """May stage 0 start another forward? Fewer than NOAM microbatches in flight (started
    forwards minus finished backwards on stage 0; docs/DESIGN.md 2.1)."""
    return forwards - backwards < noam


class Rules:
    """Data dependencies shared by every family: pipeline order in both directions."""

    def __init__(self, stages: int, microbatches: int) -> None:
        self.S, self.N = stages, microbatches

    def forward_ready(self, st: State, mb: int, s: int, t: int) -> bool:
        return s == 0 or st.fend[s - 1][mb] < t

    def backward_ready(self, st: State, mb: int, s: int, t: int) -> bool:
        if st.fend[s][mb] >= t:
            return False
        return s == self.S - 1 or st.bend[s + 1][mb] < t


class PDRules(Rules):
    """PipeDream 1F1B: at most `noam` microbatches in flight on stage 0."""

    def __init__(self, stages: int, microbatches: int, noam: int) -> None:
        super().__init__(stages, microbatches)
        self.noam = noam

    def forward_ready(self, st: State, mb: int, s: int, t: int) -> bool:
        if s == 0:
            # stage 0 decides once per slot, so its counters hold start-of-slot values
            return noam_allows(st.nf[0], st.nb[0], self.noam)
        return super().forward_ready(st, mb, s, t)


class LocalSGDRules(Rules):
    """Interleaved LocalSGD: trajectory order within a round and the round barrier."""

    def __init__(self, stages: int, microbatches: int, trajectories: int, local_steps: int):
        super().__init__(stages, microbatches)
        self.R, self.round = trajectories, trajectories * local_steps

    def forward_ready(self, st: State, mb: int, s: int, t: int) -> bool:
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

    def forward_ready(self, st: State, mb: int, s: int, t: int) -> bool:
        first = mb - mb % self.flush
        if s == 0 and first > 0 and st.bend[0][first - 1] >= t:
            return False
        return super().forward_ready(st, mb, s, t)

    def backward_ready(self, st: State, mb: int, s: int, t: int) -> bool:
        last = min(mb - mb % self.flush + self.flush, self.N) - 1
        if s == self.S - 1 and st.fend[s][last] >= t:
            return False
        return super().backward_ready(st, mb, s, t)


def choose_1f1b(b_ready: bool, f_ready: bool, has_backward: bool, turn_backward: bool) -> int:
    """The 1F1B choice of docs/DESIGN.md 2.1: returns BWD, FWD or IDLE."""
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


def next_turn(op: int, has_b: bool, turn_b: bool) -> tuple[bool, bool]:
    """(has_backward, turn_backward) after running `op` (docs/DESIGN.md 2.1)."""
    if op == BWD:
        return True, False
    return has_b, has_b
