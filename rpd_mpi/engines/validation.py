"""The held-out loss next to the objective: one `Evaluator` per objective curve.

Engines evaluate the full objective f(w) at the points of `engines.cadence` (the simulator
through its tracker, MPI assembly from block snapshots). A model with a validation split
(the char LM: `validation_objective(w)`, mean cross-entropy in nats per character on the
held-out windows, None without a split) gets that loss at the same points and the same
weights: the evaluator computes both, keeps the held-out values in order, and `again()`
repeats the last point where the weights did not change. `values()` is what goes into
`Objective.validation` (None for models without a split). Pure: numpy only.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

#: nats -> bits
BITS_PER_NAT = 1.0 / math.log(2.0)


def validation_hook(model: Any) -> Callable[[Any], float | None] | None:
    """The model's `validation_objective`, or None when it has none."""
    hook = getattr(model, "validation_objective", None)
    return hook if callable(hook) else None


class Evaluator:
    """f(w) of `model` and, when it has a validation split, the held-out loss at w."""

    def __init__(self, model: Any) -> None:
        self.model, self.hook = model, validation_hook(model)
        self._val: list[float] = []
        self._last: tuple[float, float | None] | None = None

    def __call__(self, w: Any) -> float:
        """f(w); the held-out loss at w is kept for `values`."""
        value = float(self.model.full_objective(w))
        held = self.hook(w) if self.hook is not None else None
        self._keep(value, held)
        return value

    def again(self) -> float:
        """The last point once more (the weights did not change since)."""
        if self._last is None:
            raise RuntimeError("again() before the first evaluation")
        self._keep(*self._last)
        return self._last[0]

    def _keep(self, value: float, held: float | None) -> None:
        self._last = (value, held)
        if held is not None:
            self._val.append(float(held))

    def values(self, points: int | None = None) -> np.ndarray | None:
        """The held-out losses so far (nats per character), None without a split or when
        they do not cover exactly `points` objective points (e.g. a resumed curve)."""
        if self.hook is None or not self._val:
            return None
        if points is not None and len(self._val) != points:
            return None
        return np.array(self._val, dtype=float)
