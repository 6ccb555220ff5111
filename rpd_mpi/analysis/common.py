"""Helpers shared by the tools: one-line errors, checked flag types and output paths, the Agg
pyplot, Markdown tables, objective gaps and labels of ledgers, a process-parallel map, and the
run flags of `rpd-mpi simulate`.

Output paths are checked before a tool computes anything: an output file's folder must exist
(nothing creates it) and a file must not be a folder; an output folder given with `--out DIR`
is created if missing, but its parent must exist (a default folder such as results/E1 is
created with its parents). Nothing here prints; the tools' `main` functions do.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterable, NoReturn, Sequence, TypeVar

import numpy as np

from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.flags import FLAGS
from rpd_mpi.flags import add_run_flags as add_flags
from rpd_mpi.flags import config_from
from rpd_mpi.ledger.run_file import LedgerError
from rpd_mpi.records import RunRecord

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

T = TypeVar("T")
R = TypeVar("R")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_DPI = 200
#: the help text of every tool's figure `--out`
FIGURE_HELP = ("figure to write: a 200 dpi PNG by default, or any format matplotlib knows, "
               "picked by the extension (.pdf, .svg, .eps, .jpg, ...); its folder must exist")


class ToolError(Exception):
    """A tool cannot do what it was asked; the message says why (one line, exit 2)."""


def guarded(body: Callable[[], int]) -> int:
    """Run a tool's body; known errors become one stderr line and exit code 2."""
    try:
        return body()
    except (ToolError, ConfigError, LedgerError) as err:
        print(f"rpd-mpi: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit code 2; no abbreviated flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"rpd-mpi: error: {self.prog}: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2)


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low} (got {text!r})")
        return value
    return convert


def finite_at_least(low: float) -> Callable[[str], float]:
    """An argparse type: a finite number >= low."""
    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"must be a finite number >= {low:g} "
                                             f"(got {text!r})")
        return value
    return convert


def check_out_file(path: Path, suffix: str = ".png", flag: str = "--out") -> Path:
    """An output file to write later: its folder exists and is writable, it is not a folder
    and it ends in `suffix`. Checked before any work; nothing is created."""
    folder = path.parent
    if path.is_dir():
        raise ToolError(f"{flag}: {path} is a folder; give a file name"
                        + (f" ending in {suffix}" if suffix else ""))
    if suffix and path.suffix.lower() != suffix:
        raise ToolError(f"{flag}: must be a file name ending in {suffix} (got {path})")
    if not folder.is_dir():
        raise ToolError(f"{flag}: folder {folder} does not exist; create it first (got {path})")
    if not os.access(folder, os.W_OK):
        raise ToolError(f"{flag}: folder {folder} is not writable (got {path})")
    return path


def check_out_dir(path: Path, flag: str = "--out") -> Path:
    """An output folder: it exists, or its parent does (the tool creates it, not its
    parents). Checked before any work; nothing is created."""
    if path.exists() and not path.is_dir():
        raise ToolError(f"{flag}: {path} exists and is not a folder")
    parent = path if path.is_dir() else path.parent
    if not parent.is_dir():
        raise ToolError(f"{flag}: folder {parent} does not exist; {flag} DIR may be new, but "
                        f"its parent folder must exist (got {path})")
    if not os.access(parent, os.W_OK):
        raise ToolError(f"{flag}: folder {parent} is not writable (got {path})")
    return path


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_formats() -> dict[str, str]:
    """The file extensions matplotlib can write (without the dot) and their names."""
    from matplotlib.backend_bases import FigureCanvasBase
    return dict(FigureCanvasBase.get_supported_filetypes())


