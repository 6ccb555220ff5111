"""The paper's settings of E2–E5 (docs/DESIGN.md 7) and how each one is run, tuned and tabulated.

Every curve is tuned by `rpd_mpi.analysis.sweep` over powers of two (PD and RPD 2^-12..2^-3, LocalSGD
2^-8..2^2, as in the paper) and the best ledger is kept. The one exception is RPD in E5 at
large S, where a run costs minutes (the RPD engine does O(S) Python work per update):
  - S <= 32: the full grid;  32 < S < 128: 2^(e-1..e+1) around PD's best 2^e, extended while
    the best is on an edge;  S >= 128: the two powers of two at and below RPD's best of the
    previous S. The E5 table names the grid each RPD point used.
`quick` variants shrink sizes and grids so that a test finishes in seconds.

With `Settings.seeds = N > 1` every tuned curve keeps its step size from the seed-0 sweep and
its configuration is rerun at seeds 1 .. N-1 (new data, sampling and noise); the figures then
show the mean over the N seeds with a min–max band, and the JSON carries every seed's final
value and score (E5's table adds mean ± std columns).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np

from rpd_mpi.analysis.common import (fmt, lr_exponent, lr_text, markdown_table, parallel_map,
                                     pyplot, save_figure, tidy_log_axis)
from rpd_mpi.analysis.curves import curve, group_seeds, plot_curves
from rpd_mpi.analysis.sweep import (SweepResult, power_grid, refine, score_record, sweep,
                                    write_summary)
from rpd_mpi.build import simulate_run
from rpd_mpi.config import ObjectiveConfig, RPDConfig, RunConfig, ScheduleConfig
from rpd_mpi.experiments.settings import Outcome, Settings
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.records import RunRecord

PD_GRID, LSGD_GRID = (-12, -3), (-8, 2)
QUICK_PD_GRID, QUICK_LSGD_GRID = (-6, -1), (-4, 1)
E5_FULL_RPD_MAX_S, E5_NARROW_S = 32, 128


@dataclass
class Tuned:
    """One tuned curve: its label, the sweep and the best run's record (None: all diverged)."""

    label: str
    result: SweepResult
    record: RunRecord | None
    grid: str = "full"
    seed_records: list[RunRecord] = field(default_factory=list)    # seeds 1 .. N-1

    @property
    def records(self) -> list[RunRecord]:
        """The seed-0 run and its reruns at the other seeds."""
        return ([self.record] if self.record is not None else []) + self.seed_records

    def seed_values(self, which: int) -> list[float]:
        """score_record's `which` (1: final, 2: score) of every seed's run."""
        return [score_record(r)[which] for r in self.records]

    @property
    def lr(self) -> str:
        return lr_text(self.result.best.lr) if self.result.best else "all diverged"

    @property
    def final(self) -> float | None:
        return self.result.best.final if self.result.best else None

    @property
    def score(self) -> float | None:
        return self.result.best.score if self.result.best else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lr": self.result.best.lr if self.result.best else None, "final": self.final,
            "score": self.score, "at_edge": self.result.at_edge, "grid": self.grid}
        if self.seed_records:
            out.update(seeds=[int(r.attrs["seed"]) for r in self.records],
                       seed_finals=self.seed_values(1), seed_scores=self.seed_values(2))
        return out


def lowest_final(runs: Sequence[Tuned]) -> Tuned | None:
    """The run with the lowest final value (the first of equals); None if none finished."""
    finished = [(r.final, r) for r in runs if r.final is not None]
    return min(finished, key=lambda pair: pair[0])[1] if finished else None


def make_cfg(method: str, obj: ObjectiveConfig, stages: int, *, microbatches: int = 10,
             budget: int = 0, local_steps: int = 1, delta: int | None = None) -> RunConfig:
    """A run of `method` (LocalSGD: R = S trajectories, G = 1); lr is set by the sweep."""
    lsgd = method == "localsgd"
    sch = ScheduleConfig(method=method, stages=stages, microbatches=microbatches,
                         budget_slots=budget, trajectories=stages if lsgd else 1,
                         local_steps=local_steps if lsgd else 1)
    return RunConfig(schedule=sch, objective=obj, rpd=RPDConfig(delta=delta), lr=1.0,
                     seed=0, eval_every=1, out="sweep.h5")


