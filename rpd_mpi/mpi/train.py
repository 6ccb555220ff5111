"""`rpd-mpi train`: validate on every rank, run the stage programs, assemble one ledger.

1. Every rank validates the configuration and the world size identically; the ranks agree
   (one allreduce) before any pipeline message, and the lowest failing rank prints the error.
   With `--device cuda` a second round picks each rank's GPU (`backend.select` by local
   rank) and checks the transport (IPC: one node; direct: what the MPI library says).
2. Each rank runs its `StageRunner`, writing `<out>.rankNNNNN.part` as it goes.
3. Rank 0 assembles the run file from the parts (global order by measured completion time,
   measured delays, objective over wall time from block snapshots) and removes the parts.
An exception on any rank prints `rpd-mpi: rank R (group g, stage s): ...` once and aborts the
whole job; the parts of a failed run stay behind, marked incomplete.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rpd_mpi.build import RPDSetup, build, check_out, rpd_setup, schedule_of
from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.ledger import write_run
from rpd_mpi.ledger.parts import RankPart, part_path
from rpd_mpi.mpi import backend as backendlib
from rpd_mpi.mpi import comm as commlib
from rpd_mpi.mpi import comm_gpu
from rpd_mpi.mpi.assemble import RankMeta, assemble
from rpd_mpi.mpi.recorder import snapshot_dtype
from rpd_mpi.mpi.rpd_runner import RPDRunner
from rpd_mpi.mpi.stage_runner import StageRunner
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.records import RunRecord
from rpd_mpi.schedule.programs import stage_program
from rpd_mpi.schedule.timeline import Timeline

GPU_METHODS = ("pd", "localsgd")


@dataclass(frozen=True)
class Prepared:
    """What every rank builds from the configuration before the first message."""

    model: Model
    timeline: Timeline
    rpd: RPDSetup | None       # RPD: the plan every rank draws identically     # the StageRunner methods run and tested on --device cuda


def check_world(cfg: RunConfig, size: int) -> None:
    sch = cfg.schedule
    need = sch.stages * sch.groups
    if size != need:
        raise ConfigError("--stages", f"the job has {size} MPI ranks but --stages {sch.stages}"
                                      f" x --groups {sch.groups} needs {need} "
                                      f"(launch with mpiexec -n {need})")
    if cfg.runtime.order == "dynamic" and sch.method != "pd":
        raise ConfigError("--order", f"dynamic order runs the PD 1F1B rule; use static with "
                                     f"--method {sch.method}")
    if cfg.runtime.order == "dynamic" and sch.budget_slots:
        raise ConfigError("--budget-slots", "is a unit-time budget; with --order dynamic "
                                            "give --microbatches instead")
    if cfg.runtime.fault and sch.method == "rpd":
        raise ConfigError("--fault", "fault injection runs in the PD/LocalSGD stage runner; "
                                     "not with --method rpd")
    if cfg.runtime.device == "cuda":
        if sch.method not in GPU_METHODS:
            raise ConfigError("--device", f"cuda runs --method {' or '.join(GPU_METHODS)} "
                                          f"(static or dynamic order); --method {sch.method} "
                                          f"runs on --device cpu only")
        if cfg.objective.name != "charlm":
            raise ConfigError("--device", f"cuda runs --objective charlm; the block-linear "
                                          f"{cfg.objective.name} objective is numpy-only")


@dataclass(frozen=True)
class Device:
    """A rank's GPU set-up: its array backend, the transport's links, what the ledger says."""

    backend: backendlib.Backend
    links: comm_gpu.Links
    info: dict[str, Any]


def _device(cfg: RunConfig, comm: commlib.Comm) -> Device:
    """(backend, links, ledger info) of this rank for --device cuda. The collectives come
    first, so that every rank reaches them before any check can fail."""
    rt = cfg.runtime
    local = comm_gpu.local_rank(comm.world)
    one_node = commlib.node_size() == comm.size
    be = backendlib.select(rt.device, local, rt.gpus_per_node or None)
    info = {**be.describe(), "transport": rt.transport}
    if rt.transport == "ipc" and not one_node:
        raise ConfigError("--transport", "ipc needs every rank on one node (CUDA IPC "
                                         "handles do not cross nodes); use staged")
    if rt.transport == "direct":
        aware, how = comm_gpu.cuda_aware_mpi()
        if aware is False:
            raise ConfigError("--gpu-aware-mpi", f"the MPI library says it is not "
                                                 f"CUDA-aware ({how}); use --transport "
                                                 f"staged or ipc")
        info["cuda_aware_mpi"] = how
    return Device(be, comm_gpu.make_links(rt.transport, be.xp), info)


def _agree(comm: commlib.Comm, error: Exception | None) -> bool:
    """True when no rank failed; else the lowest failing rank prints its error."""
    failed = comm.first_failure(error is not None)
    if failed >= 0 and comm.rank == failed:
        text = str(error) if isinstance(error, ConfigError) else \
            f"{type(error).__name__}: {error}"
        print(f"rpd-mpi: error: {text}", file=sys.stderr)
    return failed < 0


def _prepare(cfg: RunConfig, comm: commlib.Comm) -> Prepared:
    """Model, timeline and (RPD) the plan: everything that can fail on bad input."""
    check_world(cfg, comm.size)
    check_out(cfg.out)
    model, tl = build(cfg), schedule_of(cfg)
    return Prepared(model, tl, rpd_setup(cfg, model, tl) if cfg.schedule.method == "rpd"
                    else None)


def train(make_config: Callable[[], RunConfig],
          show: Callable[[RunRecord], None] = lambda record: None) -> int:
    """Validate (every rank), agree, run, assemble; rank 0 hands the written record to
    `show`. Returns the exit code."""
    comm = commlib.Comm()
    error: Exception | None = None
    try:
        cfg = make_config()
        prep = _prepare(cfg, comm)
    except Exception as err:        # any rank's bad input stops every rank, before a message
        error = err
    if not _agree(comm, error):
        return 2
    device = None
    if cfg.runtime.device != "cpu":        # every rank has the same valid configuration
        try:
            device = _device(cfg, comm)
        except Exception as err:           # one rank's failure here stops every rank too
            error = err
        if not _agree(comm, error):
            return 2
    try:
        record = _run(cfg, comm, prep, device)
    except BaseException as err:    # one rank's failure ends the job, printed once here
        sys.stderr.write(f"rpd-mpi: rank {comm.rank} (group {comm.group}, stage "
                         f"{comm.stage}): {type(err).__name__}: {err}\n")
        sys.stderr.flush()
        comm.abort(1)
        raise
    if record is not None:
        write_run(cfg.out, record)
        for r in range(comm.size):
            os.remove(part_path(cfg.out, r))
        show(record)
    comm.free()
    return 0


def _run(cfg: RunConfig, comm: commlib.Comm, prep: Prepared, device: Device | None = None
         ) -> RunRecord | None:
    comm.split(cfg.schedule.stages)
    waiter = commlib.Waiter(commlib.auto_strategy(cfg.runtime.wait), cfg.runtime.timeout)
    sl = prep.model.slices[comm.stage]
    with RankPart(part_path(cfg.out, comm.rank), comm.rank,
                  snapshot_dtype=snapshot_dtype(sl.stop - sl.start)) as part:
        offset = comm.clock_offset()
        t0 = comm.start_time() - offset        # rank 0's t = 0, read on this rank's clock
        losses = _execute(cfg, prep, comm, part, waiter, t0, device)
    mine = RankMeta(host=commlib.processor_name() or socket.gethostname(),
                    blocked=waiter.blocked, strategy="polite" if waiter.polite else "spin",
                    clock_offset=offset, losses=losses,
                    device=device.info if device is not None else None)
    meta = comm.gather(mine)
    comm.barrier()          # every part is closed and complete
    if comm.rank != 0 or meta is None:
        return None
    return assemble(cfg, prep.model, prep.timeline, prep.rpd, comm.size, meta)


def _execute(cfg: RunConfig, prep: Prepared, comm: commlib.Comm, part: RankPart,
             waiter: commlib.Waiter, t0: float, device: Device | None = None
             ) -> np.ndarray | None:
    """Run this rank's share; RPD's last stage returns every iteration's loss."""
    if prep.rpd is not None:
        rpd = RPDRunner(cfg, prep.model, comm, prep.rpd.plan, prep.rpd.delta, part, waiter, t0)
        rpd.run()
        return rpd.losses if comm.stage == comm.stages - 1 else None
    runner = StageRunner(cfg, prep.model, comm, prep.timeline, part, waiter, t0,
                         backend=device.backend if device else backendlib.CPU,
                         links=device.links if device else None)
    if cfg.runtime.order == "static":
        runner.run_static(stage_program(prep.timeline, comm.stage))
    else:
        runner.run_dynamic()
    return None
