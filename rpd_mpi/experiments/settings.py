"""What every experiment preset takes (`Settings`) and hands back (`Outcome`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Settings:
    """Where an experiment writes, whether it is the reduced version, how many processes,
    how many seeds (None: the preset's default) and which step-size selector."""

    out: Path
    quick: bool = False
    jobs: int = 2
    log: Callable[[str], None] | None = None     # progress lines (main: stderr)
    seeds: int | None = None    # seeds per point: lr picked at seed 0, rerun at 1..seeds-1
    selector: str = "stable"    # the paper's rule, or "tail-mean" (rpd_mpi.analysis.sweep)


@dataclass
class Outcome:
    """What an experiment hands back: its Markdown table, plot, numbers and notes."""

    table: str
    png: Path
    measured: dict[str, Any]
    notes: list[str] = field(default_factory=list)
