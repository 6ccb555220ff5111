"""The paper's experiments E1–E6 as named presets (DESIGN 7), in simulated time.

`rpd-mpi experiment NAME [--out DIR] [--quick] [--jobs J]` runs one preset (NAME = E1..E6, or
`all` for E1–E5) and writes to DIR (default results/NAME): NAME.md (command, table of what
rpd_mpi measured next to the paper, notes, wall time), NAME.json, NAME.png, the best ledger of
every step-size sweep under ledgers/ and each sweep's summary under sweeps/. It prints the
Markdown and the wall time. `--quick` runs reduced sizes and grids (for tests); its numbers are
not comparable with the paper's. The settings of E2–E5 live in `tools.presets`.

E6 (character language model, tools.preset_e6) runs a reduced width on this CPU by default.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tools import delays_vs_s
from tools.common import Parser, ToolError, guarded, write_text

QUICK_E1_STAGES = tuple(range(2, 13))


@dataclass(frozen=True)
class Settings:
    """Where an experiment writes, whether it is the reduced version, how many processes."""

    out: Path
    quick: bool = False
    jobs: int = 2
    log: Callable[[str], None] | None = None     # progress lines (main: stderr)


@dataclass
class Outcome:
    """What an experiment hands back: its Markdown table, plot, numbers and notes."""

    table: str
    png: Path
    measured: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def run_e1(st: Settings) -> Outcome:
    """Delay statistics of PD 1F1B for S = 2..128 (quick: 2..12), quadratic fits."""
    stages = QUICK_E1_STAGES if st.quick else delays_vs_s.DEFAULT_STAGES
    rows, fitted, text = delays_vs_s.run(stages, st.out, jobs=st.jobs)
    png = (st.out / "delays_vs_s.png").rename(st.out / "E1.png")
    even = [r for r in rows if r["stages"] % 2 == 0]
    mismatches = [r["stages"] for r in even if r["steady_max"] != r["formula_max"]]
    fit_max, fit_mean = fitted["steady_max"], fitted["steady_mean"]
    paper = ("| quantity | rpd_mpi | paper |\n|---|---|---|\n"
             f"| max = S²−S/2 for even S | {len(even) - len(mismatches)} of {len(even)} even S"
             f" | every even S |\n"
             f"| fit of the max | {fit_max.text()} | ≈ 1.0·S² − 0.5·S |\n"
             f"| fit of the mean | {fit_mean.text()} | ≈ 0.5·S² |\n"
             f"| startup max, S=4 | {_at(rows, 4, 'startup_max')} | 16 |")
    measured = {"even_mismatches": mismatches,
                "fit_max": [fit_max.a, fit_max.b, fit_max.c],
                "fit_mean": [fit_mean.a, fit_mean.b, fit_mean.c],
                "rows": [{k: r[k] for k in ("stages", *delays_vs_s.COLUMNS)} for r in rows]}
    return Outcome(paper + "\n\n" + text, png, measured)


def _at(rows: list[dict[str, Any]], stages: int, key: str) -> Any:
    return next((r[key] for r in rows if r["stages"] == stages), "-")


def _e6(st: Settings) -> Outcome:
    from tools.preset_e6 import run_e6
    return run_e6(st)


def _registry() -> dict[str, tuple[str, Callable[[Settings], Outcome]]]:
    from tools import presets
    return {
        "E1": ("delay vs S (PD 1F1B, steady state)", run_e1),
        "E2": ("PD vs RPD, random quadratic", presets.run_e2),
        "E3": ("PD vs LocalSGD, tridiagonal quadratic", presets.run_e3),
        "E4": ("PD vs LocalSGD, logistic regression", presets.run_e4),
        "E5": ("fixed-time scaling in S, noisy logistic regression", presets.run_e5),
        "E6": ("character language model, PD vs LocalSGD", _e6),
    }


NAMES = ("E1", "E2", "E3", "E4", "E5", "E6")


def run_named(name: str, st: Settings) -> tuple[Outcome, float]:
    """Run one experiment, write NAME.md / NAME.json, return the outcome and its seconds."""
    title, fn = _registry()[name]          # every writer creates its folders
    t0 = time.perf_counter()
    outcome = fn(st)
    seconds = time.perf_counter() - t0
    write_text(st.out / f"{name}.md", report(name, title, st, outcome, seconds))
    write_text(st.out / f"{name}.json", json.dumps(
        {"experiment": name, "quick": st.quick, "seconds": seconds,
         "png": str(outcome.png), "measured": outcome.measured, "notes": outcome.notes},
        indent=1, default=float))
    return outcome, seconds


def report(name: str, title: str, st: Settings, outcome: Outcome, seconds: float) -> str:
    """The Markdown of one experiment run."""
    command = f"rpd-mpi experiment {name} --out {shlex.quote(str(st.out))}" + \
        (" --quick" if st.quick else "") + f" --jobs {st.jobs}"
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
                   help="results folder (default results/NAME; with all: results/)")
    p.add_argument("--quick", action="store_true", help="reduced sizes and grids")
    p.add_argument("--jobs", type=int, default=2, help="worker processes for sweeps")
    args = p.parse_args(argv)

    def body() -> int:
        names = NAMES[:5] if args.name == "all" else (args.name,)
        base = args.out or Path("results")
        total = 0.0
        for name in names:
            out = base / name if (args.name == "all" or args.out is None) else base
            settings = Settings(out, args.quick, max(1, args.jobs), _progress(name))
            outcome, seconds = run_named(name, settings)
            total += seconds
            print((out / f"{name}.md").read_text())
            print(f"{name} wall time: {seconds:.1f} s", flush=True)
        if len(names) > 1:
            print(f"total wall time: {total:.1f} s")
        return 0
    return guarded(body)
