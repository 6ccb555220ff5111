"""The paper's settings of E2–E5 (docs/DESIGN.md 7) and how each one is run, tuned and tabulated.

Each preset follows the paper's own set-up (its notebooks) and budget protocol:
  - E2: random quadratic, S = 8, N = 400 (no budget); RPD with δ ∈ {8, 30, 60, 180, 420}.
  - E3: tridiagonal quadratic, n = 600, batch 5, N = 600 for every method, cut at PD's
    1230 slots (`budget_mode = "fixed"`), f − f⋆.
  - E4: logistic, n = 600, batch 5, N = 400 for every method, cut at 830 slots; raw f after
    829 slots (the notebook's `curve[:830]`) and after 830.
  - E5: noisy logistic, n = 50, batch 1, σ = 0.5, 3180 slots, each method the smallest N
    reaching them, not cut (`budget_mode = "untruncated"`), S = 2 … 128; raw f.

Every curve is tuned by `rpd_mpi.analysis.sweep` over powers of two (PD and RPD 2^-12..2^-3,
LocalSGD 2^-8..2^2, as in the paper, every S of E5 included), by the paper's stable selector
(`Settings.selector`; E2–E4 on the last 20 % of the points, E5 on the last 1 %, at least 10
points) or by the lowest tail mean (`--selector tail-mean`), and the best ledger is kept.
`quick` variants shrink sizes and grids so that a test finishes in seconds.

Seeds (`Settings.seeds`, default 5 for E2's RPD curves, E4 and E5, 2 with quick, 1 elsewhere):
every tuned curve keeps its step size from the seed-0 sweep and its configuration is rerun at
seeds 1 .. N-1. In E2 and E5 the data stay those of seed 0 (`ObjectiveConfig.data_seed = 0`)
and a seed changes the gradient noise and the RPD plan; E4 has neither (PD and LocalSGD are
deterministic given the data), so there a seed draws new data. Tables give mean ± std (sample
std, ddof = 1) and say whether a difference exceeds the seed spread (|Δ mean| > std_a + std_b);
figures show the mean with a min–max band; the JSON carries every seed's values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rpd_mpi.analysis.common import (fmt, lr_text, markdown_table, parallel_map,
                                     pyplot, save_figure, tidy_log_axis)
from rpd_mpi.analysis.curves import curve, merge_seeds, plot_curves
from rpd_mpi.analysis.sweep import (PAPER_THRESHOLDS, TAIL_MEAN, Selector, SweepResult,
                                    Thresholds, power_grid, score_record, sweep,
                                    write_summary)
from rpd_mpi.build import simulate_run
from rpd_mpi.config import ObjectiveConfig, RPDConfig, RunConfig, ScheduleConfig
from rpd_mpi.experiments.settings import Outcome, Settings
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.objectives.problems import shared_problem
from rpd_mpi.records import RunRecord

PD_GRID, LSGD_GRID = (-12, -3), (-8, 2)
QUICK_PD_GRID, QUICK_LSGD_GRID = (-6, -1), (-4, 1)
SEEDED = ("E2", "E4", "E5")          # several seeds by default
PAPER_SEEDS, QUICK_SEEDS = 5, 2


def seeds_of(st: Settings, name: str) -> int:
    """Seeds per point of experiment `name`: --seeds, else the preset's default."""
    if st.seeds is not None:
        return st.seeds
    return (QUICK_SEEDS if st.quick else PAPER_SEEDS) if name in SEEDED else 1


def selector_of(st: Settings, tail: float = 0.2, tail_min: int = 1,
                thresholds: Thresholds = PAPER_THRESHOLDS) -> Selector:
    """The stable rule on the preset's tail, or the tail mean (`--selector tail-mean`)."""
    if st.selector == "tail-mean":
        return TAIL_MEAN
    return Selector("stable", tail, tail_min, thresholds)


