"""The contract between the engines and an objective: `Model` and its `Stage` modules.

Both objective families satisfy it structurally (no inheritance): the block-linear toys
(`rpd_mpi.objectives.linear.BlockLinearModel` and its `StageModule`) and the character LM
(`rpd_mpi.objectives.charlm.CharLM` and its embedding/block/head stages). The engines (the
simulator, the RPD replay, the MPI stage runners) and the tools use only these members.

A model owns one flat weight vector of length `dim` (float64; the char LM's `init_weights`
returns its `dtype`, float32 with `--dtype float32`, and its stages cast what they are given);
stage s owns the contiguous block `slices[s]` (its `partition`, where a model has one). The
engines copy blocks, call `make_stage(s, group)` once per pipeline group and
stage, and drive the stage modules:

    a_out, cache = stage.forward(w_s, a_in, batch)   # a_in None on stage 0
    loss, g_out  = stage.loss(a_out, batch)          # last stage only
    g_w, g_in    = stage.backward(w_s, cache, g_out, batch)   # g_in None (or unused) on 0

`cache` is opaque to the engines: whatever forward returns, backward gets back. Activations,
gradients and stage blocks are numpy arrays, or cupy arrays on `--device cuda` (block-linear
models are numpy only); the full vector given to `init_weights`, `full_objective` and
`full_gradient` is numpy. Optional members are not part of `Model`: a model with an
incremental objective evaluator (the block-linear ones) also satisfies `TrackedModel`; the
character LM has `vocab` (its characters). Importing this module does no work.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any, Protocol, Sequence, TypeAlias

import numpy as np

if TYPE_CHECKING:
    from rpd_mpi.objectives.charlm import CharLM, CharStageModule
    from rpd_mpi.objectives.linear import BlockLinearModel, ObjectiveTracker, StageModule

#: numpy.ndarray, or cupy.ndarray on --device cuda (cupy has no type stubs).
Array: TypeAlias = Any


class Stage(Protocol):
    """Stage `stage` of pipeline group `group`: forward, backward and (last stage) loss."""

    @property
    def stage(self) -> int:
        """The stage index s."""

    @property
    def group(self) -> int:
        """The pipeline group (LocalSGD allreduce group; 0 otherwise)."""

    @property
    def slice(self) -> builtins.slice:
        """This stage's block of the full weight vector (`Model.slices[stage]`)."""

    @property
    def size(self) -> int:
        """Length of the block."""

    @property
    def is_last(self) -> bool:
        """Whether this is stage S - 1 (the only one whose `loss` works)."""

    def forward(self, w_s: Array, a_in: Array | None, batch: int) -> tuple[Array, Any]:
        """(activation sent on, cache for backward) of batch `batch` at block w_s; a_in is the
        previous stage's activation (None on stage 0). a_in may be reused after the call."""

    def backward(self, w_s: Array, cache: Any, g_out: Array, batch: int
                 ) -> tuple[Array, Array | None]:
        """(gradient wrt w_s, gradient wrt the stage input) from the gradient g_out of the
        activation, with the stashed block w_s and forward's cache."""

    def loss(self, a_out: Array, batch: int) -> tuple[float, Array]:
        """(mean loss of batch `batch`, its gradient wrt a_out); last stage only."""


class Model(Protocol):
    """An objective split into `stages` pipeline stages over one flat weight vector."""

    @property
    def name(self) -> str:
        """The objective's name (`--objective`)."""

    @property
    def stages(self) -> int:
        """Number of pipeline stages S."""

    @property
    def slices(self) -> Sequence[builtins.slice]:
        """Block of each stage in the full weight vector: S contiguous slices of range(dim)."""

    @property
    def dim(self) -> int:
        """Length of the full weight vector."""

    @property
    def examples(self) -> int:
        """Number of training examples (rows of X; window starts of the charlm corpus)."""

    @property
    def batch_size(self) -> int:
        """Examples per batch."""

    @property
    def num_batches(self) -> int:
        """Distinct batch ids; the engines use batch id mod num_batches."""

    @property
    def seed(self) -> int:
        """The seed the model's data and initial weights come from."""

    @property
    def f_star(self) -> float | None:
        """The optimal objective value, None when unknown."""

    @property
    def L(self) -> float | None:
        """Smoothness constant of the full objective, None when unknown."""

    def init_weights(self) -> np.ndarray:
        """A new full weight vector at the model's initial point."""

    def make_stage(self, s: int, group: int = 0) -> Stage:
        """The stage module of pipeline group `group`, stage `s` (ValueError if s is out of
        range)."""

    def full_objective(self, w: np.ndarray) -> float:
        """The evaluation objective at the full vector w."""

    def full_gradient(self, w: np.ndarray) -> np.ndarray:
        """Gradient of `full_objective` at w (same layout as w)."""

    def activation_shape(self, s: int) -> tuple[int, ...]:
        """Shape of the activation stage s sends on (and of the gradient it receives)."""


class Tracker(Protocol):
    """`full_objective` along a trajectory of w that changes one block at a time."""

    def shift(self, s: int, delta: np.ndarray, scale: float = 1.0) -> None:
        """w[slices[s]] += scale * delta."""

    def value(self) -> float:
        """full_objective at the current w."""


class TrackedModel(Model, Protocol):
    """A `Model` with an incremental objective evaluator (the engines use it when present)."""

    def objective_tracker(self, w: np.ndarray) -> Tracker:
        """A `Tracker` starting at the full vector w."""


if TYPE_CHECKING:
    def _both_families_conform(linear: BlockLinearModel, linear_stage: StageModule,
                               tracker: ObjectiveTracker, charlm: CharLM,
                               char_stage: CharStageModule) -> list[Model]:
        """Never called: mypy checks here that both families satisfy the protocols."""
        stages: list[Stage] = [linear_stage, char_stage]
        tracked: TrackedModel = linear
        tracking: Tracker = tracker
        del stages, tracking
        return [tracked, charlm]
