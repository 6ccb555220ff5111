"""The paper's experiments E1–E6 as named presets (docs/DESIGN.md 7), in simulated time.

`rpd-mpi experiment NAME [--out DIR] [--quick] [--jobs J] [--seeds N] [--selector
{stable,tail-mean}]` runs one preset (NAME = E1..E6, or
`all` for E1–E5) and writes to DIR (default results/NAME): NAME.md (command, table of what
rpd_mpi measured next to the paper, notes, wall time), NAME.json, NAME.png, the best ledger of
every step-size sweep under ledgers/ and each sweep's summary under sweeps/. It prints the
Markdown and the wall time. `--quick` runs reduced sizes and grids (for tests); its numbers are
not comparable with the paper's. The settings of E2–E5 live in `rpd_mpi.experiments.presets`
(each follows the paper's set-up and budget protocol; step sizes by the paper's stable rule
unless `--selector tail-mean`; 5 seeds by default for E2's RPD curves, E4 and E5).

E6 (character language model, rpd_mpi.experiments.e6) runs a reduced width on this CPU by default;
`--data FILE` (a text, its last 10 % held out for the validation loss) and `--width W` are E6's.
A given `--out DIR` is created if missing, but its parent folder must exist.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from rpd_mpi import jsonout
from rpd_mpi.analysis.common import Parser, check_out_dir, guarded, int_at_least, write_text
from rpd_mpi.experiments import presets
from rpd_mpi.experiments.e1 import run_e1
from rpd_mpi.experiments.e6 import run_e6
from rpd_mpi.experiments.settings import Outcome, Settings

REGISTRY: dict[str, tuple[str, Callable[[Settings], Outcome]]] = {
    "E1": ("delay vs S (PD 1F1B, steady state)", run_e1),
    "E2": ("PD vs RPD, random quadratic", presets.run_e2),
    "E3": ("PD vs LocalSGD, tridiagonal quadratic", presets.run_e3),
    "E4": ("PD vs LocalSGD, logistic regression", presets.run_e4),
    "E5": ("fixed-time scaling in S, noisy logistic regression", presets.run_e5),
    "E6": ("character language model, PD vs LocalSGD", run_e6),
}
NAMES = ("E1", "E2", "E3", "E4", "E5", "E6")


def run_named(name: str, st: Settings, fn: Callable[[Settings], Outcome] | None = None,
              flags: str = "") -> tuple[Outcome, float]:
    """Run one experiment (by `fn` when given: E6 on --data/--width; `flags` are its extra
    command-line flags for the report), write NAME.md / NAME.json, return the outcome and
    its seconds."""
    title, preset = REGISTRY[name]          # every writer creates its folders
    t0 = time.perf_counter()
    outcome = (fn or preset)(st)
    seconds = time.perf_counter() - t0
    write_text(st.out / f"{name}.md", report(name, title, st, outcome, seconds, flags))
    write_text(st.out / f"{name}.json", jsonout.dumps(
        {"experiment": name, "quick": st.quick, "seconds": seconds,
         "seeds": presets.seeds_of(st, name), "selector": st.selector, "png": str(outcome.png),
         "measured": outcome.measured,
         "notes": outcome.notes},
        indent=1, default=float))
    return outcome, seconds


def report(name: str, title: str, st: Settings, outcome: Outcome, seconds: float,
           flags: str = "") -> str:
    """The Markdown of one experiment run."""
    command = f"rpd-mpi experiment {name} --out {shlex.quote(str(st.out))}{flags}" + \
        (" --quick" if st.quick else "") + f" --jobs {st.jobs}" + \
        (f" --seeds {st.seeds}" if st.seeds is not None else "") + \
        (f" --selector {st.selector}" if st.selector != "stable" else "")
    notes = "".join(f"- {n}\n" for n in outcome.notes)
    return (f"# {name}: {title}{' (quick)' if st.quick else ''}\n\n`{command}`\n\n"
            f"{outcome.table}\n\n{notes}\n![{name}]({outcome.png.name})\n\n"
            f"wall time: {seconds:.1f} s\n")


def _progress(name: str) -> Callable[[str], None]:
    t0 = time.perf_counter()
    return lambda text: print(f"[{name} {time.perf_counter() - t0:7.1f} s] {text}",
                              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = Parser(prog="experiment", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=(*NAMES, "all"), help="experiment, or all = E1..E5")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default results/NAME; with all: results/); a given "
                        "DIR is created if missing, its parent must exist")
    p.add_argument("--quick", action="store_true", help="reduced sizes and grids")
    p.add_argument("--jobs", type=int_at_least(1), default=2, help="worker processes for sweeps")
    p.add_argument("--seeds", type=int_at_least(1), default=None,
                   help="seeds per curve (E2-E6): each step size is picked at seed 0, then "
                        "the picked run is repeated at seeds 1..N-1, the tables show mean ± "
                        "std and the figures the mean with a min-max band (default 5 for "
                        "E2's RPD curves, E4 and E5, 2 with --quick, 1 elsewhere; E1 has no "
                        "randomness)")
    p.add_argument("--selector", choices=("stable", "tail-mean"), default="stable",
                   help="how each sweep picks its step size: the paper's stable rule "
                        "(default) or the lowest mean f - f* of the last 10%% "
                        "(rpd_mpi.analysis.sweep)")
    p.add_argument("--data", default="", metavar="FILE",
                   help="E6 only: train the char LM on this UTF-8 text (e.g. `rpd-mpi data "
                        "shakespeare --out corpus.txt`), its last 10%% held out for the "
                        "validation loss (default: the generated corpus)")
    p.add_argument("--width", type=int_at_least(1), default=0,
                   help="E6 only: the model width (default: the preset's, 32; 8 with --quick)")
    args = p.parse_args(argv)
    if (args.data or args.width) and args.name != "E6":
        p.error(f"--data and --width are E6 options (got {args.name})")
    e6_flags = (f" --data {shlex.quote(args.data)}" if args.data else "") + \
        (f" --width {args.width}" if args.width else "")

    def body() -> int:
        if args.out is not None:
            check_out_dir(args.out)
        names = NAMES[:5] if args.name == "all" else (args.name,)
        base = args.out or Path("results")
        total = 0.0
        for name in names:
            out = base / name if (args.name == "all" or args.out is None) else base
            settings = Settings(out, args.quick, max(1, args.jobs), _progress(name),
                                args.seeds, args.selector)
            outcome, seconds = run_named(name, settings, (lambda st: run_e6(
                st, data=args.data, width=args.width)) if e6_flags else None, e6_flags)
            total += seconds
            print((out / f"{name}.md").read_text())
            print(f"{name} wall time: {seconds:.1f} s", flush=True)
        if len(names) > 1:
            print(f"total wall time: {total:.1f} s")
        return 0
    return guarded(body)
