"""The `rpd-mpi` command line (docs/DESIGN.md 6): simulate, train, schedule, delays, report.

The run flags and their mapping onto the `RunConfig` tree are in `rpd_mpi.flags`; what each
subcommand does is in `rpd_mpi.commands`; `rpd_mpi.entry` is the console script. Every bad value ends in one line
`rpd-mpi: error: --flag: what is allowed (got ...)` and exit code 2, before any work starts
and before any ledger file is created.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

from rpd_mpi import commands
from rpd_mpi.config import ConfigError
from rpd_mpi.flags import FLAGS, TRAIN_FLAGS, add_run_flags, typed

#: Where launchers put a process's rank (MPICH/Hydra, PMIx, Open MPI, Intel MPI, Slurm).
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID",
                  "SLURM_PROCID")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors naming the program, and no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(message)


def launch_rank() -> int | None:
    """This process's rank as the launcher set it (mpiexec, srun), without importing mpi4py
    (that would start MPI); None outside a launch."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def fail(message: str) -> None:
    """Print one error line (once per job: only on rank 0 of a launch) and exit 2."""
    if launch_rank() in (None, 0):
        print(f"rpd-mpi: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rpd-mpi", description="Pipeline-parallel training on MPI ranks: "
                "PipeDream, Randomized PipeDream, LocalSGD; HDF5 ledgers of every update.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run the unit-time simulator (one process)")
    add_run_flags(sim, FLAGS)
    sim.add_argument("--json", action="store_true", help="print the summary as JSON")
    train = sub.add_parser("train", help="run on MPI ranks (under mpiexec/srun)")
    add_run_flags(train, {**FLAGS, **TRAIN_FLAGS})
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
    for name, text in (("experiment", "run a paper experiment preset (rpd_mpi.experiments)"),
                       ("tool", "run an analysis tool of rpd_mpi.analysis (delays_vs_s, "
                                "curves, ...)")):
        t = sub.add_parser(name, help=text, add_help=False)
        t.add_argument("name", help="experiment (E1..E6) or tool module name")
        t.add_argument("rest", nargs=argparse.REMAINDER, help="its own arguments")
    return p


def _schedule_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="pd", choices=("pd", "localsgd", "gpipe", "naive"))
    for flag in ("--stages", "--microbatches", "--noam", "--trajectories", "--local-steps",
                 "--flush"):
        p.add_argument(flag, type=typed(int, flag), default=None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return commands.run(args)
    except ConfigError as err:
        fail(str(err))
    return 2
