"""E6: the character language model, PD against LocalSGD at equal slots (docs/DESIGN.md 7).

S = R = 16, about 2078 slots, LocalSGD with H in {1, 4, 8}; the paper's model has width 256
(~11.1M parameters). On this CPU the default is a reduced width (`--quick` reduces further);
`experiment E6 --full` runs the paper's width and context. The objective is the mean
next-character cross-entropy on the model's fixed evaluation windows (the training loss of the
generated corpus); step sizes are swept over powers of two and each curve gets its best.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rpd_mpi.analysis.common import fmt, markdown_table
from rpd_mpi.config import ObjectiveConfig, RunConfig
from rpd_mpi.experiments.presets import Tuned, lowest_final, make_cfg, plot_tuned, tune
from rpd_mpi.experiments.settings import Outcome, Settings

PAPER_SLOTS = 2078
LM_GRID, QUICK_LM_GRID = (-3, -1), (-3, -1)   # plain SGD on the LM: best near 2^-3..2^-1


def _objective(st: Settings, full: bool) -> ObjectiveConfig:
    if full:
        return ObjectiveConfig(name="charlm", width=256, heads=8, context=128, batch_size=8)
    if st.quick:
        return ObjectiveConfig(name="charlm", width=8, heads=2, context=8, batch_size=2)
    return ObjectiveConfig(name="charlm", width=32, heads=2, context=16, batch_size=4)


def run_e6(st: Settings, full: bool = False) -> Outcome:
    """PD with N microbatches vs LocalSGD (R = S, H in {1, 4, 8}) on PD's slot budget."""
    S = 4 if st.quick else 16
    N = 20 if st.quick else (PAPER_SLOTS - 2 * S + 2) // 2
    budget = 2 * N + 2 * S - 2
    obj, grid = _objective(st, full), QUICK_LM_GRID if st.quick else LM_GRID
    every = max(1, N * S // 40)                   # about 40 points: every E block updates
    runs = [tune(_cadence(make_cfg("pd", obj, S, microbatches=N, budget=budget), every),
                 grid, st, "pd", "PD")]
    for h in (1, 4, 8):
        cfg = _cadence(make_cfg("localsgd", obj, S, budget=budget, local_steps=h), every)
        runs.append(tune(cfg, grid, st, f"localsgd_H{h}", f"LocalSGD H={h}"))
    png = plot_tuned(runs, "slots", st.out / "E6.png",
                     f"E6: char LM width {obj.width}, S=R={S}, {budget} slots, best lr each")
    return Outcome(_table(runs, budget, st.quick), png, _measured(runs, budget, obj))


def _cadence(cfg: RunConfig, every: int) -> RunConfig:
    """Evaluating the LM costs a forward pass of every stage: every `every` updates only."""
    return dataclasses.replace(cfg, eval_every=every)


def _table(runs: list[Tuned], budget: int, quick: bool) -> str:
    rows = [(r.label, r.lr, fmt(r.final), fmt(r.score),
             "-" if quick else ("lowest" if r.label == "PD" else "higher")) for r in runs]
    table = markdown_table(("curve", "best lr", f"loss at {budget} slots (rpd_mpi)",
                            "mean of last 10%", "paper"), rows)
    best = lowest_final(runs)
    lowest = best.label if best is not None else "-"
    return table + f"\n\nlowest final training loss (rpd_mpi): **{lowest}**; paper: PD"


def _measured(runs: list[Tuned], budget: int, obj: ObjectiveConfig) -> dict[str, Any]:
    out: dict[str, Any] = {r.label: r.summary() for r in runs}
    best = lowest_final(runs)
    out.update(budget=budget, width=obj.width, context=obj.context,
               lowest=best.label if best is not None else None)
    return out
