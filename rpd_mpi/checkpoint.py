"""Checkpoints: the whole state of a run at a cut, written atomically, found by --resume.

Next to --out, in a folder of the run's own (`<out>.<run id>.ckpt/`):

    step-000003/            the newest complete checkpoint: manifest.json, rankNNNNN.pkl
    step-000004.tmp/        one being written (every rank writes its own state file)

A step is complete when its manifest is written and the folder renamed from `.tmp` (rank 0,
after every rank has written and synced its file); only then is the previous step removed,
so a kill at any moment leaves at least one complete checkpoint once the first exists.
`latest` finds the newest complete step of any run of an --out; `--resume` continues it.
The folder goes when the run completes.

A state file is a pickle of plain data (numpy arrays, numbers, lists, dicts) that the engine
or rank runner put together; its meaning is the engine's. Pickle runs code when loaded: only
resume from checkpoints your own runs wrote. Imports only the configuration (layer 6, beside
`outputs`).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import shutil
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from rpd_mpi.config import ConfigError, RunConfig
from rpd_mpi.ledger import LedgerError, read_run

FORMAT = 1
#: Configuration fields a resumed run may change: how it runs, not what it computes.
RUNTIME_KNOBS = frozenset({
    "force", "quiet", "max_memory", "checkpoint_every", "resume",
    "runtime.timeout", "runtime.wait", "runtime.op_cost", "runtime.fault",
})


def folder(out: str, run_id: str) -> str:
    return f"{out}.{run_id}.ckpt"


def state_name(rank: int) -> str:
    return f"rank{rank:05d}.pkl"


@dataclass
class Segment:
    """One stretch of a run between a start (or resume) and its stop."""

    start: str                    # UTC, ISO 8601
    end: str = ""
    cause: str = ""               # "" while running; "checkpoint", a signal name, "complete"
    hosts: list[str] = field(default_factory=list)
    progress: int = 0             # slots (simulator) or ops of rank 0 done at the end

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "cause": self.cause,
                "hosts": self.hosts, "progress": self.progress}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk."""

    path: str                     # the step folder
    manifest: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def segments(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("segments", []))

    def load(self, rank: int = 0) -> Any:
        with open(os.path.join(self.path, state_name(rank)), "rb") as f:
            return pickle.load(f)


