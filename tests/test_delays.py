"""Global delays and local staleness (docs/DESIGN.md 2.3), against the closed forms and brute force."""

import numpy as np
import pytest

from rpd_mpi.schedule.delays import delay_stats, pd_steady_max, update_order
from rpd_mpi.records import BWD, FWD
from rpd_mpi.schedule.generate import generate


@pytest.mark.parametrize("S", list(range(2, 65)))
def test_steady_max_delay_is_s_squared_minus_half_s(S: int) -> None:
    stats = delay_stats(generate("pd", S, 10 * S))
    assert stats["steady_max"] == (2 * S * S - S) // 2 == pd_steady_max(S)


def test_known_values_and_startup_transient() -> None:
    assert [pd_steady_max(S) for S in (4, 8, 16)] == [14, 60, 248]
    assert delay_stats(generate("pd", 4, 40))["startup_max"] == 16


def _brute_force(tl):
    """Obvious loops over the grid: the definition of docs/DESIGN.md 2.3, written out."""
    order = [(t, s) for t in range(tl.slots) for s in range(tl.stages) if tl.kind[t, s] == BWD]
    fslot = {(int(tl.mb[t, s]), s): t for t in range(tl.slots) for s in range(tl.stages)
             if tl.kind[t, s] == FWD}
    rows, stale = [], []
    for k, (t, s) in enumerate(order):
        m = int(tl.mb[t, s])
        row = []
        for sp in range(tl.stages):
            tf = fslot[(m, sp)]
            j = sum(1 for (t2, s2) in order if t2 < tf or (t2 == tf and s2 < sp))
            row.append(k - j)
        rows.append(row)
        stale.append(sum(1 for (t2, s2) in order if s2 == s and fslot[(m, s)] < t2 < t))
    return np.array(rows), np.array(stale)


@pytest.mark.parametrize("S,N", [(2, 5), (3, 7), (4, 12), (5, 9)])
def test_delays_equal_the_definition(S: int, N: int) -> None:
    tl = generate("pd", S, N)
    order = update_order(tl)
    rows, stale = _brute_force(tl)
    assert (order.delays == rows).all()
    assert (order.local_staleness == stale).all()


def test_local_staleness_is_classical_pipedream_in_steady_state() -> None:
    S = 6
    order = update_order(generate("pd", S, 10 * S))
    half = order.stage.size // 2
    for s in range(S):
        assert order.local_staleness[half:][order.stage[half:] == s].max() == S - 1 - s


def test_localsgd_has_no_local_staleness() -> None:
    tl = generate("localsgd", 4, 40, trajectories=4, local_steps=5)
    assert update_order(tl).local_staleness.max() == 0
    assert delay_stats(tl)["steady_max_local_staleness"] == 0
