"""Text data for the character language model: corpus, vocabulary and window batches.

Owns the small deterministic pseudo-English corpus the project generates (a seeded template
grammar: short sentences over a fixed word list, easy for a small model to learn), the
vocabulary (sorted unique characters of the text, or one supplied, e.g. from a ledger), and
`TextData`, which cuts batches of random windows out of the encoded corpus.

Train/validation split: the last `val_fraction` of the text (10 % by default, `--val-fraction`)
is held out. Training batches and the training objective's windows come only from the first
part; the validation set is `val_windows` evenly spaced windows of the held-out part (no
window crosses the boundary). Batch i holds `batch_size` windows of `context + 1` characters
whose start offsets are drawn from `np.random.default_rng([seed, 7, i])`: every process
(simulator, each MPI rank) sees the same windows for the same batch id, so batches are
generated, not stored. The evaluation set is a fixed list of evenly spaced windows. Pure
numpy; no file I/O (the caller reads the file).
"""

from __future__ import annotations

import numpy as np

_DET = ["the", "a", "every", "no", "one", "that", "this", "some"]
_ADJ = ["old", "small", "quiet", "green", "bright", "cold", "happy", "brave", "tired", "red"]
_NOUN = ["cat", "dog", "king", "queen", "bird", "river", "house", "child", "horse", "ship",
         "garden", "stone", "farmer", "sailor", "moon"]
_VERB = ["sees", "finds", "loves", "follows", "keeps", "helps", "watches", "calls", "hides",
         "wants"]
_IVERB = ["sleeps", "sings", "waits", "runs", "falls", "laughs", "rests", "dreams"]
_PREP = ["near", "under", "behind", "beside", "over", "with"]
_NAME = ["anna", "ben", "clara", "david", "ella", "frank"]
_SAY = ["said", "asked", "cried", "whispered"]


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    return words[int(rng.integers(len(words)))]


def _noun_phrase(rng: np.random.Generator) -> str:
    det, noun = _pick(rng, _DET), _pick(rng, _NOUN)
    return f"{det} {_pick(rng, _ADJ)} {noun}" if rng.random() < 0.5 else f"{det} {noun}"


def _clause(rng: np.random.Generator) -> str:
    """One of a few templates: transitive, intransitive with a place, or a name + verb."""
    kind = int(rng.integers(3))
    if kind == 0:
        return f"{_noun_phrase(rng)} {_pick(rng, _VERB)} {_noun_phrase(rng)}"
    if kind == 1:
        return (f"{_noun_phrase(rng)} {_pick(rng, _IVERB)} {_pick(rng, _PREP)} "
                f"{_noun_phrase(rng)}")
    return f"{_pick(rng, _NAME)} {_pick(rng, _VERB)} {_noun_phrase(rng)}"


def _sentence(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.2:
        body = f"{_clause(rng)}, and {_clause(rng)}"
    elif r < 0.3:
        return f'"{_clause(rng).capitalize()}?" {_pick(rng, _SAY)} {_pick(rng, _NAME)}.'
    else:
        body = _clause(rng)
    return body.capitalize() + "."


def generate_corpus(chars: int = 16384, seed: int = 0) -> str:
    """At least `chars` characters of pseudo-English (lines of sentences), deterministic."""
    if chars < 1:
        raise ValueError(f"chars must be >= 1, got {chars}")
    rng = np.random.default_rng([seed, 0xC0])
    lines, total = [], 0
    while total < chars:
        line = " ".join(_sentence(rng) for _ in range(1 + int(rng.integers(3))))
        lines.append(line)
        total += len(line) + 1
    return "\n".join(lines) + "\n"


def build_vocab(text: str) -> list[str]:
    """The sorted unique characters of `text`."""
    return sorted(set(text))


def encode(text: str, vocab: list[str]) -> np.ndarray:
    """Token ids (int64) of `text`; ValueError naming a character missing from `vocab`."""
    index = {ch: i for i, ch in enumerate(vocab)}
    if len(index) != len(vocab):
        raise ValueError("vocab has duplicate characters")
    missing = set(text) - index.keys()
    if missing:
        raise ValueError(f"text has characters outside the vocabulary: "
                         f"{sorted(missing)[:10]!r}")
    return np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))