def raw_after(record: RunRecord, slots: int | None = None) -> float:
    """The raw objective f at the end, or after `slots` slots (the last point at or before)."""
    values, times = record.objective.value, record.objective.time
    if values.size == 0:
        return float("nan")
    if slots is None:
        return float(values[-1])
    i = int(np.searchsorted(times, slots, side="right")) - 1
    return float(values[max(i, 0)])


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
        """score_record's `which` (1: final f − f⋆, 2: score) of every seed's run."""
        return [score_record(r)[which] for r in self.records]

    def raw(self, slots: int | None = None) -> list[float]:
        """Raw f of every seed's run at the end (or after `slots` slots)."""
        return [raw_after(r, slots) for r in self.records]

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
            "raw_final": raw_after(self.record) if self.record is not None else None,
            "score": self.score, "at_edge": self.result.at_edge, "grid": self.grid,
            "selector": self.result.selector.kind,
            "slots": int(self.record.objective.time[-1]) if self.record is not None and
            self.record.objective.time.size else None}
        if self.seed_records:
            out.update(seeds=[int(r.attrs["seed"]) for r in self.records],
                       seed_finals=self.seed_values(1), seed_scores=self.seed_values(2),
                       seed_raw_finals=self.raw())
        return out


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof = 1; 0 for one value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def mean_std_text(values: Sequence[float]) -> str:
    if len(values) < 2:
        return fmt(values[0]) if values else "-"
    m, s = mean_std(values)
    return f"{fmt(m)} ± {fmt(s, 2)}"


def spread_verdict(a: Sequence[float], b: Sequence[float], names: tuple[str, str]) -> str:
    """Which mean is lower and whether |Δ mean| exceeds std_a + std_b (the seed spread)."""
    if not a or not b:
        return "-"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    low, high, m_low, m_high = (names[0], names[1], ma, mb) if ma <= mb else \
        (names[1], names[0], mb, ma)
    ratio = f"{m_high / m_low:.3g}×" if m_low > 0 else "-"
    if len(a) < 2 and len(b) < 2:
        return f"{low} ({ratio}; one seed: spread unknown)"
    beyond = abs(ma - mb) > sa + sb
    return f"{low} ({ratio}; {'exceeds' if beyond else 'within'} the seed spread)"


def lowest_final(runs: Sequence[Tuned]) -> Tuned | None:
    """The run with the lowest final value (the first of equals); None if none finished."""
    finished = [(r.final, r) for r in runs if r.final is not None]
    return min(finished, key=lambda pair: pair[0])[1] if finished else None


def make_cfg(method: str, obj: ObjectiveConfig, stages: int, *, microbatches: int = 10,
             budget: int = 0, local_steps: int = 1, delta: int | None = None,
             budget_mode: str = "smallest") -> RunConfig:
    """A run of `method` (LocalSGD: R = S trajectories, G = 1); lr is set by the sweep."""
    lsgd = method == "localsgd"
    sch = ScheduleConfig(method=method, stages=stages, microbatches=microbatches,
                         budget_slots=budget, trajectories=stages if lsgd else 1,
                         local_steps=local_steps if lsgd else 1,
                         budget_mode=budget_mode if budget else "smallest")
    return RunConfig(schedule=sch, objective=obj, rpd=RPDConfig(delta=delta), lr=1.0,
                     seed=0, eval_every=1, out="sweep.h5")


def _wrap(res: SweepResult, st: Settings, label: str, grid: str, seeds: int,
          new_data: bool = False) -> Tuned:
    write_summary(res, st.out / "sweeps")
    record = read_run(res.best_ledger) if res.best_ledger else None
    if st.log is not None:
        st.log(f"{res.name}: best lr {lr_text(res.best.lr) if res.best else '-'} "
               f"of {len(res.points)}")
    again = reseed(record, seeds, st.jobs, new_data) if record is not None else []
    if again and st.log is not None:
        st.log(f"{res.name}: rerun at seeds 1..{seeds - 1}")
    return Tuned(label, res, record, grid, again)


def _run_config(cfg: RunConfig) -> RunRecord:
    return simulate_run(cfg)


