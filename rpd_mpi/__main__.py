"""`python -m rpd_mpi` runs the command line."""

from rpd_mpi.entry import main

raise SystemExit(main())
