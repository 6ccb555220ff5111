"""What an engine needs of checkpoints: when one is due, and where its state goes.

The engines take their own state at a cut (the simulator after a slot, RPD after an update)
as plain data and hand it to a `Checkpoints` object (`rpd_mpi.checkpoint` writes it); a
resumed engine is built as usual and then given that state back. `restore_arrays` copies
saved attributes into live objects in place, so that views onto them (blocks onto the
weight matrix) stay views.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class Checkpoints(Protocol):
    def due(self) -> bool:
        """Is a periodic checkpoint due now?"""
        ...

    def save(self, state: dict[str, Any], progress: int, cause: str) -> None:
        """Write `state` as the newest checkpoint (`progress`: block updates done;
        `cause`: "checkpoint" or the name of the signal that stops the run)."""
        ...


def array_state(obj: object, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The numpy arrays, numbers and lists of numbers among `obj`'s attributes (copies),
    e.g. a tracker's."""
    out: dict[str, Any] = {}
    for name, value in vars(obj).items():
        if name in skip:
            continue
        if isinstance(value, np.ndarray):
            out[name] = value.copy()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out[name] = list(value)          # e.g. the held-out losses recorded so far
    return out


def restore_arrays(obj: object, state: dict[str, Any]) -> None:
    """The inverse of `array_state`: arrays copied in place, numbers and lists set."""
    for name, value in state.items():
        if isinstance(value, np.ndarray):
            getattr(obj, name)[...] = value
        else:
            setattr(obj, name, value)


def rng_states(mods: list[Any]) -> list[Any]:
    """The bit-generator state of each stage module's `rng` (None where it has none)."""
    return [m.rng.bit_generator.state if hasattr(m, "rng") else None for m in mods]


def restore_rngs(mods: list[Any], states: list[Any]) -> None:
    for m, st in zip(mods, states):
        if st is not None:
            m.rng.bit_generator.state = st
