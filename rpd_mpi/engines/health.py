"""Numerical health of a run: losses, gradients and the objective must stay finite.

Every engine asks a `Health` about each last-stage loss (`loss`), each block gradient before
it is applied (`gradient`, from `BlockState.apply`) and, in the simulator, each recorded
objective value (`objective`). A non-finite value, or a loss above `factor` times the first
loss of the run (`--diverge-factor`, 0 = only non-finite values), raises `Diverged`, which
stops the run: the engines keep what was recorded before, and the ledger says
`status = "diverged"` with the step, stage, microbatch and value (docs/DESIGN.md 4).
"""

from __future__ import annotations

import math

from rpd_mpi.records import Divergence


class Diverged(ArithmeticError):
    """Raised by `Health` on the first bad value; carries the `Divergence`."""

    def __init__(self, divergence: Divergence) -> None:
        super().__init__(f"{divergence.what} = {divergence.value} (stage {divergence.stage}, "
                         f"microbatch {divergence.microbatch})")
        self.divergence = divergence


class Health:
    """The checks of one process (a simulator, or one MPI rank)."""

    def __init__(self, factor: float = 0.0) -> None:
        self.factor = factor
        self.first_loss: float | None = None

    def _fail(self, what: str, stage: int, mb: int, value: float) -> None:
        raise Diverged(Divergence(what, -1, stage, mb, value))

    def loss(self, value: float, stage: int, mb: int) -> None:
        if not math.isfinite(value):
            self._fail("loss", stage, mb, value)
        if self.first_loss is None:
            self.first_loss = abs(value)
        elif self.factor and abs(value) > self.factor * max(self.first_loss, 1e-12):
            self._fail(f"loss (over {self.factor:g} x the first loss {self.first_loss:.4g})",
                       stage, mb, value)

    def gradient(self, norm: float, stage: int, mb: int) -> None:
        if not math.isfinite(norm):
            self._fail("gradient norm", stage, mb, norm)

    def objective(self, value: float, k: int) -> None:
        if not math.isfinite(value):
            raise Diverged(Divergence("objective", k, -1, -1, value))
