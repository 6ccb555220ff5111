"""The HDF5 ledger (docs/DESIGN.md 5, docs/LEDGER.md): the only package that imports h5py.

    run_file  the run file: `write_run`, `read_run`, `read_arrays`, the schema version
    parts     per-rank part files of an MPI run, appended during the run
    report    summaries and comparison tables of run records (pure: no h5py)

`read_run`, `write_run`, `read_arrays` and `LedgerError` are the API the analysis tools use.
"""

from rpd_mpi.ledger.run_file import SCHEMA_VERSION, LedgerError, read_arrays, read_run, write_run

__all__ = ["SCHEMA_VERSION", "LedgerError", "read_arrays", "read_run", "write_run"]
