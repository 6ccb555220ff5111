"""Export a run file's tables as CSV or Parquet: `rpd-mpi export run.h5 --format csv --out DIR`.

Writes three tables to DIR (created if missing; its parent must exist), the frames of
`rpd_mpi.api.Run`:

    updates.<ext>     one row per block update in global order: k, stage, ..., time,
                      delay_0 .. delay_{S-1}
    events.<ext>      one row per executed op: the /events fields and op_name
    objective.<ext>   one row per objective evaluation: time, k, value

and `run.json` next to them: the root attributes (provenance included), the configuration,
the schema version and the units of every column. Existing files are not overwritten
unless --force is given. Needs pandas, and pyarrow for Parquet (`pip install
rpd_mpi[analysis]`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rpd_mpi import jsonout
from rpd_mpi.analysis.common import Parser, ToolError, check_out_dir, guarded
from rpd_mpi.api import Run, open_run, require
from rpd_mpi.ledger.schema import EVENT_FIELDS

FORMATS = {"csv": "csv", "parquet": "parquet"}
TABLES = ("updates", "events", "objective")


def frames(run: Run) -> dict[str, Any]:
    """The three tables as pandas DataFrames, by name."""
    return {"updates": run.updates_frame(), "events": run.events_frame(),
            "objective": run.objective_frame()}


def column_units(run: Run) -> dict[str, dict[str, str]]:
    """{table: {column: unit}} for run.json."""
    updates = {name: run.units(f"updates/{name}") for name in
               ("k", "stage", "group", "trajectory", "microbatch", "batch", "version",
                "local_staleness", "loss", "grad_norm", "time")}
    updates.update({f"delay_{s}": run.units("updates/delays") for s in range(run.stages)})
    events = {name: run.units(f"events/{name}") for name in EVENT_FIELDS}
    events["op_name"] = ""
    objective = {name: run.units(f"objective/{name}") for name in ("time", "k", "value")}
    return {"updates": updates, "events": events, "objective": objective}


def targets(out: Path, fmt: str) -> dict[str, Path]:
    """The files an export writes, by table (and 'run' for run.json)."""
    files = {name: out / f"{name}.{FORMATS[fmt]}" for name in TABLES}
    files["run"] = out / "run.json"
    return files


def export(ledger: str | Path, out: str | Path, fmt: str = "csv",
           force: bool = False) -> dict[str, Path]:
    """Write the tables of `ledger` to folder `out`; the files written, by table."""
    if fmt not in FORMATS:
        raise ToolError(f"--format: must be one of {', '.join(FORMATS)} (got {fmt!r})")
    out = check_out_dir(Path(out))
    files = targets(out, fmt)
    taken = [str(p) for p in files.values() if p.exists()]
    if taken and not force:
        raise ToolError(f"--out: {', '.join(taken)} already exist(s); give --force to "
                        f"overwrite or another --out folder")
    try:
        require("pandas", "rpd-mpi export")
        if fmt == "parquet":
            require("pyarrow", "rpd-mpi export --format parquet")
    except ImportError as exc:
        raise ToolError(str(exc)) from None
    run = open_run(ledger)
    tables = frames(run)
    out.mkdir(exist_ok=True)
    for name, frame in tables.items():
        if fmt == "csv":
            frame.to_csv(files[name], index=False)
        else:
            frame.to_parquet(files[name], index=False, engine="pyarrow")
    meta = {"ledger": str(ledger), "schema_version": run.schema_version,
            "time_units": run.time_units, "attrs": run.attrs, "config": run.config,
            "units": column_units(run)}
    files["run"].write_text(jsonout.dumps(meta) + "\n", encoding="utf-8")
    return files


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="rpd-mpi export", description=__doc__.splitlines()[0])
    p.add_argument("ledger", help="run.h5 to export")
    p.add_argument("--format", choices=tuple(FORMATS), default="csv",
                   help="table format (default csv; parquet needs pyarrow)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder to write updates/events/objective.<format> and run.json to "
                        "(created if missing; its parent must exist)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument("--json", action="store_true",
                   help="print the files written as one JSON object")
    args = p.parse_args(argv)

    def body() -> int:
        files = export(args.ledger, args.out, args.format, args.force)
        if args.json:
            print(json.dumps({name: str(path) for name, path in files.items()}))
        else:
            print("\n".join(f"wrote {path}" for path in files.values()))
        return 0
    return guarded(body)
