"""The `rpd-mpi` console script (and `python -m rpd_mpi`).

`train` and `simulate` run each process with one BLAS thread unless the user set the
variables: MPI ranks share the cores, and threaded BLAS made small charlm stages 8x slower on
a 2-core machine. The variables only act if they are set before numpy is loaded, so this
module sets them first and imports the command line afterwards: the one deliberate import
inside a function in the package (tests/test_layers.py allows exactly this one).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

RUN_COMMANDS = ("train", "simulate")
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] and args[0] in RUN_COMMANDS:
        for var in BLAS_THREAD_VARS:
            os.environ.setdefault(var, "1")
    from rpd_mpi.cli import main as cli_main  # after the variables: it loads numpy
    return cli_main(args)
