"""Post-hoc analysis of rpd_mpi ledgers (`rpd-mpi tool NAME`, docs/DESIGN.md 7).

Every tool module has `main(argv) -> int`; `TOOLS` lists them. Tools read ledgers through
`rpd_mpi.ledger` and run configurations through `rpd_mpi.build`; plots use matplotlib's Agg
backend. Importing does no work.

    delays_vs_s   E1: delay statistics of PD 1F1B vs S, quadratic fits, table and PNG
    curves        objective gap vs slots / block updates / wall time of several ledgers
    timeline      Gantt chart of a ledger's events or of a generated schedule; bubbles
    sweep         powers-of-two step-size sweeps in parallel processes (or a Slurm array)
    theory        RPD theory check: running mean of ||grad f||^2 next to the bound
    mpi_compare   E3 at S = 4 on real MPI ranks, PD against LocalSGD in wall time
    trace         Chrome trace of a ledger's events for Perfetto: one track per rank
    export        a ledger's updates/events/objective tables as CSV or Parquet (`rpd-mpi export`)
"""

TOOLS = ("delays_vs_s", "curves", "timeline", "sweep", "theory", "mpi_compare", "trace", "export")