def latest(out: str) -> Checkpoint | None:
    """The newest complete checkpoint of any run of `out` (None: there is none)."""
    best: Checkpoint | None = None
    for manifest in glob.glob(glob.escape(out) + ".*.ckpt/step-*/manifest.json"):
        step = os.path.dirname(manifest)
        if step.endswith(".tmp"):
            continue
        try:
            with open(manifest, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue                # a damaged manifest is not a complete checkpoint
        if meta.get("format") != FORMAT:
            continue
        ck = Checkpoint(step, meta)
        if best is None or float(meta.get("saved", 0)) > float(best.manifest.get("saved", 0)):
            best = ck
    return best


def check_compatible(cfg: RunConfig, ck: Checkpoint) -> None:
    """A resumed run must compute what the checkpointed one did: every field but the
    runtime knobs equal, else ConfigError naming the first field that differs."""
    now, then = _flat(cfg.to_dict()), _flat(ck.manifest["config"])
    for key in sorted(set(now) | set(then)):
        if key in RUNTIME_KNOBS:
            continue
        a, b = now.get(key), then.get(key)
        if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                           and not isinstance(a, bool) and float(a) == float(b)):
            flag = "--" + key.split(".")[-1].replace("_", "-")
            raise ConfigError(flag, f"differs from the checkpoint being resumed ({ck.path}: "
                                    f"{b!r}, now {a!r}); resume with the same settings, or "
                                    f"start a new run without --resume")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Writer:
    """Writes the checkpoints of one run: `begin` a step, every rank `put`s its state,
    rank 0 `commit`s (the step becomes the newest; the one before goes)."""

    def __init__(self, cfg: RunConfig, run_id: str, segments: list[dict[str, Any]],
                 step: int = 0) -> None:
        self.cfg, self.run_id = cfg, run_id
        self.root = folder(cfg.out, run_id)
        self.step = step
        self.segments = segments          # the finished segments before this one
        self.segment = Segment(utc_now(), hosts=[socket.gethostname()])
        self.last = time.monotonic()      # when the last checkpoint was taken (or the start)
        self.seconds: list[float] = []    # how long each checkpoint of this segment took
        self.size = 0                     # bytes of the newest checkpoint

    def due(self) -> bool:
        """Is a periodic checkpoint due (checkpoints on, --checkpoint-every passed)?"""
        every = self.cfg.checkpoint_every
        return bool(every) and time.monotonic() - self.last >= every

    def _tmp(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:06d}.tmp")

    def begin(self) -> int:
        """Rank 0: make the next step's folder; returns its number (every rank writes it)."""
        step = self.step + 1
        tmp = self._tmp(step)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        return step

    def put(self, step: int, rank: int, state: Any) -> None:
        """Any rank: write (and sync) this rank's state of `step`."""
        os.makedirs(self._tmp(step), exist_ok=True)
        path = os.path.join(self._tmp(step), state_name(rank))
        with open(path + ".part", "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".part", path)

    def commit(self, step: int, ranks: int, position: dict[str, Any],
               hosts: list[str] | None = None, cause: str = "checkpoint") -> str:
        """Rank 0, once every rank has `put`: the manifest, the rename, the old step goes.
        Returns the step folder."""
        tmp = self._tmp(step)
        missing = [r for r in range(ranks) if not os.path.exists(os.path.join(tmp, state_name(r)))]
        if missing:
            raise OSError(f"checkpoint {tmp}: no state of rank {missing[0]}")
        if hosts:
            self.segment.hosts = sorted(set(hosts))
        seg = {**self.segment.to_dict(), "end": utc_now(), "cause": cause,
               "progress": int(position.get("progress", 0))}
        manifest = {"format": FORMAT, "run_id": self.run_id, "step": step, "ranks": ranks,
                    "saved": time.time(), "config": self.cfg.to_dict(),
                    "position": position, "segments": [*self.segments, seg]}
        with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = os.path.join(self.root, f"step-{step:06d}")
        os.replace(tmp, final)
        self.size = sum(os.path.getsize(os.path.join(final, n)) for n in os.listdir(final))
        _sync_dir(self.root)
        previous = os.path.join(self.root, f"step-{self.step:06d}")
        if self.step and os.path.isdir(previous):
            shutil.rmtree(previous, ignore_errors=True)
        self.step, self.last = step, time.monotonic()
        return final

    def finished(self, cause: str, progress: int) -> list[dict[str, Any]]:
        """Every segment of the run, this one ended now with `cause` (for the ledger)."""
        return [*self.segments, {**self.segment.to_dict(), "end": utc_now(), "cause": cause,
                                 "progress": progress}]

    def remove(self) -> None:
        """The run completed: its checkpoints are no longer needed."""
        shutil.rmtree(self.root, ignore_errors=True)


def _sync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SimCheckpoints(Writer):
    """The simulator's checkpoints (one process: rank 0 writes and commits)."""

    def save(self, state: dict[str, Any], progress: int, cause: str) -> None:
        t0 = time.perf_counter()
        step = self.begin()
        self.put(step, 0, state)
        self.commit(step, 1, {"progress": progress}, cause=cause)
        self.seconds.append(time.perf_counter() - t0)


def find(cfg: RunConfig) -> Checkpoint | None:
    """With --resume: the checkpoint to continue (checked against `cfg`), None: start
    afresh. Without --resume: None."""
    if not cfg.resume:
        return None
    ck = latest(cfg.out)
    if ck is not None:
        check_compatible(cfg, ck)
    return ck


def writer_for(cfg: RunConfig, run_id: str, ck: Checkpoint | None,
               kind: type[Writer] = Writer) -> Writer | None:
    """The run's checkpoint writer: continuing `ck`'s steps and segments when resuming;
    None when the run neither checkpoints nor resumes."""
    if ck is not None:
        return kind(cfg, ck.run_id, ck.segments, ck.step)
    return kind(cfg, run_id, []) if cfg.checkpoint_every else None


def ledger_attrs(writer: Writer, cause: str, progress: int) -> dict[str, Any]:
    """What a run file says about its segments (`resumed`: how often, `segments`) and the
    checkpoints of its last segment (how many, their mean and longest time, the size of the
    newest)."""
    segments = writer.finished(cause, progress)
    t = writer.seconds
    return {"resumed": max(len(segments) - 1, 0), "segments": json.dumps(segments),
            "checkpoints": len(t), "checkpoint_seconds_mean": sum(t) / len(t) if t else 0.0,
            "checkpoint_seconds_max": max(t, default=0.0), "checkpoint_bytes": writer.size}


def out_is_own(out: str, run_id: str) -> bool:
    """Is --out the ledger a stop of run `run_id` wrote? (A resumed run replaces it.)"""
    if not os.path.isfile(out) or os.path.islink(out):
        return False
    try:
        return str(read_run(out).attrs.get("run_id", "")) == run_id
    except (LedgerError, OSError):
        return False
