"""The `rpd-mpi` console script (and `python -m rpd_mpi`).

`train`, `simulate`, `experiment` and `tool` run each process with one BLAS thread unless the
user set the variables: MPI ranks and sweep workers share the cores, and threaded BLAS made
small charlm stages 8x slower on a 2-core machine. The variables only act if they are set
before numpy is loaded, so this
module sets them first and imports the command line afterwards: the one deliberate import
inside a function in the package (tests/test_layers.py allows exactly this one).

A reader that goes away early (`rpd-mpi report run.h5 | head -1`) ends the command quietly
with exit code 141 (128 + SIGPIPE, what a shell reports for a process killed by SIGPIPE):
no traceback, and nothing more is written to the closed pipe.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

RUN_COMMANDS = ("train", "simulate", "experiment", "tool")   # they run engines in processes
BROKEN_PIPE = 141
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] and args[0] in RUN_COMMANDS:
        for var in BLAS_THREAD_VARS:
            os.environ.setdefault(var, "1")
    from rpd_mpi.cli import main as cli_main  # after the variables: it loads numpy
    try:
        code = cli_main(args)
        sys.stdout.flush()          # a closed pipe shows here, not in the interpreter's exit
    except BrokenPipeError:
        return _quiet_broken_pipe()
    return code


def _quiet_broken_pipe() -> int:
    """Point stdout at /dev/null (the flush at exit would fail again) and return 141."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):   # stdout has no file descriptor: nothing left to flush
        pass
    finally:
        os.close(devnull)
    return BROKEN_PIPE
