"""The run flags of `simulate` and `train`, one to one onto the `RunConfig` tree.

`FLAGS` and `TRAIN_FLAGS` map each flag to (section, field, type, help); `add_run_flags`
puts them on a parser, in argument groups (`GROUPS`: schedule, RPD, LocalSGD, objective,
runtime, output) with the allowed values of choice flags in their metavar (`CHOICES`), and
`config_from` builds the validated configuration: defaults, then the file given with
`--config`, then explicit flags. That file is TOML, or a ledger (`.h5`), whose stored
configuration is taken as it was run. Relative paths in a TOML file (data, delays_from, out)
are relative to its folder; a bad value that came from the file is named as
`--config FILE: [section] key`. `effective_toml` is what `--print-config` prints: a TOML file
that `--config` reads back into the same configuration.
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

from rpd_mpi.config import (BUDGET_MODES, DELAY_SOURCES, DEVICES, DTYPES, METHODS, OBJECTIVES,
                            ORDERS, TRANSPORTS, WAITS, ConfigError, RunConfig, toml_text)
from rpd_mpi.ledger import LedgerError, read_run

#: flag -> (section or "" for top level, field, type, help)
FlagTable = dict[str, tuple[str, str, type, str]]

FLAGS: FlagTable = {
    "--method": ("schedule", "method", str, "the schedule (pd, localsgd, gpipe, naive) or "
                 "the RPD algorithm (rpd)"),
    "--stages": ("schedule", "stages", int, "pipeline stages S (one MPI rank each)"),
    "--microbatches": ("schedule", "microbatches", int, "microbatches N"),
    "--noam": ("schedule", "noam", int, "max microbatches in flight (PD; 0 = S)"),
    "--trajectories": ("schedule", "trajectories", int, "LocalSGD trajectories R"),
    "--groups": ("schedule", "groups", int, "LocalSGD allreduce groups G"),
    "--local-steps": ("schedule", "local_steps", int, "LocalSGD local steps H"),
    "--flush": ("schedule", "flush", int, "GPipe flush size (0 = S)"),
    "--budget-slots": ("schedule", "budget_slots", int, "slot budget T (0 = none)"),
    "--budget-mode": ("schedule", "budget_mode", str, "how --budget-slots T picks the run: "
                      "smallest N reaching T, cut at T; fixed: --microbatches N cut at T "
                      "(the default when --microbatches is given); untruncated: smallest N "
                      "reaching T, run to its end"),
    "--delta": ("rpd", "delta", int, "RPD delay bound (default S^2 - S/2)"),
    "--delay-source": ("rpd", "delay_source", str, "where RPD's delays come from (random "
                       "up to --delta, all --delta, none, a PD clock, a ledger)"),
    "--updates": ("rpd", "updates", int, "RPD block updates K (0 = as many as PD)"),
    "--delays-from": ("rpd", "delays_from", str, "ledger whose delays RPD replays"),
    "--objective": ("objective", "name", str, "the model and loss"),
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
    "--layers": ("objective", "layers", int, "charlm: transformer blocks L (0 = S - 2, one "
                 "per middle stage; paper: 14)"),
    "--partition": ("objective", "partition", str, "units per stage, e.g. 2,2,2,2 (charlm "
                    "units: embedding, L blocks, head; block-linear: coordinates), or auto "
                    "(charlm: profiled here, balanced); default: even"),
    "--dtype": ("objective", "dtype", str, "charlm: precision of the stage math"),
    "--val-fraction": ("objective", "val_fraction", float, "charlm: the last part of the "
                       "text held out for the validation loss (0 = none)"),
    "--lr": ("", "lr", float, "step size"),
    "--seed": ("", "seed", int, "random seed"),
    "--data-seed": ("objective", "data_seed", int, "seed of the generated data (default: "
                    "--seed), so that --seed varies only noise and sampling"),
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
    "--quiet": ("", "quiet", bool, "no progress lines"),
    "--checkpoint-every": ("", "checkpoint_every", float, "seconds between checkpoints of the "
                           "whole run, kept next to --out until it completes (0 = none; a "
                           "stop signal then also checkpoints)"),
    "--resume": ("", "resume", bool, "continue from the newest complete checkpoint of this "
                 "--out (the same command line plus --resume); none: start afresh"),
}
TRAIN_FLAGS: FlagTable = {
    "--order": ("runtime", "order", str, "static: the simulator's order of operations; "
                "dynamic: 1F1B on what has arrived"),
    "--device": ("runtime", "device", str, "where the stages compute"),
    "--wait": ("runtime", "wait", str, "how a waiting rank waits (auto: spin unless the "
               "node is oversubscribed)"),
    "--timeout": ("runtime", "timeout", float, "seconds a receive may wait"),
    "--op-cost": ("runtime", "op_cost", float, "seconds each F/B is held (emulation)"),
    "--fault": ("runtime", "fault", str, "testing aid: raise:RANK:OP or stall:RANK:OP"),
    "--transport": ("runtime", "transport", str, "cuda: pinned host staging, device "
                    "buffers to a CUDA-aware MPI, or CUDA IPC between ranks of one node"),
    "--gpu-aware-mpi": ("runtime", "gpu_aware_mpi", bool, "cuda: the MPI library is "
                        "CUDA-aware (checked where the library says; needs --transport direct)"),
    "--gpus-per-node": ("runtime", "gpus_per_node", int, "cuda: devices per node; rank -> "
                        "device = local rank mod N (0 = every visible device, 1 = all share "
                        "device 0)"),
    "--snapshot-budget": ("runtime", "snapshot_budget", float, "MiB of block snapshots all "
                          "part files may hold (large blocks are snapshot less often; the "
                          "objective curve is rebuilt from them; 0 = final blocks only)"),
}


ALL_FLAGS: FlagTable = {**FLAGS, **TRAIN_FLAGS}

#: The allowed values of the choice flags (shown as their metavar; checked by RunConfig).
CHOICES: dict[str, tuple[str, ...]] = {
    "--method": METHODS, "--delay-source": DELAY_SOURCES, "--objective": OBJECTIVES,
    "--order": ORDERS, "--device": DEVICES, "--wait": WAITS, "--transport": TRANSPORTS,
    "--budget-mode": BUDGET_MODES, "--dtype": DTYPES,
}

#: The help groups of the run flags, in order: (title, description, flags).
GROUPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("schedule", "[schedule] which pipeline schedule, how many stages and microbatches",
     ("--method", "--stages", "--microbatches", "--noam", "--flush", "--budget-slots",
      "--budget-mode")),
    ("RPD", "[rpd] Randomized PipeDream (--method rpd)",
     ("--delta", "--delay-source", "--updates", "--delays-from")),
    ("LocalSGD", "[schedule] LocalSGD (--method localsgd)",
     ("--trajectories", "--groups", "--local-steps")),
    ("objective", "[objective] the model and its data; top level: step size and seed",
     ("--objective", "--data", "--dim", "--examples", "--batch-size", "--noise", "--mu",
      "--lam", "--width", "--heads", "--context", "--layers", "--partition", "--dtype",
      "--lr", "--seed", "--data-seed")),
    ("runtime", "[runtime] how the MPI ranks run (train); top level: safety limits",
     ("--order", "--device", "--wait", "--timeout", "--op-cost", "--fault", "--transport",
      "--gpu-aware-mpi", "--gpus-per-node", "--snapshot-budget", "--diverge-factor",
      "--max-memory")),
    ("output", "the ledger and what is printed",
     ("--out", "--force", "--eval-every", "--quiet", "--checkpoint-every", "--resume")),
)


def typed(kind: type, flag: str) -> Callable[[str], Any]:
    """An argparse type; its message leaves the flag to argparse ("argument --x: ...")."""
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if kind is int else 'a number'} "
                f"(got {text!r})") from None
    return convert


Groups = dict[str, "argparse._ArgumentGroup"]


def add_run_flags(p: argparse.ArgumentParser, table: FlagTable) -> Groups:
    """The flags of `table` (and --config) on p, in the `GROUPS` it uses; returns the groups
    by title, so that a caller can add its own flags to one (`--json` to output)."""
    p.add_argument("--config", metavar="FILE", help="a TOML file with [schedule], [rpd], "
                   "[objective], [runtime] sections and top-level lr, seed, eval_every, out, "
                   "...; relative paths in it (data, delays_from, out) are relative to its "
                   "folder; or a ledger run.h5: the configuration it was run with. Flags win")
    defaults = RunConfig()
    groups: Groups = {}
    for title, description, flags in GROUPS:
        if any(flag in table for flag in flags):
            groups[title] = p.add_argument_group(title, description)
    placed = {flag: groups[title] for title, _, flags in GROUPS for flag in flags
              if title in groups}
    order = [flag for _, _, flags in GROUPS for flag in flags if flag in table]
    for flag in [*order, *(f for f in table if f not in order)]:
        section, name, kind, text = table[flag]
        where: Any = placed.get(flag, p)
        default = getattr(getattr(defaults, section) if section else defaults, name)
        shown = f" (default {default})" if default not in ("", None) else ""
        if kind is bool:          # a switch: given = True, absent = the config's value
            where.add_argument(flag, action="store_const", const=True, default=None, help=text)
            continue
        metavar = "{" + ",".join(CHOICES[flag]) + "}" if flag in CHOICES else None
        where.add_argument(flag, type=typed(kind, flag) if kind is not str else str,
                           default=None, metavar=metavar, help=text + shown)
    return groups


#: TOML keys holding paths: relative ones are relative to the TOML file's folder.
TOML_PATHS = (("objective", "data"), ("rpd", "delays_from"), ("", "out"))
SECTIONS = ("schedule", "rpd", "objective", "runtime")


def config_from(args: argparse.Namespace, table: FlagTable) -> RunConfig:
    """Defaults < TOML file < command-line flags, validated. An error in a value that came
    from the TOML file names the file and the key, not the flag."""
    path = getattr(args, "config", None)
    tree: dict[str, Any] = read_config(path) if path else {}
    given = set()
    for flag, (section, name, _, _) in table.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        given.add(flag)
        (tree.setdefault(section, {}) if section else tree)[name] = value
    if not path or not is_ledger(path):
        _budget_protocol(tree.get("schedule", {}))
    try:
        return RunConfig.from_dict(tree)
    except ConfigError as err:
        if path and err.flag not in given:
            raise _in_toml(err, path, tree) from None
        raise


def _budget_protocol(schedule: dict[str, Any]) -> None:
    """A budget with an explicit N (flag or TOML key) and no explicit mode runs that N cut at
    the budget (`fixed`); a ledger's stored configuration already names its mode (one
    written before the modes existed ran `smallest`, the default)."""
    if schedule.get("budget_slots") and "microbatches" in schedule and \
            "budget_mode" not in schedule:
        schedule["budget_mode"] = "fixed"


def _in_toml(err: ConfigError, path: str, tree: dict[str, Any]) -> ConfigError:
    """The error of a TOML value, naming `--config FILE` and the key."""
    where = err.flag
    if err.flag in ALL_FLAGS:
        section, name = ALL_FLAGS[err.flag][:2]
        if name not in (tree.get(section, {}) if section else tree):
            return err                 # a default or a flag caused it: the flag name stands
        where = f"[{section}] {name}" if section else name
    return ConfigError(f"--config {path}", f"{where}: {err.message}")


def read_config(path: str) -> dict[str, Any]:
    """The configuration tree of `--config FILE`: a ledger's stored one, else TOML."""
    return read_ledger_config(path) if is_ledger(path) else read_toml(path)


