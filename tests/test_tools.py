"""The analysis tools of tools/: each main() on tiny ledgers made here, asserting on values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rpd_mpi.config import ObjectiveConfig, RPDConfig, RunConfig, ScheduleConfig
from rpd_mpi.ledger.run_file import read_run, write_run
from rpd_mpi.records import AVG, BWD, FWD, Objective, RunRecord, empty_events
from rpd_mpi.build import simulate_run
from rpd_mpi.analysis import curves, delays_vs_s, sweep, theory, timeline
from rpd_mpi.experiments import registry as experiments
from rpd_mpi.analysis.common import PNG_SIGNATURE

QUAD = ObjectiveConfig(name="quadratic", dim=32, examples=100, batch_size=10)


def cfg_of(method: str, stages: int = 2, microbatches: int = 6, lr: float = 2.0 ** -4,
           **schedule: int) -> RunConfig:
    return RunConfig(schedule=ScheduleConfig(method=method, stages=stages,
                                             microbatches=microbatches, **schedule),
                     objective=QUAD, rpd=RPDConfig(delta=3 if method == "rpd" else None),
                     lr=lr, out="x.h5")     # --delta with another method is an error (issue 10)


def ledger(folder: Path, name: str, cfg: RunConfig) -> Path:
    path = folder / f"{name}.h5"
    write_run(path, simulate_run(cfg))
    return path


@pytest.fixture(scope="module")
def ledgers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ledgers")
    return {"pd": ledger(folder, "pd", cfg_of("pd")),
            "localsgd": ledger(folder, "lsgd", cfg_of("localsgd", trajectories=2,
                                                      local_steps=2, budget_slots=14)),
            "rpd": ledger(folder, "rpd", cfg_of("rpd", stages=4, microbatches=10))}


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


def one_error_line(capsys: pytest.CaptureFixture, *words: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rpd-mpi: error:"), err
    assert all(w in err[0] for w in words), err


# ----------------------------------------------------------------------------- delays_vs_s

def test_delays_vs_s_table_fits_and_png(tmp_path: Path, capsys) -> None:
    assert delays_vs_s.main(["--stages", "2-12:2,3,5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 31.65 | 14.0 | 60 | 60 | yes | 72 |" in out
    assert "| 5 |" in out and "**no**" not in out
    data = json.loads((tmp_path / "delays_vs_s.json").read_text())
    fit_max, fit_mean = data["fits"]["steady_max"], data["fits"]["steady_mean"]
    assert fit_max["stages"] == [2, 4, 6, 8, 10, 12]          # even S only
    assert fit_max["a"] == pytest.approx(1.0, abs=1e-9)
    assert fit_max["b"] == pytest.approx(-0.5, abs=1e-9)
    assert fit_max["c"] == pytest.approx(0.0, abs=1e-8)
    assert fit_mean["a"] == pytest.approx(0.5, abs=0.02)
    assert [r["steady_max"] for r in data["rows"]][:3] == [3, 7, 14]   # S = 2, 3, 4
    assert is_png(tmp_path / "delays_vs_s.png")


def test_quadratic_fit_is_exact_and_needs_three_stages() -> None:
    s = np.array([2, 5, 9, 14])
    fit = delays_vs_s.quadratic_fit(s, 3 * s * s - 2 * s + 7)
    assert (fit.a, fit.b, fit.c) == pytest.approx((3, -2, 7))
    with pytest.raises(delays_vs_s.ToolError, match="3 distinct"):
        delays_vs_s.quadratic_fit([2, 4], [1, 2])


# ----------------------------------------------------------------------------- curves

def test_curves_plot_and_final_gaps(ledgers, tmp_path: Path, capsys) -> None:
    png = tmp_path / "c.png"
    args = [str(ledgers["pd"]), str(ledgers["localsgd"]), "--x", "slots", "--out", str(png)]
    assert curves.main(args) == 0
    out = capsys.readouterr().out
    for key in ("pd", "localsgd"):
        rec = read_run(ledgers[key])
        assert f"{rec.objective.value[-1] - rec.attrs['f_star']:.3g}" in out
    assert is_png(png)


def test_curve_axes_follow_the_ledger_clock(ledgers, tmp_path: Path, capsys) -> None:
    rec = read_run(ledgers["pd"])
    c = curves.curve(rec, "updates")
    assert np.array_equal(c.x, rec.objective.k) and c.y[-1] == rec.objective.value[-1]
    assert curves.main([str(ledgers["pd"]), "--x", "wall", "--out", str(tmp_path / "w.png")]) == 2
    one_error_line(capsys, "no wall-clock time")
    rec.attrs["engine"] = "mpi"                       # the same data as if measured in seconds
    assert np.array_equal(curves.curve(rec, "wall").x, rec.objective.time)
    with pytest.raises(curves.ToolError, match="seconds"):
        curves.curve(rec, "slots")


# ----------------------------------------------------------------------------- timeline

def test_timeline_of_a_pd_ledger_bubbles(ledgers, tmp_path: Path, capsys) -> None:
    png = tmp_path / "g.png"
    assert timeline.main([str(ledgers["pd"]), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    slots = 2 * 6 + 2 * 2 - 2                          # 2N + 2S - 2
    bubble = 1 - 12 / slots                            # N forwards + N backwards per stage
    assert out.count(f"| {bubble:.3f} |") == 2
    assert f"mean bubble fraction: {bubble:.4f}" in out
    assert is_png(png)


def test_timeline_from_flags_and_errors(ledgers, tmp_path: Path, capsys) -> None:
    png = tmp_path / "l.png"
    argv = ["--method", "localsgd", "--stages", "2", "--trajectories", "2", "--local-steps",
            "2", "--microbatches", "8", "--window", "0:12", "--out", str(png)]
    assert timeline.main(argv) == 0 and is_png(png)
    assert "mean bubble fraction" in capsys.readouterr().out
    assert timeline.main([str(ledgers["rpd"]), "--out", str(tmp_path / "r.png")]) == 2
    one_error_line(capsys, "no events")


def test_bubble_table_of_measured_events(tmp_path: Path) -> None:
    ev = empty_events(5)
    rows = [(0, FWD, 0.0, 1.0), (0, BWD, 2.0, 3.0), (0, AVG, 3.0, 3.5), (1, FWD, 1.0, 2.0),
            (1, BWD, 1.5, 4.0)]
    for e, (rank, op, start, end) in zip(ev, rows):
        e["rank"], e["stage"], e["op"], e["start"], e["end"] = rank, rank, op, start, end
    table = {r["rank"]: r for r in timeline.bubble_table(ev)}       # span 0 .. 4 s
    assert table[0]["bubble"] == pytest.approx(0.5) and table[0]["average"] == pytest.approx(0.125)
    assert table[1]["bubble"] == pytest.approx(1 - 3.5 / 4)
    timeline.plot_gantt(ev, tmp_path / "m.png", unit="s")
    assert is_png(tmp_path / "m.png")


# ----------------------------------------------------------------------------- sweep

def _record(values: list[float], f_star: float = 0.0) -> RunRecord:
    rec = simulate_run(cfg_of("pd"))
    n = len(values)
    rec.objective = Objective(np.arange(n, dtype=float), np.arange(n), np.array(values))
    rec.attrs["f_star"] = f_star
    return rec


def test_score_rule_and_divergence() -> None:
    values = [10.0] + [5.0] * 18 + [2.0, 4.0]           # 21 points: last ceil(2.1) = 3
    assert sweep.score_record(_record(values)) == (10.0, 4.0, pytest.approx(11 / 3), False)
    assert sweep.score_record(_record([1.0, 0.5, math.nan, 0.1]))[3] is True
    assert sweep.score_record(_record([1.0, 0.5, 11.0]))[3] is True       # > 10x initial
    assert sweep.score_record(_record([1.0, 0.5, 9.0]))[3] is False
    pts = [sweep.SweepPoint(lr, 1.0, s, s, d, "", 0.0)
           for lr, s, d in ((0.5, 0.0, True), (0.25, 0.3, False), (0.125, 0.2, False))]
    assert sweep.pick(pts).lr == 0.125                     # the diverged 0.0 is excluded
    assert sweep.pick(pts[:1]) is None


def test_sweep_picks_the_clear_best_and_keeps_its_ledger(tmp_path: Path) -> None:
    base = cfg_of("pd", stages=4, microbatches=40)
    res = sweep.sweep(base, [2.0 ** -9, 2.0 ** -3, 1.0], jobs=2, out_dir=tmp_path, name="pd")
    by_lr = {p.lr: p for p in res.points}
    assert by_lr[1.0].diverged and not by_lr[2.0 ** -3].diverged
    assert res.best.lr == 2.0 ** -3 and by_lr[2.0 ** -9].score > 100 * res.best.score
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pd.h5"]
    assert read_run(tmp_path / "pd.h5").attrs["lr"] == 2.0 ** -3
    assert not res.at_edge


def test_sweep_main_writes_summary_and_slurm_array(tmp_path: Path, capsys) -> None:
    flags = ["--method", "pd", "--stages", "2", "--microbatches", "6", "--dim", "32",
             "--examples", "100", "--batch-size", "10"]
    grid = ["--lr-lo", "-5", "--lr-hi", "-3", "--out", str(tmp_path)]
    for i in range(2):                                  # grid points run one at a time
        assert sweep.main(flags + grid + ["--index", str(i)]) == 0
    assert len(list(tmp_path.glob("pd_lr-*.h5"))) == 2
    cfg = cfg_of("pd", lr=2.0 ** -3)                    # as jobs/sweep.sbatch task 2 writes it
    write_run(tmp_path / "lr_2.h5", simulate_run(cfg))
    assert sweep.main(flags + grid + ["--collect"]) == 0
    out = capsys.readouterr().out
    assert "LR_LO=-5 sbatch --array=0-2 jobs/sweep.sbatch --method pd" in out
    assert "lr = 2^(-5 + i)" in out and (tmp_path / "lr_2.h5").exists()
    summary = json.loads((tmp_path / "pd_sweep.json").read_text())
    scores = {p["lr"]: p["score"] for p in summary["points"]}
    assert summary["best_lr"] == min(scores, key=scores.get)
    assert (tmp_path / "pd.h5").exists() and "picked lr" in (tmp_path / "pd_sweep.md").read_text()
    write_run(tmp_path / "lr_2.h5", simulate_run(cfg_of("pd", lr=2.0 ** -2)))
    assert sweep.main(flags + grid + ["--collect"]) == 2          # a task with the wrong lr
    one_error_line(capsys, "lr_2.h5", "LR_LO")


# ----------------------------------------------------------------------------- theory

def test_running_average_weights_samples_by_updates() -> None:
    K, avg = theory.running_average(np.array([0, 2, 4, 4, 7]), np.array([4.0, 2.0, 9.0, 1.0, 0]))
    assert list(K) == [2, 4, 4, 7] and avg == pytest.approx([4.0, 3.0, 3.0, (12 + 3) / 7])


def test_theory_bound_holds_and_rerun_reproduces(ledgers, tmp_path: Path, capsys) -> None:
    png = tmp_path / "t.png"
    assert theory.main([str(ledgers["rpd"]), "--out", str(png), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["reproduced"] and res["holds"] and 0 < res["measured"] <= res["bound"]
    c = res["constants"]
    rec = read_run(ledgers["rpd"])
    assert (c["S"], c["delta"], c["G"]) == (4, 3, rec.updates.grad_norm.max())
    assert res["K"] == len(rec.updates) and is_png(png)


def test_theory_first_sample_is_the_gradient_at_w0(ledgers) -> None:
    rec = read_run(ledgers["rpd"])
    cfg = RunConfig.from_dict(rec.config)
    from rpd_mpi.build import build
    model = build(cfg)
    g0 = model.full_gradient(model.init_weights())
    k, sq, same = theory.rerun_gradients(rec, every=1)
    assert same and k[0] == 0 and sq[0] == pytest.approx(float(g0 @ g0))


# ----------------------------------------------------------------------------- experiments

def test_experiment_e1_quick_end_to_end(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", "experiment", "E1", "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "E1 wall time:" in res.stdout and "1.0000·S² -0.5000·S +0.0000" in res.stdout
    md = (tmp_path / "E1.md").read_text()
    assert "| 12 | 71.82 | 31.0 | 138 | 138 | yes | 168 |" in md and "![E1](E1.png)" in md
    assert json.loads((tmp_path / "E1.json").read_text())["measured"]["even_mismatches"] == []
    assert is_png(tmp_path / "E1.png")


def test_experiment_e6_quick_runs_the_char_lm(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", "experiment", "E6", "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    measured = json.loads((tmp_path / "E6.json").read_text())["measured"]
    assert measured["budget"] == 2 * 20 + 2 * 4 - 2
    for label in ("PD", "LocalSGD H=1", "LocalSGD H=4", "LocalSGD H=8"):
        assert measured[label]["final"] is not None and measured[label]["final"] < 4.0
    assert is_png(tmp_path / "E6.png")


def test_experiment_e3_quick_writes_ledgers_table_and_plot(tmp_path: Path, capsys) -> None:
    assert experiments.main(["E3", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "E3.json").read_text())["measured"]
    assert data["budget"] == 46 and set(data) >= {"PD", "LocalSGD H=2", "LocalSGD H=5"}
    finals = {k: v["final"] for k, v in data.items() if isinstance(v, dict)}
    assert data["lowest"] == min(finals, key=finals.get)
    kept = read_run(tmp_path / "ledgers" / "localsgd_H5.h5")
    assert kept.attrs["local_steps"] == 5 and kept.attrs["lr"] == data["LocalSGD H=5"]["lr"]
    assert int(kept.objective.time[-1]) == 46 and is_png(tmp_path / "E3.png")
    assert "E3 wall time:" in capsys.readouterr().out


def test_mpi_compare_runs_real_ranks(tmp_path: Path) -> None:
    from rpd_mpi.analysis import mpi_compare
    assert mpi_compare.main(["--stages", "2", "--microbatches", "4", "--dim", "8",
                             "--examples", "20", "--op-cost", "0.001",
                             "--out", str(tmp_path)]) == 0
    table = (tmp_path / "mpi_compare.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| PD") or r.startswith("| Local")]
    assert len(rows) == 5
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        if cells[1] == "static":            # static order: the simulator's math exactly
            assert cells[3] == cells[4]
    assert is_png(tmp_path / "mpi_compare.png")


# ----------------------------------------------------------------------------- figures

def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big")


def test_figures_are_200_dpi_png_or_any_format_by_extension(ledgers, tmp_path: Path,
                                                           capsys) -> None:
    png, pdf, svg = tmp_path / "c.png", tmp_path / "c.pdf", tmp_path / "t.svg"
    assert curves.main([str(ledgers["pd"]), "--out", str(png)]) == 0
    assert png_width(png) > 1000                     # 7 in at 200 dpi (was ~620 px at 100)
    assert curves.main([str(ledgers["pd"]), "--out", str(pdf)]) == 0
    assert pdf.read_bytes()[:4] == b"%PDF"
    assert timeline.main([str(ledgers["pd"]), "--out", str(tmp_path / "g.pdf")]) == 0
    assert (tmp_path / "g.pdf").read_bytes()[:4] == b"%PDF"
    assert timeline.main([str(ledgers["pd"]), "--out", str(svg)]) == 0
    assert b"<svg" in svg.read_bytes()[:1000]
    capsys.readouterr()
    assert curves.main([str(ledgers["pd"]), "--out", str(tmp_path / "c.nosuch")]) == 2
    one_error_line(capsys, "extension", ".pdf", ".png")
    for tool in (curves, timeline, theory):
        with pytest.raises(SystemExit):
            tool.main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "200 dpi PNG" in text and ".pdf" in text and ".svg" in text, tool.__name__


def test_labels_and_titles_name_the_run_not_the_path(ledgers) -> None:
    from rpd_mpi.analysis.common import describe, run_title
    rec = read_run(ledgers["pd"])
    static, dynamic = read_run(ledgers["pd"]), read_run(ledgers["pd"])
    for r, order in ((static, "static"), (dynamic, "dynamic")):
        r.attrs["engine"], r.attrs["order"] = "mpi", order
    assert describe(static) != describe(dynamic)
    assert "dynamic" in describe(dynamic) and "static" in describe(static)
    assert describe(rec) == "PD S=2 lr=2^-4"                   # simulator: no order
    lsgd, rpd = read_run(ledgers["localsgd"]), read_run(ledgers["rpd"])
    assert "H=2" in describe(lsgd) and "δ=3" in describe(rpd) and "lr=2^-4" in describe(rpd)
    for r in (rec, lsgd, rpd):
        title = run_title(r)
        assert "/" not in title and ".h5" not in title and "S=" in title and "lr=" in title
    assert "δ=3" in run_title(rpd) and "H=2" in run_title(lsgd)


def test_curves_merge_seeds_into_a_mean_and_band(tmp_path: Path) -> None:
    import dataclasses
    paths = [ledger(tmp_path, f"s{s}", dataclasses.replace(cfg_of("pd"), seed=s))
             for s in range(3)]
    paths.append(ledger(tmp_path, "other", cfg_of("pd", lr=2.0 ** -5)))
    records = [read_run(p) for p in paths]
    cs = [curves.curve(r, "slots") for r in records]
    drawn = curves.group_seeds(records, cs)
    assert len(drawn) == 2 and drawn[0].seeds == (0, 1, 2) and drawn[1].low is None
    ys = np.stack([c.y for c in cs[:3]])
    merged = drawn[0]
    assert merged.y == pytest.approx(ys.mean(axis=0))
    assert np.array_equal(merged.low, ys.min(axis=0)) and np.array_equal(merged.high,
                                                                          ys.max(axis=0))
    assert "mean of 3 seeds" in merged.label
    std = curves.merge_seeds(cs[:3], "std")
    assert std.high == pytest.approx(ys.mean(axis=0) + ys.std(axis=0))
    assert curves.main([*map(str, paths), "--out", str(tmp_path / "b.png")]) == 0
    assert is_png(tmp_path / "b.png")
    # the same run twice is not a seed band
    assert len(curves.group_seeds(records[:1] * 2, cs[:1] * 2)) == 2


def test_char_lm_loss_is_linear_and_labelled() -> None:
    lm = curves.Curve("PD", np.arange(3.0), np.array([3.5, 3.0, 2.9]), False, "charlm")
    quad = dataclasses_replace_objective(lm, "quadratic")
    assert curves.y_scale([lm]) == "linear" and curves.y_scale([quad]) == "log"
    assert curves.y_scale([lm], "log") == "log"
    assert curves.LOSS_LABEL == "training loss (nats/char)"


def dataclasses_replace_objective(c: "curves.Curve", objective: str) -> "curves.Curve":
    import dataclasses
    return dataclasses.replace(c, objective=objective)


def test_timeline_default_window_and_visible_averages(tmp_path: Path) -> None:
    from rpd_mpi.schedule.generate import generate
    short = timeline.schedule_events(generate("pd", 2, 6))
    assert timeline.default_window(short) is None                 # 12 ops per rank: all
    long = timeline.schedule_events(generate("pd", 4, 200))
    lo, hi = timeline.default_window(long)
    assert lo == 0 and 40 <= hi < long["end"].max() / 4
    busy = long[(long["op"] == FWD) | (long["op"] == BWD)]
    for r in np.unique(busy["rank"]):                              # every rank shows 40 ops
        assert np.sum((busy["rank"] == r) & (busy["end"] <= hi)) >= 40
    tl = generate("localsgd", 2, 40, trajectories=2, local_steps=8)
    ev, avgs = timeline.schedule_events(tl), [t + 1.0 for t in tl.averages]
    lo, hi = timeline.default_window(ev, avgs)
    assert hi > avgs[0]                                            # the first average shows
    ev = empty_events(6)
    rows = [(0, FWD, 0.0, 1.0), (1, FWD, 1.0, 2.0), (0, AVG, 2.0, 2.01), (1, AVG, 2.0, 2.02),
            (0, AVG, 5.0, 5.01), (1, AVG, 5.1, 5.11)]
    for e, (rank, op, start, end) in zip(ev, rows):
        e["rank"], e["stage"], e["op"], e["start"], e["end"] = rank, rank, op, start, end
    assert timeline.average_times(ev) == [2.0, 5.0]
    assert timeline.parse_window("all") is None


def test_delays_plot_keeps_a_zero_p10_and_other_formats(tmp_path: Path, capsys) -> None:
    assert delays_vs_s.main(["--stages", "2,4,6", "--out", str(tmp_path), "--format",
                             "pdf"]) == 0
    assert (tmp_path / "delays_vs_s.pdf").read_bytes()[:4] == b"%PDF"
    assert "| 2 | 1.50 | 0.0 |" in capsys.readouterr().out        # the p10 of 0 at S = 2
    assert delays_vs_s.main(["--stages", "2,4,6", "--out", str(tmp_path), "--format",
                             "nosuch"]) == 2
    one_error_line(capsys, "--format")


def test_experiment_e5_quick_with_seeds_has_bands(tmp_path: Path, capsys) -> None:
    assert experiments.main(["E5", "--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "E5.json").read_text())
    assert data["seeds"] == 2
    points = [p for key, p in data["measured"].items() if key.isdigit()]     # per S
    assert len(points) == 3 and data["measured"]["budget_protocol"] == "untruncated"
    for point in points:
        for method in ("PD", "RPD", "LocalSGD"):
            m = point[method]
            assert m["seeds"] == [0, 1] and len(m["seed_finals"]) == 2
            assert m["seed_finals"][0] == pytest.approx(m["final"])
    md = (tmp_path / "E5.md").read_text()
    assert "mean ± std over 2 seeds" in md and "--seeds 2" in md
    assert is_png(tmp_path / "E5.png")
