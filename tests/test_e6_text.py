"""E6 on a text file: `rpd-mpi experiment E6 --data FILE [--width W]` (rpd_mpi.experiments.e6).

The corpus is the shipped Shakespeare excerpt (tests/data/shakespeare/), no network. The quick
preset runs the real sweeps (PD and LocalSGD H in {1, 4, 8} at equal slots) on it and must
report a training and a validation loss per curve, from ledgers that trained on that file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from rpd_mpi.analysis.common import PNG_SIGNATURE
from rpd_mpi.build import build
from rpd_mpi.experiments import e6
from rpd_mpi.experiments import registry as experiments
from rpd_mpi.experiments.presets import make_cfg
from rpd_mpi.experiments.settings import Settings
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.objectives.charlm import CharLM

EXCERPT = Path(__file__).parent / "data" / "shakespeare" / "hamlet_gut.txt"
LABELS = ("PD", "LocalSGD H=1", "LocalSGD H=4", "LocalSGD H=8")


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE


def test_e6_quick_on_text_reports_training_and_validation_loss(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "rpd_mpi", "experiment", "E6", "--quick",
                          "--data", str(EXCERPT), "--width", "16", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    measured = json.loads((tmp_path / "E6.json").read_text())["measured"]
    assert measured["budget"] == 46 and measured["width"] == 16
    vocab = len(set(EXCERPT.read_text()))          # the loss starts near log(vocab)
    for label in LABELS:
        row = measured[label]
        assert row["final"] is not None and row["final"] < math.log(vocab)
        assert row["validation"] is not None and 0 < row["validation"] < math.log(vocab)
    md = (tmp_path / "E6.md").read_text()
    assert f"--data {EXCERPT}" in md and "--width 16" in md
    assert "validation loss at 46 slots" in md and "E6_validation.png" in md
    assert is_png(tmp_path / "E6.png") and is_png(tmp_path / "E6_validation.png")
    kept = read_run(tmp_path / "ledgers" / "pd.h5")            # trained on the excerpt
    assert kept.config["objective"]["data"] == str(EXCERPT.resolve())
    assert kept.config["objective"]["width"] == 16
    held = kept.objective.validation
    assert held is not None and held.size == kept.objective.value.size and held[-1] < held[0]
    last = read_run(tmp_path / "ledgers" / "localsgd_H8.h5").objective.validation
    assert last is not None and row["validation"] == pytest.approx(float(last[-1]))


@pytest.mark.parametrize("argv, flag", [
    (["E6", "--quick", "--data", "no/such/corpus.txt"], "--data: no such file"),
    (["E6", "--quick", "--width", "7"], "--width: must be a multiple of the preset's 2 heads"),
    (["E3", "--quick", "--data", str(EXCERPT)], "--data and --width are E6 options"),
    (["E6", "--width", "0"], "--width"),
])
def test_e6_text_options_bad_input_is_one_line_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str) -> None:
    try:
        code = experiments.main([*argv, "--out", str(tmp_path / "out")])
    except SystemExit as stop:          # argparse-level errors
        code = int(stop.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and flag in err
    assert err.startswith("rpd-mpi: error:") and err.count("\n") == 1
    assert not (tmp_path / "out" / "E6.json").exists()


def test_e6_paper_preset_on_text_is_14_blocks_on_16_stages(tmp_path: Path) -> None:
    """The paper's model (width 256, 8 heads, context 128, S = 16) with --layers 14, on text:
    one block per middle stage, about 11.1 M parameters (built, not trained: hours here)."""
    obj = e6.e6_objective(Settings(tmp_path), full=True, data=str(EXCERPT))
    assert (obj.width, obj.heads, obj.context, obj.layers) == (256, 8, 128, 14)
    cfg = dataclasses.replace(make_cfg("pd", obj, 16, microbatches=1), max_memory=0.0)
    model = build(cfg)
    assert isinstance(model, CharLM)
    per_stage = model.stage_parameters()
    block = 12 * 256 ** 2 + 13 * 256               # attention + MLP + 2 LayerNorms
    assert len(per_stage) == 16 and per_stage[1:15] == [block] * 14
    assert 11.0e6 < sum(per_stage) < 11.2e6
