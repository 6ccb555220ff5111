"""From a validated `RunConfig` to a `RunRecord`: data, model, timeline, engine, attributes.

This is the wiring layer between the pure modules (schedule, sim, rpd, objectives) and the
ledger: it may read data files (through `ledger.read_arrays` for .h5) and ledgers (for
replayed delays); it never writes. The CLI writes the record.
"""

from __future__ import annotations

import os
import socket
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from rpd_mpi.budget import check_memory
from rpd_mpi.config import ConfigError, RunConfig, partition_counts
from rpd_mpi.engines.resume import Checkpoints
from rpd_mpi.engines.rpd import RPDPlan, rpd_plan, simulate_rpd
from rpd_mpi.engines.sim import simulate
from rpd_mpi.ledger import LedgerError, read_arrays, read_run
from rpd_mpi.ledger.provenance import provenance
from rpd_mpi.ledger.run_file import array_shape
from rpd_mpi.objectives import build_model
from rpd_mpi.objectives.charlm import build_charlm
from rpd_mpi.objectives.partition import predicted_utilization, stage_times
from rpd_mpi.objectives.problems import problem_arrays, shared_problem
from rpd_mpi.objectives.protocol import Model
from rpd_mpi.progress import Progress
from rpd_mpi.records import RunRecord, Trace
from rpd_mpi.schedule.delays import update_mask, update_order
from rpd_mpi.schedule.generate import generate, smallest_reaching, timeline_for
from rpd_mpi.schedule.timeline import Timeline

DATA_ARRAYS = ("X", "y", "w_true", "f_star")


def load_data(path: str) -> dict[str, np.ndarray]:
    """X, y (and optional w_true, f_star) from an .npz or .h5 file; ConfigError('--data')
    naming the file for anything that cannot be read (empty, truncated, corrupt, pickled)."""
    if not os.path.isfile(path):
        raise ConfigError("--data", f"no such file: {path}")
    if path.endswith(".npz"):
        try:
            with np.load(path) as f:
                arrays = {k: f[k] for k in DATA_ARRAYS if k in f.files}
        except Exception as err:        # BadZipFile, EOFError, zlib.error, pickled data, ...
            raise ConfigError("--data", f"cannot read {path} as .npz: "
                                        f"{type(err).__name__}: {err}") from None
    elif path.endswith((".h5", ".hdf5")):
        try:
            arrays = read_arrays(path, [], optional=list(DATA_ARRAYS))
        except LedgerError as err:
            raise ConfigError("--data", str(err)) from None
    else:
        raise ConfigError("--data", f"must be an .npz or .h5 file holding X and y (got {path})")
    for name in ("X", "y"):
        if name not in arrays:
            raise ConfigError("--data", f"{path} has no array {name!r}; it needs X (n x d) "
                                        f"and y (n), optionally w_true (d) and f_star")
    return arrays


def data_shape(path: str) -> tuple[int, int] | None:
    """(n, d) of the X of a data file, read from its header only (None when it cannot tell:
    `load_data` then says why)."""
    if not os.path.isfile(path):
        return None
    shape = _npz_shape(path) if path.endswith(".npz") else array_shape(path, "X")
    return (int(shape[0]), int(shape[1])) if shape is not None and len(shape) == 2 else None


def _npz_shape(path: str) -> tuple[int, ...] | None:
    try:
        with zipfile.ZipFile(path) as z, z.open("X.npy") as member:
            version = np.lib.format.read_magic(member)
            header = np.lib.format.read_array_header_1_0(member) if version == (1, 0) \
                else np.lib.format.read_array_header_2_0(member)
            return tuple(header[0])
    except Exception:                   # unreadable: load_data reports it
        return None


def build(cfg: RunConfig, ranks: int = 1) -> Model:
    """The model of a configuration (data file read and checked here), once the run is known
    to fit in memory (`rpd_mpi.budget`; `ranks`: the job's processes on this machine, 1 for
    the simulator)."""
    obj, S = cfg.objective, cfg.schedule.stages
    check_memory(cfg, data_shape(obj.data) if obj.data and obj.name != "charlm" else None,
                 ranks)
    if obj.name == "charlm":
        return _charlm(cfg)
    data = load_data(obj.data) if obj.data else None
    if data is not None:
        n, d = np.shape(data["X"]) if np.ndim(data["X"]) == 2 else (0, 0)
        if n % obj.batch_size:
            raise ConfigError("--batch-size", f"must divide the {n} examples of {obj.data} "
                                              f"(got {obj.batch_size})")
        if S > d:
            raise ConfigError("--stages", f"must be <= the {d} columns of {obj.data}")
        if sum(partition_counts(obj.partition) or (d,)) != d:
            raise ConfigError("--partition", f"must sum to the {d} columns of {obj.data} "
                                             f"(got {obj.partition})")
    try:
        if data is None and obj.data_seed is not None:      # same data, other --seed
            data = problem_arrays(shared_problem(obj.name, obj.dim, obj.examples,
                                                 obj.data_seed, obj.mu, obj.lam))
        return build_model(obj.name, S, dim=obj.dim, examples=obj.examples,
                           batch_size=obj.batch_size, seed=cfg.seed, noise=obj.noise,
                           mu=obj.mu, lam=obj.lam, data=data,
                           partition=partition_counts(obj.partition) or None)
    except (ValueError, TypeError) as err:
        if obj.data:
            raise ConfigError("--data", f"{obj.data}: {err}") from None
        raise ConfigError("--objective", str(err)) from None


