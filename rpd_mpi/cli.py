"""The `rpd-mpi` command line (DESIGN 6): simulate, train, schedule, delays, report.

Flags map one to one onto the `RunConfig` tree (`FLAGS`); a TOML file given with `--config`
supplies values that explicit flags override. Every bad value ends in one line
`rpd-mpi: error: --flag: what is allowed (got ...)` and exit code 2, before any work starts
and before any ledger file is created.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from rpd_mpi.config import (DELAY_SOURCES, METHODS, OBJECTIVES, ORDERS, TRANSPORTS,
                            ConfigError, RunConfig)

# flag -> (section or "" for top level, field, type, help)
FLAGS: dict[str, tuple[str, str, type, str]] = {
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
    "--eval-every": ("", "eval_every", int, "objective cadence: slots (simulate), "
                     "block updates (train, rpd)"),
    "--out": ("", "out", str, "ledger file to write"),
}
TRAIN_FLAGS: dict[str, tuple[str, str, type, str]] = {
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors naming the program."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)


def fail(message: str) -> None:
    """Print one error line and exit 2."""
    print(f"rpd-mpi: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _typed(kind: type, flag: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag}: must be {'an integer' if kind is int else 'a number'} "
                f"(got {text!r})") from None
    return convert


def _add_run_flags(p: argparse.ArgumentParser, table: dict) -> None:
    p.add_argument("--config", help="TOML file with [schedule], [rpd], [objective], "
                   "[runtime] sections and top-level lr, seed, eval_every, out; flags win")
    defaults = RunConfig()
    for flag, (section, name, kind, text) in table.items():
        default = getattr(getattr(defaults, section) if section else defaults, name)
        shown = f" (default {default})" if default not in ("", None) else ""
        if kind is bool:          # a switch: given = True, absent = the config's value
            p.add_argument(flag, action="store_const", const=True, default=None, help=text)
            continue
        p.add_argument(flag, type=_typed(kind, flag) if kind is not str else str,
                       default=None, help=text + shown)


def config_from(args: argparse.Namespace, table: dict) -> RunConfig:
    """Defaults < TOML file < command-line flags, validated."""
    tree: dict[str, Any] = _read_toml(args.config) if getattr(args, "config", None) else {}
    for flag, (section, name, _, _) in table.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        (tree.setdefault(section, {}) if section else tree)[name] = value
    return RunConfig.from_dict(tree)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError("--config", f"cannot read {path}: {err}") from None


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rpd-mpi", description="Pipeline-parallel training on MPI ranks: "
                "PipeDream, Randomized PipeDream, LocalSGD; HDF5 ledgers of every update.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run the unit-time simulator (one process)")
    _add_run_flags(sim, FLAGS)
    sim.add_argument("--json", action="store_true", help="print the summary as JSON")
    train = sub.add_parser("train", help="run on MPI ranks (under mpiexec/srun)")
    _add_run_flags(train, {**FLAGS, **TRAIN_FLAGS})
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    sch = sub.add_parser("schedule", help="print a timeline grid")
    _schedule_flags(sch)
    sch.add_argument("--json", action="store_true", help="kind/mb grids as JSON")
    dl = sub.add_parser("delays", help="delay statistics of a schedule")
    _schedule_flags(dl)
    dl.add_argument("--json", action="store_true", help="print one JSON object")
    rep = sub.add_parser("report", help="summary of ledgers (several: a comparison table)")
    rep.add_argument("ledgers", nargs="+", help="run.h5 files written by simulate or train")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    for name, text in (("experiment", "run a paper experiment preset (tools/experiments.py)"),
                       ("tool", "run an analysis tool of tools/ (delays_vs_s, curves, ...)")):
        t = sub.add_parser(name, help=text, add_help=False)
        t.add_argument("name", help="experiment (E1..E6) or tool module name")
        t.add_argument("rest", nargs=argparse.REMAINDER, help="its own arguments")
    return p


def _schedule_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="pd", choices=("pd", "localsgd", "gpipe", "naive"))
    for flag in ("--stages", "--microbatches", "--noam", "--trajectories", "--local-steps",
                 "--flush"):
        p.add_argument(flag, type=_typed(int, flag), default=None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("train", "simulate"):
        # one BLAS thread per process: ranks share the cores (set before numpy loads)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
    from rpd_mpi import commands
    try:
        return commands.run(args)
    except ConfigError as err:
        fail(str(err))
    return 2
