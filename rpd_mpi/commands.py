"""What each `rpd-mpi` subcommand does, dispatched through a table (`HANDLERS`).

`cli` parses; this module validates (ConfigError -> one-line error, exit 2), runs and prints.
Every `--json` output is one object on stdout.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Callable

from rpd_mpi import analysis, checkpoint, jsonout, signals
from rpd_mpi.budget import check_timeline
from rpd_mpi.build import build, simulate_run
from rpd_mpi.config import ConfigError, ScheduleConfig
from rpd_mpi.data import shakespeare
from rpd_mpi.experiments import registry
from rpd_mpi.flags import FLAGS, TRAIN_FLAGS, config_from
from rpd_mpi.ledger import LedgerError, read_run
from rpd_mpi.ledger.report import compare_table, format_summary, summarize
from rpd_mpi.mpi.assemble import recover
from rpd_mpi.outputs import (EXIT_DIVERGED, EXIT_OK, EXIT_STOPPED, EXIT_WRITE, OutLock, WriteFailed,
                             check_out, inputs_of, new_run_id, stopped_line, write_out)
from rpd_mpi.records import Divergence, RunRecord
from rpd_mpi.sample import char_model
from rpd_mpi.sample import generate as generate_text
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
    ck = checkpoint.find(cfg)                # --resume: the newest complete checkpoint
    run_id = ck.run_id if ck is not None else new_run_id()
    own = ck is not None and checkpoint.out_is_own(cfg.out, run_id)
    check_out(cfg.out, inputs_of(cfg, args.config or ""), cfg.force or own)
    lock = OutLock(cfg.out, run_id)
    lock.acquire()
    try:
        writer = checkpoint.writer_for(cfg, run_id, ck, checkpoint.SimCheckpoints)
        hook = writer if isinstance(writer, checkpoint.SimCheckpoints) and \
            cfg.checkpoint_every else None
        with signals.catching():             # SIGTERM/SIGINT/SIGUSR1: stop, keep the run
            model, started = build(cfg), time.perf_counter()
            record = simulate_run(cfg, model, run_id, progress=True, checkpoints=hook,
                                  resume=ck.load(0) if ck is not None else None)
            record.attrs["run_seconds"] = time.perf_counter() - started   # tokens/s (report)
            if writer is not None:
                status = str(record.attrs.get("status"))
                record.attrs.update(checkpoint.ledger_attrs(
                    writer, str(record.attrs.get("stopped_by") or status), len(record.updates)))
            write_out(cfg.out, record, run_id)
            if writer is not None and record.attrs.get("status") == "complete":
                writer.remove()
    finally:
        lock.release()
    if ck is not None:
        print(f"rpd-mpi: resumed run {run_id} from {ck.path}", file=sys.stderr)
    _print_summary(record, args.json, cfg.out)
    return _outcome(record, cfg.lr)


def _outcome(record: RunRecord, lr: float) -> int:
    """The exit code of a written run; a diverged or stopped run also gets its one line."""
    if record.attrs.get("status") == "stopped":
        print(f"rpd-mpi: {stopped_line(record)}", file=sys.stderr)
        return EXIT_STOPPED
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
    check_timeline("--microbatches", sch.microbatches, sch.method, sch.stages,
                   sch.microbatches, sch.noam, sch.trajectories, sch.local_steps, sch.flush)
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


def cmd_assemble(args: argparse.Namespace) -> int:
    """`assemble OUT`: the run file OUT from the part files a stopped, crashed or killed run
    left next to it (`mpi.assemble.recover`); the parts go only when the ledger is complete."""
    check_out(args.out, {}, args.force)
    found = recover(args.out, args.run_id or "")
    lock = OutLock(args.out, found.run_id)
    lock.acquire()
    try:
        write_out(args.out, found.record, found.run_id)
    finally:
        lock.release()
    if found.complete:
        for path in found.paths:
            path.unlink(missing_ok=True)
    _print_summary(found.record, args.json, args.out)
    if found.missing:
        print(f"rpd-mpi: {args.out} is incomplete (the part files stay): {found.missing}",
              file=sys.stderr)
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    """`data shakespeare`: build the corpus into --out (an existing file only with --force)."""
    check_out(args.out, {"--tarball": args.tarball} if args.tarball else {}, args.force)
    corpus = shakespeare.shakespeare(
        Path(args.out), chars=None if args.all else args.chars,
        tarball=Path(args.tarball) if args.tarball else None,
        cache=Path(args.cache) if args.cache else None)
    if args.json:
        print(jsonout.dumps({"out": args.out, "characters": len(corpus.text),
                             "plays": list(corpus.plays), "available": corpus.available,
                             "last_cut": corpus.last_cut, "source": corpus.source,
                             "sha256": corpus.sha256}))
    else:
        print(corpus.describe(args.out))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """`sample run.h5`: text from the final model of a charlm ledger."""
    try:
        record = read_run(args.ledger)
    except LedgerError as err:
        raise ConfigError("ledger", str(err)) from None
    print(generate_text(char_model(record, args.ledger), args.chars,
                        temperature=args.temperature, seed=args.seed, prompt=args.prompt))
    return 0


HELP = ("-h", "--help")
EXPORT_MODULE = "rpd_mpi.analysis.export"


def cmd_external(args: argparse.Namespace) -> int:
    """`experiment NAME ...` and `tool NAME ...`: `rpd_mpi.experiments` and `rpd_mpi.analysis`."""
    return pass_through(args.command, [args.name, *args.rest])


def pass_through(command: str, argv: list[str]) -> int:
    """`experiment`, `tool` and `export`: their argv goes to the module that does the work.
    `experiment` / `tool` without a name (or with only --help) print the list of names."""
    if command == "export":
        if importlib.util.find_spec(EXPORT_MODULE) is None:
            raise ConfigError("export", "not available in this version of rpd_mpi")
        return int(importlib.import_module(EXPORT_MODULE).main(argv) or 0)
    names = dict(experiment_lines()) if command == "experiment" else dict(tool_lines())
    if not argv or argv[0] in HELP:
        print(listing(command, names))
        return 0
    if argv[0] not in names:
        raise ConfigError(command, f"no {command} {argv[0]!r}; {command}s: {', '.join(names)}")
    if command == "experiment":
        return int(registry.main(argv) or 0)
    return int(importlib.import_module(f"rpd_mpi.analysis.{argv[0]}").main(argv[1:]) or 0)


def listing(command: str, names: dict[str, str]) -> str:
    """The help of `rpd-mpi tool` / `rpd-mpi experiment`: usage, then one line per name."""
    width = max(map(len, names))
    lines = [f"  {name:{width}}  {text}" for name, text in names.items()]
    return (f"usage: rpd-mpi {command} NAME [ARGS ...]    (rpd-mpi {command} NAME --help: its "
            f"arguments)\n\n{command}s:\n" + "\n".join(lines))


def tool_lines() -> list[tuple[str, str]]:
    """(name, first docstring line) of every tool, read from its source (nothing runs)."""
    return [(name, _first_doc_line(f"{analysis.__name__}.{name}")) for name in analysis.TOOLS]


def experiment_lines() -> list[tuple[str, str]]:
    return [*((name, title) for name, (title, _) in registry.REGISTRY.items()),
            ("all", f"{registry.NAMES[0]}..{registry.NAMES[4]} in turn")]


def _first_doc_line(module: str) -> str:
    """The module docstring's first sentence (its first line + "..." when that is long)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "(not found)"
    with open(spec.origin, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    paragraph = doc.strip().split("\n\n")[0]
    sentence = " ".join(paragraph.split()).split(". ")[0]
    if len(sentence) <= 100:
        return sentence
    return paragraph.splitlines()[0].rstrip() + " ..."


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulate": cmd_simulate, "train": cmd_train, "schedule": cmd_schedule,
    "delays": cmd_delays, "report": cmd_report, "data": cmd_data, "sample": cmd_sample,
    "assemble": cmd_assemble,
}
