"""Progress of long runs: one line on stderr, rewritten at most once a second, only when
stderr is a terminal (so logs, CI and batch jobs stay clean). The MPI runtime shows it on
rank 0; the simulator shows it for runs that take more than a moment.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """One progress line on a terminal (quiet when stderr is not one, or not `enabled`)."""

    def __init__(self, total: int, enabled: bool = True, what: str = "microbatches") -> None:
        self.total, self.enabled = total, enabled and sys.stderr.isatty()
        self.what, self.shown = what, False
        self.t0 = self.last = time.monotonic()

    def tick(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 1.0 and (done < self.total or not self.shown):
            return
        self.last, self.shown = now, True
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        sys.stderr.write(f"\r[rpd-mpi] {self.what} {done}/{self.total}  {rate:.1f}/s  "
                         f"ETA {eta:.0f} s ")
        if done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