def check_figure_file(path: Path, flag: str = "--out") -> Path:
    """An output figure: like `check_out_file`, but any extension matplotlib writes
    (.png, .pdf, .svg, .eps, ...) is accepted. Checked before any work; nothing is created."""
    ext = path.suffix.lower().lstrip(".")
    known = figure_formats()
    if not path.is_dir() and ext not in known:
        raise ToolError(f"{flag}: the extension picks the format, one of "
                        f"{', '.join('.' + k for k in sorted(known))} (got {path})")
    return check_out_file(path, suffix="", flag=flag)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` (folders created) and close it: raster formats at FIGURE_DPI, the format
    from the extension (.png, .pdf, .svg, ...; none: PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight",
                format=None if path.suffix else "png")
    pyplot().close(fig)
    return path


save_png = save_figure      # the name the tools used when every figure was a PNG


def tidy_log_axis(ax: Axes, axis: str = "y") -> None:
    """No labels on the minor ticks of a log axis (they clutter); the ticks stay. Call it
    after plotting: an axis spanning under two decades gets labelled ticks at 1, 2 and 5
    times the powers of ten, under one decade also at 1.5, 3 and 7 (else it could show a
    single label or none)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    which = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    if lo > 0 and hi > lo and math.log10(hi / lo) < 2:
        subs = (1.0, 2.0, 5.0) if math.log10(hi / lo) >= 1 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
        which.set_major_locator(LogLocator(base=10, subs=subs))
        which.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    which.set_minor_formatter(NullFormatter())


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: '-' for None, integers as is, floats with `digits` significant digits."""
    if value is None:
        return "-"
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells go through `fmt` unless they are strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |")
    return "\n".join(lines)


def lr_exponent(lr: float) -> int | None:
    """e when lr == 2**e exactly, else None."""
    m, e = math.frexp(lr)
    return e - 1 if m == 0.5 else None


def lr_text(lr: float) -> str:
    """'2^-8' for powers of two, else '%g'."""
    e = lr_exponent(lr)
    return f"2^{e}" if e is not None else f"{lr:g}"


def gaps(record: RunRecord) -> np.ndarray:
    """The objective values minus f* (the values themselves when f* is unknown)."""
    f_star = record.attrs.get("f_star")
    values = np.asarray(record.objective.value, dtype=float)
    return values - float(f_star) if f_star is not None else values


def method_name(record: RunRecord) -> str:
    """'PD', 'RPD', 'LocalSGD', ... and, for an MPI run of PD, its order ('PD dynamic')."""
    a = record.attrs
    name = {"localsgd": "LocalSGD"}.get(str(a.get("method")), str(a.get("method", "?")).upper())
    order = a.get("order")
    if order not in (None, "", "unit-time") and a.get("engine") != "sim":
        name += f" {order}"
    return name


def settings_parts(record: RunRecord) -> list[str]:
    """The settings that tell runs apart: H (LocalSGD), δ (RPD), lr."""
    a = record.attrs
    parts = []
    if a.get("method") == "localsgd":
        parts.append(f"H={a.get('local_steps')}")
    if a.get("method") == "rpd":
        parts.append(f"δ={a.get('delta')}")
    if a.get("lr") is not None:
        parts.append(f"lr={lr_text(float(a['lr']))}")
    return parts


def describe(record: RunRecord) -> str:
    """A short legend label: method (and order of an MPI PD run), S, H (LocalSGD), delta
    (RPD), step size: 'PD dynamic S=4 lr=2^-8', 'LocalSGD S=16 H=2 lr=2^-5'."""
    return " ".join([method_name(record), f"S={record.attrs.get('stages')}",
                     *settings_parts(record)])


def problem_text(record: RunRecord) -> str:
    """The objective and its size: 'tridiag d=512 n=600'."""
    a = record.attrs
    parts = [str(a.get("objective", "?"))]
    if a.get("dim") is not None:
        parts.append(f"d={a['dim']}")
    if a.get("examples") is not None and a.get("objective") != "charlm":
        parts.append(f"n={a['examples']}")
    return " ".join(parts)


def run_title(record: RunRecord) -> str:
    """A figure title from a run's method and settings (never a path):
    'PD dynamic, S=4, lr=2^-8; tridiag d=512 n=600, MPI'."""
    a = record.attrs
    head = ", ".join([method_name(record), f"S={a.get('stages')}", *settings_parts(record)])
    clock = "simulated (unit time)" if a.get("engine") == "sim" else "MPI (wall clock)"
    return f"{head}; {problem_text(record)}, {clock}"


def parallel_map(fn: Callable[[T], R], items: Sequence[T], jobs: int) -> list[R]:
    """[fn(x) for x in items], in `jobs` worker processes when jobs > 1 (order kept).

    Workers are forked where the platform can (they inherit imported modules and compiled
    kernels, and the caller's script needs no `if __name__ == "__main__"` guard), spawned
    elsewhere; `fn` must be a module-level function.
    """
    if jobs <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(items)), mp_context=ctx) as pool:
        return list(pool.map(fn, items))


def add_run_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """The flags of `rpd-mpi simulate` (docs/DESIGN.md 6), except those in `skip`."""
    add_flags(parser, {k: v for k, v in FLAGS.items() if k not in skip})


def config_from_args(args: argparse.Namespace, skip: Sequence[str] = ()) -> RunConfig:
    """Defaults < TOML < flags, validated exactly as `rpd-mpi simulate` does."""
    return config_from(args, {k: v for k, v in FLAGS.items() if k not in skip})
