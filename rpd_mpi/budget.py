"""The memory a run needs, estimated from its configuration before anything is allocated.

`estimate` adds up a run's large allocations in parts, each named by the flag that drives
it: the timeline grid (T x S cells while it is generated), the update rows, delay matrix and
events (K x S), the data X (n x d float64 and its per-stage copies), the blocks of every model
copy (R x G), the weight stash (up to the in-flight depth per stage), RPD's block histories
((delta + 1) versions), the char LM's activations in flight and, on MPI ranks, the snapshots
rank 0 assembles. `check_memory` compares the total with what this machine has available
(the smallest of /proc/meminfo MemAvailable, the process's cgroup v2 limit and RLIMIT_AS) or
with `--max-memory GIB` (0 = no check), and raises ConfigError naming the largest part's flag.

The figures are rough upper bounds (Python objects and temporaries included), good to a small
factor: enough to refuse a run that cannot fit before it fills a shared machine.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.records import EVENT_DTYPE

GIB = 2 ** 30
F8 = 8                                  # bytes of a float64 / int64
CELL = 64                               # a timeline cell while generated (Python lists)
UPDATE = 512 + 16                       # an update: the engine's row, the ledger's columns
EVENT = 64 + EVENT_DTYPE.itemsize       # an executed op
VOCAB = 128                             # char LM vocabulary assumed before the text is read


@dataclass(frozen=True)
class Part:
    """One share of the estimate: the flag that drives it, that flag's value, bytes."""

    flag: str
    value: object
    what: str
    bytes: int


@dataclass(frozen=True)
class Estimate:
    """Every part of a run's memory on this machine (`ranks` processes of it)."""

    parts: tuple[Part, ...]
    ranks: int

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def largest(self) -> Part:
        return max(self.parts, key=lambda p: p.bytes)


def size_text(n: float) -> str:
    """Bytes as '512 MiB', '22.8 GiB', '59.6 TiB'."""
    for unit, scale in (("PiB", 2 ** 50), ("TiB", 2 ** 40), ("GiB", GIB), ("MiB", 2 ** 20)):
        if n >= scale or unit == "MiB":
            return f"{n / scale:.3g} {unit}"
    return ""


