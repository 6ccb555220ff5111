"""The RPD theory check: the running average of ‖∇f(w_k)‖² next to the paper's bound

    (1/K) Σ_{k<K} ‖∇f(w_k)‖²  ≤  2SΔ0/(γK) + γSLG² + γ²L²δ²G²,

with S = attrs stages, γ = attrs lr, L = attrs L, δ = attrs delta (the bound in force; for a
PD ledger its largest delay), Δ0 = f(w0) − f⋆ (from the ledger's first objective point) and
G = the largest block-gradient norm the ledger recorded (updates.grad_norm).

A ledger stores objective values and final blocks, not iterates, so the run is simulated again
from the ledger's own configuration (`RunConfig.from_dict(record.config)`, same seed) with the
model wrapped in a probe that evaluates the full gradient wherever the engine evaluates the
objective (every `--every` block updates). The check that the re-run reproduces the ledger's final
blocks is reported. The average over k < K weights each sample by the updates until the next.

    rpd-mpi tool theory rpd.h5 [--every 1] [--out theory.png] [--json]
    rpd-mpi tool theory --quartic S2_rpd.h5 S4_rpd.h5 ... [--every 10] [--out quartic.png]

`--quartic` takes RPD ledgers at several S (e.g. E5's) and puts the bound's stale-read term
γ²L²δ²G² (δ = the ledger's bound, S² − S/2 by default = δ_PD) against S with a c·S⁴ fit,
next to each run's measured (1/K) Σ ‖∇f(w_k)‖²; one series per folder of ledgers, labelled
fixed γ when they share a step size, else tuned γ per S.

`--out` is a 200 dpi PNG by default, or any format matplotlib knows by its extension (.pdf,
.svg, ...); its folder must exist (it is not created). The figure's title names the run's
method, S, δ, lr and objective (never the ledger's path).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from rpd_mpi import jsonout
from rpd_mpi.analysis.common import (FIGURE_HELP, Parser, ToolError, check_figure_file, fmt,
                                     guarded, int_at_least, markdown_table, parallel_map,
                                     pyplot, run_title, save_figure, tidy_log_axis)
from rpd_mpi.build import build, simulate_run
from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.records import RunRecord


class GradientProbe:
    """A model proxy: every `full_objective(w)` also records ‖∇f(w)‖² (full gradient).

    It hides `objective_tracker`, so the simulator evaluates through `full_objective`.
    """

    def __init__(self, model: Model) -> None:
        self._model = model
        self.sq_norms: list[float] = []

    def full_objective(self, w: np.ndarray) -> float:
        g = self._model.full_gradient(w)
        self.sq_norms.append(float(g @ g))
        return self._model.full_objective(w)

    def __getattr__(self, name: str) -> Any:
        if name == "objective_tracker" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._model, name)


@dataclass(frozen=True)
class Constants:
    """The quantities of the bound, as read from a ledger."""

    S: int
    lr: float
    L: float
    delta: int
    G: float
    delta0: float

    def terms(self, K: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(2SΔ0/(γK), γSLG², γ²L²δ²G²) at each K."""
        K = np.asarray(K, dtype=float)
        t1 = 2 * self.S * self.delta0 / (self.lr * K)
        t2 = np.full_like(K, self.lr * self.S * self.L * self.G ** 2)
        t3 = np.full_like(K, (self.lr * self.L * self.delta * self.G) ** 2)
        return t1, t2, t3


@dataclass(frozen=True)
class Check:
    """The measured running average and the bound at every sampled K."""

    constants: Constants
    K: np.ndarray
    average: np.ndarray
    bound: np.ndarray
    reproduced: bool