def reseed(record: RunRecord, seeds: int, jobs: int = 1, new_data: bool = False
           ) -> list[RunRecord]:
    """The run of `record`'s configuration at seeds 1 .. seeds-1 (in memory, not written);
    `new_data`: the data seed follows the seed (else the data stay the record's)."""
    if seeds <= 1:
        return []
    base = RunConfig.from_dict(record.config)
    obj = base.objective

    def at(s: int) -> RunConfig:
        data = dataclasses.replace(obj, data_seed=s) if new_data and obj.data_seed is not None \
            else obj
        return dataclasses.replace(base, seed=s, objective=data)
    return parallel_map(_run_config, [at(s) for s in range(1, seeds)], jobs)


def warm_data(cfg: RunConfig) -> None:
    """Generate a `data_seed` problem once here, so that the sweep's forked workers share it
    (`objectives.problems.shared_problem`) instead of each generating it (and solving f*)."""
    obj = cfg.objective
    if obj.data_seed is not None and not obj.data and obj.name != "charlm":
        shared_problem(obj.name, obj.dim, obj.examples, obj.data_seed, obj.mu, obj.lam)


def tune(cfg: RunConfig, grid: tuple[int, int], st: Settings, name: str, label: str,
         seeds: int | None = None, selector: Selector | None = None,
         new_data: bool = False) -> Tuned:
    """Sweep the whole power-of-two grid 2^grid[0] .. 2^grid[1] (seeds None: --seeds or 1;
    selector None: the settings' rule on the last 20 %; `new_data`: reseeded runs draw new
    data)."""
    sel = selector if selector is not None else selector_of(st)
    warm_data(cfg)
    res = sweep(cfg, power_grid(*grid), st.jobs, st.out / "ledgers", name, selector=sel)
    n = seeds if seeds is not None else (st.seeds or 1)
    return _wrap(res, st, label, f"2^{grid[0]}..2^{grid[1]}", n, new_data)


def grid_of(quick: bool, method: str) -> tuple[int, int]:
    if method == "localsgd":
        return QUICK_LSGD_GRID if quick else LSGD_GRID
    return QUICK_PD_GRID if quick else PD_GRID


def plot_tuned(runs: Sequence[Tuned], x: str, path: str | Path, title: str) -> Path:
    """The best curve of every tuned run on one plot; a run with several seeds is drawn as
    the mean over its seeds with a min–max band."""
    drawn = [merge_seeds([curve(rec, x, f"{r.label} (lr {r.lr})") for rec in r.records])
             for r in runs if r.records]       # one curve per tuned run, whatever its seeds vary
    return plot_curves(drawn, x, path, title)


def selector_note(st: Settings, tail: str) -> str:
    if st.selector == "tail-mean":
        return "step sizes: lowest mean f − f⋆ over the last 10 % of the points"
    return (f"step sizes: the paper's stable rule on the last {tail} of the points of raw f "
            f"(smallest stable lr within 5 % of the best stable tail mean)")


# ----------------------------------------------------------------------------- E2

E2_PAPER = {"PD": "≈ 2.4e−7", "RPD δ=60": "≈ 2.3e−6 (tracks PD)", "RPD δ=180": "far worse",
            "RPD δ=420": "far worse"}


