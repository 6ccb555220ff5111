"""The HDF5 ledger: the one schema for run files and per-rank part files (the only h5py importer).

This module owns the on-disk layout. Engines hand it a `RunRecord` (`rpd_mpi.records`);
analysis reads a `RunRecord` back. docs/LEDGER.md has the same schema as a table.

Run file (`run.h5`, schema version 2; version 1 files are still read)::

    /                       attrs: schema_version (int), complete (bool, written last),
                            package_version (str), config (JSON str), json_attrs (JSON list),
                            time_units ("slots" or "s"), and every entry of RunRecord.attrs
                            (provenance included: created, git_commit, command_line, ...)
    /updates/<field>        K rows each, in global update order k:
                            k, microbatch, batch, version, local_staleness (int64);
                            stage, group, trajectory (int32); loss, grad_norm, time (float64)
    /updates/delays         K x S int64, delays[k, s'] = k - j_k^(s')
    /events                 compound, EVENT_DTYPE, one row per executed op
    /objective/{time,k,value}   float64, int64, float64
    /objective/validation, validation_bits   float64 (char LM with a validation split: the
                            held-out loss at the same points, nats and bits per character)
    /final_blocks/block_000 ... one dataset per stage (shapes and dtypes as the engine gave)
    /timeline/kind          T x S int8 op codes (only when the run had a unit-time timeline)
    /timeline/mb            T x S int64 microbatch ids (idle cells as the engine filled them)

Schema version 2 makes the file self-describing (`rpd_mpi.ledger.schema` has the table):
every dataset has `description` and `units` attributes, /events also `fields` (JSON field ->
"description [units]") and `op_codes` (JSON code -> name; /timeline/kind too), and the
dimensions are HDF5 dimension scales, so h5netcdf/xarray name them: /stage (a coordinate,
0..S-1) and /event at the root, /updates/update, /objective/objective_point and
/timeline/slot (netCDF "dimension but not a variable" scales: no storage). /final_blocks has
no scales (open that group with phony_dims="sort").
Version 1 files have none of this and read the same.

Attribute encoding: str, bool, int, float (Python or numpy scalars) are stored natively.
Lists, tuples, dicts, numpy arrays and None are stored as JSON strings, their names listed
in the root attribute `json_attrs`; reading decodes them (tuples and arrays come back as
lists, None as None). Names in `RESERVED_ATTRS` may not appear in RunRecord.attrs.

Writes are atomic: `write_run` writes `<path>.partial`, sets `complete` as the last write,
closes, then `os.replace`s it to `path`. Readers reject files of another schema version and
files whose `complete` attribute is not True.

Part files (one per rank, appended during an MPI run, assembled by rank 0 at the end) are
written and read by `rpd_mpi.ledger.parts`, which shares this schema version::

    /                       attrs: schema_version, kind = "rank_part", rank, complete
    /events                 resizable, chunked, EVENT_DTYPE
    /updates                resizable, chunked, PART_UPDATE_DTYPE
    /snapshots              optional, resizable: (time, version, copy, block[d_s]) rows, the
                            rank's block after its updates, to rebuild the objective over time

Rows are buffered in memory (default 1024) and appended in blocks: one resize per block,
never one per row (docs/DESIGN.md 9: per-row resizing is ~250x slower).
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import h5py
import numpy as np

from rpd_mpi.ledger import schema
from rpd_mpi.ledger.provenance import package_version
from rpd_mpi.records import EVENT_DTYPE, Objective, RunRecord, Updates

SCHEMA_VERSION = 2
#: Schema versions `read_run` and `read_part` accept (1: before the units/dimension scales).
READABLE_VERSIONS = (1, 2)
RESERVED_ATTRS = ("schema_version", "complete", "package_version", "config", "json_attrs",
                  "time_units")
#: The NAME of an HDF5 dimension scale that is a netCDF dimension but not a variable
#: (netCDF-C's marker, which h5netcdf and so xarray honour).
NOT_A_VARIABLE = "This is a netCDF dimension but not a netCDF variable."

#: dtype of every /updates dataset (delays: int64, K x S).
UPDATE_DTYPES: dict[str, np.dtype] = {
    "k": np.dtype("i8"), "stage": np.dtype("i4"), "group": np.dtype("i4"),
    "trajectory": np.dtype("i4"), "microbatch": np.dtype("i8"), "batch": np.dtype("i8"),
    "version": np.dtype("i8"), "local_staleness": np.dtype("i8"),
    "loss": np.dtype("f8"), "grad_norm": np.dtype("f8"), "time": np.dtype("f8"),
}
_OBJECTIVE_DTYPES = {"time": np.dtype("f8"), "k": np.dtype("i8"), "value": np.dtype("f8")}

_COMPRESS_MIN = 4096     # elements; smaller datasets are stored contiguous, uncompressed


class LedgerError(Exception):
    """A ledger or data file cannot be written or read as asked; the message says why."""


# ----------------------------------------------------------------------------- writing


#: h5py raises OSError or RuntimeError for a failed write (HDF5 reports both ways)
WRITE_ERRORS = (OSError, RuntimeError)


def io_reason(err: Exception) -> str:
    """The one-line reason of a failed write (h5py's messages span several lines)."""
    errno = getattr(err, "errno", None)
    if errno:
        return os.strerror(errno)
    found = re.search(r"error message = '([^']*)'", str(err))
    if found:
        return found.group(1)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def write_run(path: str | os.PathLike[str], record: RunRecord, run_id: str = "") -> None:
    """Write `record` to `path` atomically: via `<path>.<run_id>.partial` (`<path>.partial`
    without a run id) and `os.replace`, so an old file at `path` stays intact until then."""
    path = Path(path)
    if not path.parent.is_dir():
        raise LedgerError(f"cannot write ledger {path}: directory {path.parent} does not exist")
    partial = path.with_name(f"{path.name}.{run_id}.partial" if run_id else
                             f"{path.name}.partial")
    try:
        with h5py.File(partial, "w") as f:
            f.attrs["complete"] = False
            _write_attrs(f, record)
            _write_updates(f.create_group("updates"), record.updates)
            _write_events(f, record.events)
            _write_objective(f.create_group("objective"), record.objective)
            _write_blocks(f.create_group("final_blocks"), record.final_blocks)
            _write_timeline(f, record.timeline_kind, record.timeline_mb)
            _describe(f, record)
            f.attrs["complete"] = True
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def _write_attrs(f: h5py.File, record: RunRecord) -> None:
    clash = sorted(set(record.attrs) & set(RESERVED_ATTRS))
    if clash:
        raise LedgerError(f"RunRecord.attrs uses names reserved by the ledger: {clash}")
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["package_version"] = package_version()
    f.attrs["time_units"] = schema.time_units(record.attrs.get("engine"))
    f.attrs["config"] = _to_json(record.config, "config")
    json_names = []
    for name, value in record.attrs.items():
        if value is None or isinstance(value, (list, tuple, dict, np.ndarray)):
            f.attrs[name] = _to_json(value, name)
            json_names.append(name)
        elif isinstance(value, (str, bool, int, float, np.generic)):
            f.attrs[name] = value
        else:
            raise LedgerError(f"attribute {name!r} has unsupported type {type(value).__name__}")
    f.attrs["json_attrs"] = json.dumps(json_names)


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"{what} is not JSON-serialisable: {exc}") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _create(group: h5py.Group, name: str, data: np.ndarray, compress: bool) -> None:
    """A dataset; gzip(1)+shuffle only for compressible arrays large enough to matter."""
    if compress and data.size >= _COMPRESS_MIN:
        group.create_dataset(name, data=data, compression="gzip", compression_opts=1,
                             shuffle=True, chunks=True)
    else:
        group.create_dataset(name, data=data)


