"""E3 at S = 4 on real MPI ranks: PD (static and dynamic order) against LocalSGD, in wall time.

Step sizes come from a simulated sweep of the same configuration (each curve its best, by the
sweep rule); then every curve runs again under `mpiexec -n S rpd-mpi train` with each forward
and backward held for `--op-cost` seconds of emulated compute, so that wall time means
something on an oversubscribed machine. Writes mpi_compare.md (a table with the unit-time and
the measured delays, utilization and objective), a curves-vs-wall-time PNG and the ledgers.

    rpd-mpi tool mpi_compare [--stages 4] [--microbatches 150] [--op-cost 0.002]
                             [--dim 512] [--examples 600] --out DIR

`--out DIR` is created if missing; its parent folder must exist.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

from rpd_mpi.analysis.common import (Parser, ToolError, check_out_dir, finite_at_least, fmt,
                                     guarded, int_at_least, lr_text, markdown_table, write_text)
from rpd_mpi.analysis.curves import Curve, curve, plot_curves
from rpd_mpi.analysis.sweep import power_grid, sweep
from rpd_mpi.config import ObjectiveConfig, RunConfig, RuntimeConfig
from rpd_mpi.experiments.presets import make_cfg
from rpd_mpi.ledger.report import summarize
from rpd_mpi.ledger.run_file import read_run

GRIDS = {"pd": (-12, -3), "localsgd": (-8, 2)}


def _runs(S: int, N: int, dim: int, examples: int) -> list[tuple[str, RunConfig, str]]:
    obj = ObjectiveConfig(name="tridiag", dim=dim, examples=examples, batch_size=5)
    budget = 2 * N + 2 * S - 2
    out = [("PD", make_cfg("pd", obj, S, microbatches=N, budget=budget), "pd")]
    for h in (2, 5, 30):
        out.append((f"LocalSGD H={h}", make_cfg("localsgd", obj, S, budget=budget,
                                                 local_steps=h), "localsgd"))
    return out


def _tuned(cfg: RunConfig, grid: tuple[int, int], out: Path, name: str
           ) -> tuple[RunConfig, float]:
    """The configuration at its best simulated step size, and that run's final f - f*."""
    res = sweep(dataclasses.replace(cfg, eval_every=4), power_grid(*grid), 2, out / "sweeps",
                name)
    if res.best is None:
        raise ToolError(f"{name}: every step size diverged in the simulated sweep")
    return dataclasses.replace(cfg, lr=res.best.lr, eval_every=4), res.best.final


def _train(cfg: RunConfig, out: Path, name: str, order: str, op_cost: float) -> Path:
    path = out / f"{name}-{order}.h5"
    sch, obj = cfg.schedule, cfg.objective
    args = ["--method", sch.method, "--stages", str(sch.stages), "--budget-slots",
            str(sch.budget_slots), "--trajectories", str(sch.trajectories), "--local-steps",
            str(sch.local_steps), "--objective", obj.name, "--dim", str(obj.dim),
            "--examples", str(obj.examples), "--batch-size", str(obj.batch_size),
            "--lr", repr(cfg.lr), "--eval-every", str(cfg.eval_every), "--order", order,
            "--op-cost", str(op_cost), "--wait", "polite", "--out", str(path),
            "--force"]                # the tool owns the ledgers in its --out folder
    if order == "dynamic":      # a dynamic run has no slot budget: the same microbatches
        args[args.index("--budget-slots"):args.index("--budget-slots") + 2] = \
            ["--microbatches", str(sch.microbatches if not sch.budget_slots else
                                   read_run(out / f"{name}-static.h5").attrs["microbatches"])]
    mpiexec = str(Path(sys.executable).parent / "mpiexec")
    res = subprocess.run(["timeout", "-k", "5", "600", mpiexec, "-n", str(sch.stages),
                          sys.executable, "-m", "rpd_mpi", "train", *args, "--json"],
                         capture_output=True, text=True)
    if res.returncode:
        raise ToolError(f"{name} ({order}) failed: {res.stderr.strip()[-400:]}")
    return path


def _row(label: str, order: str, cfg: RunConfig, path: Path, sim_final: float
         ) -> tuple[Any, ...]:
    s = summarize(read_run(path))
    return (label, order, lr_text(cfg.lr), fmt(sim_final), fmt(s["final_gap"]),
            fmt(s["wall_time"]), fmt(s["steady_mean_delay"]), fmt(s["unit_steady_mean_delay"]),
            s["steady_max_delay"], s["unit_steady_max_delay"], fmt(s["utilization"]),
            fmt(s["unit_utilization"]))


def run(S: int, N: int, op_cost: float, out: Path, dim: int = 512, examples: int = 600
        ) -> tuple[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[Any, ...]] = []
    curves: list[Curve] = []
    for label, cfg, kind in _runs(S, N, dim, examples):
        name = label.replace(" ", "_").replace("=", "")
        tuned, sim_final = _tuned(cfg, GRIDS[kind], out, name)
        for order in (("static", "dynamic") if kind == "pd" else ("static",)):
            path = _train(tuned, out, name, order, op_cost)
            rows.append(_row(label, order, tuned, path, sim_final))
            curves.append(curve(read_run(path), "wall", f"{label} ({order}, lr "
                                f"{lr_text(tuned.lr)})"))
    png = plot_curves(curves, "wall", out / "mpi_compare.png",
                      f"tridiag d={dim} on {S} MPI ranks, op cost {op_cost * 1e3:g} ms")
    table = markdown_table(("curve", "order", "lr", "f−f⋆ simulated", "f−f⋆ MPI", "wall s",
                            "mean delay", "unit mean", "max delay", "unit max",
                            "utilization", "unit util."), rows)
    write_text(out / "mpi_compare.md", table + "\n")
    return table, png


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="rpd-mpi tool mpi_compare", description=__doc__.splitlines()[0])
    p.add_argument("--stages", type=int_at_least(1), default=4)
    p.add_argument("--microbatches", type=int_at_least(1), default=150)
    p.add_argument("--op-cost", type=finite_at_least(0.0), default=0.002)
    p.add_argument("--dim", type=int_at_least(1), default=512)
    p.add_argument("--examples", type=int_at_least(1), default=600)
    p.add_argument("--out", type=Path, default=None, help="folder (default "
                   "results/mpi_compare; a given DIR is created if missing, its parent must "
                   "exist)")
    args = p.parse_args(argv)

    def body() -> int:
        _runs(args.stages, args.microbatches, args.dim, args.examples)   # ConfigError first
        RuntimeConfig(op_cost=args.op_cost)
        if args.out is not None:
            check_out_dir(args.out)
        args.out = args.out or Path("results/mpi_compare")
        table, png = run(args.stages, args.microbatches, args.op_cost, args.out, args.dim,
                         args.examples)
        print(table)
        print(f"plot: {png}")
        return 0
    return guarded(body)
