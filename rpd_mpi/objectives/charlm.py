"""The character language model (docs/DESIGN.md 3) split into pipeline stages.

Owns `build_charlm`, `CharLM` (parameter layout, seeded init, evaluation objective) and the
three stage modules: stage 0 = token + position embedding, stages 1..S-2 = one pre-LN
transformer block each, stage S-1 = final LayerNorm + LM head without bias (its forward
output is the logits; `loss` gives the mean next-character cross-entropy and its gradient).

Stage s owns the contiguous slice `slices[s]` of one flat float64 vector; inside it the named
tensors of `stage_layout` are unpacked as views (no copies). Weight stashing contract: the
engine copies w_s; a stage's cache is a copy of its input activation (a_in may be a
communication buffer that is reused after forward returns), and backward recomputes the
forward internals from that copy and the stashed w_s. The math lives in `layers`; data in
`corpus`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from rpd_mpi.objectives import layers
from rpd_mpi.objectives.corpus import TextData, text_data
from rpd_mpi.objectives.kernels_lm import array_module
from rpd_mpi.objectives.protocol import Array

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

#: Generated batches: ids are drawn, so the count is only a modulus (see sim/runtime).
NUM_BATCHES = 2**31 - 1
#: The paper's run (docs/DESIGN.md 7, E6): width 256 with S = 16 stages -> 11,123,200 parameters
#: on Tiny Shakespeare's 65 characters.
PRESETS: dict[str, dict[str, int]] = {
    "small": {"width": 32, "heads": 2, "context": 32},
    "paper": {"width": 256, "heads": 8, "context": 128},
}


def stage_layout(kind: str, width: int, context: int, vocab: int
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the tensors of a stage of kind 'embed', 'block' or 'head'."""
    c = width
    if kind == "embed":
        return [("wte", (vocab, c)), ("wpe", (context, c))]
    if kind == "head":
        return [("lnf_g", (c,)), ("lnf_b", (c,)), ("head_w", (c, vocab))]
    shapes = [(c,), (c,), (c, 3 * c), (3 * c,), (c, c), (c,), (c,), (c,), (c, 4 * c),
              (4 * c,), (4 * c, c), (c,)]
    return list(zip(layers.BLOCK_NAMES, shapes))


@dataclass(frozen=True)
class Layout:
    """Named tensors packed one after the other in a flat block."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.entries)

    def unpack(self, flat: Array) -> dict[str, Array]:
        """name -> view of `flat` (1-D, contiguous) with the tensor's shape."""
        out: dict[str, Array] = {}
        at = 0
        for name, shape in self.entries:
            n = math.prod(shape)
            out[name] = flat[at:at + n].reshape(shape)
            at += n
        return out

    def pack(self, tensors: dict[str, Array], xp: ModuleType, dtype: DTypeLike) -> Array:
        """A new flat vector holding `tensors` (every name of the layout)."""
        flat = xp.empty(self.size, dtype=dtype)
        for name, view in self.unpack(flat).items():
            view[...] = tensors[name]
        return flat


def stage_kind(s: int, stages: int) -> str:
    return "embed" if s == 0 else "head" if s == stages - 1 else "block"


def parameter_count(stages: int, width: int, context: int, vocab: int) -> int:
    """Total number of parameters of a charlm with these sizes."""
    return sum(Layout(tuple(stage_layout(stage_kind(s, stages), width, context, vocab))).size
               for s in range(stages))


class CharStage:
    """Stage s of one pipeline group (base: bookkeeping shared by the three kinds)."""

    def __init__(self, model: CharLM, s: int, group: int) -> None:
        self.stage, self.group = s, group
        self.slice = model.slices[s]
        self.size = self.slice.stop - self.slice.start
        self.is_last = s == model.stages - 1
        self.layout, self.data, self.heads = model.layouts[s], model.data, model.heads

    def loss(self, a_out: Array, batch: int) -> tuple[float, Array]:
        raise RuntimeError(f"stage {self.stage} is not the last stage; it has no loss")


