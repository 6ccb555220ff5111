"""Progress of long runs on stderr: a live line on a terminal, plain lines in a log file.

On a terminal the line is rewritten at most once a second. When stderr is a file or a pipe
(mpiexec, a Slurm .out file, CI) a complete line is written every `LOG_EVERY` seconds, so a
log shows the run as it goes. Each line says what is done out of the total, the rate, the
elapsed time, the ETA and, when known, the latest loss. The MPI runtime shows it on rank 0;
the simulator on its one process; `--quiet` turns it off.
"""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class Progress:
    """Progress of `total` steps called `what`; `tick(done, loss)` after each step."""

    TTY_EVERY = 1.0        # seconds between rewrites of the live line
    LOG_EVERY = 5.0        # seconds between lines in a log
    FIRST_AFTER = 2.0      # runs shorter than this print nothing at all

    def __init__(self, total: int, enabled: bool = True, what: str = "microbatches",
                 stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.enabled, self.what = total, enabled, what
        self.tty = self.stream.isatty()
        self.every = self.TTY_EVERY if self.tty else self.LOG_EVERY
        self.t0 = time.monotonic()
        self.last = self.t0 + self.FIRST_AFTER - self.every   # first line after FIRST_AFTER
        self.shown = False
        self.loss = math.nan

    def tick(self, done: int, loss: float = math.nan) -> None:
        if not math.isnan(loss):
            self.loss = loss
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done >= self.total
        if now - self.last < self.every and not (finished and self.shown):
            return
        self.last, self.shown = now, True
        self._write(self.line(done, now), finished)

    def line(self, done: int, now: float) -> str:
        elapsed = now - self.t0
        rate = done / max(elapsed, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else math.inf
        loss = f"  loss {self.loss:.4g}" if not math.isnan(self.loss) else ""
        eta_text = f"{eta:.0f} s" if math.isfinite(eta) else "?"
        return (f"[rpd-mpi] {self.what} {done}/{self.total} ({100 * done / max(1, self.total):.0f}"
                f"%)  {rate:.1f}/s  elapsed {elapsed:.0f} s  ETA {eta_text}{loss}")

    def _write(self, text: str, finished: bool) -> None:
        if self.tty:
            self.stream.write("\r" + text + (" \n" if finished else " "))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