def _wrap(res: SweepResult, st: Settings, label: str, grid: str) -> Tuned:
    write_summary(res, st.out / "sweeps")
    record = read_run(res.best_ledger) if res.best_ledger else None
    if st.log is not None:
        st.log(f"{res.name}: best lr {lr_text(res.best.lr) if res.best else '-'} "
               f"of {len(res.points)}")
    again = reseed(record, st.seeds, st.jobs) if record is not None else []
    if again and st.log is not None:
        st.log(f"{res.name}: rerun at seeds 1..{st.seeds - 1}")
    return Tuned(label, res, record, grid, again)


def _run_config(cfg: RunConfig) -> RunRecord:
    return simulate_run(cfg)


def reseed(record: RunRecord, seeds: int, jobs: int = 1) -> list[RunRecord]:
    """The run of `record`'s configuration at seeds 1 .. seeds-1 (in memory, not written)."""
    if seeds <= 1:
        return []
    base = RunConfig.from_dict(record.config)
    cfgs = [dataclasses.replace(base, seed=s) for s in range(1, seeds)]
    return parallel_map(_run_config, cfgs, jobs)


def tune(cfg: RunConfig, grid: tuple[int, int], st: Settings, name: str, label: str) -> Tuned:
    """Sweep the whole power-of-two grid 2^grid[0] .. 2^grid[1]."""
    res = sweep(cfg, power_grid(*grid), st.jobs, st.out / "ledgers", name)
    return _wrap(res, st, label, f"2^{grid[0]}..2^{grid[1]}")


def grid_of(quick: bool, method: str) -> tuple[int, int]:
    if method == "localsgd":
        return QUICK_LSGD_GRID if quick else LSGD_GRID
    return QUICK_PD_GRID if quick else PD_GRID


def plot_tuned(runs: Sequence[Tuned], x: str, path: str | Path, title: str) -> Path:
    """The best curve of every tuned run on one plot; a run with several seeds is drawn as
    the mean over its seeds with a min–max band."""
    records = [rec for r in runs for rec in r.records]
    curves = [curve(rec, x, f"{r.label} (lr {r.lr})") for r in runs for rec in r.records]
    return plot_curves(group_seeds(records, curves), x, path, title)


# ----------------------------------------------------------------------------- E2

E2_PAPER = {"PD": "≈ 2.4e−7", "RPD δ=60": "≈ 2.3e−6 (tracks PD)", "RPD δ=180": "far worse",
            "RPD δ=420": "far worse"}


def run_e2(st: Settings) -> Outcome:
    """PD vs RPD with several delay bounds on the random quadratic, S = 8, K = 3200."""
    q = st.quick
    obj = ObjectiveConfig(name="quadratic", dim=64 if q else 512, examples=200 if q else 2000,
                          batch_size=10 if q else 100)
    S, N = (4, 40) if q else (8, 400)
    deltas = (4, 14, 60) if q else (8, 30, 60, 180, 420)
    grid = grid_of(q, "pd")
    runs = [tune(make_cfg("pd", obj, S, microbatches=N), grid, st, "pd", "PD")]
    for d in deltas:
        runs.append(tune(make_cfg("rpd", obj, S, microbatches=N, delta=d), grid, st,
                         f"rpd_delta{d}", f"RPD δ={d}"))
    png = plot_tuned(runs, "updates", st.out / "E2.png",
                     f"E2: PD vs RPD, quadratic d={obj.dim}, S={S}, best lr each")
    pd_final = runs[0].final
    rows = [(r.label, r.lr, len(r.record.updates) if r.record else "-", fmt(r.final),
             fmt(r.final / pd_final) if r.final is not None and pd_final else "-",
             "-" if q else E2_PAPER.get(r.label, "-")) for r in runs]
    table = markdown_table(("curve", "best lr", "block updates K", "final f−f⋆ (rpd_mpi)",
                            "÷ PD", "paper"), rows)
    return Outcome(table, png, {r.label: r.summary() for r in runs})


# ----------------------------------------------------------------------------- E3, E4

