#!/usr/bin/env python3
"""`rpd-mpi tool curves`: a thin entry point; the tool is rpd_mpi.analysis.curves."""

import sys

from rpd_mpi.analysis.curves import main

raise SystemExit(main(sys.argv[1:]))
