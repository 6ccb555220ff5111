#!/usr/bin/env python3
"""`rpd-mpi tool timeline`: a thin entry point; the tool is rpd_mpi.analysis.timeline."""

import sys

from rpd_mpi.analysis.timeline import main

raise SystemExit(main(sys.argv[1:]))
