"""`--budget-slots` picks the smallest N reaching the budget from the steady-state slope: the
same N as the old bisection over whole timelines, on a grid of methods, S and budgets."""

from __future__ import annotations

import importlib

import pytest

from rpd_mpi.schedule.generate import generate, smallest_reaching, timeline_for

gen = importlib.import_module("rpd_mpi.schedule.generate")   # the module, not the function


def bisection(method: str, S: int, budget: int, **kw: int) -> int:
    """The search `timeline_for` used before: doubling, then bisection on whole timelines."""
    lo, hi = 1, max(1, budget // 2)
    while generate(method, S, hi, **kw).slots < budget:
        lo, hi = hi + 1, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if generate(method, S, mid, **kw).slots >= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


CASES = [("pd", {}), ("pd", {"noam": 2}), ("localsgd", {"trajectories": 2, "local_steps": 1}),
         ("localsgd", {"trajectories": 4, "local_steps": 5}), ("gpipe", {}),
         ("gpipe", {"flush": 3}), ("naive", {})]


@pytest.mark.parametrize("method,kw", CASES)
@pytest.mark.parametrize("S", [1, 2, 4, 7])
def test_same_microbatches_as_the_bisection(method: str, kw: dict[str, int], S: int) -> None:
    for budget in (1, 2, 3, 5, 8, 13, 21, 40, 77, 150, 331):
        tl = smallest_reaching(method, S, budget, **kw)
        assert tl.microbatches == bisection(method, S, budget, **kw), (method, S, budget)
        assert not tl.truncated and tl.slots >= budget
        assert timeline_for(method, S, 999, budget=budget, **kw).slots == budget


def test_a_right_guess_generates_few_whole_timelines(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = gen.generate

    def counting(method: str, S: int, n: int, **kw: int):
        sizes.append(n)
        return real(method, S, n, **kw)

    monkeypatch.setattr(gen, "generate", counting)
    tl = smallest_reaching("pd", 16, 1230)
    assert tl.microbatches == 600
    big = [n for n in sizes if n > 100]
    assert big == [600, 599] or big == [599, 600], sizes      # the guess and its neighbour


@pytest.mark.parametrize("method,kw", [("pd", {}), ("localsgd", {"trajectories": 16,
                                                                 "local_steps": 5}),
                                       ("gpipe", {})])
def test_paper_budgets_at_16_stages(method: str, kw: dict[str, int]) -> None:
    for budget in (530, 1230, 3180):
        tl = smallest_reaching(method, 16, budget, **kw)
        assert tl.microbatches == bisection(method, 16, budget, **kw), (method, budget)
