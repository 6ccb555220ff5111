"""What each `rpd-mpi` subcommand does, dispatched through a table (`HANDLERS`).

`cli` parses; this module validates (ConfigError -> one-line error, exit 2), runs and prints.
Every `--json` output is one object on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable

from rpd_mpi import analysis, jsonout
from rpd_mpi.build import build, simulate_run
from rpd_mpi.config import ConfigError, ScheduleConfig
from rpd_mpi.experiments import registry
from rpd_mpi.flags import FLAGS, TRAIN_FLAGS, config_from
from rpd_mpi.ledger import LedgerError, read_run
from rpd_mpi.ledger.report import compare_table, format_summary, summarize
from rpd_mpi.outputs import (EXIT_DIVERGED, EXIT_OK, EXIT_WRITE, OutLock, WriteFailed, check_out,
                             inputs_of, new_run_id, write_out)
from rpd_mpi.records import Divergence, RunRecord
from rpd_mpi.schedule import Timeline, generate
from rpd_mpi.schedule.delays import delay_stats, pd_steady_max
from rpd_mpi.schedule.text import render


def run(args: argparse.Namespace) -> int:
    try:
        return HANDLERS[args.command](args)
    except WriteFailed as err:            # disk full, quota, I/O error: one line, no ledger
        print(f"rpd-mpi: error: {err}", file=sys.stderr)
        return EXIT_WRITE


def _print_summary(record: RunRecord, as_json: bool, out: str = "") -> None:
    summary = summarize(record)
    if out:
        summary["ledger"] = out
    if as_json:
        print(jsonout.dumps(summary, sort_keys=False))
    else:
        print(format_summary(summary))


def cmd_simulate(args: argparse.Namespace) -> int:
    cfg = config_from(args, FLAGS)
    run_id = new_run_id()
    check_out(cfg.out, inputs_of(cfg, args.config or ""), cfg.force)
    lock = OutLock(cfg.out, run_id)
    lock.acquire()
    try:
        record = simulate_run(cfg, build(cfg), run_id)
        write_out(cfg.out, record, run_id)
    finally:
        lock.release()
    _print_summary(record, args.json, cfg.out)
    return _outcome(record, cfg.lr)


def _outcome(record: RunRecord, lr: float) -> int:
    """The exit code of a written run; a diverged run also gets its one line."""
    if record.attrs.get("status") != "diverged":
        return EXIT_OK
    print(f"rpd-mpi: error: {Divergence.from_attrs(record.attrs).describe(lr)}",
          file=sys.stderr)
    return EXIT_DIVERGED


def cmd_train(args: argparse.Namespace) -> int:
    # the MPI runtime is loaded here, not at the top: importing mpi4py initialises MPI,
    # which no other subcommand should do (tests/test_layers.py allows this one import)
    from rpd_mpi.mpi.train import train
    code = train(lambda: config_from(args, {**FLAGS, **TRAIN_FLAGS}),
                 lambda record: _print_summary(record, args.json, record.config["out"]),
                 config_file=args.config or "")
    if code == EXIT_WRITE:      # a part file failed to write: leave without HDF5 or MPI
        sys.stdout.flush()      # clean-up, which retries the failed writes (ledger.parts)
        sys.stderr.flush()
        os._exit(code)
    return code


def _schedule_config(args: argparse.Namespace, default_n: Callable[[int], int]) -> ScheduleConfig:
    given = {name: getattr(args, name) for name in
             ("stages", "noam", "trajectories", "local_steps", "flush")}
    values = {k: v for k, v in given.items() if v is not None}
    stages = values.setdefault("stages", 4)
    n = args.microbatches
    if n is None:
        n = default_n(stages) if isinstance(stages, int) and stages > 0 else 1
    return ScheduleConfig(method=args.method, microbatches=n, **values)


def _timeline(sch: ScheduleConfig) -> Timeline:
    return generate(sch.method, sch.stages, sch.microbatches, noam=sch.noam,
                    trajectories=sch.trajectories, local_steps=sch.local_steps,
                    flush=sch.flush)


def cmd_schedule(args: argparse.Namespace) -> int:
    tl = _timeline(_schedule_config(args, lambda s: 2 * s))
    if args.json:
        print(jsonout.dumps({"method": tl.method, "stages": tl.stages,
                          "microbatches": tl.microbatches, "slots": tl.slots,
                          "kind": tl.kind.T.tolist(), "mb": tl.mb.T.tolist(),
                          "averages": list(tl.averages)}))
    else:
        print(render(tl))
    return 0


def cmd_delays(args: argparse.Namespace) -> int:
    tl = _timeline(_schedule_config(args, lambda s: 10 * s))
    stats = delay_stats(tl)
    closed_form = tl.method == "pd" and tl.noam == tl.stages   # S^2 - S/2 holds for NOAM = S
    stats["formula_max"] = pd_steady_max(tl.stages) if closed_form else None
    if args.json:
        print(jsonout.dumps(stats))
    else:
        for key, value in stats.items():
            print(f"{key:28s} {value}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    records = []
    for path in args.ledgers:
        try:
            records.append(read_run(path))
        except LedgerError as err:
            raise ConfigError("ledger", str(err)) from None
    if len(records) == 1:
        _print_summary(records[0], args.json)
        return 0
    summaries = [dict(summarize(r), ledger=p) for r, p in zip(records, args.ledgers)]
    if args.json:
        print(jsonout.dumps({"runs": summaries}))
    else:
        print(compare_table(summaries))
    return 0


def cmd_external(args: argparse.Namespace) -> int:
    """`experiment NAME ...` and `tool NAME ...`: `rpd_mpi.experiments` and `rpd_mpi.analysis`."""
    if args.command == "experiment":
        return int(registry.main([args.name, *args.rest]) or 0)
    if args.name not in analysis.TOOLS:
        raise ConfigError("tool", f"no tool {args.name!r}; tools: {', '.join(analysis.TOOLS)}")
    module = importlib.import_module(f"rpd_mpi.analysis.{args.name}")
    return int(module.main(list(args.rest)) or 0)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulate": cmd_simulate, "train": cmd_train, "schedule": cmd_schedule,
    "delays": cmd_delays, "report": cmd_report, "experiment": cmd_external,
    "tool": cmd_external,
}