class EmbeddingStage(CharStage):
    """Stage 0: reads the token ids of its batch itself (a_in is None)."""

    def _ids(self, batch: int, xp: ModuleType) -> Array:
        return xp.asarray(self.data.batch(batch)[0])

    def forward(self, w_s: Array, a_in: None, batch: int) -> tuple[Array, None]:
        p, ids = self.layout.unpack(w_s), self._ids(batch, array_module(w_s))
        return layers.embedding_forward(p["wte"], p["wpe"], ids), None

    def backward(self, w_s: Array, cache: None, g_out: Array, batch: int
                 ) -> tuple[Array, None]:
        xp = array_module(w_s)
        g_wte, g_wpe = layers.embedding_backward(self._ids(batch, xp), g_out,
                                                 self.data.vocab_size, self.data.context)
        return self.layout.pack({"wte": g_wte, "wpe": g_wpe}, xp, w_s.dtype), None


class BlockStage(CharStage):
    """Stages 1..S-2: one pre-LN transformer block; cache = a copy of the input."""

    def forward(self, w_s: Array, a_in: Array, batch: int) -> tuple[Array, Array]:
        out, _ = layers.block_forward(a_in, self.layout.unpack(w_s), self.heads)
        return out, a_in.copy()

    def backward(self, w_s: Array, cache: Array, g_out: Array, batch: int
                 ) -> tuple[Array, Array]:
        g_x, grads = layers.block_backward(cache, self.layout.unpack(w_s), self.heads, g_out)
        return self.layout.pack(grads, array_module(w_s), w_s.dtype), g_x


class HeadStage(CharStage):
    """Stage S-1: final LayerNorm + LM head; forward returns the logits."""

    def forward(self, w_s: Array, a_in: Array, batch: int) -> tuple[Array, Array]:
        logits, _ = layers.head_forward(a_in, self.layout.unpack(w_s))
        return logits, a_in.copy()

    def loss(self, a_out: Array, batch: int) -> tuple[float, Array]:
        """(mean cross-entropy of the batch's next characters, its gradient wrt logits)."""
        targets = array_module(a_out).asarray(self.data.batch(batch)[1])
        return layers.cross_entropy(a_out, targets)

    def backward(self, w_s: Array, cache: Array, g_out: Array, batch: int
                 ) -> tuple[Array, Array]:
        g_x, grads = layers.head_backward(cache, self.layout.unpack(w_s), g_out)
        return self.layout.pack(grads, array_module(w_s), w_s.dtype), g_x


#: The stage module classes of a charlm (each satisfies `rpd_mpi.objectives.protocol.Stage`).
CharStageModule: TypeAlias = "EmbeddingStage | BlockStage | HeadStage"
_STAGE_CLASS: dict[str, type[CharStageModule]] = {"embed": EmbeddingStage, "block": BlockStage,
                                                  "head": HeadStage}