#: The held-out fraction of the text by default (`--val-fraction`) and the validation windows.
DEFAULT_VAL_FRACTION = 0.1
VAL_WINDOWS = 32


def split_point(n: int, val_fraction: float) -> int:
    """Characters of an n-character text that train: the last round(n * val_fraction) are
    held out. ValueError for a fraction outside [0, 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    return n - int(round(n * val_fraction))


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class TextData:
    """Random windows of an encoded corpus: batch i -> (inputs, targets), each (b, context).
    `ids` are the training characters, `val_ids` the held-out ones (None: no validation)."""

    def __init__(self, ids: np.ndarray, vocab: list[str], *, context: int, batch_size: int,
                 seed: int, eval_windows: int = 8, val_ids: np.ndarray | None = None,
                 val_windows: int = VAL_WINDOWS) -> None:
        if ids.size < context + 2:
            raise ValueError(f"the training text has {ids.size} characters; context {context} "
                             f"needs at least {context + 2}")
        self.ids = _readonly(np.ascontiguousarray(ids, dtype=np.int64))
        self.vocab = list(vocab)
        self.context, self.batch_size, self.seed = context, batch_size, seed
        self.windows = ids.size - context          # number of distinct window starts
        self._offsets = np.arange(context + 1)
        starts = np.linspace(0, self.windows - 1, eval_windows).round().astype(np.int64)
        self.eval_set = self._cut(self.ids, starts)
        self.val_set: tuple[np.ndarray, np.ndarray] | None = None
        self.val_chars = 0 if val_ids is None else int(val_ids.size)
        if val_ids is not None and val_ids.size:
            self.val_set = self._validation(np.ascontiguousarray(val_ids, np.int64),
                                            val_windows)

    def _validation(self, val: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """`count` evenly spaced windows of the held-out ids (overlapping only when the
        held-out part is shorter than count windows)."""
        if val.size < self.context + 1:
            raise ValueError(f"the validation split has {val.size} characters; context "
                             f"{self.context} needs at least {self.context + 1}")
        last = val.size - self.context - 1
        starts = np.linspace(0, last, min(count, last + 1)).round().astype(np.int64)
        return self._cut(_readonly(val), starts)

    def _cut(self, ids: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        win = ids[starts[:, None] + self._offsets]
        return _readonly(win[:, :-1]), _readonly(win[:, 1:])

    def starts(self, batch: int) -> np.ndarray:
        """Start offsets of the windows of batch `batch`."""
        rng = np.random.default_rng([self.seed, 7, int(batch)])
        return rng.integers(0, self.windows, size=self.batch_size)

    def batch(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of batch `batch`: ids of shape (batch_size, context), read-only;
        targets are the inputs shifted by one character."""
        return self._cut(self.ids, self.starts(batch))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def text_data(text: str | None, vocab: list[str] | None, *, context: int, batch_size: int,
              seed: int, eval_windows: int = 8,
              val_fraction: float = DEFAULT_VAL_FRACTION) -> TextData:
    """TextData of `text` (None: the generated corpus) over `vocab` (None: from the whole
    text, both splits), its last `val_fraction` held out for validation (0: none)."""
    text = generate_corpus() if text is None else text
    vocab = build_vocab(text) if vocab is None else list(vocab)
    ids = encode(text, vocab)
    cut = split_point(ids.size, val_fraction)
    return TextData(ids[:cut], vocab, context=context, batch_size=batch_size, seed=seed,
                    eval_windows=eval_windows, val_ids=ids[cut:] if cut < ids.size else None)
