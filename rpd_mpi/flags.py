"""The run flags of `simulate` and `train`, one to one onto the `RunConfig` tree.

`FLAGS` and `TRAIN_FLAGS` map each flag to (section, field, type, help); `add_run_flags`
puts them on a parser and `config_from` builds the validated configuration: defaults, then
a TOML file given with `--config`, then explicit flags. Relative paths in the TOML file
(data, delays_from, out) are relative to its folder; a bad value that came from it is named
as `--config FILE: [section] key`.
"""

from __future__ import annotations

import argparse
import os
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
    "--out": ("", "out", str, "ledger file to write (a new file; see --force)"),
    "--force": ("", "force", bool, "replace an existing --out ledger (the old one stays "
                "intact until the new one is complete)"),
    "--diverge-factor": ("", "diverge_factor", float, "stop as diverged when a loss exceeds "
                         "this many times the first loss (0 = only NaN/inf)"),
    "--max-memory": ("", "max_memory", float, "GiB of memory the run may need, estimated "
                     "before it starts (default: what the machine has available; 0 = no "
                     "check)"),
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


ALL_FLAGS: FlagTable = {**FLAGS, **TRAIN_FLAGS}


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
                   "[runtime] sections and top-level lr, seed, eval_every, out, max_memory; "
                   "flags win; relative paths in it (data, delays_from, out) are relative to "
                   "its folder")
    defaults = RunConfig()
    for flag, (section, name, kind, text) in table.items():
        default = getattr(getattr(defaults, section) if section else defaults, name)
        shown = f" (default {default})" if default not in ("", None) else ""
        if kind is bool:          # a switch: given = True, absent = the config's value
            p.add_argument(flag, action="store_const", const=True, default=None, help=text)
            continue
        p.add_argument(flag, type=typed(kind, flag) if kind is not str else str,
                       default=None, help=text + shown)


#: TOML keys holding paths: relative ones are relative to the TOML file's folder.
TOML_PATHS = (("objective", "data"), ("rpd", "delays_from"), ("", "out"))
SECTIONS = ("schedule", "rpd", "objective", "runtime")


def config_from(args: argparse.Namespace, table: FlagTable) -> RunConfig:
    """Defaults < TOML file < command-line flags, validated. An error in a value that came
    from the TOML file names the file and the key, not the flag."""
    path = getattr(args, "config", None)
    tree: dict[str, Any] = read_toml(path) if path else {}
    given = set()
    for flag, (section, name, _, _) in table.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        given.add(flag)
        (tree.setdefault(section, {}) if section else tree)[name] = value
    try:
        return RunConfig.from_dict(tree)
    except ConfigError as err:
        if path and err.flag not in given:
            raise _in_toml(err, path, tree) from None
        raise


def _in_toml(err: ConfigError, path: str, tree: dict[str, Any]) -> ConfigError:
    """The error of a TOML value, naming `--config FILE` and the key."""
    where = err.flag
    if err.flag in ALL_FLAGS:
        section, name = ALL_FLAGS[err.flag][:2]
        if name not in (tree.get(section, {}) if section else tree):
            return err                 # a default or a flag caused it: the flag name stands
        where = f"[{section}] {name}" if section else name
    return ConfigError(f"--config {path}", f"{where}: {err.message}")


def read_toml(path: str) -> dict[str, Any]:
    """The TOML tree: sections are tables, relative paths resolved against its folder."""
    try:
        with open(path, "rb") as f:
            tree: dict[str, Any] = tomllib.load(f)
    except (OSError, ValueError) as err:    # TOMLDecodeError, UnicodeDecodeError
        raise ConfigError("--config", f"cannot read {path} as TOML: {err}") from None
    for section in SECTIONS:
        if section in tree and not isinstance(tree[section], dict):
            raise ConfigError(f"--config {path}", f"[{section}] must be a table (got "
                                                  f"{section} = {tree[section]!r})")
    folder = os.path.dirname(path)
    for section, name in TOML_PATHS:
        where = tree.get(section, {}) if section else tree
        value = where.get(name)
        if isinstance(value, str) and value and not os.path.isabs(value):
            where[name] = os.path.join(folder, value)
    return tree
