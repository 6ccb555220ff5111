"""The character language model (docs/DESIGN.md 3.3) partitioned into pipeline stages.

Owns `build_charlm`, `CharLM` (parameter layout, seeded init, evaluation objective) and its
stage module `PartStage`. The model is a sequence of **units**: the token + position
embedding, `layers` pre-LN transformer blocks, and the final LayerNorm + LM head without
bias (its output is the logits; `loss` gives the mean next-character cross-entropy and its
gradient). A partition (`rpd_mpi.objectives.partition`) gives each stage a contiguous run of
units: by default one unit per stage with `layers` = S - 2, any S in 1..layers + 2 otherwise,
and `"auto"` balances the profiled unit costs (`unit_costs`, `auto_partition`).

Stage s owns the contiguous slice `slices[s]` of one flat vector, its units' tensors one unit
after the other (`unit_layouts`), unpacked as views. Weight stashing contract: the engine
copies w_s; the cache of a stage is its input (copied: a_in may be a communication buffer
reused after forward returns) and each later unit's input, and backward recomputes each
unit's internals from those and the stashed w_s. The math lives in `layers`; data in
`corpus`. `dtype` (float64 or float32) is the precision of the stage math: weights,
activations and gradients are cast to it on entry (a no-op when they already have it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence, TypeAlias

import numpy as np

from rpd_mpi.objectives import layers
from rpd_mpi.objectives.corpus import DEFAULT_VAL_FRACTION, TextData, text_data
from rpd_mpi.objectives.kernels_lm import HAVE_NUMBA, array_module
from rpd_mpi.objectives.partition import (Partition, best_partition, bounds, cached_profile,
                                          check_partition, even_partition, median_time,
                                          profile_key)
from rpd_mpi.objectives.protocol import Array

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

#: Generated batches: ids are drawn, so the count is only a modulus (see sim/runtime).
NUM_BATCHES = 2**31 - 1
#: The paper's run (docs/DESIGN.md 7, E6): width 256 with 14 blocks (S = 16 stages) ->
#: 11,123,200 parameters on Tiny Shakespeare's 65 characters.
PRESETS: dict[str, dict[str, int]] = {
    "small": {"width": 32, "heads": 2, "context": 32},
    "paper": {"width": 256, "heads": 8, "context": 128},
}
DTYPES = ("float64", "float32")


def stage_layout(kind: str, width: int, context: int, vocab: int
                 ) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the tensors of a unit of kind 'embed', 'block' or 'head'."""
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


def unit_kinds(n_layers: int) -> list[str]:
    """['embed', 'block' x n_layers, 'head']: the units in pipeline order."""
    return ["embed", *["block"] * n_layers, "head"]


def parameter_count(stages: int, width: int, context: int, vocab: int,
                    n_layers: int | None = None) -> int:
    """Total number of parameters of a charlm with these sizes (n_layers None: S - 2)."""
    kinds = unit_kinds(stages - 2 if n_layers is None else n_layers)
    return sum(Layout(tuple(stage_layout(k, width, context, vocab))).size for k in kinds)


class CharStage:
    """Stage s of one pipeline group (base: bookkeeping; `PartStage` computes)."""

    def __init__(self, model: CharLM, s: int, group: int) -> None:
        self.stage, self.group = s, group
        self.slice = model.slices[s]
        self.size = self.slice.stop - self.slice.start
        self.is_last = s == model.stages - 1
        self.data, self.heads, self.dtype = model.data, model.heads, model.dtype
        first, last = model.unit_bounds[s], model.unit_bounds[s + 1]
        self.kinds = model.kinds[first:last]
        self.layouts = model.unit_layouts[first:last]
        at = bounds([lay.size for lay in self.layouts])
        self.offsets = [slice(a, b) for a, b in zip(at, at[1:])]    # units within w_s

    def loss(self, a_out: Array, batch: int) -> tuple[float, Array]:
        raise RuntimeError(f"stage {self.stage} is not the last stage; it has no loss")

    def _params(self, w: Array) -> list[dict[str, Array]]:
        return [lay.unpack(w[sl]) for lay, sl in zip(self.layouts, self.offsets)]

    def _ids(self, batch: int, xp: ModuleType) -> Array | None:
        return xp.asarray(self.data.batch(batch)[0]) if self.stage == 0 else None


