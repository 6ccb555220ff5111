"""Post-hoc analysis of rpd_mpi ledgers and the paper's experiment presets (DESIGN 7).

Every module has `main(argv) -> int` and is reachable as `rpd-mpi tool NAME ...`
(`experiments` as `rpd-mpi experiment E1 ...`). Tools read ledgers only through
`rpd_mpi.ledger`; plots use matplotlib's Agg backend. Importing does no work.

    delays_vs_s   E1: delay statistics of PD 1F1B vs S, quadratic fits, table and PNG
    curves        objective gap vs slots / block updates / wall time of several ledgers
    timeline      Gantt chart of a ledger's events or of a generated schedule; bubbles
    sweep         powers-of-two step-size sweeps in parallel processes (or a Slurm array)
    theory        RPD theory check: running mean of ||grad f||^2 next to the bound
    experiments   presets E1-E6 with the paper's settings
"""
