"""The paper's experiments E1-E6 as named presets (`rpd-mpi experiment EN`, docs/DESIGN.md 7).

    registry  the presets by name, their settings and the `main` entry point
    presets   E2-E5: how each is run, tuned and tabulated
    e6        E6: the character language model, PD against LocalSGD
"""
