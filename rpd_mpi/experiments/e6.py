"""E6: the character language model, PD against LocalSGD at equal slots (docs/DESIGN.md 7).

S = R = 16, about 2078 slots, LocalSGD with H in {1, 4, 8}; the paper's model has width 256
(~11.1M parameters). On this CPU the default is a reduced width (`--quick` reduces further);
`run_e6(..., full=True)` is the paper's width, context and 14 blocks (no command-line flag:
hours of CPU here). The objective is the mean
next-character cross-entropy on the model's fixed evaluation windows (the training loss of the
generated corpus); step sizes are swept over powers of two and each curve gets its best by
the paper's stable rule with the looser thresholds of its LLM runs (`--thresholds llm`).
`experiment E6 --data FILE [--width W]` trains on a text file instead (e.g. the Shakespeare
corpus of `rpd-mpi data shakespeare`), its last 10 % held out: the table adds the validation
loss at the budget and E6_validation.png its curves; the step sizes stay picked on training loss.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from rpd_mpi.analysis.common import fmt, markdown_table, pyplot, save_figure
from rpd_mpi.analysis.sweep import LLM_THRESHOLDS
from rpd_mpi.config import ConfigError, ObjectiveConfig, RunConfig
from rpd_mpi.experiments.presets import (Tuned, lowest_final, make_cfg, plot_tuned, selector_of,
                                         tune)
from rpd_mpi.experiments.settings import Outcome, Settings
from rpd_mpi.objectives.corpus import VAL_WINDOWS

PAPER_SLOTS = 2078
LM_GRID, QUICK_LM_GRID = (-3, -1), (-3, -1)   # plain SGD on the LM: best near 2^-3..2^-1


def _objective(st: Settings, full: bool) -> ObjectiveConfig:
    if full:
        return ObjectiveConfig(name="charlm", width=256, heads=8, context=128, batch_size=8,
                               layers=14)         # the paper's 14 blocks on S = 16
    if st.quick:
        return ObjectiveConfig(name="charlm", width=8, heads=2, context=8, batch_size=2)
    return ObjectiveConfig(name="charlm", width=32, heads=2, context=16, batch_size=4)


def e6_objective(st: Settings, full: bool = False, data: str = "",
                 width: int = 0) -> ObjectiveConfig:
    """The preset's model, on the text file `data` ("" = the generated corpus; its last
    --val-fraction 0.1 held out for the validation loss) and `width` wide (0 = the preset's).
    ConfigError (naming the flag) for a width its heads do not divide or a missing file."""
    obj = _objective(st, full)
    if width and width % obj.heads:
        raise ConfigError("--width", f"must be a multiple of the preset's {obj.heads} heads "
                                     f"(got {width})")
    if data and not Path(data).is_file():
        raise ConfigError("--data", f"no such file: {data}")
    return dataclasses.replace(obj, data=str(Path(data).resolve()) if data else "",
                               width=width or obj.width)


def run_e6(st: Settings, full: bool = False, data: str = "", width: int = 0) -> Outcome:
    """PD with N microbatches vs LocalSGD (R = S, H in {1, 4, 8}) on PD's slot budget; on
    the text file `data` when given (training and validation loss), `width` wide if not 0."""
    S = 4 if st.quick else 16
    N = 20 if st.quick else (PAPER_SLOTS - 2 * S + 2) // 2
    budget = 2 * N + 2 * S - 2
    obj = e6_objective(st, full, data, width)
    grid = QUICK_LM_GRID if st.quick else LM_GRID
    every = max(1, N * S // 40)                   # about 40 points: every E block updates
    sel = selector_of(st, thresholds=LLM_THRESHOLDS)     # the paper's LLM limits
    runs = [tune(_cadence(make_cfg("pd", obj, S, microbatches=N, budget=budget), every),
                 grid, st, "pd", "PD", selector=sel)]
    for h in (1, 4, 8):
        cfg = _cadence(make_cfg("localsgd", obj, S, budget=budget, local_steps=h), every)
        runs.append(tune(cfg, grid, st, f"localsgd_H{h}", f"LocalSGD H={h}", selector=sel))
    text = f" on {Path(obj.data).name}" if obj.data else ""
    png = plot_tuned(runs, "slots", st.out / "E6.png",
                     f"E6: char LM width {obj.width}{text}, S=R={S}, {budget} slots, "
                     f"best lr each")
    notes: list[str] = []
    if obj.data:
        held = plot_validation(runs, st.out / "E6_validation.png", S, budget)
        notes.append(f"text: {obj.data} (its last 10 % held out: validation loss on "
                     f"{VAL_WINDOWS} windows of it, training loss on the 8 fixed evaluation "
                     f"windows of the rest); validation figure: {held.name}")
    return Outcome(_table(runs, budget, st.quick, bool(obj.data)), png,
                   _measured(runs, budget, obj), notes)


def final_validation(run: Tuned) -> float | None:
    """The held-out loss (nats/char) at the last point of the run's best ledger, if any."""
    held = run.record.objective.validation if run.record is not None else None
    return float(held[-1]) if held is not None and held.size else None


def plot_validation(runs: list[Tuned], path: Path, stages: int, budget: int) -> Path:
    """The validation loss of every tuned curve against slots (PNG at FIGURE_DPI)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in runs:
        rec = r.record
        if rec is not None and rec.objective.validation is not None:
            ax.plot(rec.objective.time, rec.objective.validation, label=f"{r.label} (lr {r.lr})")
    ax.set_xlabel("slots")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(f"E6 validation loss, S=R={stages}, {budget} slots")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def _cadence(cfg: RunConfig, every: int) -> RunConfig:
    """Evaluating the LM costs a forward pass of every stage: every `every` updates only."""
    return dataclasses.replace(cfg, eval_every=every)


def _table(runs: list[Tuned], budget: int, quick: bool, text: bool = False) -> str:
    rows = [(r.label, r.lr, fmt(r.final), fmt(r.score),
             *((fmt(final_validation(r)),) if text else ()),
             "-" if quick else ("lowest" if r.label == "PD" else "higher")) for r in runs]
    table = markdown_table(("curve", "best lr", f"loss at {budget} slots (rpd_mpi)",
                            "mean of last 10%",
                            *((f"validation loss at {budget} slots",) if text else ()),
                            "paper"), rows)
    best = lowest_final(runs)
    lowest = best.label if best is not None else "-"
    return table + f"\n\nlowest final training loss (rpd_mpi): **{lowest}**; paper: PD"


def _measured(runs: list[Tuned], budget: int, obj: ObjectiveConfig) -> dict[str, Any]:
    out: dict[str, Any] = {r.label: {**r.summary(), "validation": final_validation(r)}
                           for r in runs}
    best = lowest_final(runs)
    out.update(budget=budget, width=obj.width, context=obj.context,
               lowest=best.label if best is not None else None)
    return out
