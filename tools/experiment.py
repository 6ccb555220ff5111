#!/usr/bin/env python3
"""`rpd-mpi experiment NAME`: a thin entry point; the presets are rpd_mpi.experiments."""

import sys

from rpd_mpi.experiments.registry import main

raise SystemExit(main(sys.argv[1:]))