def run_e2(st: Settings) -> Outcome:
    """PD vs RPD with several delay bounds on the random quadratic, S = 8, K = 3200; RPD
    rerun at several seeds on the seed-0 data (new plans)."""
    q = st.quick
    obj = ObjectiveConfig(name="quadratic", dim=64 if q else 512, examples=200 if q else 2000,
                          batch_size=10 if q else 100, data_seed=0)
    S, N = (4, 40) if q else (8, 400)
    deltas = (4, 14, 60) if q else (8, 30, 60, 180, 420)
    grid, sel, seeds = grid_of(q, "pd"), selector_of(st), seeds_of(st, "E2")
    runs = [tune(make_cfg("pd", obj, S, microbatches=N), grid, st, "pd", "PD", 1, sel)]
    for d in deltas:
        runs.append(tune(make_cfg("rpd", obj, S, microbatches=N, delta=d), grid, st,
                         f"rpd_delta{d}", f"RPD δ={d}", seeds, sel))
    png = plot_tuned(runs, "updates", st.out / "E2.png",
                     f"E2: PD vs RPD, quadratic d={obj.dim}, S={S}, best lr each"
                     + (f"; RPD mean of {seeds} seeds, band min–max" if seeds > 1 else ""))
    pd_vals = runs[0].seed_values(1)
    rows = [(r.label, r.lr, len(r.record.updates) if r.record else "-", fmt(r.final),
             mean_std_text(r.seed_values(1)),
             "-" if r is runs[0] else spread_verdict(r.seed_values(1), pd_vals,
                                                     (r.label, "PD")),
             "-" if q else E2_PAPER.get(r.label, "-")) for r in runs]
    table = markdown_table(("curve", "best lr", "block updates K", "final f−f⋆ (seed 0)",
                            f"final f−f⋆, mean ± std over {seeds} seeds",
                            "lower vs PD", "paper"), rows)
    table += (f"\n\nPD is deterministic on fixed data (one run); each RPD seed draws a new "
              f"plan (stages, batches, delays) on the seed-0 data. {selector_note(st, '20 %')}.")
    return Outcome(table, png, {r.label: r.summary() for r in runs})


# ----------------------------------------------------------------------------- E3, E4

def pd_vs_localsgd(st: Settings, obj: ObjectiveConfig, name: str, paper: dict[str, str],
                   hs: Sequence[int], stages: int, microbatches: int, raw: bool) -> Outcome:
    """PD and LocalSGD (R = S, each H), all with N microbatches, cut at PD's slot count
    (the paper's E3/E4 protocol). `raw`: the table shows raw f after budget − 1 and budget
    slots (E4, the notebook's `curve[:budget]`), else f − f⋆ (E3)."""
    budget = 2 * microbatches + 2 * stages - 2
    seeds, sel = seeds_of(st, name), selector_of(st)
    runs = [tune(make_cfg("pd", obj, stages, microbatches=microbatches, budget=budget,
                          budget_mode="fixed"), grid_of(st.quick, "pd"), st, "pd", "PD",
                 seeds, sel, new_data=True)]
    for h in hs:
        cfg = make_cfg("localsgd", obj, stages, microbatches=microbatches, budget=budget,
                       local_steps=h, budget_mode="fixed")
        runs.append(tune(cfg, grid_of(st.quick, "localsgd"), st, f"localsgd_H{h}",
                         f"LocalSGD H={h}", seeds, sel, new_data=True))
    what = "f" if raw else "f − f⋆"
    png = plot_tuned(runs, "slots", st.out / f"{name}.png",
                     f"{name}: {obj.name}, S=R={stages}, N={microbatches} cut at {budget} slots"
                     + (f"; mean of {seeds} seeds" if seeds > 1 else ""))

    def value(r: Tuned, slots: int | None = None) -> list[float]:
        return r.raw(slots) if raw else r.seed_values(1)

    at = budget - 1 if raw else None            # the notebook's convention for E4
    pd_vals = value(runs[0], at)
    rows = []
    for r in runs:
        cells: list[Any] = [r.label, r.lr]
        if raw:
            cells += [fmt(r.raw(budget - 1)[0]) if r.record else "-",
                      fmt(r.raw()[0]) if r.record else "-", fmt(r.final)]
        else:
            cells += [fmt(r.final)]
        v = value(r, at)
        cells += [mean_std_text(v)] if seeds > 1 else []
        cells += [fmt(float(np.mean(v)) / float(np.mean(pd_vals)))
                  if v and pd_vals and np.mean(pd_vals) > 0 else "-",
                  "-" if r is runs[0] else spread_verdict(v, pd_vals, (r.label, "PD")),
                  "-" if st.quick else paper.get(r.label, "-")]
        rows.append(tuple(cells))
    heads: tuple[str, ...] = (f"f after {budget - 1} slots", f"f after {budget} slots",
                              f"f − f⋆ after {budget}") if raw else (f"f − f⋆ at {budget} slots",)
    main = f"{what} after {budget - 1 if raw else budget}"
    spread = (f"{main}, mean ± std over {seeds} seeds",) if seeds > 1 else ()
    table = markdown_table(("curve", "best lr", *heads, *spread,
                            "÷ PD (mean)", "lower vs PD", "paper"), rows)
    means = {r.label: float(np.mean(value(r, at))) for r in runs if r.record is not None}
    lowest = min(means, key=means.__getitem__) if means else "-"
    table += (f"\n\nlowest {main} (rpd_mpi, mean over {seeds} seed{'s' if seeds > 1 else ''})"
              f": **{lowest}**; paper: {paper['lowest']}. Every method runs N = {microbatches}, "
              f"cut at {budget} slots (budget protocol `fixed`). "
              + (f"Each seed draws new data (these runs have no other randomness). "
                 if seeds > 1 else "") + f"{selector_note(st, '20 %')}.")
    measured: dict[str, Any] = {r.label: r.summary() for r in runs}
    for r in runs:
        if r.record is not None:
            measured[r.label]["seed_values_shown"] = value(r, at)
    measured.update(budget=budget, microbatches=microbatches, budget_protocol="fixed",
                    lowest=lowest, shown=main, seeds=seeds)
    return Outcome(table, png, measured)


