"""Schedule generators, the validator and the text form (docs/DESIGN.md 2.1, 2.4, 2.7)."""

import numpy as np
import pytest

from rpd_mpi.schedule.programs import stage_program
from rpd_mpi.schedule.text import parse, render
from rpd_mpi.records import AVG, BWD, FWD
from rpd_mpi.schedule.generate import generate, timeline_for, validate
from rpd_mpi.schedule.timeline import ScheduleError, Timeline


def _ops(tl: Timeline, s: int) -> list[str]:
    return [f"{'F' if k == FWD else 'B'}{m}" for k, m in zip(tl.kind[:, s], tl.mb[:, s]) if k]


@pytest.mark.parametrize("S", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize("N", [1, 3, 10, 37])
def test_pd_length_is_2n_plus_2s_minus_2(S: int, N: int) -> None:
    tl = generate("pd", S, N)
    assert tl.slots == 2 * N + 2 * S - 2
    validate(tl)


def test_pd_stage_order_follows_the_rule_not_a_textbook_warmup() -> None:
    tl = generate("pd", 4, 8)
    assert _ops(tl, 1)[:8] == ["F0", "F1", "F2", "F3", "B0", "B1", "F4", "B2"]
    assert _ops(tl, 3)[:4] == ["F0", "B0", "F1", "B1"]


def test_every_op_once_in_order() -> None:
    for tl in (generate("pd", 5, 23), generate("localsgd", 3, 20, trajectories=3, local_steps=2),
               generate("gpipe", 3, 10), generate("naive", 4, 3)):
        for s in range(tl.stages):
            f = [m for k, m in zip(tl.kind[:, s], tl.mb[:, s]) if k == FWD]
            b = [m for k, m in zip(tl.kind[:, s], tl.mb[:, s]) if k == BWD]
            assert f == list(range(tl.microbatches)) and b == f


def test_noam_limits_microbatches_in_flight() -> None:
    for noam in (1, 2, 3, 6):
        tl = generate("pd", 4, 20, noam=noam)
        inflight = np.cumsum(tl.kind[:, 0] == FWD) - np.cumsum(tl.kind[:, 0] == BWD)
        assert inflight.max() == noam
        validate(tl)


def test_localsgd_round_length_and_barrier() -> None:
    S, H = 4, 3
    tl = generate("localsgd", S, S * H * 2, trajectories=S, local_steps=H)
    assert tl.averages[0] == 2 * S * (H + 1) - 3          # last slot of round one
    assert tl.slots == 2 * (2 * S * (H + 1) - 2)
    fslot, bslot = tl.op_slots(FWD), tl.op_slots(BWD)
    first_of_round2 = S * H
    assert fslot[first_of_round2:, 0].min() > bslot[first_of_round2 - 1, 0]   # barrier
    # same trajectory, previous local step: its backward finished earlier on that stage
    for mb in range(S, S * H):
        assert (fslot[mb] > bslot[mb - S]).all()


def test_gpipe_flushes_and_naive_has_one_microbatch_in_flight() -> None:
    tl = generate("gpipe", 3, 6)
    fslot, bslot = tl.op_slots(FWD), tl.op_slots(BWD)
    assert bslot[:3, 2].min() > fslot[2, 2]                 # backwards after the flush's F
    assert fslot[3, 0] > bslot[2, 0]                        # next flush after the last B
    naive = generate("naive", 3, 4)
    assert naive.slots == 4 * 2 * 3


def test_validator_rejects_a_broken_timeline_and_marks_the_cell() -> None:
    tl = generate("pd", 3, 4)
    kind, mb = tl.kind.copy(), tl.mb.copy()
    t = int(np.nonzero(kind[:, 1] == FWD)[0][0])           # F0 on stage 1 ...
    kind[t - 1, 1], mb[t - 1, 1] = kind[t, 1], mb[t, 1]     # ... moved one slot earlier
    kind[t, 1], mb[t, 1] = 0, -1
    bad = Timeline(kind, mb, "pd", 4, noam=3)
    with pytest.raises(ScheduleError) as err:
        validate(bad)
    assert f"slot {t - 1}, stage 1" in str(err.value) and "[F0]" in str(err.value)


def test_validator_rejects_exceeding_noam() -> None:
    tl = generate("pd", 2, 6, noam=2)
    loose = Timeline(tl.kind, tl.mb, "pd", 6, noam=1)
    with pytest.raises(ScheduleError):
        validate(loose)


def test_text_form_round_trips() -> None:
    for tl in (generate("pd", 4, 9), generate("localsgd", 3, 12, trajectories=3, local_steps=2)):
        back = parse(render(tl))
        assert (back.kind == tl.kind).all() and (back.mb == tl.mb).all()
        assert back.averages == tl.averages and back.method == tl.method
        validate(back)


def test_stage_program_has_averages_after_round_ends() -> None:
    tl = generate("localsgd", 2, 8, trajectories=2, local_steps=2)
    prog = stage_program(tl, 1)
    assert (prog["op"] == AVG).sum() == 2
    assert prog["op"][-1] == AVG
    assert (np.diff(prog["slot"]) >= 0).all()
    assert len(prog) == 2 * 8 + 2


def test_budget_picks_smallest_n_reaching_it() -> None:
    tl = timeline_for("pd", 16, 0, budget=1230)
    assert tl.slots == 1230 and tl.microbatches == 600
    tl = timeline_for("localsgd", 4, 0, trajectories=4, local_steps=2, budget=50)
    assert tl.slots == 50
    assert generate("localsgd", 4, tl.microbatches - 1, trajectories=4, local_steps=2).slots < 50


def test_validator_knows_truncated_from_incomplete() -> None:
    tl = generate("pd", 4, 12)
    validate(tl.truncate(8))                       # a budget cut is valid
    kind, mb = tl.kind.copy(), tl.mb.copy()
    last = int(np.nonzero(kind[:, 0] == BWD)[0][-1])
    kind[last, 0], mb[last, 0] = 0, -1             # the final backward is missing
    with pytest.raises(ScheduleError, match="unfinished"):
        validate(Timeline(kind, mb, "pd", 12, noam=4))
    back = parse(render(tl.truncate(8)))
    assert back.truncated and back.slots == 8
