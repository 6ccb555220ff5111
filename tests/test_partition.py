"""Partitions of units over stages: the DP equals a brute-force search over every contiguous
partition, `--partition auto` on a charlm with deliberately unequal units picks that optimum
(the unit costs come from the profile cache, written here), the cache is keyed and reused,
predictions, explicit partitions of the block-linear coordinates, and the one-line errors."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rpd_mpi.build import build, partition_attrs
from rpd_mpi.config import ConfigError, ObjectiveConfig, RunConfig, ScheduleConfig
from rpd_mpi.objectives import build_model
from rpd_mpi.objectives.charlm import build_charlm, profile_shape
from rpd_mpi.objectives.partition import (best_partition, cache_file, cached_profile,
                                          even_partition, predicted_utilization, profile_key,
                                          stage_times)


def brute_force(costs: list[float], stages: int) -> tuple[tuple[int, ...], float]:
    """(lexicographically first optimal partition, its bottleneck) over all of them."""
    n, best, arg = len(costs), float("inf"), ()
    for cuts in itertools.combinations(range(1, n), stages - 1):
        counts = tuple(b - a for a, b in zip((0, *cuts), (*cuts, n)))
        top = max(stage_times(costs, counts))
        if top < best:
            best, arg = top, counts
    return arg, best


@pytest.mark.parametrize("seed", range(6))
def test_dp_equals_brute_force_on_unequal_costs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for n in range(1, 10):
        costs = list(rng.choice([0.5, 1.0, 3.0, 7.0], size=n) * rng.uniform(0.5, 2.0, n))
        for stages in range(1, n + 1):
            counts = best_partition(costs, stages)
            want, top = brute_force(costs, stages)
            assert len(counts) == stages and sum(counts) == n and min(counts) >= 1
            assert max(stage_times(costs, counts)) == pytest.approx(top, rel=1e-12)
            assert counts == want


def test_dp_ties_and_simple_cases() -> None:
    assert best_partition([1.0] * 8, 4) == (2, 2, 2, 2)
    assert best_partition([1.0, 5.0, 1.0, 1.0, 1.0, 1.0], 2) == (2, 4)
    assert best_partition([1.0, 1.0, 1.0], 3) == (1, 1, 1)
    assert best_partition([9.0, 1.0, 1.0, 1.0], 2) == (1, 3)
    with pytest.raises(ValueError, match="cannot fill"):
        best_partition([1.0, 1.0], 3)
    assert even_partition(8, 3) == (3, 3, 2) and even_partition(5, 5) == (1,) * 5


def test_predicted_utilization() -> None:
    u = predicted_utilization([1.0, 1.0, 1.0, 1.0], 200)
    assert u == pytest.approx([200 / 203] * 4)        # the ideal N / (N + S - 1)
    u = predicted_utilization([1.0, 2.0], 10)
    assert u == pytest.approx([10 / 21, 20 / 21])


def test_cache_is_keyed_by_shape_and_host_and_reused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPD_MPI_CACHE", str(tmp_path))
    calls: list[int] = []
    key = profile_key({"model": "x", "width": 3})
    assert cached_profile(key, lambda: calls.append(1) or [1.0, 2.0]) == [1.0, 2.0]
    assert cached_profile(key, lambda: calls.append(1) or [5.0]) == [1.0, 2.0]
    assert len(calls) == 1 and cache_file().parent == tmp_path
    other = profile_key({"model": "x", "width": 4})
    assert cached_profile(other, lambda: [3.0]) == [3.0]
    assert len(json.loads(cache_file().read_text())) == 2


def small(stages: int, **kw: object):  # type: ignore[no-untyped-def]
    return build_charlm(stages, width=8, heads=2, context=6, batch_size=3, seed=5, **kw)


def test_auto_partition_of_unequal_units_is_the_brute_force_optimum(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliberately unequal units (a heavy embedding, uneven blocks, a heavy head), planted
    in the profile cache: auto must pick the partition brute force proves optimal."""
    monkeypatch.setenv("RPD_MPI_CACHE", str(tmp_path))
    costs = [6.0, 1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 5.0]                  # 6 blocks
    key = profile_key(profile_shape(small(4, layers=6)))
    assert cached_profile(key, lambda: costs) == costs
    model = small(4, layers=6, partition="auto")
    want, top = brute_force(costs, 4)
    assert model.partition == want and model.unit_costs == costs
    assert top == 6.0 < max(stage_times(costs, even_partition(8, 4))) == 7.0
    attrs = partition_attrs(model, 100)
    assert attrs["partition"] == list(want) and attrs["unit_seconds"] == costs
    assert max(attrs["predicted_stage_seconds"]) == top
    assert attrs["predicted_stage_utilization"] == predicted_utilization(
        stage_times(costs, want), 100)
    assert attrs["stage_parameters"] == model.stage_parameters()