def run_e3(st: Settings) -> Outcome:
    """Tridiagonal quadratic: PD and LocalSGD H in {2, 5, 30}, N = 600 cut at 1230 slots."""
    q = st.quick
    obj = ObjectiveConfig(name="tridiag", dim=32 if q else 512, examples=40 if q else 600,
                          batch_size=5, data_seed=0)
    paper = {"PD": "≈ 2.7", "LocalSGD H=2": "≥ 19", "LocalSGD H=5": "≥ 19 (paper code: "
             "22.6612)", "LocalSGD H=30": "≥ 19", "lowest": "PD, ≈ 7× below the best LocalSGD"}
    return pd_vs_localsgd(st, obj, "E3", paper, (2, 5) if q else (2, 5, 30),
                          4 if q else 16, 20 if q else 600, raw=False)


def run_e4(st: Settings) -> Outcome:
    """Logistic regression: PD and LocalSGD H in {2, 5, 30}, N = 400 cut at 830 slots."""
    q = st.quick
    obj = ObjectiveConfig(name="logistic", dim=32 if q else 512, examples=40 if q else 600,
                          batch_size=5, lam=1e-4, data_seed=0)
    paper = {"lowest": "LocalSGD H=5 (figure); the paper's code on this set-up: PD"}
    return pd_vs_localsgd(st, obj, "E4", paper, (2, 5) if q else (2, 5, 30),
                          4 if q else 16, 20 if q else 400, raw=True)


# ----------------------------------------------------------------------------- E5

E5_METHODS = ("PD", "RPD", "LocalSGD")