def pd_vs_localsgd(st: Settings, obj: ObjectiveConfig, name: str, paper: dict[str, str],
                   hs: Sequence[int], stages: int, microbatches: int) -> Outcome:
    """PD with N microbatches against LocalSGD (R = S, each H) on PD's slot budget."""
    budget = 2 * microbatches + 2 * stages - 2
    runs = [tune(make_cfg("pd", obj, stages, microbatches=microbatches, budget=budget),
                 grid_of(st.quick, "pd"), st, "pd", "PD")]
    for h in hs:
        cfg = make_cfg("localsgd", obj, stages, budget=budget, local_steps=h)
        runs.append(tune(cfg, grid_of(st.quick, "localsgd"), st, f"localsgd_H{h}",
                         f"LocalSGD H={h}"))
    png = plot_tuned(runs, "slots", st.out / f"{name}.png",
                     f"{name}: {obj.name}, S=R={stages}, {budget} slots, best lr each")
    pd_final = runs[0].final
    rows = [(r.label, r.lr, fmt(r.final),
             fmt(r.final / pd_final) if r.final is not None and pd_final else "-",
             "-" if st.quick else paper.get(r.label, "-")) for r in runs]
    table = markdown_table(("curve", "best lr", f"f−f⋆ at {budget} slots (rpd_mpi)",
                            "÷ PD", "paper"), rows)
    best = lowest_final(runs)
    lowest = best.label if best is not None else "-"
    table += f"\n\nlowest final f−f⋆ (rpd_mpi): **{lowest}**; paper: {paper['lowest']}"
    measured: dict[str, Any] = {r.label: r.summary() for r in runs}
    measured.update(budget=budget, lowest=lowest)
    return Outcome(table, png, measured)


def run_e3(st: Settings) -> Outcome:
    """Tridiagonal quadratic: PD vs LocalSGD H in {2, 5, 30} at PD's 1230 slots."""
    q = st.quick
    obj = ObjectiveConfig(name="tridiag", dim=32 if q else 512, examples=40 if q else 600,
                          batch_size=5)
    paper = {"PD": "≈ 2.7", "LocalSGD H=2": "≥ 19", "LocalSGD H=5": "≥ 19",
             "LocalSGD H=30": "≥ 19", "lowest": "PD, ≈ 7× below the best LocalSGD"}
    return pd_vs_localsgd(st, obj, "E3", paper, (2, 5) if q else (2, 5, 30),
                          4 if q else 16, 20 if q else 600)


def run_e4(st: Settings) -> Outcome:
    """Logistic regression: PD vs LocalSGD H in {2, 5, 30} at PD's 830 slots."""
    q = st.quick
    obj = ObjectiveConfig(name="logistic", dim=32 if q else 512, examples=40 if q else 600,
                          batch_size=10 if not q else 5, lam=1e-4)
    paper = {"lowest": "LocalSGD H=5"}
    return pd_vs_localsgd(st, obj, "E4", paper, (2, 5) if q else (2, 5, 30),
                          4 if q else 16, 20 if q else 400)


# ----------------------------------------------------------------------------- E5

def e5_rpd(cfg: RunConfig, st: Settings, stages: int, pd: Tuned,
           previous: Tuned | None) -> Tuned:
    """RPD at one S, on the grid the module docstring describes."""
    lo, hi = grid_of(st.quick, "pd")
    name, label = f"S{stages}_rpd", "RPD"
    if st.quick or stages <= E5_FULL_RPD_MAX_S:
        return tune(cfg, (lo, hi), st, name, label)
    anchor = previous if stages >= E5_NARROW_S and previous and previous.result.best else pd
    center = _exponent(anchor.result.best.lr) if anchor.result.best else (lo + hi) // 2
    if stages >= E5_NARROW_S:
        exps = [e for e in (center - 1, center) if lo <= e <= hi]
        res = sweep(cfg, [2.0 ** e for e in exps], st.jobs, st.out / "ledgers", name)
        return _wrap(res, st, label, f"2^{exps[0]}..2^{exps[-1]} (RPD's best at the previous S "
                                     f"and half)")
    res = refine(cfg, center, lo, hi, st.jobs, st.out / "ledgers", name)
    exps = sorted(_exponent(p.lr) for p in res.points)
    return _wrap(res, st, label, f"2^{exps[0]}..2^{exps[-1]} (around PD's best)")


def _exponent(lr: float) -> int:
    """e of a step size 2^e of the grid (every step size these sweeps try is one)."""
    return cast(int, lr_exponent(lr))


