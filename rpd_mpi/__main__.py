"""`python -m rpd_mpi` runs the command line."""

from rpd_mpi.cli import main

raise SystemExit(main())