def constants_of(record: RunRecord) -> Constants:
    """S, γ, L, δ, G and Δ0 of a ledger; ToolError when one is missing."""
    a = record.attrs
    if a.get("L") is None or a.get("f_star") is None:
        raise ToolError("the ledger's objective has no known L or f* (the bound needs both)")
    if len(record.updates) == 0 or record.objective.value.size == 0:
        raise ToolError("the ledger has no updates or no objective values")
    return Constants(S=int(a["stages"]), lr=float(a["lr"]), L=float(a["L"]),
                     delta=int(a["delta"]), G=float(np.max(record.updates.grad_norm)),
                     delta0=float(record.objective.value[0]) - float(a["f_star"]))


def rerun_gradients(record: RunRecord, every: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(k, ‖∇f(w_k)‖²) along a re-run of the ledger's configuration, and whether the re-run
    reproduced the ledger's final blocks exactly."""
    try:
        cfg = dataclasses.replace(RunConfig.from_dict(record.config), eval_every=every)
    except ConfigError as err:
        raise ToolError(f"the ledger's config cannot be run again: {err}") from None
    probe = GradientProbe(build(cfg))
    again = simulate_run(cfg, probe)
    k = np.asarray(again.objective.k)
    if len(probe.sq_norms) != k.size:
        raise ToolError(f"gradient samples ({len(probe.sq_norms)}) do not match objective "
                        f"points ({k.size}): the engine evaluated the objective elsewhere")
    same = len(again.final_blocks) == len(record.final_blocks) and all(
        np.array_equal(a, b) for a, b in zip(again.final_blocks, record.final_blocks))
    return k, np.array(probe.sq_norms), same


def running_average(k: np.ndarray, sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, (1/K) Σ_{k<K} ‖∇f(w_k)‖²): sample i stands for the iterates k_i .. k_{i+1}-1."""
    weights = np.diff(k).astype(float)
    K = k[1:].astype(float)
    avg = np.cumsum(sq[:-1] * weights) / np.maximum(K, 1.0)
    keep = K > 0
    return K[keep], avg[keep]


def check(record: RunRecord, every: int = 1) -> Check:
    """Re-run, measure, and evaluate the bound at the same K."""
    c = constants_of(record)
    k, sq, same = rerun_gradients(record, every)
    K, avg = running_average(k, sq)
    if K.size == 0:
        raise ToolError("the re-run has no gradient samples after the first update")
    return Check(c, K, avg, cast(np.ndarray, sum(c.terms(K))), same)


def checkpoints(res: Check) -> list[int]:
    """Indices of the samples nearest 10 %, 25 %, 50 % and 100 % of the run."""
    target = np.array([0.1, 0.25, 0.5, 1.0]) * res.K[-1]
    return sorted({int(np.argmin(np.abs(res.K - t))) for t in target})


def table(res: Check) -> str:
    """K, measured average, bound and its three terms, bound / measured."""
    t1, t2, t3 = res.constants.terms(res.K)
    rows = [(int(res.K[i]), fmt(res.average[i]), fmt(res.bound[i]), fmt(t1[i]), fmt(t2[i]),
             fmt(t3[i]), fmt(res.bound[i] / res.average[i]) if res.average[i] > 0 else "inf")
            for i in checkpoints(res)]
    return markdown_table(("K", "mean ‖∇f‖² (measured)", "bound", "2SΔ0/(γK)", "γSLG²",
                           "γ²L²δ²G²", "bound / measured"), rows)


def describe_constants(res: Check) -> str:
    c = res.constants
    return (f"S={c.S} γ={c.lr:g} L={c.L:.4g} δ={c.delta} G={c.G:.4g} Δ0={c.delta0:.4g}; "
            f"re-run reproduces the ledger's final blocks: {'yes' if res.reproduced else 'NO'}")


def plot(res: Check, path: str | Path, title: str = "") -> Path:
    """Measured running average, the bound and its terms vs K (log y)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.plot(res.K, res.average, color="C0", lw=1.6, label="measured (1/K) Σ ‖∇f(w_k)‖²")
    ax.plot(res.K, res.bound, color="k", lw=1.6, label="bound")
    names = ("2SΔ0/(γK)", "γSLG²", "γ²L²δ²G²")
    for term, name, color in zip(res.constants.terms(res.K), names, ("C1", "C2", "C3")):
        ax.plot(res.K, term, "--", color=color, lw=1, label=name)
    ax.set(yscale="log", xlabel="block updates K",
           ylabel="‖∇f(w)‖² (running mean, bound)",
           title=title or "RPD theory check")
    tidy_log_axis(ax)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def to_json(res: Check) -> dict[str, Any]:
    i = -1
    return {"constants": dataclasses.asdict(res.constants), "K": int(res.K[i]),
            "measured": float(res.average[i]), "bound": float(res.bound[i]),
            "holds": bool(np.all(res.bound >= res.average)), "reproduced": res.reproduced}


@dataclass(frozen=True)
class StalePoint:
    """One run's stale-read term γ²L²δ²G² next to its measured mean ‖∇f‖² (the quartic
    claim: with δ = δ_PD = S² − S/2 the term grows like S⁴ at a fixed γ, G and L)."""

    S: int
    lr: float
    L: float
    delta: int
    G: float
    stale: float
    measured: float
    reproduced: bool


def stale_point(record: RunRecord, every: int = 1) -> StalePoint:
    """The stale term and (1/K) Σ ‖∇f(w_k)‖² over the whole run (re-run, `check`)."""
    res = check(record, every)
    c = res.constants
    return StalePoint(c.S, c.lr, c.L, c.delta, c.G, float((c.lr * c.L * c.delta * c.G) ** 2),
                      float(res.average[-1]), res.reproduced)


def power_fit(S: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(c of the fit c·S⁴, exponent p and factor a of the free fit a·S^p), least squares in
    log-log (positive y only)."""
    S, y = np.asarray(S, dtype=float), np.asarray(y, dtype=float)
    ok = y > 0
    if np.count_nonzero(ok) < 2:
        return math.nan, math.nan, math.nan
    logs, logy = np.log(S[ok]), np.log(y[ok])
    c = float(np.exp(np.mean(logy - 4.0 * logs)))
    p, log_a = np.polyfit(logs, logy, 1)
    return c, float(p), float(np.exp(log_a))


def quartic_table(groups: dict[str, list[StalePoint]]) -> str:
    """Per group (a step-size setting) and S: γ, L, δ, G, the stale term, the S⁴ fit there,
    the measured mean ‖∇f‖² and term / measured; then each group's fitted exponents."""
    rows: list[tuple[Any, ...]] = []
    fits = []
    for name, points in groups.items():
        S = np.array([p.S for p in points], dtype=float)
        c, p_term, _ = power_fit(S, np.array([p.stale for p in points]))
        _, p_meas, _ = power_fit(S, np.array([p.measured for p in points]))
        for pt in points:
            rows.append((name, pt.S, fmt(pt.lr), fmt(pt.L), pt.delta, fmt(pt.G), fmt(pt.stale),
                         fmt(c * pt.S ** 4), fmt(pt.measured),
                         fmt(pt.stale / pt.measured) if pt.measured > 0 else "inf",
                         "yes" if pt.reproduced else "NO"))
        fits.append(f"{name}: stale term ∝ S^{p_term:.2f} (free fit), measured mean ‖∇f‖² ∝ "
                    f"S^{p_meas:.2f}")
    table = markdown_table(("step size", "S", "γ", "L", "δ_PD", "G", "γ²L²δ²G²", "c·S⁴ fit",
                            "mean ‖∇f‖² (measured)", "term / measured", "re-run exact"), rows)
    return table + "\n\n" + "\n".join(f"- {f}" for f in fits)


def plot_quartic(groups: dict[str, list[StalePoint]], path: str | Path, title: str = ""
                 ) -> Path:
    """The stale term with its S⁴ fit and the measured mean ‖∇f‖², against S (log-log)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (name, points) in enumerate(groups.items()):
        S = np.array([p.S for p in points], dtype=float)
        stale = np.array([p.stale for p in points])
        c, _, _ = power_fit(S, stale)
        color = f"C{i}"
        ax.plot(S, stale, "o-", color=color, label=f"γ²L²δ²G², {name}")
        ax.plot(S, c * S ** 4, ":", color=color, label=f"c·S⁴ fit, {name}")
        ax.plot(S, [p.measured for p in points], "s--", color=color,
                label=f"measured (1/K) Σ ‖∇f(w_k)‖², {name}")
    ax.set(xscale="log", yscale="log", xlabel="stages S",
           ylabel="‖∇f‖² scale", title=title or "stale-read term vs S")
    ax.set_xticks(sorted({p.S for pts in groups.values() for p in pts}))
    ax.set_xticklabels([str(s) for s in sorted({p.S for pts in groups.values() for p in pts})])
    ax.set_xticks([], minor=True)
    tidy_log_axis(ax)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def _stale_of(job: tuple[str, int]) -> StalePoint:
    path, every = job
    try:
        return stale_point(read_run(path), every)
    except (ToolError, ConfigError) as err:
        raise ToolError(f"{path}: {err}") from None


def quartic_main(paths: list[str], every: int, out: Path, as_json: bool, jobs: int = 1
                 ) -> int:
    """`--quartic`: RPD ledgers at several S, one series per folder (its ledgers sharing one
    step size: a fixed-γ series, else tuned γ per S); the re-runs in `jobs` processes."""
    found = parallel_map(_stale_of, [(path, every) for path in paths], jobs)
    folders: dict[str, list[StalePoint]] = {}
    for path, point in zip(paths, found):
        folders.setdefault(Path(path).parent.name or ".", []).append(point)
    named: dict[str, list[StalePoint]] = {}
    for folder, points in folders.items():
        lrs = {p.lr for p in points}
        what = f"fixed γ = {fmt(lrs.pop())}" if len(lrs) == 1 else "tuned γ per S"
        named[f"{what} ({folder})"] = sorted(points, key=lambda p: p.S)
    plot_quartic(named, out, "RPD stale-read term γ²L²δ_PD²G² vs S (δ_PD = S² − S/2)")
    if as_json:
        print(jsonout.dumps({k: [dataclasses.asdict(p) for p in v] for k, v in named.items()}))
    else:
        print(f"{quartic_table(named)}\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="theory", description=__doc__.splitlines()[0])
    p.add_argument("ledger", nargs="+", help="run.h5 (RPD; PD works too, with δ = its largest "
                                             "delay); several with --quartic")
    p.add_argument("--quartic", action="store_true",
                   help="RPD ledgers at several S: the stale term γ²L²δ²G² against S with an "
                        "S⁴ fit, next to each run's measured mean ‖∇f‖² (one series per folder: "
                        "fixed γ when its ledgers share a step size, else tuned γ per S)")
    p.add_argument("--every", type=int_at_least(1), default=1,
                   help="gradient cadence in block updates (--eval-every of the re-run)")
    p.add_argument("--out", type=Path, default=Path("theory.png"), help=FIGURE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--jobs", type=int_at_least(1), default=1,
                   help="--quartic: worker processes for the re-runs (default 1)")
    args = p.parse_args(argv)

    def body() -> int:
        check_figure_file(args.out)
        if args.quartic:
            return quartic_main(args.ledger, args.every, args.out, args.json, args.jobs)
        if len(args.ledger) != 1:
            raise ToolError(f"one ledger without --quartic (got {len(args.ledger)})")
        record = read_run(args.ledger[0])
        try:
            res = check(record, args.every)
        except (ToolError, ConfigError) as err:
            raise ToolError(f"{args.ledger[0]}: {err}") from None
        plot(res, args.out, f"RPD theory check (bound vs measured)\n{run_title(record)}")
        if args.json:
            print(jsonout.dumps(to_json(res)))
        else:
            print(f"{describe_constants(res)}\n\n{table(res)}\n\nbound holds at every K: "
                  f"{'yes' if to_json(res)['holds'] else 'NO'}\nwrote {args.out}")
        return 0
    return guarded(body)
