"""What every rank's runner shares: its result, the JIT warm-up, and the drain after a stop.

A job stops early when a rank announces it (`comm.StopFlag`: today a divergence). Every rank
then leaves its program within one op, without draining its links; once every rank has
settled the stop, `drain_after_stop` makes the links quiet: each rank learns how many
messages its pipeline neighbours sent it, receives (and drops) the ones it has not taken,
cancels the receives it posted ahead, and completes its own sends. No request is left
pending, so the job ends through the normal path (assembly, MPI_Finalize).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rpd_mpi.engines.health import Diverged
from rpd_mpi.mpi.comm import STOP_DIVERGED, STOP_WRITE, Comm, Stopped, Waiter
from rpd_mpi.mpi.comm_links import StageLinks
from rpd_mpi.mpi.recorder import PartWriteFailed
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.records import Divergence

# the stop codes (comm.STOP_*): DIVERGED < SIGNAL < WRITE, the largest announced wins


@dataclass
class RunnerResult:
    """What a rank's runner hands back to `train`."""

    links: StageLinks
    losses: np.ndarray | None = None          # RPD, last stage: every iteration's loss
    divergence: Divergence | None = None      # this rank saw the run diverge
    write_error: str = ""                     # this rank's part file could not be written


def stop_for(err: Exception, comm: Comm) -> tuple[Divergence | None, str]:
    """Announce the stop an exception of this rank's program calls for (a stop that came
    from elsewhere announces nothing); (its divergence, its write error)."""
    if isinstance(err, Diverged):
        comm.stop.announce(STOP_DIVERGED)
        return err.divergence, ""
    if isinstance(err, PartWriteFailed):
        comm.stop.announce(STOP_WRITE)
        return None, str(err)
    return None, ""


STOPS = (Diverged, Stopped, PartWriteFailed)     # what ends a rank's program early


def warm_up(model: Model, stage: int, group: int = 0) -> None:
    """One forward and backward of this rank's stage on its real shapes, before the first
    timed wait, so that JIT compilation (numba, cold cache) never counts against --timeout.
    Nothing is kept: the stage object, the block and the activations are throwaway copies."""
    mod = model.make_stage(stage, group)
    w = model.init_weights()[model.slices[stage]].copy()
    a_in = None if stage == 0 else np.zeros(model.activation_shape(stage - 1))
    a_out, cache = mod.forward(w, a_in, 0)
    g_out = mod.loss(a_out, 0)[1] if stage == model.stages - 1 else np.zeros_like(a_out)
    mod.backward(w, cache, g_out, 0)


def drain_after_stop(comm: Comm, links: StageLinks, waiter: Waiter) -> bool:
    """Collective over the world after a stop: every link of every rank ends quiet (False:
    this rank's links cannot be drained, some requests stay pending; the CLI then leaves
    with os._exit instead of MPI_Finalize, see `commands.cmd_train`)."""
    stop, waiter.stop = waiter.stop, None          # the stop is known: waits must not raise
    try:
        sent = np.array([sent_count(links.act_out), sent_count(links.grad_out)],
                        dtype=np.int64)
        every = np.zeros((comm.size, 2), dtype=np.int64)
        waiter.collective(comm.world.Iallgather(sent, every), "the drain after a stop")
        quiet = all(hasattr(link, "discard") for link in (links.act_in, links.grad_in)
                    if link is not None)
        if not quiet:             # CUDA IPC links: their credit protocol is not drained
            return False
        if links.act_in is not None:                 # activations come from stage - 1
            links.act_in.discard(int(every[comm.rank - 1, 0]))
        if links.grad_in is not None:                # gradients come from stage + 1
            links.grad_in.discard(int(every[comm.rank + 1, 1]))
        links.drain()
        return True
    finally:
        waiter.stop = stop


def sent_count(link: object) -> int:
    """Messages an outgoing link has sent (0 for no link, or one that does not count)."""
    return int(getattr(link, "sent", 0)) if link is not None else 0
