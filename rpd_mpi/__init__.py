"""rpd_mpi: pipeline-parallel training research on MPI ranks (PD, RPD, LocalSGD).

Importing the package does no work and never initialises MPI.
"""

__version__ = "0.1.0"