def run_e5(st: Settings) -> Outcome:
    """Noisy logistic regression at a fixed 3180-slot budget, S = 2 .. 128."""
    q = st.quick
    obj = ObjectiveConfig(name="logistic", dim=32 if q else 512, examples=60 if q else 600,
                          batch_size=10, noise=0.5, lam=1e-4)
    budget = 120 if q else 3180
    stages = (2, 4, 8) if q else (2, 4, 8, 16, 32, 64, 128)
    rows: list[dict[str, Any]] = []
    previous: Tuned | None = None
    for S in stages:
        pd = tune(make_cfg("pd", obj, S, budget=budget), grid_of(q, "pd"), st, f"S{S}_pd", "PD")
        lsgd = tune(make_cfg("localsgd", obj, S, budget=budget, local_steps=5),
                    grid_of(q, "localsgd"), st, f"S{S}_localsgd", "LocalSGD H=5")
        previous = e5_rpd(make_cfg("rpd", obj, S, budget=budget), st, S, pd, previous)
        rows.append({"S": S, "PD": pd, "RPD": previous, "LocalSGD": lsgd})
    measured = {str(r["S"]): {m: r[m].summary() for m in ("PD", "RPD", "LocalSGD")}
                for r in rows}
    png = plot_e5(measured, st.out / "E5.png", budget)
    return Outcome(e5_table(rows, q), png, measured)


def _winner(row: dict[str, Any], key: str) -> str:
    values = {m: getattr(row[m], key) for m in ("PD", "LocalSGD")}
    ok = {m: v for m, v in values.items() if v is not None}
    return min(ok, key=ok.__getitem__) if ok else "-"


def _mean_std(t: Tuned) -> str:
    values = np.array(t.seed_values(1), dtype=float)
    if values.size < 2:
        return "-"
    return f"{fmt(float(values.mean()))} ± {fmt(float(values.std(ddof=1)), 2)}"


def e5_table(rows: list[dict[str, Any]], quick: bool) -> str:
    seeds = max(len(r["PD"].records) for r in rows) if rows else 1
    body = []
    for r in rows:
        cells: tuple[Any, ...] = (
            r["S"], r["PD"].lr, fmt(r["PD"].final), r["RPD"].lr, fmt(r["RPD"].final),
            r["RPD"].grid, r["LocalSGD"].lr, fmt(r["LocalSGD"].final),
            _winner(r, "final"), _winner(r, "score"))
        if seeds > 1:
            cells += tuple(_mean_std(r[m]) for m in ("PD", "RPD", "LocalSGD"))
        body.append((*cells, "-" if quick else ("PD" if r["S"] == 2 else "LocalSGD")))
    extra = tuple(f"{m} final, mean ± std over {seeds} seeds" for m in ("PD", "RPD", "LocalSGD")
                  ) if seeds > 1 else ()
    return markdown_table(("S", "PD lr", "PD f−f⋆", "RPD lr", "RPD f−f⋆", "RPD grid",
                           "LocalSGD lr", "LocalSGD f−f⋆", "lower of PD/LocalSGD (final)",
                           "lower (mean of last 10%)", *extra, "paper"), body)


def plot_e5(measured: dict[str, dict[str, dict[str, Any]]], path: str | Path, budget: int
            ) -> Path:
    """Final f − f⋆ and its mean over the last 10 % of the budget, per method, against S.

    `measured` is E5.json's: {S: {method: {"final": ..., "score": ...}}}, so the figure can be
    redrawn from the JSON alone. Where a point has several seeds ("seed_finals",
    "seed_scores") the line is their mean and the band their min–max.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    s = sorted(int(k) for k in measured)
    seeds = 1
    for ax, key, what in zip(axes, ("final", "score"), ("at the budget", "mean, last 10 %")):
        for method, style in (("PD", "o-"), ("RPD", "s--"), ("LocalSGD", "^-")):
            points = [measured[str(x)][method] for x in s]
            per_seed = [p.get(f"seed_{key}s") for p in points]
            if all(v for v in per_seed):
                vals = [np.array(v, dtype=float) for v in per_seed]
                seeds = max(seeds, max(v.size for v in vals))
                (line,) = ax.plot(s, [v.mean() for v in vals], style, label=method)
                ax.fill_between(s, [v.min() for v in vals], [v.max() for v in vals],
                                color=line.get_color(), alpha=0.18, lw=0)
            else:
                y = [p[key] for p in points]
                ax.plot(s, [v if v is not None else float("nan") for v in y], style,
                        label=method)
        ax.set(xscale="log", yscale="log", xlabel="stages S", title=f"f − f⋆ {what}")
        ax.set_xticks(s, [str(x) for x in s])
        ax.set_xticks([], minor=True)
        tidy_log_axis(ax)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("f(w) − f⋆")
    axes[0].legend(fontsize=8, title="best lr per S and method (seed 0)", title_fontsize=8)
    fig.suptitle(f"E5: noisy logistic regression (σ = 0.5), fixed budget of {budget} slots; "
                 + (f"mean of {seeds} seeds, band min–max" if seeds > 1 else "seed 0"))
    return save_figure(fig, path)
