"""The run flags of `simulate` and `train`, one to one onto the `RunConfig` tree.

`FLAGS` and `TRAIN_FLAGS` map each flag to (section, field, type, help); `add_run_flags`
puts them on a parser and `config_from` builds the validated configuration: defaults, then
a TOML file given with `--config`, then explicit flags.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from rpd_mpi.config import (DELAY_SOURCES, METHODS, OBJECTIVES, ORDERS, TRANSPORTS, ConfigError,
                            RunConfig)

#: flag -> (section or "" for top level, field, type, help)
FlagTable = dict[str, tuple[str, str, type, str]]

FLAGS: FlagTable = {
    "--method": ("schedule", "method", str, f"one of {', '.join(METHODS)}"),
    "--stages": ("schedule", "stages", int, "pipeline stages S (one MPI rank each)"),
    "--microbatches": ("schedule", "microbatches", int, "microbatches N"),
    "--noam": ("schedule", "noam", int, "max microbatches in flight (PD; 0 = S)"),
    "--trajectories": ("schedule", "trajectories", int, "LocalSGD trajectories R"),
    "--groups": ("schedule", "groups", int, "LocalSGD allreduce groups G"),
    "--local-steps": ("schedule", "local_steps", int, "LocalSGD local steps H"),
    "--flush": ("schedule", "flush", int, "GPipe flush size (0 = S)"),
    "--budget-slots": ("schedule", "budget_slots", int, "slot budget T (0 = none)"),
    "--delta": ("rpd", "delta", int, "RPD delay bound (default S^2 - S/2)"),
    "--delay-source": ("rpd", "delay_source", str, f"one of {', '.join(DELAY_SOURCES)}"),
    "--updates": ("rpd", "updates", int, "RPD block updates K (0 = as many as PD)"),
    "--delays-from": ("rpd", "delays_from", str, "ledger whose delays RPD replays"),
    "--objective": ("objective", "name", str, f"one of {', '.join(OBJECTIVES)}"),
    "--data": ("objective", "data", str, ".npz/.h5 file with X, y [, w_true, f_star]; "
               "charlm: a UTF-8 text file"),
    "--dim": ("objective", "dim", int, "parameters d"),
    "--examples": ("objective", "examples", int, "examples n"),
    "--batch-size": ("objective", "batch_size", int,
                     "rows per microbatch (divides n); charlm: windows per microbatch"),
    "--noise": ("objective", "noise", float, "std of Gaussian gradient noise"),
    "--mu": ("objective", "mu", float, "tridiag: Hessian shift"),
    "--lam": ("objective", "lam", float, "logistic: L2 regularisation"),
    "--width": ("objective", "width", int, "charlm: model width (paper: 256)"),
    "--heads": ("objective", "heads", int, "charlm: attention heads (paper: 8)"),
    "--context": ("objective", "context", int, "charlm: characters per window (paper: 128)"),
    "--lr": ("", "lr", float, "step size"),
    "--seed": ("", "seed", int, "random seed"),
    "--eval-every": ("", "eval_every", int, "record the objective every E block updates "
                     "(every engine; the simulator checks at slot ends)"),
    "--out": ("", "out", str, "ledger file to write"),
}
TRAIN_FLAGS: FlagTable = {
    "--order": ("runtime", "order", str, f"one of {', '.join(ORDERS)}"),
    "--device": ("runtime", "device", str, "cpu or cuda"),
    "--wait": ("runtime", "wait", str, "auto, spin or polite"),
    "--timeout": ("runtime", "timeout", float, "seconds a receive may wait"),
    "--op-cost": ("runtime", "op_cost", float, "seconds each F/B is held (emulation)"),
    "--fault": ("runtime", "fault", str, "testing aid: raise:RANK:OP or stall:RANK:OP"),
    "--transport": ("runtime", "transport", str, f"cuda: one of {', '.join(TRANSPORTS)} "
                    "(pinned host staging, device buffers to a CUDA-aware MPI, CUDA IPC "
                    "between ranks of one node)"),
    "--gpu-aware-mpi": ("runtime", "gpu_aware_mpi", bool, "cuda: the MPI library is "
                        "CUDA-aware (checked where the library says; needs --transport direct)"),
    "--gpus-per-node": ("runtime", "gpus_per_node", int, "cuda: devices per node; rank -> "
                        "device = local rank mod N (0 = every visible device, 1 = all share "
                        "device 0)"),
}


def typed(kind: type, flag: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag}: must be {'an integer' if kind is int else 'a number'} "
                f"(got {text!r})") from None
    return convert


def add_run_flags(p: argparse.ArgumentParser, table: FlagTable) -> None:
    p.add_argument("--config", help="TOML file with [schedule], [rpd], [objective], "
                   "[runtime] sections and top-level lr, seed, eval_every, out; flags win")
    defaults = RunConfig()
    for flag, (section, name, kind, text) in table.items():
        default = getattr(getattr(defaults, section) if section else defaults, name)
        shown = f" (default {default})" if default not in ("", None) else ""
        if kind is bool:          # a switch: given = True, absent = the config's value
            p.add_argument(flag, action="store_const", const=True, default=None, help=text)
            continue
        p.add_argument(flag, type=typed(kind, flag) if kind is not str else str,
                       default=None, help=text + shown)


def config_from(args: argparse.Namespace, table: FlagTable) -> RunConfig:
    """Defaults < TOML file < command-line flags, validated."""
    tree: dict[str, Any] = read_toml(args.config) if getattr(args, "config", None) else {}
    for flag, (section, name, _, _) in table.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        (tree.setdefault(section, {}) if section else tree)[name] = value
    return RunConfig.from_dict(tree)


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            tree: dict[str, Any] = tomllib.load(f)
            return tree
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError("--config", f"cannot read {path}: {err}") from None