def _cast(value: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    try:
        return np.asarray(value).astype(dtype, casting="same_kind", copy=False)
    except TypeError as exc:
        raise LedgerError(f"{what} has dtype {np.asarray(value).dtype}, "
                          f"which does not cast safely to {dtype}") from exc


def _write_updates(group: h5py.Group, updates: Updates) -> None:
    n = len(updates)
    for name, dtype in UPDATE_DTYPES.items():
        data = _cast(getattr(updates, name), dtype, f"updates.{name}")
        if data.shape != (n,):
            raise LedgerError(f"updates.{name} has shape {data.shape}; expected ({n},)")
        _create(group, name, data, compress=dtype.kind == "i")
    delays = _cast(updates.delays, np.dtype("i8"), "updates.delays")
    if delays.ndim != 2 or delays.shape[0] != n:
        raise LedgerError(f"updates.delays has shape {delays.shape}; expected ({n}, S)")
    _create(group, "delays", delays, compress=True)


def _write_events(f: h5py.File, events: np.ndarray) -> None:
    if events.dtype != EVENT_DTYPE or events.ndim != 1:
        raise LedgerError(f"events must be a 1-D array of EVENT_DTYPE, got {events.dtype}")
    _create(f, "events", events, compress=True)


def _write_objective(group: h5py.Group, objective: Objective) -> None:
    arrays = {n: _cast(getattr(objective, n), d, f"objective.{n}")
              for n, d in _OBJECTIVE_DTYPES.items()}
    shapes = {a.shape for a in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise LedgerError(f"objective time, k, value must be 1-D of one length, got {shapes}")
    for name, data in arrays.items():
        _create(group, name, data, compress=False)
    if objective.validation is not None:        # char LM with a validation split
        held = _cast(objective.validation, np.dtype("f8"), "objective.validation")
        if held.shape != arrays["value"].shape:
            raise LedgerError(f"objective.validation has shape {held.shape}; expected "
                              f"{arrays['value'].shape}, one value per objective point")
        _create(group, "validation", held, compress=False)
        _create(group, "validation_bits", held / np.log(2.0), compress=False)


def _write_blocks(group: h5py.Group, blocks: Sequence[np.ndarray]) -> None:
    group.attrs["count"] = len(blocks)
    for s, block in enumerate(blocks):
        group.create_dataset(_block_name(s), data=np.asarray(block))


def _block_name(stage: int) -> str:
    return f"block_{stage:03d}"


def _write_timeline(f: h5py.File, kind: np.ndarray | None, mb: np.ndarray | None) -> None:
    if kind is None and mb is None:
        return
    group = f.create_group("timeline")
    if kind is not None:
        _create(group, "kind", _cast(kind, np.dtype("i1"), "timeline_kind"), compress=True)
    if mb is not None:
        _create(group, "mb", _cast(mb, np.dtype("i8"), "timeline_mb"), compress=True)


def _describe(f: h5py.File, record: RunRecord) -> None:
    """Schema 2: `description`/`units` on every dataset and group, the op codes and event
    fields on /events, and dimension scales attached to every axis (docs/LEDGER.md)."""
    engine, objective = record.attrs.get("engine"), record.attrs.get("objective")
    for name, entry in schema.DATASETS.items():
        if name in f:
            _label(f[name], entry.description,
                   schema.units_for(entry.units, engine, objective))
            _attach(f, f[name], entry.dims)
    for name, text in schema.GROUPS.items():
        if name in f:
            f[name].attrs["description"] = text
    events = f["events"]
    events.attrs["fields"] = schema.event_fields(engine, objective)
    events.attrs["op_codes"] = json.dumps(schema.OP_CODES)
    if "timeline/kind" in f:
        f["timeline/kind"].attrs["op_codes"] = json.dumps(schema.OP_CODES)
    for s in range(int(f["final_blocks"].attrs["count"])):      # no scales: see block_entry
        entry = schema.block_entry(s)
        _label(f["final_blocks"][_block_name(s)], entry.description, entry.units)


def _label(obj: h5py.HLObject, description: str, units: str) -> None:
    obj.attrs["description"] = description
    obj.attrs["units"] = units


def _attach(f: h5py.File, dataset: h5py.Dataset, dims: tuple[str, ...]) -> None:
    """Attach a dimension scale to each axis of `dataset`, creating the scale on first use:
    `stage` (a coordinate) and `event` at the root, the others in the dataset's group. A
    scale of the right name but another length is not reused: the axis gets `<name>_<n>`."""
    if len(dims) != dataset.ndim:
        return
    for axis, name in enumerate(dims):
        size = int(dataset.shape[axis])
        home = f if name in ("stage", "event") else dataset.parent
        scale = _scale(home, name, size)
        dataset.dims[axis].attach_scale(scale)
        dataset.dims[axis].label = name


def _scale(group: h5py.Group, name: str, size: int) -> h5py.Dataset:
    existing = group.get(name)
    if isinstance(existing, h5py.Dataset) and existing.shape == (size,) and \
            existing.attrs.get("CLASS") == b"DIMENSION_SCALE":
        return existing
    if existing is not None:
        return _scale(group, f"{name}_{size}", size)
    described = schema.dimension_description(name)
    if name == "stage":
        scale = group.create_dataset(name, data=np.arange(size, dtype=np.int32))
        scale.make_scale(name)
    else:
        scale = group.create_dataset(name, shape=(size,), dtype="f4")
        scale.make_scale(f"{NOT_A_VARIABLE}{size:10d}")
    _label(scale, f"dimension: {described}" if described else "dimension", "1")
    return scale


# ----------------------------------------------------------------------------- reading


def open_ledger(path: str | os.PathLike[str], what: str) -> h5py.File:
    """Open an existing HDF5 file for reading, or raise LedgerError saying why not."""
    path = Path(path)
    if not path.exists():
        hint = ""
        left = sorted(path.parent.glob(f"{glob.escape(path.name)}.*partial"))
        if left:
            hint = f" (but {left[-1].name} exists: the run did not finish writing it)"
        raise LedgerError(f"{what} {path} does not exist{hint}")
    if path.is_dir() or not h5py.is_hdf5(path):
        raise LedgerError(f"{what} {path} is not an HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise LedgerError(f"{what} {path} cannot be opened: {exc}") from exc


def check_version(f: h5py.File, path: str | os.PathLike[str]) -> None:
    if "schema_version" not in f.attrs:
        raise LedgerError(f"{path} is not an rpd_mpi ledger (no schema_version attribute)")
    version = f.attrs["schema_version"]
    if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)) \
            or int(version) not in READABLE_VERSIONS:
        raise LedgerError(f"{path} has ledger schema version {_plain(version)!r}; "
                          f"this rpd_mpi reads version "
                          f"{' or '.join(map(str, READABLE_VERSIONS))}")


def is_complete(value: object) -> bool:
    """A `complete` attribute counts only when it is exactly True (h5py reads a bool
    attribute as numpy.bool_); 1, "yes" or "true" do not."""
    return value is True or (isinstance(value, np.bool_) and bool(value))


def _check_header(f: h5py.File, path: str | os.PathLike[str]) -> None:
    check_version(f, path)
    if f.attrs.get("kind") == "rank_part":
        raise LedgerError(f"{path} is a rank part file, not a run ledger (see read_part)")
    if not is_complete(f.attrs.get("complete")):
        raise LedgerError(f"{path} is incomplete (the run did not finish writing it: its "
                          f"complete attribute is {_plain(f.attrs.get('complete'))!r}, not "
                          f"True)")


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


#: Attributes the readers compute with, and the types they must have (None allowed).
_TYPED_ATTRS: dict[str, tuple[type, ...]] = {
    **{n: (int,) for n in ("stages", "groups", "trajectories", "local_steps", "flush", "noam",
                           "microbatches", "slots", "delta", "dim", "examples")},
    **{n: (int, float) for n in ("lr", "f_star", "L")},
    **{n: (str,) for n in ("method", "engine", "objective")},
}


def read_run(path: str | os.PathLike[str]) -> RunRecord:
    """Read a run file written by `write_run`; LedgerError naming the file if it is not a
    complete ledger of a readable schema version (1 or 2) or a part of it is missing or
    malformed."""
    with open_ledger(path, "ledger") as f:
        _check_header(f, path)
        try:
            record = RunRecord(
                attrs=_read_attrs(f), config=_read_config(f),
                updates=_read_updates(f["updates"]), events=_read_events(f),
                objective=Objective(**{n: f["objective"][n][()] for n in _OBJECTIVE_DTYPES},
                                    validation=_optional(f, "objective/validation")),
                final_blocks=_read_blocks(f["final_blocks"]),
                timeline_kind=_optional(f, "timeline/kind"),
                timeline_mb=_optional(f, "timeline/mb"),
            )
        except KeyError as exc:
            raise LedgerError(f"{path} lacks a part of the ledger schema: {exc}") from exc
        except (TypeError, ValueError, OSError) as exc:     # bad JSON, types, a torn file
            raise LedgerError(f"{path} is malformed: {type(exc).__name__}: {exc}") from exc
    _check_attrs(record.attrs, path)
    return record


def ledger_version(path: str | os.PathLike[str]) -> int:
    """The schema version of a readable ledger (LedgerError otherwise)."""
    with open_ledger(path, "ledger") as f:
        check_version(f, path)
        return int(f.attrs["schema_version"])


def _read_config(f: h5py.File) -> dict[str, Any]:
    config = json.loads(_text(f.attrs["config"], "config"))
    if not isinstance(config, dict):
        raise ValueError(f"the config attribute must be a JSON object (got {config!r:.60})")
    return config


def _text(value: object, name: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"the {name} attribute must be a JSON string (got "
                        f"{_plain(value)!r:.60})")
    return value


def _check_attrs(attrs: dict[str, Any], path: str | os.PathLike[str]) -> None:
    for name, kinds in _TYPED_ATTRS.items():
        value = attrs.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise LedgerError(f"{path} is malformed: attribute {name!r} is {value!r:.60}, "
                              f"not {' or '.join(k.__name__ for k in kinds)}")


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    json_names = set(json.loads(_text(f.attrs["json_attrs"], "json_attrs")))
    attrs: dict[str, Any] = {}
    for name, value in f.attrs.items():
        if name in RESERVED_ATTRS:
            continue
        if name in json_names:
            attrs[name] = json.loads(_text(value, name))
        elif isinstance(value, np.generic):
            attrs[name] = value.item()
        else:
            attrs[name] = value
    return attrs


def _read_updates(group: h5py.Group) -> Updates:
    fields = {n: group[n][()] for n in UPDATE_DTYPES if n != "k"}
    delays = group["delays"][()]
    rows = {np.shape(v) for v in fields.values()}
    if len(rows) != 1 or len(next(iter(rows))) != 1 or np.ndim(delays) != 2 or \
            np.shape(delays)[0] != next(iter(rows))[0]:
        raise ValueError(f"/updates columns have shapes {sorted(rows)} and delays "
                         f"{np.shape(delays)}; expected K rows each and K x S delays")
    return Updates(delays=delays, **fields)


def _read_events(f: h5py.File) -> np.ndarray:
    events: np.ndarray = f["events"][()]
    if events.ndim != 1 or not set(EVENT_DTYPE.names or ()) <= set(events.dtype.names or ()):
        raise ValueError(f"/events must be 1-D rows of {EVENT_DTYPE.names} (got dtype "
                         f"{events.dtype}, shape {events.shape})")
    return events


def _read_blocks(group: h5py.Group) -> list[np.ndarray]:
    return [group[_block_name(s)][()] for s in range(int(group.attrs["count"]))]


def _optional(f: h5py.File, name: str) -> np.ndarray | None:
    return f[name][()] if name in f else None


def read_arrays(path: str | os.PathLike[str], names: Iterable[str],
                optional: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """Top-level datasets of a user data file (`--data`): all of `names`, those of `optional`
    that exist. A 0-d dataset (e.g. f_star) comes back as a 0-d array."""
    out: dict[str, np.ndarray] = {}
    with open_ledger(path, "data file") as f:
        try:
            for name in names:
                if not isinstance(f.get(name), h5py.Dataset):
                    raise LedgerError(f"data file {path} has no top-level dataset {name!r} (it "
                                      f"has: {', '.join(sorted(f.keys())) or 'nothing'})")
                out[name] = np.asarray(f[name][()])
            for name in optional:
                if isinstance(f.get(name), h5py.Dataset):
                    out[name] = np.asarray(f[name][()])
        except (OSError, KeyError, TypeError, ValueError) as exc:     # torn or odd datasets
            raise LedgerError(f"data file {path} cannot be read: {type(exc).__name__}: "
                              f"{exc}") from exc
    return out


def array_shape(path: str | os.PathLike[str], name: str) -> tuple[int, ...] | None:
    """The shape of top-level dataset `name` of an HDF5 file, without reading it; None when
    the file or the dataset cannot be read (`read_arrays` then says why)."""
    try:
        with h5py.File(path, "r") as f:
            dataset = f.get(name)
            return tuple(int(n) for n in dataset.shape) if isinstance(dataset, h5py.Dataset) \
                and dataset.shape is not None else None
    except (OSError, TypeError, ValueError):
        return None
