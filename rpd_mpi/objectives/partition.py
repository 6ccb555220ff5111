"""Partitions of a model's units over pipeline stages, and `--partition auto` (docs/DESIGN.md 3.5).

A partition is a tuple of unit counts, one per stage, each >= 1, summing to the number of
units; stage s holds the contiguous units [sum(counts[:s]), sum(counts[:s+1])). Owns:

- `even_partition` (the default: counts as equal as possible, the first stages one more),
  `check_partition` (ValueError saying what is wrong), `bounds`;
- `best_partition`: the contiguous partition minimising the slowest stage's time, by dynamic
  programming over (units placed, stages used); ties go to the lexicographically smallest
  counts, so every process that runs it on the same costs gets the same partition;
- `predicted_utilization`: the busy fraction of each stage of a PD run of N microbatches
  whose stages take t_s per microbatch (forward + backward): N t_s / (N max t + sum t - max t),
  the bottleneck paces the steady state, every other stage adds its time once to fill and drain;
- timing (`median_time`) and the per-host profile cache: a JSON file under
  $RPD_MPI_CACHE, else $XDG_CACHE_HOME/rpd_mpi, else ~/.cache/rpd_mpi, keyed by model shape
  and host. `cached_profile` holds an exclusive lock on the file while it measures, so the
  ranks of one node wait for the first one and all read the same numbers.

Pure Python plus the standard library; the model-specific measuring lives with the model
(`rpd_mpi.objectives.charlm.unit_costs`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

Partition = tuple[int, ...]


def even_partition(units: int, stages: int) -> Partition:
    """`units` split into `stages` contiguous runs as equal as possible (first ones longer)."""
    check_sizes(units, stages)
    q, r = divmod(units, stages)
    return tuple(q + 1 if s < r else q for s in range(stages))


def check_sizes(units: int, stages: int) -> None:
    if stages < 1 or units < stages:
        raise ValueError(f"{units} units cannot fill {stages} stages (each stage holds >= 1)")


def check_partition(counts: Sequence[int], units: int, stages: int) -> None:
    """ValueError unless counts has `stages` entries >= 1 summing to `units`."""
    if len(counts) != stages:
        raise ValueError(f"has {len(counts)} entries for {stages} stages")
    if any(c < 1 for c in counts):
        raise ValueError(f"every stage holds at least one unit (got {list(counts)})")
    if sum(counts) != units:
        raise ValueError(f"sums to {sum(counts)} units; the model has {units}")


def bounds(counts: Sequence[int]) -> list[int]:
    """[0, c0, c0 + c1, ...]: stage s holds units bounds[s]:bounds[s + 1]."""
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def stage_times(costs: Sequence[float], counts: Sequence[int]) -> list[float]:
    """Sum of the unit costs each stage holds."""
    b = bounds(counts)
    return [float(sum(costs[b[s]:b[s + 1]])) for s in range(len(counts))]


def best_partition(costs: Sequence[float], stages: int) -> Partition:
    """The contiguous partition of the units (costs in order) over `stages` stages whose
    slowest stage is fastest; among equally good ones the lexicographically smallest."""
    n = len(costs)
    check_sizes(n, stages)
    prefix = [0.0] * (n + 1)
    for i, c in enumerate(costs):
        prefix[i + 1] = prefix[i] + float(c)
    inf = float("inf")
    # worst[k][i]: best bottleneck of units i.. over the last k stages (backwards, so the
    # first stage's count is chosen first and the smallest good count wins ties)
    worst = [[inf] * (n + 1) for _ in range(stages + 1)]
    worst[0][n] = 0.0
    for k in range(1, stages + 1):
        for i in range(n - k, -1, -1):
            worst[k][i] = min(max(prefix[j] - prefix[i], worst[k - 1][j])
                              for j in range(i + 1, n - k + 2))
    counts, i, target = [], 0, worst[stages][0]
    for k in range(stages, 0, -1):
        j = next(j for j in range(i + 1, n - k + 2)
                 if max(prefix[j] - prefix[i], worst[k - 1][j]) <= target)
        counts.append(j - i)
        i = j
    return tuple(counts)


def predicted_utilization(times: Sequence[float], microbatches: int) -> list[float]:
    """Busy fraction of each stage in a PD run of N microbatches (module docstring)."""
    top, total = max(times), sum(times)
    span = microbatches * top + total - top
    return [microbatches * t / span if span > 0 else 0.0 for t in times]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return float(statistics.median(samples))


def cache_file() -> Path:
    """The profile cache of this user (module docstring)."""
    root = os.environ.get("RPD_MPI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "rpd_mpi")
    return Path(root) / "profiles.json"


def profile_key(shape: dict[str, object]) -> str:
    """The cache key of a model shape on this host."""
    return json.dumps({"host": socket.gethostname(), **shape}, sort_keys=True)


def cached_profile(key: str, measure: Callable[[], list[float]]) -> list[float]:
    """The unit costs stored under `key`, or `measure()` stored there first (under the lock)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                table = _read(path)
                if key not in table:
                    table[key] = [float(c) for c in measure()]
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
                    os.replace(tmp, path)
                return [float(c) for c in table[key]]
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError as err:     # the ranks must share one profile: no silent fallback
        raise ValueError(f"--partition auto cannot use the profile cache {path}: {err} (set "
                         f"RPD_MPI_CACHE to a writable folder)") from None


def _read(path: Path) -> dict[str, list[float]]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):       # missing or damaged: measure again
        return {}
    return table if isinstance(table, dict) else {}