class PartStage(CharStage):
    """The units of one stage; cache = the input of every unit (the first one copied)."""

    def forward(self, w_s: Array, a_in: Array | None, batch: int
                ) -> tuple[Array, list[Array | None]]:
        w = w_s.astype(self.dtype, copy=False)
        x = None if a_in is None else a_in.astype(self.dtype, copy=True)
        return layers.units_forward(self.kinds, self._params(w), x,
                                    self._ids(batch, array_module(w)), self.heads)

    def loss(self, a_out: Array, batch: int) -> tuple[float, Array]:
        """(mean cross-entropy of the batch's next characters, its gradient wrt logits)."""
        if not self.is_last:
            return super().loss(a_out, batch)
        targets = array_module(a_out).asarray(self.data.batch(batch)[1])
        return layers.cross_entropy(a_out, targets)

    def backward(self, w_s: Array, cache: list[Array | None], g_out: Array, batch: int
                 ) -> tuple[Array, Array | None]:
        w = w_s.astype(self.dtype, copy=False)
        xp = array_module(w)
        grad = xp.empty(self.size, dtype=self.dtype)
        g_in = layers.units_backward(self.kinds, self._params(w), self._params(grad), cache,
                                     g_out.astype(self.dtype, copy=False),
                                     self._ids(batch, xp), self.heads, self.data.vocab_size,
                                     self.data.context)
        return grad, g_in


#: The stage module class of a charlm (satisfies `rpd_mpi.objectives.protocol.Stage`).
CharStageModule: TypeAlias = PartStage