class CharLM:
    """A character-level transformer over `data`, partitioned into `stages` stages."""

    def __init__(self, data: TextData, *, stages: int, width: int, heads: int, seed: int
                 ) -> None:
        self.name, self.data, self.vocab = "charlm", data, data.vocab
        self.stages, self.width, self.heads, self.seed = stages, width, heads, seed
        self.context, self.batch_size = data.context, data.batch_size
        self.examples, self.num_batches = data.windows, NUM_BATCHES
        self.f_star = self.L = None
        self.layouts = [Layout(tuple(stage_layout(stage_kind(s, stages), width, data.context,
                                                  data.vocab_size))) for s in range(stages)]
        bounds = np.cumsum([0] + [lay.size for lay in self.layouts]).tolist()
        self.slices = [slice(bounds[s], bounds[s + 1]) for s in range(stages)]
        self.dim = self.parameter_count = bounds[-1]

    def init_weights(self) -> np.ndarray:
        """GPT-2 style: N(0, 0.02) matrices and embeddings, residual projections scaled by
        1/sqrt(2 blocks), zero biases, unit LayerNorm gains; stage s from its own generator."""
        w = np.empty(self.dim)
        resid = 0.02 / math.sqrt(2 * max(self.stages - 2, 1))
        for s, lay in enumerate(self.layouts):
            rng = np.random.default_rng([self.seed, 11, s])
            for name, view in lay.unpack(w[self.slices[s]]).items():
                if name.endswith("_b"):
                    view[...] = 0.0
                elif name.endswith("_g"):
                    view[...] = 1.0
                else:
                    std = resid if name in ("proj_w", "out_w") else 0.02
                    view[...] = std * rng.standard_normal(view.shape)
        return w

    def make_stage(self, s: int, group: int = 0) -> CharStageModule:
        """The stage module of pipeline group `group`, stage `s`."""
        if not 0 <= s < self.stages:
            raise ValueError(f"stage must be in [0, {self.stages}), got {s}")
        return _STAGE_CLASS[stage_kind(s, self.stages)](self, s, group)

    def activation_shape(self, s: int) -> tuple[int, ...]:
        """(batch, context, width) for every s: what stage s sends on, and the gradient it
        sends back (the last stage sends only that gradient)."""
        return (self.batch_size, self.context, self.width)

    def _params(self, w: Array, s: int) -> dict[str, Array]:
        return self.layouts[s].unpack(w[self.slices[s]])

    def _logits(self, w: Array, ids: Array) -> tuple[Array, list[Array]]:
        """Logits of token ids (b, t) at the full vector w, and every stage's input."""
        p = self._params(w, 0)
        x = layers.embedding_forward(p["wte"], p["wpe"], ids)
        inputs: list[Array] = []
        for s in range(1, self.stages - 1):
            inputs.append(x)
            x, _ = layers.block_forward(x, self._params(w, s), self.heads)
        inputs.append(x)
        return layers.head_forward(x, self._params(w, self.stages - 1))[0], inputs

    def full_objective(self, w: Array) -> float:
        """Mean cross-entropy over the fixed evaluation windows (`data.eval_set`)."""
        xp = array_module(w)
        ids, targets = (xp.asarray(a) for a in self.data.eval_set)
        return layers.cross_entropy(self._logits(w, ids)[0], targets)[0]

    def full_gradient(self, w: Array) -> Array:
        """Gradient of `full_objective` at w (same layout as w)."""
        xp = array_module(w)
        ids, targets = (xp.asarray(a) for a in self.data.eval_set)
        logits, inputs = self._logits(w, ids)
        g = layers.cross_entropy(logits, targets)[1]
        out = xp.empty_like(w)
        g, grads = layers.head_backward(inputs[-1], self._params(w, self.stages - 1), g)
        out[self.slices[-1]] = self.layouts[-1].pack(grads, xp, w.dtype)
        for s in range(self.stages - 2, 0, -1):
            p = self._params(w, s)
            g, grads = layers.block_backward(inputs[s - 1], p, self.heads, g)
            out[self.slices[s]] = self.layouts[s].pack(grads, xp, w.dtype)
        g_wte, g_wpe = layers.embedding_backward(ids, g, self.data.vocab_size, self.context)
        out[self.slices[0]] = self.layouts[0].pack({"wte": g_wte, "wpe": g_wpe}, xp, w.dtype)
        return out


def _validate(stages: int, width: int, heads: int, context: int, batch_size: int) -> None:
    if stages < 3:
        raise ValueError(f"charlm needs at least 3 stages (embedding, >= 1 transformer "
                         f"block, head), got {stages}")
    for key, value in {"width": width, "heads": heads, "context": context,
                       "batch_size": batch_size}.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if width % heads:
        raise ValueError(f"heads ({heads}) must divide width ({width})")


def build_charlm(stages: int, *, width: int = 32, heads: int = 2, context: int = 32,
                 batch_size: int = 8, seed: int = 0, text: str | None = None,
                 vocab: list[str] | None = None) -> CharLM:
    """The character LM on `text` (None: the generated corpus); vocabulary `vocab` (None:
    the sorted characters of the text). ValueError on bad sizes, S < 3, a text shorter than
    context + 2 characters, or a character missing from `vocab`."""
    _validate(stages, width, heads, context, batch_size)
    data = text_data(text, vocab, context=context, batch_size=batch_size, seed=seed)
    return CharLM(data, stages=stages, width=width, heads=heads, seed=seed)


def stage_gradient(model: CharLM, w: Array, batch: int) -> tuple[float, Array]:
    """Loss of `batch` and the full gradient, through the stage modules exactly as the
    engines call them (forward on every stage, loss, backward from the last stage down),
    stitched into one vector like w. For gradient checks (numpy or cupy)."""
    xp = array_module(w)
    mods = [model.make_stage(s) for s in range(model.stages)]
    a: Array | None = None
    caches: list[Any] = []
    for mod in mods:
        a, cache = mod.forward(w[model.slices[mod.stage]].copy(), a, batch)
        caches.append(cache)
    loss, g = mods[-1].loss(a, batch)
    grad = xp.empty_like(w)
    for mod in reversed(mods):
        sl = model.slices[mod.stage]
        grad[sl], g = mod.backward(w[sl].copy(), caches[mod.stage], g, batch)
    if g is not None:
        raise ValueError("stage 0 returned an input gradient; it has no input")
    return float(loss), grad
