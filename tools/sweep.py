#!/usr/bin/env python3
"""`rpd-mpi tool sweep`: a thin entry point; the tool is rpd_mpi.analysis.sweep."""

import sys

from rpd_mpi.analysis.sweep import main

raise SystemExit(main(sys.argv[1:]))
