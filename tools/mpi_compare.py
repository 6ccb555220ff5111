#!/usr/bin/env python3
"""`rpd-mpi tool mpi_compare`: a thin entry point; the tool is rpd_mpi.analysis.mpi_compare."""

import sys

from rpd_mpi.analysis.mpi_compare import main

raise SystemExit(main(sys.argv[1:]))
