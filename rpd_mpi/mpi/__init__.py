"""The MPI runtime (docs/DESIGN.md 4, `mpi` engine): one rank per pipeline stage.

    comm          communicators, links and waits: with comm_gpu the only mpi4py importers
    comm_gpu      links for device arrays (pinned staging, CUDA-aware MPI, CUDA IPC)
    backend       the array module of a rank (numpy or cupy) and its device
    recorder      a rank's events, updates and snapshots, appended to its part file
    stage_runner  PD / LocalSGD / GPipe / naive ranks: static or dynamic 1F1B order
    rpd_runner    Randomized PipeDream ranks executing the shared plan
    measured      measured global order, delays and objective curve (pure numpy)
    assemble      rank 0: the run record from every rank's part
    train         `rpd-mpi train`: validate on every rank, agree, run, assemble
"""