def _charlm(cfg: RunConfig) -> Model:
    obj, text = cfg.objective, None
    if obj.data:
        try:
            with open(obj.data, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError("--data", f"cannot read {obj.data} as UTF-8 text: {err}") from None
    try:
        counts = partition_counts(obj.partition)
        return build_charlm(cfg.schedule.stages, width=obj.width, heads=obj.heads,
                            context=obj.context, batch_size=obj.batch_size, seed=cfg.seed,
                            text=text, layers=obj.layers or None, dtype=obj.dtype,
                            val_fraction=obj.val_fraction,
                            partition="auto" if counts is None else counts or None)
    except ValueError as err:
        if obj.data:
            raise ConfigError("--data", f"{obj.data}: {err}") from None
        raise ConfigError("--objective", str(err)) from None


def schedule_of(cfg: RunConfig) -> Timeline:
    """The unit-time timeline of a pipeline method (PD for RPD: its clock and delays); a slot
    budget too short for one block update is refused."""
    sch = cfg.schedule
    method = "pd" if sch.method == "rpd" else sch.method
    kw = dict(noam=sch.noam, trajectories=sch.trajectories, local_steps=sch.local_steps,
              flush=sch.flush)
    tl = budget_timeline(cfg, method, kw)
    if sch.budget_slots and not update_mask(tl).any():
        first = generate(method, sch.stages, (sch.flush or sch.stages) if method == "gpipe"
                         else 1, **kw)
        need = int(np.nonzero(update_mask(first).any(axis=1))[0][0]) + 1
        raise ConfigError("--budget-slots", f"{sch.budget_slots} slots hold no block update: "
                                            f"the first one ends with slot {need}; give at "
                                            f"least {need} (got {sch.budget_slots})")
    return tl


def budget_timeline(cfg: RunConfig, method: str, kw: dict[str, int]) -> Timeline:
    """The timeline under the run's budget protocol (`config.BUDGET_MODES`): no budget, the
    given N; `fixed`, the given N cut at the budget; `smallest`, the smallest N reaching the
    budget, cut at it; `untruncated`, that N run to its end."""
    sch = cfg.schedule
    if sch.budget_slots and sch.budget_mode == "fixed":
        return generate(method, sch.stages, sch.microbatches, **kw).truncate(sch.budget_slots)
    if sch.budget_slots and sch.budget_mode == "untruncated":
        return smallest_reaching(method, sch.stages, sch.budget_slots, **kw)
    return timeline_for(method, sch.stages, sch.microbatches, budget=sch.budget_slots, **kw)


def simulate_run(cfg: RunConfig, model: Model | None = None, run_id: str = "",
                 progress: bool = False, checkpoints: Checkpoints | None = None,
                 resume: dict[str, Any] | None = None) -> RunRecord:
    """Run the simulator for `cfg` and return the record (complete, diverged or stopped).
    `progress`: progress lines on stderr (the `simulate` command; tools and sweeps stay
    quiet). `checkpoints` / `resume`: see `engines.sim.simulate`."""
    model = model if model is not None else build(cfg)
    tl = schedule_of(cfg)
    show = progress and not cfg.quiet
    if cfg.schedule.method == "rpd":
        trace, delta = _rpd(cfg, model, tl, show, checkpoints, resume)
    else:
        trace = simulate(tl, model, cfg.lr, groups=cfg.schedule.groups,
                         eval_every=cfg.eval_every,
                         progress=Progress(tl.slots, show, what="slots").tick,
                         diverge_factor=cfg.diverge_factor, checkpoints=checkpoints,
                         resume=resume)
        delta = int(trace.updates.delays.max()) if len(trace.updates) else 0
    return to_record(cfg, model, trace, tl, engine="sim", delta=delta, run_id=run_id)


@dataclass(frozen=True)
class RPDSetup:
    """What an RPD run executes: the plan, its delay bound, its unit-time clock (the PD
    timeline's update slots; None when K exceeds the PD run's updates)."""

    plan: RPDPlan
    delta: int
    clock: np.ndarray | None


def _rpd(cfg: RunConfig, model: Model, tl: Timeline, show: bool,
         checkpoints: Checkpoints | None = None, resume: dict[str, Any] | None = None
         ) -> tuple[Trace, int]:
    setup = rpd_setup(cfg, model, tl)
    return simulate_rpd(model, cfg.lr, setup.plan, delta=setup.delta, clock=setup.clock,
                        eval_every=cfg.eval_every,
                        progress=Progress(setup.plan.stage.size, show,
                                         what="updates").tick,
                        diverge_factor=cfg.diverge_factor, checkpoints=checkpoints,
                        resume=resume), setup.delta


def rpd_setup(cfg: RunConfig, model: Model, tl: Timeline) -> RPDSetup:
    """The RPD plan, its delay bound and its clock for a configuration; identical on every
    process that calls it."""
    order = update_order(tl)
    K = cfg.rpd.updates or order.slot.size
    replay = None
    if cfg.rpd.delay_source == "pd":
        replay = order.delays if K <= order.slot.size else _pd_delays(cfg, K)
    elif cfg.rpd.delay_source == "ledger":
        replay = replayed_delays(cfg.rpd.delays_from, cfg.schedule.stages, K)
    delta = int(replay[:K].max()) if replay is not None else cfg.delta
    plan = rpd_plan(K, cfg.schedule.stages, model.num_batches, delta,
                    cfg.rpd.delay_source, cfg.seed, replay)
    clock = (order.slot + 1) if K <= order.slot.size else None
    return RPDSetup(plan, delta, clock)


def _pd_delays(cfg: RunConfig, updates: int) -> np.ndarray:
    S = cfg.schedule.stages
    n = -(-updates // S)
    return update_order(timeline_for("pd", S, n, noam=cfg.schedule.noam)).delays


def replayed_delays(path: str, stages: int, updates: int) -> np.ndarray:
    """The measured delays of a recorded run, for --delay-source ledger."""
    try:
        delays = read_run(path).updates.delays
    except LedgerError as err:
        raise ConfigError("--delays-from", str(err)) from None
    if delays.ndim != 2 or delays.shape[1] != stages or delays.shape[0] < updates:
        raise ConfigError("--delays-from", f"{path} holds {delays.shape[0]} x "
                                           f"{delays.shape[1] if delays.ndim == 2 else '?'} "
                                           f"delays; this run needs {updates} x {stages}")
    return delays


def partition_attrs(model: Model, microbatches: int) -> dict[str, Any]:
    """The ledger's partition attributes: units (charlm) or coordinates per stage, each
    stage's parameters, and with --partition auto the profiled unit seconds and the
    predicted per-stage F + B seconds and utilization (`objectives.partition`)."""
    sizes = [sl.stop - sl.start for sl in model.slices]
    out: dict[str, Any] = {"partition": list(getattr(model, "partition", sizes)),
                           "stage_parameters": sizes}
    costs = getattr(model, "unit_costs", None)
    if costs is not None:
        times = stage_times(costs, out["partition"])
        out.update(unit_seconds=list(costs), predicted_stage_seconds=times,
                   predicted_stage_utilization=predicted_utilization(times, microbatches))
    return out


def to_record(cfg: RunConfig, model: Model, trace: Trace, tl: Timeline | None, *,
              engine: str, delta: int, extra: dict[str, Any] | None = None,
              run_id: str = "") -> RunRecord:
    """Wrap an engine's trace with the attributes every ledger carries (docs/DESIGN.md 5)."""
    sch = cfg.schedule
    attrs = {
        **provenance(),             # created, git_commit, command_line, versions, Slurm ids
        "method": sch.method, "stages": sch.stages, "groups": sch.groups,
        "trajectories": sch.trajectories, "local_steps": sch.local_steps,
        "noam": tl.noam if tl is not None else sch.noam,
        "flush": tl.flush if tl is not None else sch.flush,
        "microbatches": tl.microbatches if tl is not None else sch.microbatches,
        "slots": tl.slots if tl is not None and sch.method != "rpd" else None,
        "delta": delta, "seed": cfg.seed, "lr": cfg.lr, "objective": cfg.objective.name,
        "dim": model.dim, "examples": model.examples, "f_star": model.f_star,
        "L": model.L, "engine": engine, "order": "unit-time" if engine == "sim" else
        cfg.runtime.order, "mpi_library": "",
        "hosts": [socket.gethostname()], "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
    }
    attrs["run_id"] = run_id
    attrs["status"] = "diverged" if trace.divergence is not None else \
        "stopped" if trace.stopped else "complete"
    if trace.stopped:
        attrs["stopped_by"] = trace.stopped
    if trace.divergence is not None:
        attrs.update(trace.divergence.to_attrs())
    attrs.update(partition_attrs(model, tl.microbatches if tl is not None else
                                 sch.microbatches))
    vocab = getattr(model, "vocab", None)          # the char LM's alphabet
    if vocab is not None:
        attrs["vocab"] = "".join(vocab)
    attrs.update(extra or {})
    blocks = [trace.final_weights[sl].copy() for sl in model.slices]
    keep = tl if tl is not None and sch.method != "rpd" else None
    return RunRecord(attrs=attrs, config=cfg.to_dict(), updates=trace.updates,
                     objective=trace.objective, final_blocks=blocks, events=trace.events,
                     timeline_kind=keep.kind if keep is not None else None,
                     timeline_mb=keep.mb if keep is not None else None)
