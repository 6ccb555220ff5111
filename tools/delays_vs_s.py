#!/usr/bin/env python3
"""`rpd-mpi tool delays_vs_s`: a thin entry point; the tool is rpd_mpi.analysis.delays_vs_s."""

import sys

from rpd_mpi.analysis.delays_vs_s import main

raise SystemExit(main(sys.argv[1:]))
