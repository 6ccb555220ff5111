"""What each `rpd-mpi` subcommand does, dispatched through a table (`HANDLERS`).

`cli` parses; this module validates (ConfigError -> one-line error, exit 2), runs and prints.
Every `--json` output is one object on stdout.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from rpd_mpi.config import ConfigError, ScheduleConfig


def run(args: argparse.Namespace) -> int:
    return HANDLERS[args.command](args)


def _print_summary(record: Any, as_json: bool, out: str = "") -> None:
    from rpd_mpi.report import format_summary, summarize
    summary = summarize(record)
    if out:
        summary["ledger"] = out
    if as_json:
        print(json.dumps(summary, sort_keys=False))
    else:
        print(format_summary(summary))


def cmd_simulate(args: argparse.Namespace) -> int:
    from rpd_mpi.cli import FLAGS, config_from
    from rpd_mpi.ledger import write_run
    from rpd_mpi.runs import build, check_out, simulate_run
    cfg = config_from(args, FLAGS)
    check_out(cfg.out)
    model = build(cfg)
    record = simulate_run(cfg, model)
    write_run(cfg.out, record)
    _print_summary(record, args.json, cfg.out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rpd_mpi.cli import FLAGS, TRAIN_FLAGS, config_from
    from rpd_mpi.train import train
    return train(lambda: config_from(args, {**FLAGS, **TRAIN_FLAGS}),
                 lambda record: _print_summary(record, args.json, record.config["out"]))


def _schedule_config(args: argparse.Namespace, default_n: Callable[[int], int]) -> ScheduleConfig:
    given = {name: getattr(args, name) for name in
             ("stages", "noam", "trajectories", "local_steps", "flush")}
    values = {k: v for k, v in given.items() if v is not None}
    stages = values.setdefault("stages", 4)
    n = args.microbatches
    if n is None:
        n = default_n(stages) if isinstance(stages, int) and stages > 0 else 1
    return ScheduleConfig(method=args.method, microbatches=n, **values)


def _timeline(sch: ScheduleConfig) -> Any:
    from rpd_mpi.schedule import generate
    return generate(sch.method, sch.stages, sch.microbatches, noam=sch.noam,
                    trajectories=sch.trajectories, local_steps=sch.local_steps,
                    flush=sch.flush)


def cmd_schedule(args: argparse.Namespace) -> int:
    from rpd_mpi.programs import render
    tl = _timeline(_schedule_config(args, lambda s: 2 * s))
    if args.json:
        print(json.dumps({"method": tl.method, "stages": tl.stages,
                          "microbatches": tl.microbatches, "slots": tl.slots,
                          "kind": tl.kind.T.tolist(), "mb": tl.mb.T.tolist(),
                          "averages": list(tl.averages)}))
    else:
        print(render(tl))
    return 0


def cmd_delays(args: argparse.Namespace) -> int:
    from rpd_mpi.delays import delay_stats, pd_steady_max
    tl = _timeline(_schedule_config(args, lambda s: 10 * s))
    stats = delay_stats(tl)
    closed_form = tl.method == "pd" and tl.noam == tl.stages   # S^2 - S/2 holds for NOAM = S
    stats["formula_max"] = pd_steady_max(tl.stages) if closed_form else None
    if args.json:
        print(json.dumps(stats))
    else:
        for key, value in stats.items():
            print(f"{key:28s} {value}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rpd_mpi.ledger import LedgerError, read_run
    from rpd_mpi.report import compare_table, summarize
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
        print(json.dumps({"runs": summaries}))
    else:
        print(compare_table(summaries))
    return 0


def cmd_external(args: argparse.Namespace) -> int:
    """`experiment NAME ...` and `tool NAME ...`: modules of the tools/ package."""
    import importlib
    if args.command == "experiment":
        module, argv = "tools.experiments", [args.name, *args.rest]
    else:
        module, argv = f"tools.{args.name}", list(args.rest)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ConfigError(args.command, f"no module {module} ({err})") from None
    if not callable(getattr(mod, "main", None)):
        raise ConfigError(args.command, f"{module} is a helper module, not a tool (tools: "
                                        f"delays_vs_s, curves, timeline, sweep, theory, "
                                        f"mpi_compare)")
    return int(mod.main(argv) or 0)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulate": cmd_simulate, "train": cmd_train, "schedule": cmd_schedule,
    "delays": cmd_delays, "report": cmd_report, "experiment": cmd_external,
    "tool": cmd_external,
}
