"""`rpd-mpi train`: validate on every rank, run the stage programs, assemble one ledger.

1. Every rank validates the configuration and the world size identically; the ranks agree
   (one allreduce) before any pipeline message, and the lowest failing rank prints the error.
   With `--device cuda` a second round picks each rank's GPU (`backend.select` by local
   rank) and checks the transport (IPC: one node; direct: what the MPI library says).
   Every rank checks the output policy (`outputs`); rank 0 holds the lock on --out.
2. Each rank runs its `StageRunner` (or `RPDRunner`), writing `<out>.<run id>.rankNNNNN.part`
   as it goes. A rank that sees a non-finite loss or gradient (`engines.health`) announces a
   stop; every rank ends its program within one op, the links are drained (`mpi.runner`).
3. Rank 0 assembles the run file from the parts (global order by measured completion time,
   measured delays, objective over wall time from block snapshots) and removes the parts; a
   stopped run's ledger says `status = "diverged"` and the job exits with EXIT_DIVERGED.
An exception on any rank prints `rpd-mpi: rank R (group g, stage s): ...` once and aborts the
whole job; the parts of a failed run stay behind, marked incomplete. Every wait, collectives
included, is bounded by --timeout.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable

from rpd_mpi import checkpoint, signals
from rpd_mpi.build import RPDSetup, build, rpd_setup, schedule_of
from rpd_mpi.checkpoint import Checkpoint, Writer
from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.ledger import LedgerError
from rpd_mpi.ledger.parts import RankPart, part_path
from rpd_mpi.ledger.run_file import WRITE_ERRORS, io_reason
from rpd_mpi.mpi import backend as backendlib
from rpd_mpi.mpi import comm as commlib
from rpd_mpi.mpi import comm_gpu
from rpd_mpi.mpi.assemble import RankMeta, assemble
from rpd_mpi.mpi.comm import STOP_DIVERGED, STOP_SIGNAL, STOP_WRITE
from rpd_mpi.mpi.recorder import part_notes, salvage, snapshot_dtype
from rpd_mpi.mpi.rpd_runner import RPDRunner
from rpd_mpi.mpi.runner import RunnerResult, drain_after_stop, warm_up
from rpd_mpi.mpi.stage_runner import StageRunner
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.outputs import (EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FAILED, EXIT_OK, EXIT_STOPPED,
                             EXIT_WRITE, OutLock, WriteFailed, check_out, inputs_of, new_run_id,
                             stopped_line, write_out)
from rpd_mpi.records import Divergence, RunRecord
from rpd_mpi.schedule.programs import stage_program
from rpd_mpi.schedule.timeline import Timeline

GPU_METHODS = ("pd", "localsgd")


@dataclass
class Prepared:
    """What every rank builds from the configuration before the first message."""

    model: Model
    timeline: Timeline
    rpd: RPDSetup | None       # RPD: the plan every rank draws identically
    run_id: str
    lock: OutLock | None       # rank 0: the lock on --out, held to the end
    resume: Checkpoint | None = None      # --resume: the checkpoint this run continues
    writer: Writer | None = None          # checkpoints on (or resuming): this run's writer
    state: dict[str, Any] | None = None   # --resume: this rank's state at the cut

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()     # the StageRunner methods run and tested on --device cuda


def check_world(cfg: RunConfig, size: int) -> None:
    sch = cfg.schedule
    need = sch.stages * sch.groups
    if size != need:
        raise ConfigError("--stages", f"the job has {size} MPI ranks but --stages {sch.stages}"
                                      f" x --groups {sch.groups} needs {need} "
                                      f"(launch with mpiexec -n {need})")
    cfg.check_fault_rank(size)
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


def _first_failure(comm: commlib.Comm, error: Exception | None) -> bool:
    """True when no rank failed; else the lowest failing rank prints its error."""
    failed = comm.first_failure(error is not None)
    if failed >= 0 and comm.rank == failed:
        text = str(error) if isinstance(error, ConfigError) else \
            f"{type(error).__name__}: {error}"
        print(f"rpd-mpi: error: {text}", file=sys.stderr)
    return failed < 0


def _prepare(cfg: RunConfig, comm: commlib.Comm, run_id: str, config_file: str,
             ranks_here: int) -> Prepared:
    """Model, timeline and (RPD) the plan: everything that can fail on bad input. Every rank
    checks the output policy; rank 0 takes the lock on --out."""
    check_world(cfg, comm.size)
    if (cfg.checkpoint_every or cfg.resume) and cfg.runtime.device != "cpu":
        raise ConfigError("--checkpoint-every", "checkpoints and --resume run on --device "
                                                "cpu only (device links are not drained to "
                                                "a cut)")
    ck = checkpoint.find(cfg)                  # --resume: the newest complete checkpoint
    if ck is not None:
        run_id = ck.run_id
        if int(ck.manifest["ranks"]) != comm.size:
            raise ConfigError("--resume", f"{ck.path} holds {ck.manifest['ranks']} ranks; "
                                          f"this job has {comm.size}")
    own = ck is not None and checkpoint.out_is_own(cfg.out, run_id)
    check_out(cfg.out, inputs_of(cfg, config_file), cfg.force or own,
              probe=f".{os.path.basename(cfg.out)}.probe-{run_id}-{comm.rank}")
    lock = OutLock(cfg.out, run_id) if comm.rank == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        model, tl = build(cfg, ranks=ranks_here), schedule_of(cfg)
        rpd = rpd_setup(cfg, model, tl) if cfg.schedule.method == "rpd" else None
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Prepared(model, tl, rpd, run_id, lock, ck, checkpoint.writer_for(cfg, run_id, ck))


def train(make_config: Callable[[], RunConfig],
          show: Callable[[RunRecord], None] = lambda record: None,
          config_file: str = "") -> int:
    """Validate (every rank), agree, run, assemble; rank 0 hands the written record to
    `show`. Returns the exit code (outputs.EXIT_*)."""
    comm = commlib.Comm()
    error: Exception | None = None
    prep: Prepared | None = None
    run_id = comm.share(new_run_id() if comm.rank == 0 else "")
    ranks_here = commlib.node_size()    # collective: before anything that may fail on a rank
    try:
        cfg = make_config()
        prep = _prepare(cfg, comm, run_id, config_file, ranks_here)
    except Exception as err:        # any rank's bad input stops every rank, before a message
        error = err
    if not _agree(comm, error, prep):
        return EXIT_BAD_INPUT
    assert prep is not None
    if prep.resume is not None and comm.rank == 0:
        print(f"rpd-mpi: resumed run {prep.run_id} from {prep.resume.path}", file=sys.stderr)
    device = None
    if cfg.runtime.device != "cpu":        # every rank has the same valid configuration
        try:
            device = _device(cfg, comm)
        except Exception as err:           # one rank's failure here stops every rank too
            error = err
        if not _agree(comm, error, prep):
            return EXIT_BAD_INPUT
    try:
        outcome = _run(cfg, comm, prep, device)
    except BaseException as err:    # one rank's failure ends the job, printed once here
        sys.stderr.write(f"rpd-mpi: rank {comm.rank} (group {comm.group}, stage "
                         f"{comm.stage}): {type(err).__name__}: {err}\n")
        sys.stderr.flush()
        prep.release()
        comm.abort(EXIT_FAILED)
        raise
    code = {STOP_DIVERGED: EXIT_DIVERGED, STOP_SIGNAL: EXIT_STOPPED,
            STOP_WRITE: EXIT_WRITE}.get(outcome.stop, EXIT_OK)
    if outcome.record is not None:
        code = _write(cfg, comm, prep, outcome.record, code, show)
    if outcome.stop:        # nobody leaves before rank 0 has written and said why: mpiexec
        comm.final_barrier()   # ends the whole job when one rank exits with a nonzero code
        if not outcome.quiet:  # undrained (CUDA IPC) links would block MPI_Finalize
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    comm.free()
    return code


def _write(cfg: RunConfig, comm: commlib.Comm, prep: Prepared, record: RunRecord, code: int,
           show: Callable[[RunRecord], None]) -> int:
    """Rank 0: the run file, then the parts go; one line for a failed write or divergence."""
    try:
        write_out(cfg.out, record, prep.run_id)
    except WriteFailed as err:
        print(f"rpd-mpi: error: {err} (the part files stay: "
              f"{part_path(cfg.out, 0, prep.run_id).name} ...)", file=sys.stderr)
        return EXIT_WRITE
    finally:
        prep.release()
    resumable = prep.writer is not None and prep.writer.step and code != EXIT_OK
    if not resumable:            # a checkpoint to resume needs the parts it points into
        for r in range(comm.size):
            os.remove(part_path(cfg.out, r, prep.run_id))
    if prep.writer is not None and code == EXIT_OK:
        prep.writer.remove()     # complete: its checkpoints are no longer needed
    show(record)
    if code == EXIT_STOPPED:
        print(f"rpd-mpi: {stopped_line(record)}", file=sys.stderr)
    if code == EXIT_DIVERGED:
        print(f"rpd-mpi: error: {Divergence.from_attrs(record.attrs).describe(cfg.lr)}",
              file=sys.stderr)
    return code


def _agree(comm: commlib.Comm, error: Exception | None, prep: Prepared | None) -> bool:
    """True when no rank failed; else the lowest failing rank prints its error and rank 0
    gives the lock on --out back."""
    ok = _first_failure(comm, error)
    if not ok and prep is not None:
        prep.release()
    return ok


@dataclass
class Outcome:
    """What `_run` ends with on each rank: rank 0's record, the job's stop code."""

    record: RunRecord | None
    stop: int
    quiet: bool = True          # after a stop: every link of this rank was drained


def _run(cfg: RunConfig, comm: commlib.Comm, prep: Prepared, device: Device | None = None
         ) -> Outcome:
    comm.split(cfg.schedule.stages)
    waiter = commlib.Waiter(commlib.auto_strategy(cfg.runtime.wait), cfg.runtime.timeout)
    part, error = _open_part(cfg, comm, prep)
    if not _first_failure(comm, error):           # the lowest failing rank said why
        return Outcome(None, STOP_WRITE)
    assert part is not None
    warm_up(prep.model, comm.stage, comm.group)    # JIT compiles before any timed wait
    offset = comm.clock_offset()                   # (start-up waits: Comm.AGREE_TIMEOUT)
    t0 = comm.start_time() - offset                # rank 0's t = 0, read on this rank's clock
    if prep.resume is not None:                    # times go on from the checkpoint's cut
        t0 -= float(prep.resume.manifest["position"].get("elapsed", 0.0))
    if prep.writer is not None and cfg.checkpoint_every:
        comm.signals_cut()                         # a stop signal: checkpoint, then stop
    part.note(clock_offset=offset)
    comm.set_waiter(waiter)                        # from here on every wait: --timeout
    with signals.catching():                       # SIGTERM & co. stop the job, not kill it
        try:
            result = _execute(cfg, prep, comm, part, waiter, t0, device)
        except BaseException as err:         # its rows reach the part before the abort
            salvage(part, err)
            raise
        stop = comm.stop.settle(waiter)
        signum = signals.received()
    quiet = drain_after_stop(comm, result.links, waiter) if stop else True
    mine = RankMeta(host=commlib.processor_name() or socket.gethostname(),
                    blocked=waiter.blocked, strategy="polite" if waiter.polite else "spin",
                    clock_offset=offset, losses=result.losses,
                    device=device.info if device is not None else None,
                    divergence=result.divergence, write_error=result.write_error,
                    signal=signals.name(signum))
    write_error = _close(part, complete=not stop, flush=not result.write_error,
                         notes=mine.notes()) or result.write_error
    mine = replace(mine, write_error=write_error)
    meta = comm.gather(mine)
    comm.barrier()          # every part is closed
    if comm.rank != 0 or meta is None:
        return Outcome(None, stop, quiet)
    failed = [m.write_error for m in meta if m.write_error]
    if failed:
        print(f"rpd-mpi: error: {failed[0]} (the job stopped; no ledger was written, the part "
              f"files of run {prep.run_id} are incomplete)", file=sys.stderr)
        prep.release()
        return Outcome(None, STOP_WRITE, quiet)
    record = assemble(cfg, prep.model, prep.timeline, prep.rpd, comm.size, meta,
                      prep.run_id, stopped=bool(stop))
    if prep.writer is not None:
        cause = str(record.attrs.get("stopped_by") or record.attrs.get("status"))
        record.attrs.update(checkpoint.ledger_attrs(prep.writer, cause, len(record.updates)))
        if prep.writer.step:
            record.attrs["checkpoint"] = os.path.join(prep.writer.root,
                                                      f"step-{prep.writer.step:06d}")
    return Outcome(record, stop, quiet)


def _open_part(cfg: RunConfig, comm: commlib.Comm, prep: Prepared
               ) -> tuple[RankPart | None, Exception | None]:
    sl = prep.model.slices[comm.stage]
    path = part_path(cfg.out, comm.rank, prep.run_id)
    try:
        if prep.resume is not None:            # the rows up to the cut, appended to
            state = prep.resume.load(comm.rank)
            prep.state = state
            return RankPart.reopen(path, comm.rank, state["part"],
                                   snapshot_dtype=snapshot_dtype(sl.stop - sl.start)), None
        notes = part_notes(cfg, comm, prep.model, prep.timeline, prep.run_id,
                           prep.rpd.plan.stage if prep.rpd is not None else None)
        return RankPart(path, comm.rank, snapshot_dtype=snapshot_dtype(sl.stop - sl.start),
                        attrs=notes), None
    except (OSError, LedgerError, KeyError) as err:
        what = "resume from" if prep.resume is not None else "create"
        return None, ConfigError("--out", f"cannot {what} {path}: {io_reason(err)}"
                                 if isinstance(err, OSError) else f"cannot {what} {path}: {err}")


def _close(part: RankPart, complete: bool, flush: bool = True,
           notes: dict[str, Any] | None = None) -> str:
    """Close the part (marked complete unless the job stopped) with what the rank reports
    noted in it (`RankMeta.notes`); the write error, if any."""
    try:
        if flush and notes:
            part.note(**notes)
        part.close(complete=complete, flush=flush)
    except WRITE_ERRORS as err:
        return f"writing {part.path}: {io_reason(err)}"
    return ""


def _execute(cfg: RunConfig, prep: Prepared, comm: commlib.Comm, part: RankPart,
             waiter: commlib.Waiter, t0: float, device: Device | None = None) -> RunnerResult:
    """Run this rank's share (it ends early, without draining, when the job stops)."""
    if prep.rpd is not None:
        rpd = RPDRunner(cfg, prep.model, comm, prep.rpd.plan, prep.rpd.delta, part, waiter, t0,
                        writer=prep.writer, resume=prep.state)
        if comm.stage == comm.stages - 1:
            # so the part holds them as they come (resumed: from the checkpoint's cut on)
            rpd.rec.track_losses(rpd.losses, first=rpd.rec.losses_done)
        return rpd.run()
    runner = StageRunner(cfg, prep.model, comm, prep.timeline, part, waiter, t0,
                         backend=device.backend if device else backendlib.CPU,
                         links=device.links if device else None, writer=prep.writer,
                         resume=prep.state)
    if cfg.runtime.order == "static":
        return runner.run_static(stage_program(prep.timeline, comm.stage))
    return runner.run_dynamic()