class CharLM:
    """A character-level transformer of `layers` blocks over `data`, its units partitioned
    over len(partition) stages."""

    def __init__(self, data: TextData, *, layers: int, partition: Sequence[int], width: int,
                 heads: int, seed: int, dtype: str = "float64",
                 unit_costs: Sequence[float] | None = None) -> None:
        self.name, self.data, self.vocab = "charlm", data, data.vocab
        self.layers, self.partition = layers, tuple(int(c) for c in partition)
        self.stages, self.width, self.heads, self.seed = len(self.partition), width, heads, seed
        self.dtype = np.dtype(dtype)
        self.unit_costs = None if unit_costs is None else [float(c) for c in unit_costs]
        self.context, self.batch_size = data.context, data.batch_size
        self.examples, self.num_batches = data.windows, NUM_BATCHES
        self.f_star = self.L = None
        self.kinds = unit_kinds(layers)
        check_partition(self.partition, len(self.kinds), self.stages)
        self.unit_layouts = [Layout(tuple(stage_layout(k, width, data.context,
                                                       data.vocab_size))) for k in self.kinds]
        self.unit_bounds = bounds(self.partition)
        at = bounds([lay.size for lay in self.unit_layouts])
        self.unit_slices = [slice(a, b) for a, b in zip(at, at[1:])]
        self.slices = [slice(at[self.unit_bounds[s]], at[self.unit_bounds[s + 1]])
                       for s in range(self.stages)]
        self.dim = self.parameter_count = at[-1]

    def stage_parameters(self) -> list[int]:
        """Parameters of each stage."""
        return [sl.stop - sl.start for sl in self.slices]

    def init_weights(self) -> np.ndarray:
        """GPT-2 style: N(0, 0.02) matrices and embeddings, residual projections scaled by
        1/sqrt(2 layers), zero biases, unit LayerNorm gains; unit u from its own generator
        (so the weights do not depend on the partition); drawn in float64, then cast."""
        w = np.empty(self.dim)
        resid = 0.02 / math.sqrt(2 * max(self.layers, 1))
        for u, lay in enumerate(self.unit_layouts):
            rng = np.random.default_rng([self.seed, 11, u])
            for name, view in lay.unpack(w[self.unit_slices[u]]).items():
                if name.endswith("_b"):
                    view[...] = 0.0
                elif name.endswith("_g"):
                    view[...] = 1.0
                else:
                    std = resid if name in ("proj_w", "out_w") else 0.02
                    view[...] = std * rng.standard_normal(view.shape)
        return w.astype(self.dtype, copy=False)

    def make_stage(self, s: int, group: int = 0) -> CharStageModule:
        """The stage module of pipeline group `group`, stage `s`."""
        if not 0 <= s < self.stages:
            raise ValueError(f"stage must be in [0, {self.stages}), got {s}")
        return PartStage(self, s, group)

    def activation_shape(self, s: int) -> tuple[int, ...]:
        """(batch, context, width) for every s: what stage s sends on, and the gradient it
        sends back (the last stage sends only that gradient)."""
        return (self.batch_size, self.context, self.width)

    def _unit_params(self, w: Array) -> list[dict[str, Array]]:
        return [lay.unpack(w[sl]) for lay, sl in zip(self.unit_layouts, self.unit_slices)]

    def _eval(self, w: Array) -> tuple[Array, Array, Array, Array, list[Array | None]]:
        w = w.astype(self.dtype, copy=False)
        xp = array_module(w)
        ids, targets = (xp.asarray(a) for a in self.data.eval_set)
        logits, inputs = layers.units_forward(self.kinds, self._unit_params(w), None, ids,
                                              self.heads)
        return w, ids, targets, logits, inputs

    def full_objective(self, w: Array) -> float:
        """Mean cross-entropy over the fixed evaluation windows (`data.eval_set`)."""
        _, _, targets, logits, _ = self._eval(w)
        return layers.cross_entropy(logits, targets)[0]

    def validation_objective(self, w: Array) -> float | None:
        """Mean cross-entropy (nats per character) over the held-out windows
        (`data.val_set`, the last --val-fraction of the text); None without a split."""
        if self.data.val_set is None:
            return None
        w = w.astype(self.dtype, copy=False)
        xp = array_module(w)
        ids, targets = (xp.asarray(a) for a in self.data.val_set)
        logits, _ = layers.units_forward(self.kinds, self._unit_params(w), None, ids,
                                         self.heads)
        return float(layers.cross_entropy(logits, targets)[0])

    def full_gradient(self, w: Array) -> Array:
        """Gradient of `full_objective` at w (same layout and dtype as w)."""
        w_in = w
        w, ids, targets, logits, inputs = self._eval(w)
        xp = array_module(w)
        out = xp.empty(self.dim, dtype=self.dtype)
        layers.units_backward(self.kinds, self._unit_params(w), self._unit_params(out), inputs,
                              layers.cross_entropy(logits, targets)[1], ids, self.heads,
                              self.data.vocab_size, self.context)
        return out.astype(w_in.dtype, copy=False)


# ----- profiling and the automatic partition ------------------------------------------------

def unit_costs(model: CharLM, repeats: int = 10) -> list[float]:
    """Seconds of forward + backward of each unit on one microbatch of the model's batch
    shape, measured here (one embedding, one block, one head: the blocks are alike)."""
    rng = np.random.default_rng(0)
    ids, targets = model.data.batch(0)
    shape = model.activation_shape(0)
    w = model.init_weights()
    params = model._unit_params(w)
    x = rng.standard_normal(shape).astype(model.dtype)
    vocab, context, heads = model.data.vocab_size, model.context, model.heads

    def embed() -> object:
        out = layers.embedding_forward(params[0]["wte"], params[0]["wpe"], ids)
        return layers.embedding_backward(ids, out, vocab, context)

    def block() -> object:
        out = layers.block_forward(x, params[1], heads)[0]
        return layers.block_backward(x, params[1], heads, out)

    def head() -> object:
        logits = layers.head_forward(x, params[-1])[0]
        return layers.head_backward(x, params[-1], layers.cross_entropy(logits, targets)[1])

    e, h = median_time(embed, repeats), median_time(head, repeats)
    b = median_time(block, repeats) if model.layers else 0.0
    return [e, *[b] * model.layers, h]


