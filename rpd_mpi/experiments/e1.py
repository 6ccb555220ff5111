"""E1: steady-state delay statistics of PD 1F1B as a function of S (docs/DESIGN.md 7)."""

from __future__ import annotations

from typing import Any

from rpd_mpi.analysis import delays_vs_s
from rpd_mpi.experiments.settings import Outcome, Settings

QUICK_E1_STAGES = tuple(range(2, 13))


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


def _at(rows: list[dict[str, Any]], stages: int, key: str) -> object:
    return next((r[key] for r in rows if r["stages"] == stages), "-")
