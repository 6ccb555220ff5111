"""Timeline generators and the validator (docs/DESIGN.md 2).

`generate` runs a family's `Rules` slot by slot until the last backward on stage 0;
`timeline_for` adds a slot budget (`smallest_reaching`: the smallest N reaching it, guessed
from one round's slots or PD's steady-state slope and checked on two whole timelines);
`validate` replays a timeline against the same rules and raises `ScheduleError` with the grid
around the bad cell marked.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rpd_mpi.records import BWD, FWD, IDLE
from rpd_mpi.schedule.rules import LocalSGDRules, Rules, State, choose_1f1b, make_rules, next_turn
from rpd_mpi.schedule.text import mark
from rpd_mpi.schedule.timeline import ScheduleError, Timeline


def generate(method: str, stages: int, microbatches: int, *, noam: int = 0,
             trajectories: int = 1, local_steps: int = 1, flush: int = 0) -> Timeline:
    """Run the family's rules slot by slot until the last backward on stage 0
    (docs/DESIGN.md 2.1)."""
    _check_sizes(stages, microbatches)
    rules = make_rules(method, stages, microbatches, noam=noam, trajectories=trajectories,
                       local_steps=local_steps, flush=flush)
    st = State(stages, microbatches)
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


def _decide(rules: Rules, st: State, s: int, t: int, has_b: bool, turn_b: bool
            ) -> tuple[int, int]:
    nf, nb = st.nf[s], st.nb[s]
    f_ready = nf < rules.N and rules.forward_ready(st, nf, s, t)
    b_ready = nb < nf and rules.backward_ready(st, nb, s, t)
    op = choose_1f1b(b_ready, f_ready, has_b, turn_b)
    return op, (nb if op == BWD else nf)


def timeline_for(method: str, stages: int, microbatches: int, *, noam: int = 0,
                 trajectories: int = 1, local_steps: int = 1, flush: int = 0,
                 budget: int = 0) -> Timeline:
    """A timeline, optionally meeting a slot budget: the smallest N whose timeline reaches
    `budget` slots, truncated at the budget (docs/DESIGN.md 7). `microbatches` is then ignored."""
    kw = dict(noam=noam, trajectories=trajectories, local_steps=local_steps, flush=flush)
    if budget <= 0:
        return generate(method, stages, microbatches, **kw)
    return smallest_reaching(method, stages, budget, **kw).truncate(budget)


def period(method: str, stages: int, *, noam: int = 0, trajectories: int = 1,
           local_steps: int = 1, flush: int = 0) -> int:
    """Microbatches after which a family's steady state repeats: a LocalSGD round, a GPipe
    flush, a PD wave of --noam (< S) microbatches; 1 otherwise."""
    if method == "localsgd":
        return max(1, trajectories * local_steps)
    if method == "gpipe":
        return flush or stages
    if method == "pd" and 0 < noam < stages:
        return noam
    return 1


BARRIER_FAMILIES = ("localsgd", "gpipe", "naive")


def smallest_reaching(method: str, stages: int, budget: int, *, noam: int = 0,
                      trajectories: int = 1, local_steps: int = 1, flush: int = 0
                      ) -> Timeline:
    """The whole (untruncated) timeline of the smallest N whose timeline has >= `budget`
    slots (slots grow with N), from a guess checked on whole timelines.

    The guess: LocalSGD, GPipe and naive start a round (flush) only when stage 0 has
    finished the previous one, so N = k P + r microbatches take k times the slots of one
    round of P plus the slots of r alone: the guess comes from timelines of at most P
    microbatches. PD grows by a fixed number of slots per `period` in steady state: two
    small timelines give the slope. The guess N0 is then checked, and corrected if needed,
    on whole timelines: N0 reaches the budget and N0 - 1 does not. A right guess costs two
    whole timelines (the old bisection: ~13)."""
    kw = dict(noam=noam, trajectories=trajectories, local_steps=local_steps, flush=flush)
    seen: dict[int, Timeline] = {}

    def slots(n: int) -> int:
        if n not in seen:
            seen[n] = generate(method, stages, n, **kw)
        return seen[n].slots

    P = period(method, stages, **kw)
    if method in BARRIER_FAMILIES:
        P = 1 if method == "naive" else P
        rounds = -(-budget // slots(P)) - 1            # full rounds short of the budget
        rest = budget - rounds * slots(P)              # 0 < rest <= slots of one round
        guess = rounds * P + _smallest(lambda r: slots(r) >= rest, 1, P)
    else:
        n1 = P * max(2, -(-2 * stages // P))           # past the start-up transient
        n2 = n1 + P * max(1, -(-stages // P))
        per = max(slots(n2) - slots(n1), 1) / (n2 - n1)
        guess = max(1, n1 + int(np.ceil((budget - slots(n1)) / per)))
    lo, hi = _bracket(lambda n: slots(n) >= budget, guess)
    N = _smallest(lambda n: slots(n) >= budget, lo, hi)
    slots(N)
    return seen[N]


def _smallest(reaches: Callable[[int], bool], lo: int, hi: int) -> int:
    """The smallest n in [lo, hi] with `reaches(n)` (monotone; `reaches(hi)` holds)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _bracket(reaches: Callable[[int], bool], guess: int) -> tuple[int, int]:
    """(lo, hi) with the smallest n satisfying `reaches` in [lo, hi], searched outward from
    `guess` (a right guess: `reaches(guess)` and not `reaches(guess - 1)`, lo == hi)."""
    if reaches(guess):
        if guess == 1 or not reaches(guess - 1):
            return guess, guess
        step, hi = 2, guess - 1
        while hi - step >= 1 and reaches(hi - step):
            hi, step = hi - step, step * 2
        return max(1, hi - step + 1), hi
    step, lo = 1, guess + 1
    while not reaches(lo + step - 1):
        lo, step = lo + step, step * 2
    return lo, lo + step - 1


def validate(tl: Timeline) -> None:
    """Check every op against the family's dependency rules; raise ScheduleError if broken.

    Checks: in-order ops per stage, dependencies at the slot the op runs, and (unless the
    timeline was truncated at a budget) that every (mb, stage) has exactly one forward and
    one backward.
    """
    rules = make_rules(tl.method, tl.stages, tl.microbatches, noam=tl.noam,
                       trajectories=tl.trajectories, local_steps=tl.local_steps, flush=tl.flush)
    st = State(tl.stages, tl.microbatches)
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


def _op_problem(rules: Rules, st: State, op: int, mb: int, s: int, t: int) -> str:
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