def profile_shape(model: CharLM) -> dict[str, object]:
    """What the unit costs depend on: the cache key (with the host)."""
    return {"model": "charlm", "layers": model.layers, "width": model.width,
            "heads": model.heads, "context": model.context, "batch_size": model.batch_size,
            "vocab": model.data.vocab_size, "dtype": model.dtype.name, "numba": HAVE_NUMBA}


def auto_partition(model: CharLM, stages: int) -> tuple[Partition, list[float]]:
    """(the DP's partition over `stages`, the unit costs), the costs cached per host."""
    costs = cached_profile(profile_key(profile_shape(model)), lambda: unit_costs(model))
    return best_partition(costs, stages), costs


def _validate(stages: int, n_layers: int | None, width: int, heads: int, context: int,
              batch_size: int, dtype: str) -> int:
    """The number of blocks (n_layers, or S - 2 when None), once the sizes are valid."""
    for key, value in {"width": width, "heads": heads, "context": context,
                       "batch_size": batch_size, "stages": stages}.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    if n_layers is None and stages < 3:
        raise ValueError(f"charlm with {stages} stages needs layers (the default, one block "
                         f"per middle stage, needs at least 3 stages)")
    n_layers = stages - 2 if n_layers is None else n_layers
    if n_layers < 0:
        raise ValueError(f"layers must be >= 0, got {n_layers}")
    if stages > n_layers + 2:
        raise ValueError(f"{stages} stages need at least {stages - 2} layers (every stage "
                         f"holds >= 1 of the {n_layers + 2} units), got {n_layers}")
    if width % heads:
        raise ValueError(f"heads ({heads}) must divide width ({width})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return n_layers


def build_charlm(stages: int, *, width: int = 32, heads: int = 2, context: int = 32,
                 batch_size: int = 8, seed: int = 0, text: str | None = None,
                 vocab: list[str] | None = None, layers: int | None = None,
                 partition: Sequence[int] | str | None = None, dtype: str = "float64",
                 val_fraction: float = DEFAULT_VAL_FRACTION) -> CharLM:
    """The character LM on `text` (None: the generated corpus); vocabulary `vocab` (None:
    the sorted characters of the text); `layers` blocks (None: stages - 2); `partition`
    None (even), "auto" (profiled, `auto_partition`) or the unit count of each stage.
    ValueError on bad sizes, an impossible partition, a text shorter than context + 2
    characters, or a character missing from `vocab`."""
    n_layers = _validate(stages, layers, width, heads, context, batch_size, dtype)
    data = text_data(text, vocab, context=context, batch_size=batch_size, seed=seed,
                     val_fraction=val_fraction)

    def make(counts: Sequence[int], costs: Sequence[float] | None = None) -> CharLM:
        return CharLM(data, layers=n_layers, partition=counts, width=width, heads=heads,
                      seed=seed, dtype=dtype, unit_costs=costs)

    if partition is None:
        return make(even_partition(n_layers + 2, stages))
    if isinstance(partition, str):
        if partition != "auto":
            raise ValueError(f"partition must be 'auto' or unit counts, got {partition!r}")
        return make(*auto_partition(make(even_partition(n_layers + 2, stages)), stages))
    check_partition(partition, n_layers + 2, stages)
    return make(partition)


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
    grad = xp.empty(w.shape, dtype=model.dtype)
    for mod in reversed(mods):
        sl = model.slices[mod.stage]
        grad[sl], g = mod.backward(w[sl].copy(), caches[mod.stage], g, batch)
    if g is not None:
        raise ValueError("stage 0 returned an input gradient; it has no input")
    return float(loss), grad