def test_auto_profiles_this_machine_once(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPD_MPI_CACHE", str(tmp_path))
    model = small(2, layers=3, partition="auto")
    costs = model.unit_costs
    assert costs is not None and len(costs) == 5 and min(costs) > 0
    assert costs[1] == costs[2] == costs[3]                 # the blocks are alike
    assert model.partition == best_partition(costs, 2)
    again = small(2, layers=3, partition="auto")
    assert again.unit_costs == costs                        # read from the cache
    assert small(2, layers=3, partition="auto", dtype="float32").unit_costs != costs


def test_explicit_linear_partition() -> None:
    model = build_model("quadratic", 3, dim=10, examples=20, batch_size=5, seed=0,
                        partition=(1, 6, 3))
    assert [sl.stop - sl.start for sl in model.slices] == [1, 6, 3]
    assert model.partition == (1, 6, 3)
    even = build_model("quadratic", 3, dim=10, examples=20, batch_size=5, seed=0)
    w = np.random.default_rng(0).standard_normal(10)
    assert model.full_objective(w) == pytest.approx(even.full_objective(w), rel=1e-12)
    with pytest.raises(ValueError, match="sums to 9"):
        build_model("quadratic", 3, dim=10, examples=20, batch_size=5, seed=0,
                    partition=(1, 5, 3))


def config(**objective: object) -> RunConfig:
    stages = int(objective.pop("stages", 4))  # type: ignore[call-overload]
    return RunConfig(schedule=ScheduleConfig(stages=stages),
                     objective=ObjectiveConfig(**objective))  # type: ignore[arg-type]


@pytest.mark.parametrize("kw,flag,text", [
    ({"name": "charlm", "layers": 6, "partition": "2,2,2"}, "--partition", "3 entries"),
    ({"name": "charlm", "layers": 6, "partition": "2,2,2,3"}, "--partition", "sums to 9"),
    ({"name": "charlm", "layers": 6, "partition": "2,0,3,3"}, "--partition", "integers >= 1"),
    ({"name": "charlm", "layers": 6, "partition": "two"}, "--partition", "auto or a comma"),
    ({"name": "charlm", "layers": 1}, "--stages", "<= --layers + 2 = 3"),
    ({"name": "charlm", "stages": 2}, "--stages", "needs --layers"),
    ({"name": "charlm", "dtype": "float16"}, "--dtype", "float64, float32"),
    ({"name": "quadratic", "dtype": "float32"}, "--dtype", "does not use it"),
    ({"name": "quadratic", "layers": 3}, "--layers", "does not use it"),
    ({"name": "quadratic", "partition": "auto"}, "--partition", "auto profiles charlm"),
    ({"name": "quadratic", "dim": 8, "partition": "1,1,1,1"}, "--partition", "sums to 4"),
])
def test_bad_partition_settings_name_the_flag(kw: dict[str, object], flag: str,
                                              text: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(**kw)
    assert err.value.flag == flag and text in err.value.message


def test_config_builds_partitioned_models(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RPD_MPI_CACHE", str(tmp_path))
    lm = build(config(name="charlm", stages=3, layers=4, partition="1,4,1", width=8,
                      context=6, batch_size=3))
    assert lm.partition == (1, 4, 1) and lm.stages == 3   # type: ignore[attr-defined]
    lin = build(config(name="quadratic", stages=2, dim=8, partition="5,3"))
    assert [sl.stop - sl.start for sl in lin.slices] == [5, 3]


def test_cli_one_line_error_exit_2(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", "simulate", "--objective", "charlm",
                          "--stages", "4", "--layers", "6", "--partition", "2,2,2",
                          "--out", str(tmp_path / "x.h5")], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and not (tmp_path / "x.h5").exists()
    assert res.stderr.strip() == "rpd-mpi: error: --partition: has 3 entries for --stages 4"


def test_unwritable_cache_is_a_clear_error(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RPD_MPI_CACHE", str(blocker / "cache"))
    with pytest.raises(ValueError, match="RPD_MPI_CACHE"):
        cached_profile("k", lambda: [1.0])