def is_ledger(path: str) -> bool:
    """An HDF5 file (by its signature, else by a .h5/.hdf5 name)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return path.endswith((".h5", ".hdf5"))


def read_ledger_config(path: str) -> dict[str, Any]:
    """The configuration a ledger was run with, as stored (paths as they were given then);
    keys left unset (None) are dropped, so that they take their defaults again."""
    try:
        config = read_run(path).config
    except (LedgerError, OSError, ValueError, KeyError) as err:
        raise ConfigError("--config", f"cannot read the configuration of ledger {path}: "
                                      f"{err}") from None
    return _without_none(config)


def _without_none(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in tree.items()
            if v is not None}


def effective_toml(cfg: RunConfig, command: str) -> str:
    """`--print-config`: cfg as TOML (sections as in `RunConfig.to_dict`), with absolute
    paths so that `--config` reads it back the same from any folder."""
    tree = cfg.to_dict()
    for section, name in TOML_PATHS:
        where = tree[section] if section else tree
        if where[name]:
            where[name] = os.path.abspath(where[name])
    return (f"# rpd-mpi {command}: the effective configuration (defaults < --config < "
            f"flags)\n# rerun it: rpd-mpi {command} --config THIS.toml  (flags still win; "
            f"keys left out take their defaults)\n" + toml_text(tree))


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
