"""Engines that execute a schedule with real math (docs/DESIGN.md 4).

    blocks   the block-update object every engine shares (stash, version, flush, SGD step,
             the typed update row) and the one function from rows to `Updates`
    sim      the unit-time simulator: one process runs every stage of a `Timeline`
    rpd      Randomized PipeDream: the plan, the block history, the sequential algorithm

The MPI runtime (`rpd_mpi.mpi`) reuses `blocks`; nothing here imports MPI or HDF5.
"""
