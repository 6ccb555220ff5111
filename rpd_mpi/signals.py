"""SIGTERM, SIGINT and SIGUSR1 end a run early without losing it.

`catching()` installs handlers that only record the first signal (Slurm's time limit sends
SIGTERM, `scancel` SIGTERM, `--signal=B:USR1@SECONDS` SIGUSR1, Ctrl-C SIGINT); the engines
check `received()` between ops (the simulator once per slot, MPI ranks before every op and
inside every wait), stop, and write a ledger with `status = "stopped"` holding every update
done so far. A second signal restores the default action and delivers itself: the process
ends at once. Pure: no MPI, no HDF5.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_received: list[int] = []


def _handler(signum: int, frame: FrameType | None) -> None:
    if _received:                         # the second one: end now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)


class SignalStop(Exception):
    """Raised by an engine at its next check after a stop signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {name(signum)}")
        self.signum = signum


def check() -> None:
    """Raise SignalStop if a stop signal has been received."""
    if _received:
        raise SignalStop(_received[0])


def received() -> int:
    """The first stop signal received since `catching` began (0: none)."""
    return _received[0] if _received else 0


def name(signum: int) -> str:
    return signal.Signals(signum).name if signum else ""


@contextmanager
def catching() -> Iterator[None]:
    """Record stop signals for the duration (main thread only; elsewhere a no-op)."""
    try:
        old = {s: signal.signal(s, _handler) for s in STOP_SIGNALS}
    except ValueError:                    # not the main thread: leave the handlers alone
        yield
        return
    _received.clear()
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
