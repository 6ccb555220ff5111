"""The run configuration: one frozen dataclass tree, validated at construction.

Every invalid value raises `ConfigError(flag, message)` naming the command-line flag and the
allowed values, so that every rank can validate identically before any message is sent.
`RunConfig.to_dict()` is what each ledger stores verbatim; `RunConfig.from_dict` reads it
back (and reads TOML config files, whose keys are the section/field names below);
`toml_text` writes such a tree as TOML (what `--print-config` prints).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from rpd_mpi.schedule.delays import pd_steady_max

METHODS = ("pd", "rpd", "localsgd", "gpipe", "naive")
OBJECTIVES = ("quadratic", "tridiag", "logistic", "charlm")
DELAY_SOURCES = ("uniform", "max", "zero", "pd", "ledger")
ORDERS = ("static", "dynamic")
DEVICES = ("cpu", "cuda")
TRANSPORTS = ("staged", "direct", "ipc")
WAITS = ("auto", "spin", "polite")
DTYPES = ("float64", "float32")
#: How a slot budget T picks the run (docs/DESIGN.md 2): `smallest` = the smallest N whose
#: timeline reaches T, cut at T; `fixed` = the given --microbatches N, cut at T (the paper's
#: E3/E4); `untruncated` = the smallest N reaching T, run to its end (the paper's E5).
BUDGET_MODES = ("smallest", "fixed", "untruncated")
_FAULT = re.compile(r"(raise|stall):\d+:\d+")


class ConfigError(ValueError):
    """A bad configuration value; `flag` names the command-line flag (or file, or TOML key).

    The message is kept to one line (newlines and runs of spaces collapse), so that every
    printer of it prints exactly one line."""

    def __init__(self, flag: str, message: str) -> None:
        self.flag, self.message = flag, " ".join(str(message).split())
        super().__init__(f"{flag}: {self.message}")


#: numpy's generators take any seed >= 0; the ledger stores it as an HDF5 int64 attribute.
SEED_MAX = 2 ** 63 - 1


def _int_at_least(flag: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or \
            (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(flag, f"must be an integer {allowed} (got {value!r})")


def _choice(flag: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(flag, f"must be one of {', '.join(allowed)} (got {value!r})")


def _text(flag: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(flag, f"must be a string (got {value!r})")


def _finite(flag: str, value: object, low: float = 0.0, *, strict: bool = False) -> None:
    """A finite real number >= low (> low when strict); bools, nan and inf are refused."""
    try:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and (value > low if strict else value >= low)
    except OverflowError:              # an integer too large for a float
        ok = False
    if not ok:
        raise ConfigError(flag, f"must be a finite number {'>' if strict else '>='} {low:g} "
                                f"(got {value!r})")


def _positive(flag: str, value: object) -> None:
    _finite(flag, value, strict=True)


@dataclass(frozen=True)
class ScheduleConfig:
    """Which pipeline schedule runs, and how long."""

    method: str = "pd"
    stages: int = 4
    microbatches: int = 40
    noam: int = 0                 # 0 = S
    trajectories: int = 1         # R (LocalSGD)
    groups: int = 1               # G (LocalSGD allreduce groups)
    local_steps: int = 1          # H (LocalSGD)
    flush: int = 0                # GPipe flush size, 0 = S
    budget_slots: int = 0         # 0 = no budget
    budget_mode: str = "smallest"  # BUDGET_MODES; the command line picks fixed when
    #                                --microbatches is given with --budget-slots

    def __post_init__(self) -> None:
        _choice("--method", self.method, METHODS)
        _choice("--budget-mode", self.budget_mode, BUDGET_MODES)
        _int_at_least("--stages", self.stages, 1)
        _int_at_least("--microbatches", self.microbatches, 1)
        for flag, value in (("--noam", self.noam), ("--flush", self.flush),
                            ("--budget-slots", self.budget_slots)):
            _int_at_least(flag, value, 0)
        for flag, value in (("--trajectories", self.trajectories), ("--groups", self.groups),
                            ("--local-steps", self.local_steps)):
            _int_at_least(flag, value, 1)
        if self.method != "localsgd":
            for flag, value in (("--trajectories", self.trajectories),
                                ("--groups", self.groups), ("--local-steps", self.local_steps)):
                if value != 1:
                    raise ConfigError(flag, f"only --method localsgd uses it; must be 1 with "
                                            f"--method {self.method} (got {value})")
        if self.budget_mode != "smallest" and not self.budget_slots:
            raise ConfigError("--budget-mode", f"only --budget-slots uses it (got "
                                               f"{self.budget_mode} without a budget)")
        self._check_copies()

    def _check_copies(self) -> None:
        """R beyond the microbatches (or slots) a run has would never step, nor H beyond the
        microbatches (a budget's N is not known here: under one, H only delays averaging)."""
        limit, what = (self.budget_slots, f"--budget-slots {self.budget_slots}") \
            if self.budget_slots else (self.microbatches, f"--microbatches {self.microbatches}")
        checks = [("--trajectories", self.trajectories, "a trajectory owns every R-th "
                   "microbatch")]
        if not self.budget_slots:
            checks.append(("--local-steps", self.local_steps, "a round is R x H microbatches"))
        for flag, value, meaning in checks:
            if value > limit:
                raise ConfigError(flag, f"must be <= {what} ({meaning}; more never steps) "
                                        f"(got {value})")


@dataclass(frozen=True)
class RPDConfig:
    """Randomized PipeDream: delay bound and source (docs/DESIGN.md 2.6)."""

    delta: int | None = None      # None = S^2 - S/2 (the PD steady-state maximum)
    delay_source: str = "uniform"
    updates: int = 0              # 0 = N * S (as many block updates as the PD run)
    delays_from: str = ""         # ledger to replay with --delay-source ledger

    def __post_init__(self) -> None:
        if self.delta is not None:
            _int_at_least("--delta", self.delta, 0)
        _choice("--delay-source", self.delay_source, DELAY_SOURCES)
        _int_at_least("--updates", self.updates, 0)
        _text("--delays-from", self.delays_from)
        if self.delay_source == "ledger" and not self.delays_from:
            raise ConfigError("--delays-from", "is required with --delay-source ledger")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The model and its data (docs/DESIGN.md 3)."""

    name: str = "quadratic"
    data: str = ""
    dim: int = 64
    examples: int = 200
    batch_size: int = 10
    noise: float = 0.0
    mu: float = 0.01
    lam: float = 1e-4
    width: int = 32               # charlm: model width
    heads: int = 2                # charlm: attention heads (divide the width)
    context: int = 32             # charlm: characters per window
    layers: int = 0               # charlm: transformer blocks L, 0 = S - 2
    partition: str = ""           # units (charlm) or coordinates (block-linear) per stage:
    #                               "" = even, "auto" (charlm: profiled), or "n1,n2,..."
    dtype: str = "float64"        # charlm: float64 or float32 stage math
    val_fraction: float = 0.1     # charlm: the held-out last part of the text (validation)
    data_seed: int | None = None  # generated data from this seed (None: --seed), so that
    #                               seeds can vary noise and sampling on the same data

    def __post_init__(self) -> None:
        _choice("--objective", self.name, OBJECTIVES)
        _text("--data", self.data)
        if self.data_seed is not None:
            _int_at_least("--data-seed", self.data_seed, 0, SEED_MAX)
            if self.data or self.name == "charlm":
                raise ConfigError("--data-seed", "only generated block-linear data uses it "
                                                 "(not --data, not charlm); leave it out")
        for flag, value in (("--width", self.width), ("--heads", self.heads),
                            ("--context", self.context)):
            _int_at_least(flag, value, 1)
        if self.width % self.heads:
            raise ConfigError("--heads", f"must divide --width {self.width} "
                                         f"(got {self.heads})")
        _int_at_least("--layers", self.layers, 0)
        _choice("--dtype", self.dtype, DTYPES)
        _finite("--val-fraction", self.val_fraction)
        if self.val_fraction >= 1:
            raise ConfigError("--val-fraction", f"must be in [0, 1) (got {self.val_fraction})")
        if self.name != "charlm" and self.val_fraction != 0.1:
            raise ConfigError("--val-fraction", f"only --objective charlm uses it; leave it "
                                                f"out (got {self.val_fraction!r})")
        partition_counts(self.partition)
        _int_at_least("--dim", self.dim, 1)
        _int_at_least("--examples", self.examples, 1)
        _int_at_least("--batch-size", self.batch_size, 1)
        _finite("--noise", self.noise)
        _positive("--mu", self.mu)
        _finite("--lam", self.lam)
        if not self.data and self.name != "charlm" and self.examples % self.batch_size:
            raise ConfigError("--batch-size", f"must divide --examples {self.examples} "
                                              f"(got {self.batch_size})")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the MPI runtime executes (ignored by the simulator)."""

    order: str = "static"
    device: str = "cpu"
    wait: str = "auto"
    timeout: float = 60.0         # seconds a receive may wait before the job aborts
    op_cost: float = 0.0          # seconds each F/B is held (emulated compute), 0 = none
    fault: str = ""               # testing aid: "raise:RANK:OP" or "stall:RANK:OP"
    transport: str = "staged"     # cuda: how device buffers move between stages (docs/GPU.md)
    gpu_aware_mpi: bool = False   # cuda: the MPI library takes device buffers (direct)
    gpus_per_node: int = 0        # cuda: devices used per node, 0 = every visible one
    snapshot_budget: float = 256.0    # MiB of block snapshots in all part files (recorder)

    def __post_init__(self) -> None:
        _choice("--order", self.order, ORDERS)
        _choice("--device", self.device, DEVICES)
        self._check_gpu()
        _choice("--wait", self.wait, WAITS)
        _positive("--timeout", self.timeout)
        _finite("--op-cost", self.op_cost)
        if self.op_cost >= self.timeout:
            raise ConfigError("--op-cost", f"must be < --timeout {self.timeout:g} (a neighbour "
                                           f"waits at least one op for each message; got "
                                           f"{self.op_cost:g})")
        _finite("--snapshot-budget", self.snapshot_budget)
        _text("--fault", self.fault)
        if self.fault and not _FAULT.fullmatch(self.fault):
            raise ConfigError("--fault", f"must be raise:RANK:OP or stall:RANK:OP "
                                         f"(got {self.fault!r})")

    def check_fault_rank(self, world_size: int) -> None:
        """--fault must name a rank of the job (call it where the world size is known)."""
        if self.fault and int(self.fault.split(":")[1]) >= world_size:
            raise ConfigError("--fault", f"rank must be in 0..{world_size - 1}, the job's "
                                         f"{world_size} ranks (got {self.fault!r})")

    def _check_gpu(self) -> None:
        _choice("--transport", self.transport, TRANSPORTS)
        if not isinstance(self.gpu_aware_mpi, bool):
            raise ConfigError("--gpu-aware-mpi", f"must be true or false "
                                                 f"(got {self.gpu_aware_mpi!r})")
        _int_at_least("--gpus-per-node", self.gpus_per_node, 0)
        if self.device == "cpu":
            for flag, value, default in (("--transport", self.transport, "staged"),
                                         ("--gpu-aware-mpi", self.gpu_aware_mpi, False),
                                         ("--gpus-per-node", self.gpus_per_node, 0)):
                if value != default:
                    raise ConfigError(flag, f"only --device cuda uses it (got {value!r} "
                                            f"with --device cpu)")
        if self.transport == "direct" and not self.gpu_aware_mpi:
            raise ConfigError("--transport", "direct hands device buffers to MPI and needs "
                                             "--gpu-aware-mpi (a CUDA-aware MPI library)")
        if self.gpu_aware_mpi and self.transport != "direct":
            raise ConfigError("--gpu-aware-mpi", f"goes with --transport direct (got "
                                                 f"--transport {self.transport}); staged and "
                                                 f"ipc work with any MPI")


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of one run."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    rpd: RPDConfig = field(default_factory=RPDConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    lr: float = 2.0 ** -6
    seed: int = 0
    eval_every: int = 1           # objective every E block updates (engines.cadence)
    out: str = "run.h5"
    force: bool = False           # replace an existing --out (atomically, when complete)
    diverge_factor: float = 1e6   # a loss above this x the first one is divergence (0: off)
    max_memory: float | None = None   # GiB a run may need (rpd_mpi.budget); None = what the
    #                                   machine has available, 0 = no check
    quiet: bool = False           # no progress lines
    checkpoint_every: float = 0.0  # seconds between checkpoints (rpd_mpi.checkpoint), 0 = off
    resume: bool = False          # continue from the newest complete checkpoint of --out

    def __post_init__(self) -> None:
        _positive("--lr", self.lr)
        _finite("--checkpoint-every", self.checkpoint_every)
        if not isinstance(self.resume, bool):
            raise ConfigError("--resume", f"must be true or false (got {self.resume!r})")
        _int_at_least("--seed", self.seed, 0, SEED_MAX)
        _int_at_least("--eval-every", self.eval_every, 1)
        if self.max_memory is not None:
            _finite("--max-memory", self.max_memory)
        _text("--out", self.out)
        if not isinstance(self.force, bool):
            raise ConfigError("--force", f"must be true or false (got {self.force!r})")
        if not isinstance(self.quiet, bool):
            raise ConfigError("--quiet", f"must be true or false (got {self.quiet!r})")
        if not isinstance(self.diverge_factor, (int, float)) or \
                isinstance(self.diverge_factor, bool) or not 0 <= self.diverge_factor < math.inf:
            raise ConfigError("--diverge-factor", f"must be a finite number >= 0 (0 = only "
                                                  f"non-finite values count; got "
                                                  f"{self.diverge_factor!r})")
        if not self.out:
            raise ConfigError("--out", "must name the ledger file to write")
        self._check_cross()

    def _check_cross(self) -> None:
        sch, obj = self.schedule, self.objective
        if obj.name == "charlm":
            self._check_charlm_depth()
        elif obj.partition:
            self._check_linear_partition()
        if obj.name != "charlm" and not obj.data and sch.stages > obj.dim:
            raise ConfigError("--stages", f"must be <= --dim {obj.dim} so every stage owns a "
                                          f"parameter (got {sch.stages})")
        self._check_unused()

    def _check_charlm_depth(self) -> None:
        """S in 1..L + 2 (L = --layers, default S - 2, so S >= 3 without it), and an
        explicit --partition of the L + 2 units (embedding, L blocks, head) over S stages."""
        S, obj = self.schedule.stages, self.objective
        if not obj.layers and S < 3:
            raise ConfigError("--stages", f"charlm on {S} stage(s) needs --layers L (the "
                                          f"default L = S - 2 needs >= 3 stages)")
        units = (obj.layers or S - 2) + 2
        if S > units:
            raise ConfigError("--stages", f"must be <= --layers + 2 = {units} (every stage "
                                          f"holds >= 1 unit; got {S})")
        counts = partition_counts(obj.partition)
        if counts is not None:
            _check_counts(counts, S, units, f"unit(s): embedding, {units - 2} block(s), head")

    def _check_linear_partition(self) -> None:
        counts, obj = partition_counts(self.objective.partition), self.objective
        if counts is None:
            raise ConfigError("--partition", f"auto profiles charlm units; give --objective "
                                             f"{obj.name} the coordinates of each stage")
        if not obj.data:
            _check_counts(counts, self.schedule.stages, obj.dim, "coordinates (--dim)")

    def _check_unused(self) -> None:
        """Flags a method would silently ignore are errors (docs/DESIGN.md 6)."""
        sch, rpd = self.schedule, self.rpd
        if rpd.delay_source != "uniform" and sch.method != "rpd":
            raise ConfigError("--delay-source", f"only --method rpd uses it "
                                                f"(got --method {sch.method})")
        if rpd.updates and sch.method != "rpd":
            raise ConfigError("--updates", "only --method rpd uses it")
        if rpd.delays_from and rpd.delay_source != "ledger":
            raise ConfigError("--delays-from", "only --delay-source ledger uses it")
        if rpd.delta is not None and rpd.delay_source in ("pd", "ledger"):
            raise ConfigError("--delta", f"is the largest replayed delay with --delay-source "
                                         f"{rpd.delay_source}; leave it out")
        if sch.noam and sch.method not in ("pd", "rpd"):
            raise ConfigError("--noam", f"only --method pd (and rpd's PD clock) uses it "
                                        f"(got --method {sch.method})")
        if sch.flush and sch.method != "gpipe":
            raise ConfigError("--flush", f"only --method gpipe uses it (got --method "
                                         f"{sch.method})")
        if rpd.delta is not None and sch.method != "rpd":
            raise ConfigError("--delta", f"only --method rpd uses it (got --method "
                                         f"{sch.method})")
        if rpd.delta is not None and rpd.delay_source == "zero":
            raise ConfigError("--delta", "--delay-source zero reads no stale block; leave it "
                                         "out")
        self._check_objective_unused()

    def _check_objective_unused(self) -> None:
        """Objective flags the chosen objective ignores, where they differ from the default."""
        obj, default = self.objective, ObjectiveConfig()
        lm = ("width", "heads", "context", "layers", "dtype")
        unused = {"charlm": ("dim", "examples", "noise", "mu", "lam"),
                  "tridiag": (*lm, "lam"),
                  "logistic": (*lm, "mu")}.get(obj.name, (*lm, "mu", "lam"))
        for name in unused:
            if getattr(obj, name) != getattr(default, name):
                raise ConfigError(f"--{name}", f"--objective {obj.name} does not use it; leave "
                                               f"it out (got {getattr(obj, name)!r})")
        if obj.data and obj.name != "charlm":
            for name in ("dim", "examples"):
                if getattr(obj, name) != getattr(default, name):
                    raise ConfigError(f"--{name}", f"the --data file sets it ({obj.data}); "
                                                   f"leave it out (got {getattr(obj, name)})")

    def check_fault_rank(self, world_size: int) -> None:
        """--fault names a rank of the job: call it where the world size is known."""
        self.runtime.check_fault_rank(world_size)

    @property
    def delta(self) -> int:
        """The RPD delay bound in force (default: the PD steady-state max S^2 - S/2)."""
        if self.rpd.delta is not None:
            return self.rpd.delta
        return pd_steady_max(self.schedule.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from nested dicts (a TOML file or a ledger); unknown keys are errors."""
        parts = {"schedule": ScheduleConfig, "rpd": RPDConfig,
                 "objective": ObjectiveConfig, "runtime": RuntimeConfig}
        kwargs: dict[str, Any] = {}
        if not isinstance(d, dict):
            raise ConfigError("config", f"must be a table of sections (got {d!r})")
        for key, value in d.items():
            if key in parts:
                kwargs[key] = _build(parts[key], value, key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ConfigError(key, f"unknown configuration key; allowed: "
                                       f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**kwargs)


def partition_counts(text: object) -> tuple[int, ...] | None:
    """The counts of an explicit --partition "n1,n2,...", None for "auto"; () for "" (even).
    ConfigError('--partition') for anything else."""
    _text("--partition", text)
    assert isinstance(text, str)
    if text in ("", "auto"):
        return () if not text else None
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or any(c < 1 for c in counts):
        raise ConfigError("--partition", f"must be auto or a comma list of integers >= 1, "
                                         f"one per stage (got {text!r})")
    return counts


def _check_counts(counts: tuple[int, ...], stages: int, total: int, what: str) -> None:
    if not counts:
        return
    if len(counts) != stages:
        raise ConfigError("--partition", f"has {len(counts)} entries for --stages {stages}")
    if sum(counts) != total:
        raise ConfigError("--partition", f"sums to {sum(counts)}; the model has {total} "
                                         f"{what}")


def _build(kind: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}]", f"must be a table of keys (got {section} = "
                                          f"{values!r})")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"[{section}] {sorted(unknown)[0]}",
                          f"unknown key; allowed: {', '.join(sorted(names))}")
    return kind(**values)


def toml_text(tree: dict[str, Any]) -> str:
    """A `RunConfig.to_dict()` tree as TOML: top-level keys, then one table per section.
    None (unset: the default applies) is left out; floats are written with `repr`, which
    reads back to the same float, so the file reproduces the configuration exactly."""
    top = [f"{k} = {_toml_value(k, v)}" for k, v in tree.items()
           if not isinstance(v, dict) and v is not None]
    lines = [*top]
    for key, value in tree.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(k, v)}" for k, v in value.items()
                                         if v is not None]
    return "\n".join(lines) + "\n"


def _toml_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return repr(value)
    if isinstance(value, str):
        # a TOML basic string: JSON's escapes are TOML's, but TOML also escapes DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise ConfigError(key, f"cannot be written as TOML (got {value!r})")