def slots_of(method: str, S: int, N: int, noam: int = 0, R: int = 1, H: int = 1,
             flush: int = 0) -> int:
    """An upper estimate of the slots of a timeline with N microbatches (docs/DESIGN.md 2)."""
    if method in ("pd", "rpd"):
        depth = min(noam or S, S)       # fewer than S in flight: a wave of 2S slots each
        return 2 * N + 2 * S if depth == S else -(-N // depth) * 2 * S + 2 * S
    if method == "localsgd":
        return 2 * N + 2 * S * (-(-N // (R * H)) + 1)
    F = (flush or S) if method == "gpipe" else 1
    return -(-N // F) * (2 * F + 2 * S)


def _sizes(cfg: RunConfig) -> tuple[int, int, int]:
    """(slots generated, microbatches, block updates K) of the run's schedule."""
    sch = cfg.schedule
    fixed = not sch.budget_slots or sch.budget_mode == "fixed"    # the given N runs
    N = sch.microbatches if fixed else max(1, sch.budget_slots // 2)
    T = slots_of(sch.method, sch.stages, N, sch.noam, sch.trajectories, sch.local_steps,
                 sch.flush)
    K = N * sch.stages
    if sch.method == "rpd" and cfg.rpd.updates:
        K = cfg.rpd.updates
    return T, N, K


def _schedule_flag(cfg: RunConfig, K: int) -> tuple[str, int]:
    sch = cfg.schedule
    if sch.method == "rpd" and cfg.rpd.updates and K > sch.microbatches * sch.stages:
        return "--updates", K
    first = ("--budget-slots", sch.budget_slots) if sch.budget_slots and \
        sch.budget_mode != "fixed" else \
        ("--microbatches", sch.microbatches)
    return max((first, ("--stages", sch.stages), ("--groups", sch.groups)),
               key=lambda fv: fv[1])


def _schedule(cfg: RunConfig, ranks: int) -> Part:
    """Timeline cells, update rows and delays, events (every group in the simulator)."""
    T, N, K = _sizes(cfg)
    S, G = cfg.schedule.stages, cfg.schedule.groups
    grid = T * S * CELL * ranks
    records = K * G * (UPDATE + 3 * S * F8) + 2 * N * S * G * EVENT
    flag, value = _schedule_flag(cfg, K)
    return Part(flag, value, "timeline, update rows and delays", grid + records)


def _model_size(cfg: RunConfig, data_shape: tuple[int, int] | None
                ) -> tuple[int, tuple[str, object]]:
    """(parameters d, (the flag that sets d, its value))."""
    obj, S = cfg.objective, cfg.schedule.stages
    if obj.name == "charlm":
        c, C = obj.width, obj.context
        params = (obj.layers or max(S - 2, 1)) * (12 * c * c + 13 * c) + \
            (2 * VOCAB + C + 2) * c
        return params, ("--width", c)
    if data_shape is not None:
        return data_shape[1], ("--data", obj.data)
    return obj.dim, ("--dim", obj.dim)


def _data(cfg: RunConfig, data_shape: tuple[int, int] | None, ranks: int) -> Part:
    """X with its per-stage and per-batch copies, the Gram matrix for L, solver temporaries
    (every MPI rank builds the whole model)."""
    obj = cfg.objective
    if obj.name == "charlm":
        chars = os.path.getsize(obj.data) if obj.data and os.path.isfile(obj.data) else 16384
        return Part("--data" if obj.data else "--context", obj.data or obj.context,
                    "text", chars * 16 * ranks)
    n, d = data_shape if data_shape is not None else (obj.examples, obj.dim)
    small = min(n, d)
    solver = d * d * 2 if obj.name in ("tridiag", "logistic") else 0
    total = (4 * n * d + 2 * small * small + solver) * F8 * ranks
    if data_shape is not None:
        return Part("--data", obj.data, "data X", total)
    flag, value = ("--examples", n) if n >= d else ("--dim", d)
    return Part(flag, value, "data X", total)


def _depth(cfg: RunConfig) -> tuple[int, str, object]:
    """(microbatches in flight per stage, the flag that sets it, its value)."""
    sch = cfg.schedule
    if sch.method == "localsgd":
        return min(sch.microbatches, sch.trajectories), "--trajectories", sch.trajectories
    if sch.method == "gpipe":
        return sch.flush or sch.stages, "--flush" if sch.flush else "--stages", \
            sch.flush or sch.stages
    if sch.method == "naive":
        return 1, "--stages", sch.stages
    return sch.noam or sch.stages, "--noam" if sch.noam else "--stages", sch.noam or sch.stages


def _weights(cfg: RunConfig, d: int, size_flag: tuple[str, object]) -> list[Part]:
    """Blocks of every copy, the stash, RPD's histories."""
    sch = cfg.schedule
    copies = sch.trajectories * sch.groups
    flag = max((("--trajectories", sch.trajectories), ("--groups", sch.groups)),
               key=lambda fv: fv[1]) if copies > 1 else size_flag
    parts = [Part(flag[0], flag[1], "blocks of every model copy", (copies + 3) * d * F8)]
    depth, dflag, dvalue = _depth(cfg)
    if sch.method == "rpd":
        hflag, hvalue = ("--delta", cfg.rpd.delta) if cfg.rpd.delta is not None else \
            ("--stages", sch.stages)
        parts.append(Part(hflag, hvalue, "block histories", (cfg.delta + 1) * d * F8))
    else:
        parts.append(Part(dflag, dvalue, "weight stash", depth * sch.groups * d * F8))
    return parts


def _activations(cfg: RunConfig) -> Part:
    """Char LM caches of every microbatch in flight on every stage (block-linear: none)."""
    obj, sch = cfg.objective, cfg.schedule
    if obj.name != "charlm":
        return Part("--batch-size", obj.batch_size, "activations", 0)
    c, C, B = obj.width, obj.context, obj.batch_size
    per = B * C * (24 * c + 3 * obj.heads * C + 2 * VOCAB) * F8
    depth = 1 if sch.method == "rpd" else _depth(cfg)[0]
    if sch.microbatches:                 # never more in flight than the run has
        depth = min(depth, sch.microbatches)
    flag, value = max((("--context", 3 * obj.heads * C), ("--width", 24 * c),
                       ("--batch-size", B)), key=lambda fv: fv[1])
    shown = {"--context": C, "--width": c, "--batch-size": B}[flag]
    units = obj.layers + 2 if obj.layers else sch.stages    # each unit caches its input
    return Part(flag, shown, "activations in flight", per * depth * units * sch.groups)


def _snapshots(cfg: RunConfig, d: int, ranks: int) -> Part:
    """MPI: block snapshots every --eval-every updates, all read by rank 0 to assemble."""
    _, _, K = _sizes(cfg)
    rows = 0 if ranks <= 1 else -(-K // cfg.eval_every) * cfg.schedule.trajectories
    row = (d // cfg.schedule.stages + 4) * F8
    return Part("--eval-every", cfg.eval_every, "snapshots", rows * row)


def estimate(cfg: RunConfig, data_shape: tuple[int, int] | None = None, ranks: int = 1
             ) -> Estimate:
    """The memory of `cfg` on this machine: the simulator (`ranks` = 1) or `ranks` MPI
    processes of one job; `data_shape` = (n, d) of a --data file when known."""
    d, size_flag = _model_size(cfg, data_shape)
    parts = [_schedule(cfg, ranks), _data(cfg, data_shape, ranks),
             *_weights(cfg, d, size_flag), _activations(cfg), _snapshots(cfg, d, ranks)]
    return Estimate(tuple(parts), ranks)


def check_memory(cfg: RunConfig, data_shape: tuple[int, int] | None = None,
                 ranks: int = 1) -> None:
    """ConfigError naming the largest part's flag when `cfg` would not fit in memory."""
    if cfg.max_memory == 0:
        return
    if cfg.max_memory is not None:
        limit, source = int(cfg.max_memory * GIB), "allowed by --max-memory"
    else:
        found = available()
        if found is None:
            return
        limit, source = found
    est = estimate(cfg, data_shape, ranks)
    if est.total <= limit:
        return
    part = est.largest
    where = f" on this node ({ranks} processes)" if ranks > 1 else ""
    raise ConfigError(part.flag, f"the run needs about {size_text(est.total)} of memory{where} "
                                 f"({part.what}: {size_text(part.bytes)}), more than the "
                                 f"{size_text(limit)} {source}; make it smaller or set "
                                 f"--max-memory GIB (0 = no check) (got {part.value})")


def timeline_bytes(method: str, S: int, N: int, noam: int = 0, R: int = 1, H: int = 1,
                   flush: int = 0) -> int:
    """A schedule alone (`rpd-mpi schedule`, `delays`, the tools): its grid while generated
    and its delay statistics (K x S)."""
    T = slots_of(method, S, N, noam, R, H, flush)
    return T * S * CELL + N * S * (UPDATE + 3 * S * F8)


def check_timeline(flag: str, value: object, method: str, S: int, N: int, noam: int = 0,
                   R: int = 1, H: int = 1, flush: int = 0) -> None:
    """ConfigError naming `flag` when a schedule alone would not fit in memory."""
    need, found = timeline_bytes(method, S, N, noam, R, H, flush), available()
    if found is not None and need > found[0]:
        raise ConfigError(flag, f"the schedule needs about {size_text(need)} of memory, more "
                                f"than the {size_text(found[0])} {found[1]} (got {value})")


def available() -> tuple[int, str] | None:
    """(bytes, where that figure comes from) this process may still allocate, or None when
    the platform says nothing."""
    found = [x for x in (_meminfo(), _cgroup(), _rlimit()) if x is not None]
    return min(found, key=lambda x: x[0]) if found else None


def _meminfo() -> tuple[int, str] | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available (MemAvailable)"
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup() -> tuple[int, str] | None:
    """The process's cgroup v2 memory.max minus memory.current (a Slurm job's limit)."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as f:
            path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        with open(os.path.join(base, "memory.max"), encoding="ascii") as f:
            text = f.read().strip()
        if text == "max":
            return None
        with open(os.path.join(base, "memory.current"), encoding="ascii") as f:
            used = int(f.read().strip())
        return max(0, int(text) - used), "left in this cgroup (memory.max)"
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def _rlimit() -> tuple[int, str] | None:
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return None
    return soft, "allowed by the address-space limit (ulimit -v)"
