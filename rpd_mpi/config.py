"""The run configuration: one frozen dataclass tree, validated at construction.

Every invalid value raises `ConfigError(flag, message)` naming the command-line flag and the
allowed values, so that every rank can validate identically before any message is sent.
`RunConfig.to_dict()` is what each ledger stores verbatim; `RunConfig.from_dict` reads it
back (and reads TOML config files, whose keys are the section/field names below).
"""

from __future__ import annotations

import dataclasses
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
_FAULT = re.compile(r"(raise|stall):\d+:\d+")


class ConfigError(ValueError):
    """A bad configuration value; `flag` names the command-line flag."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def _int_at_least(flag: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(flag, f"must be an integer >= {low} (got {value!r})")


def _choice(flag: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(flag, f"must be one of {', '.join(allowed)} (got {value!r})")


def _positive(flag: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ConfigError(flag, f"must be a number > 0 (got {value!r})")


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

    def __post_init__(self) -> None:
        _choice("--method", self.method, METHODS)
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

    def __post_init__(self) -> None:
        _choice("--objective", self.name, OBJECTIVES)
        for flag, value in (("--width", self.width), ("--heads", self.heads),
                            ("--context", self.context)):
            _int_at_least(flag, value, 1)
        if self.width % self.heads:
            raise ConfigError("--heads", f"must divide --width {self.width} "
                                         f"(got {self.heads})")
        _int_at_least("--dim", self.dim, 1)
        _int_at_least("--examples", self.examples, 1)
        _int_at_least("--batch-size", self.batch_size, 1)
        if not isinstance(self.noise, (int, float)) or self.noise < 0:
            raise ConfigError("--noise", f"must be a number >= 0 (got {self.noise!r})")
        _positive("--mu", self.mu)
        if not isinstance(self.lam, (int, float)) or self.lam < 0:
            raise ConfigError("--lam", f"must be a number >= 0 (got {self.lam!r})")
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

    def __post_init__(self) -> None:
        _choice("--order", self.order, ORDERS)
        _choice("--device", self.device, DEVICES)
        self._check_gpu()
        _choice("--wait", self.wait, WAITS)
        _positive("--timeout", self.timeout)
        if not isinstance(self.op_cost, (int, float)) or self.op_cost < 0:
            raise ConfigError("--op-cost", f"must be a number >= 0 (got {self.op_cost!r})")
        if self.fault and not _FAULT.fullmatch(self.fault):
            raise ConfigError("--fault", f"must be raise:RANK:OP or stall:RANK:OP "
                                         f"(got {self.fault!r})")

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

    def __post_init__(self) -> None:
        _positive("--lr", self.lr)
        _int_at_least("--seed", self.seed, 0)
        _int_at_least("--eval-every", self.eval_every, 1)
        if not self.out:
            raise ConfigError("--out", "must name the ledger file to write")
        self._check_cross()

    def _check_cross(self) -> None:
        sch, obj = self.schedule, self.objective
        if obj.name == "charlm" and sch.stages < 3:
            raise ConfigError("--stages", f"charlm needs >= 3 stages (got {sch.stages})")
        if obj.name != "charlm" and not obj.data and sch.stages > obj.dim:
            raise ConfigError("--stages", f"must be <= --dim {obj.dim} so every stage owns a "
                                          f"parameter (got {sch.stages})")
        self._check_unused()

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
        for key, value in d.items():
            if key in parts:
                kwargs[key] = _build(parts[key], value, key)
            elif key in {f.name for f in dataclasses.fields(cls)}:
                kwargs[key] = value
            else:
                raise ConfigError(key, f"unknown configuration key; allowed: "
                                       f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**kwargs)


def _build(kind: type, values: dict[str, Any], section: str) -> Any:
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"[{section}] {sorted(unknown)[0]}",
                          f"unknown key; allowed: {', '.join(sorted(names))}")
    return kind(**values)
