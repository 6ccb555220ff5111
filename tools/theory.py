#!/usr/bin/env python3
"""`rpd-mpi tool theory`: a thin entry point; the tool is rpd_mpi.analysis.theory."""

import sys

from rpd_mpi.analysis.theory import main

raise SystemExit(main(sys.argv[1:]))
