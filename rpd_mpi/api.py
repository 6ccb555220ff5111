"""The Python API for run files: `open_run(path)` -> `Run`, with pandas DataFrames on request.

    from rpd_mpi.api import open_run
    run = open_run("run.h5")
    run.updates.delays                 # K x S numpy array (the RunRecord arrays)
    run.updates_frame()                # pandas: one row per update, delay_0 .. delay_{S-1}

The arrays need only numpy and h5py; the frames need pandas (`pip install rpd_mpi[analysis]`).
Importing this module loads h5py (through `rpd_mpi.ledger`), never MPI.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rpd_mpi.ledger import read_run
from rpd_mpi.ledger.run_file import ledger_version
from rpd_mpi.ledger.schema import DATASETS, EVENT_FIELDS, OP_CODES, time_units, units_for
from rpd_mpi.records import UPDATE_FIELDS, Objective, RunRecord, Updates

ANALYSIS_HINT = "pip install rpd_mpi[analysis]"


def require(module: str, what: str) -> Any:
    """Import an optional dependency, or ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs {module}, which is not installed: "
                          f"{ANALYSIS_HINT}") from exc


@dataclass
class Run:
    """One run file: the `RunRecord` arrays and attributes, and DataFrame views of them."""

    path: Path
    schema_version: int
    record: RunRecord

    # ------------------------------------------------------------------ the arrays

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes: method, stages, ..., provenance (docs/LEDGER.md)."""
        return self.record.attrs

    @property
    def config(self) -> dict[str, Any]:
        return self.record.config

    @property
    def updates(self) -> Updates:
        return self.record.updates

    @property
    def events(self) -> np.ndarray:
        """Structured array of `rpd_mpi.records.EVENT_DTYPE`."""
        return self.record.events

    @property
    def objective(self) -> Objective:
        return self.record.objective

    @property
    def final_blocks(self) -> list[np.ndarray]:
        return self.record.final_blocks

    @property
    def timeline_kind(self) -> np.ndarray | None:
        return self.record.timeline_kind

    @property
    def timeline_mb(self) -> np.ndarray | None:
        return self.record.timeline_mb

    @property
    def stages(self) -> int:
        """S, the number of columns of the delay matrix."""
        return int(self.updates.delays.shape[1])

    @property
    def time_units(self) -> str:
        """'slots' (simulator) or 's' (MPI, seconds since the run's common start)."""
        return time_units(self.attrs.get("engine"))

    def units(self, dataset: str) -> str:
        """The unit of a dataset ('updates/time') or an event field ('events/wait')."""
        engine, objective = self.attrs.get("engine"), self.attrs.get("objective")
        group, _, field = dataset.partition("/")
        if group == "events" and field in EVENT_FIELDS:
            return units_for(EVENT_FIELDS[field][1], engine, objective)
        if dataset not in DATASETS:
            raise KeyError(f"no dataset {dataset!r} in the run file schema")
        return units_for(DATASETS[dataset].units, engine, objective)

    # ------------------------------------------------------------------ the frames

    def updates_frame(self) -> Any:
        """pandas.DataFrame, one row per update in global order: k, stage, group, trajectory,
        microbatch, batch, version, local_staleness, loss, grad_norm, time, delay_0 ..
        delay_{S-1}."""
        pd = require("pandas", "updates_frame()")
        columns: dict[str, np.ndarray] = {
            name: np.asarray(getattr(self.updates, name)) for name in UPDATE_FIELDS}
        delays = np.asarray(self.updates.delays)
        for s in range(delays.shape[1]):
            columns[f"delay_{s}"] = delays[:, s]
        return pd.DataFrame(columns)

    def events_frame(self) -> Any:
        """pandas.DataFrame, one row per executed op: the /events fields plus `op_name`
        (idle, F, B, avg)."""
        pd = require("pandas", "events_frame()")
        columns = {name: self.events[name] for name in self.events.dtype.names or ()}
        frame = pd.DataFrame(columns)
        frame["op_name"] = [OP_CODES.get(str(int(op)), str(int(op))) for op in self.events["op"]]
        return frame

    def objective_frame(self) -> Any:
        """pandas.DataFrame, one row per objective evaluation: time, k, value, and for a char
        LM with a validation split also validation (nats/char) and validation_bits."""
        pd = require("pandas", "objective_frame()")
        columns = {name: np.asarray(getattr(self.objective, name))
                   for name in ("time", "k", "value")}
        held = self.objective.validation
        if held is not None:
            columns["validation"] = np.asarray(held)
            columns["validation_bits"] = np.asarray(held) / np.log(2.0)
        return pd.DataFrame(columns)


def open_run(path: str | os.PathLike[str]) -> Run:
    """Read a run file (schema version 1 or 2); `rpd_mpi.ledger.LedgerError` if it is not a
    complete ledger."""
    record = read_run(path)
    return Run(Path(path), ledger_version(path), record)
