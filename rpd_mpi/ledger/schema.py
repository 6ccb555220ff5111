"""What every dataset of a run file means: descriptions, units and dimension names (pure).

`rpd_mpi.ledger.run_file` writes these as the `description` and `units` attributes of each
dataset (schema version 2), `/events` also gets `fields` (a JSON object field ->
"description [units]") and `op_codes`, and the dimension names below become HDF5 dimension
scales, so that h5netcdf/xarray show named dimensions. docs/LEDGER.md has the same table.

Units follow the CF convention of "1" for dimensionless numbers (indices, counts, ratios).
Two units depend on the run: time ("slots" for the unit-time simulator, "s" for measured MPI
runs: seconds since the run's common start on rank 0's clock) and the loss/objective (the
objective's own unit). `{time}` and `{loss}` in the tables are filled by `units_for`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from rpd_mpi.records import EVENT_DTYPE, OP_NAMES

#: The op codes of /events `op` and /timeline/kind, as stored in their `op_codes` attribute.
OP_CODES: dict[str, str] = {str(code): name for code, name in sorted(OP_NAMES.items())}

#: Time units by engine (root attribute `engine`).
TIME_UNITS = {"sim": "slots", "mpi": "s"}
TIME_MEANING = {
    "sim": "unit-time slots of the simulator (one op per slot and stage)",
    "mpi": "seconds since the run's common start, on rank 0's clock (MPI.Wtime differences)",
}

#: Units of losses and objective values by objective (root attribute `objective`).
LOSS_UNITS = {"logistic": "nats per example", "charlm": "nats per character"}

#: Names of the dimensions (HDF5 dimension scales) and what they count.
DIMENSIONS: dict[str, str] = {
    "update": "block updates k = 0..K-1, in global order (of completion)",
    "stage": "pipeline stages s' = 0..S-1 (columns of the delay matrix and the timeline)",
    "event": "executed ops, one row of /events each",
    "objective_point": "evaluations of the full objective",
    "slot": "unit-time slots t = 0..T-1 of the schedule",
}


@dataclass(frozen=True)
class Entry:
    """One dataset: what it holds, its unit (may contain {time} or {loss}), its dimensions."""

    description: str
    units: str
    dims: tuple[str, ...]


_UPD = ("update",)

#: Every dataset of a run file except the per-stage /final_blocks/block_NNN (see `block_entry`)
#: and the dimension scales themselves (see `DIMENSIONS`).
DATASETS: dict[str, Entry] = {
    "updates/k": Entry("global update index k, in order of completion", "1", _UPD),
    "updates/stage": Entry("stage s_k whose parameter block update k changed", "1", _UPD),
    "updates/group": Entry("pipeline group of the update (LocalSGD allreduce group; 0 "
                           "otherwise)", "1", _UPD),
    "updates/trajectory": Entry("trajectory of the update (LocalSGD interleaving; 0 "
                                "otherwise)", "1", _UPD),
    "updates/microbatch": Entry("microbatch m_k of the update (RPD: the iteration k)", "1",
                                _UPD),
    "updates/batch": Entry("dataset batch id used by that microbatch", "1", _UPD),
    "updates/version": Entry("version of block s_k read by the forward pass (= the version "
                             "this update replaced)", "updates of that block", _UPD),
    "updates/local_staleness": Entry("versions of block s_k applied between its read and "
                                     "this update", "updates of that block", _UPD),
    "updates/delays": Entry("delays[k, s'] = k - j_k^(s'): global delay of block s' in "
                            "update k (docs/DESIGN.md 2.3)", "global updates",
                            ("update", "stage")),
    "updates/loss": Entry("last-stage loss of microbatch m_k (NaN where not known)", "{loss}",
                          _UPD),
    "updates/grad_norm": Entry("Euclidean norm of the block gradient applied", "1", _UPD),
    "updates/time": Entry("completion time of the update", "{time}", _UPD),
    "events": Entry("one row per executed op (fields: see the `fields` attribute; op codes: "
                    "`op_codes`)", "{time}", ("event",)),
    "objective/time": Entry("when the full objective was evaluated", "{time}",
                            ("objective_point",)),
    "objective/k": Entry("block updates applied when the objective was evaluated", "1",
                         ("objective_point",)),
    "objective/value": Entry("full objective f(w) (LocalSGD: at the average of the copies)",
                             "{loss}", ("objective_point",)),
    "objective/validation": Entry("held-out loss: mean next-character cross-entropy on the "
                                  "validation windows (the last --val-fraction of the text), "
                                  "at the same weights as value", "nats per character",
                                  ("objective_point",)),
    "objective/validation_bits": Entry("the same held-out loss in bits (validation / ln 2)",
                                       "bits per character", ("objective_point",)),
    "timeline/kind": Entry("op code per slot and stage of the unit-time schedule (see "
                           "`op_codes`)", "1", ("slot", "stage")),
    "timeline/mb": Entry("microbatch per slot and stage of the unit-time schedule (idle "
                         "cells as the engine filled them)", "1", ("slot", "stage")),
}

#: Datasets only some runs write: the held-out loss of a char LM with a validation split.
OPTIONAL_DATASETS = ("objective/validation", "objective/validation_bits")

#: The fields of /events (EVENT_DTYPE): description and unit.
EVENT_FIELDS: dict[str, tuple[str, str]] = {
    "rank": ("MPI rank that ran the op (simulator: group * S + stage)", "1"),
    "group": ("pipeline group", "1"),
    "stage": ("pipeline stage", "1"),
    "trajectory": ("trajectory (LocalSGD interleaving; 0 otherwise)", "1"),
    "op": ("op code: " + ", ".join(f"{c} {n}" for c, n in OP_CODES.items()), "1"),
    "microbatch": ("microbatch of the op (RPD: the iteration; avg: the averaging round)", "1"),
    "version": ("version of the stage's block the op used", "updates of that block"),
    "start": ("start time of the op", "{time}"),
    "end": ("end time of the op", "{time}"),
    "wait": ("time blocked waiting for the op's input", "{time}"),
    "bytes": ("payload sent by F/B, allreduced by avg", "bytes"),
}
assert tuple(EVENT_FIELDS) == EVENT_DTYPE.names, "EVENT_FIELDS must follow EVENT_DTYPE"


#: Descriptions of the groups.
GROUPS: dict[str, str] = {
    "updates": "block updates in global order k (one row per update)",
    "objective": "the full objective at the evaluation cadence",
    "final_blocks": "final parameter block of each stage (attribute count = S)",
    "timeline": "the unit-time schedule (slots x stages)",
}


def dimension_description(name: str) -> str:
    """What a dimension counts ('' for a name this table does not know); `<name>_<n>` (a
    second scale of another length) as `<name>`."""
    return DIMENSIONS.get(name) or DIMENSIONS.get(name.rpartition("_")[0], "")


def block_entry(stage: int) -> Entry:
    """/final_blocks/block_NNN: the final parameter block of one stage. Its axes have no
    dimension scales (blocks differ in size per stage, and a scale must live in the group or
    above it, which would put one dataset per stage at the root); h5netcdf names them with
    phony_dims="sort"."""
    return Entry(f"final parameter block of stage {stage}", "1", ())


def time_units(engine: object) -> str:
    """'slots' (simulator) or 's' (MPI); '' for an engine this version does not know."""
    return TIME_UNITS.get(str(engine), "")


def loss_units(objective: object) -> str:
    return LOSS_UNITS.get(str(objective), "1")


def units_for(template: str, engine: object, objective: object) -> str:
    """A unit of the tables above with {time} and {loss} filled in for one run."""
    return template.format(time=time_units(engine), loss=loss_units(objective))


def event_fields(engine: object, objective: object) -> str:
    """The `fields` attribute of /events: JSON {field: "description [units]"}."""
    return json.dumps({name: f"{text} [{units_for(unit, engine, objective)}]"
                       for name, (text, unit) in EVENT_FIELDS.items()})