def run_e5(st: Settings) -> Outcome:
    """Noisy logistic regression at a fixed 3180-slot budget, S = 2 .. 128: each method the
    smallest N reaching the budget, untruncated; raw f; seeds vary noise and RPD plans."""
    q = st.quick
    obj = ObjectiveConfig(name="logistic", dim=32 if q else 512, examples=20 if q else 50,
                          batch_size=1, noise=0.5, lam=1e-4, data_seed=0)
    budget = 120 if q else 3180
    stages = (2, 4, 8) if q else (2, 4, 8, 16, 32, 64, 128)
    seeds = seeds_of(st, "E5")
    sel = selector_of(st, tail=0.01, tail_min=10)
    rows: list[dict[str, Any]] = []
    for S in stages:
        def cfg(method: str, h: int = 1) -> RunConfig:
            return make_cfg(method, obj, S, budget=budget, local_steps=h,
                            budget_mode="untruncated")
        pd = tune(cfg("pd"), grid_of(q, "pd"), st, f"S{S}_pd", "PD", seeds, sel)
        lsgd = tune(cfg("localsgd", 5), grid_of(q, "localsgd"), st, f"S{S}_localsgd",
                    "LocalSGD H=5", seeds, sel)
        rpd = tune(cfg("rpd"), grid_of(q, "pd"), st, f"S{S}_rpd", "RPD", seeds, sel)
        rows.append({"S": S, "PD": pd, "RPD": rpd, "LocalSGD": lsgd})
    measured: dict[str, Any] = {str(r["S"]): {m: r[m].summary() for m in E5_METHODS}
                                for r in rows}
    png = plot_e5(measured, st.out / "E5.png", budget)
    table = e5_table(rows, q, seeds) + (
        f"\n\nRaw f (not f − f⋆), at the end of each run: every method runs the smallest N "
        f"whose timeline reaches {budget} slots, not cut (budget protocol `untruncated`); "
        f"data of seed 0 (n = {obj.examples}, d = {obj.dim}), each seed new gradient noise "
        f"and RPD plans. {selector_note(st, '1 % (at least 10)')}.")
    measured.update(budget=budget, budget_protocol="untruncated", seeds=seeds)
    return Outcome(table, png, measured)


def e5_table(rows: list[dict[str, Any]], quick: bool, seeds: int) -> str:
    body = []
    for r in rows:
        cells: list[Any] = [r["S"]]
        for m in E5_METHODS:
            t: Tuned = r[m]
            cells += [t.lr, fmt(t.raw()[0]) if t.record else "-"]
            if seeds > 1:
                cells.append(mean_std_text(t.raw()))
        cells.append(spread_verdict(r["PD"].raw(), r["LocalSGD"].raw(), ("PD", "LocalSGD")))
        body.append((*cells, "-" if quick else ("PD" if r["S"] == 2 else "LocalSGD")))
    heads: list[str] = ["S"]
    for m in E5_METHODS:
        heads += [f"{m} lr", f"{m} f (seed 0)"]
        if seeds > 1:
            heads.append(f"{m} f, mean ± std over {seeds} seeds")
    return markdown_table((*heads, "lower of PD / LocalSGD (mean)",
                           "paper: lower"), body)


def plot_e5(measured: dict[str, Any], path: str | Path, budget: int) -> Path:
    """Final raw f per method against S, the mean over seeds with a min–max band.

    `measured` is E5.json's: {S: {method: {"raw_final": ..., "seed_raw_finals": [...]}}}, so
    the figure can be redrawn from the JSON alone."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    s = sorted(int(k) for k in measured if k.isdigit())
    seeds = 1
    for method, style in (("PD", "o-"), ("RPD", "s--"), ("LocalSGD", "^-")):
        points = [measured[str(x)][method] for x in s]
        per_seed = [p.get("seed_raw_finals") for p in points]
        if all(v for v in per_seed):
            vals = [np.array(v, dtype=float) for v in per_seed]
            seeds = max(seeds, max(v.size for v in vals))
            (line,) = ax.plot(s, [v.mean() for v in vals], style, label=method)
            ax.fill_between(s, [v.min() for v in vals], [v.max() for v in vals],
                            color=line.get_color(), alpha=0.18, lw=0)
        else:
            y = [p.get("raw_final") for p in points]
            ax.plot(s, [v if v is not None else float("nan") for v in y], style,
                    label=method)
    ax.set(xscale="log", yscale="log", xlabel="stages S", ylabel="f(w) at the end (raw)")
    ax.set_xticks(s, [str(x) for x in s])
    ax.set_xticks([], minor=True)
    tidy_log_axis(ax)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, title="best lr per S and method (seed 0)", title_fontsize=8)
    ax.set_title(f"E5: noisy logistic (σ = 0.5), {budget}-slot budget, untruncated; "
                 + (f"mean of {seeds} seeds, band min–max" if seeds > 1 else "seed 0"),
                 fontsize=9)
    return save_figure(fig, path)
