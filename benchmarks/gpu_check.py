#!/usr/bin/env python3
"""The one prepared GPU check (issues 6 and 15), for a session that has a GPU (docs/GPU.md).

    bash jobs/gpu-check.sh                  # sets up MPI from jobs/wheels/, then this script
    python3 benchmarks/gpu_check.py [--out docs/gpu-check.md] [--budget 360]
    python3 benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check.md     # mock cupy, tiny

Sections, in order (each failure is written down and the next section still runs):
  a. charlm gradient check on cupy: float64, a 3-stage tiny model, central differences at
     random entries of every stage's block, plus cupy against numpy (same weights, batch);
     and one-process copy rates (D2H, H2D, D2D, D2H+sync; see `copy_rates`), which need no
     MPI.
  b. `rpd-mpi train --device cuda` on 3 ranks (charlm needs S >= 3): a tiny static PD run
     per transport compared with the CPU simulator (final blocks), then charlm width 256,
     S = 3 per transport and on the CPU, with the median forward/backward time per stage.
  c. transfer bandwidth between 2 ranks per transport (staged, ipc; direct only when the
     MPI library says it is CUDA-aware; host numpy MPI as the baseline) for 1..256 MiB, by
     ping-pong through the links the runtime uses (run before b).
  d. the Markdown report (`--out`) with the date, the card and the MPI library, rewritten
     after every section so that a run cut short still leaves its results; the raw rows go
     to a .json file beside it.
No launch starts after `--budget` seconds (each gets at most what is left), so the whole
script stays near that bound plus section a.

Needs only python3 with numpy, cupy, mpi4py (with an MPI library it can load and an mpiexec
that matches it) and h5py; numba is optional. jobs/gpu-check.sh provides the MPI library
from a wheel when the machine has none. This script puts the repository on sys.path (and
PYTHONPATH for the ranks) itself, so nothing has to be installed. Ranks are launched as
`MPIEXEC -n K python -m mpi4py ...` where MPIEXEC is the first of `launcher_candidates`
($MPIEXEC, $GPU_PREFIX/bin, the prefix of $MPI4PY_LIBMPI, beside this python, PATH) that
starts 2 ranks which see a world of 2 (a probe, which also reads the MPI library's
version). `--dry-run` uses the numpy mock cupy of tests/fakecupy and tiny sizes; it checks
that the script runs, not the GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
MOCK_DIR = REPO / "tests" / "fakecupy"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FULL = {"sizes": [1, 4, 16, 64, 256], "width": 256, "heads": 8, "context": 128,
        "batch": 16, "micro": 24, "reps_bytes": 2 ** 31}
DRY = {"sizes": [1 / 16, 1 / 4], "width": 16, "heads": 2, "context": 8, "batch": 3,
       "micro": 6, "reps_bytes": 2 ** 24}
DEADLINE = [float("inf")]      # time.monotonic() after which no rank job starts (--budget)
TINY = ["--width", "16", "--heads", "2", "--context", "8", "--batch-size", "3",
        "--microbatches", "8", "--lr", "0.1", "--seed", "2", "--eval-every", "4"]


# ----- environment -----------------------------------------------------------------------------

def child_env(dry: bool) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(MOCK_DIR)] if dry else []
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(REPO), env.get("PYTHONPATH", "")])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")          # Open MPI as root (harmless else)
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("NUMBA_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rpd-numba"))
    return env


def launcher_candidates(env: dict[str, str]) -> list[str]:
    """Where an mpiexec may be, in order: $MPIEXEC, the bin/ of the prefix that
    jobs/gpu-check.sh installed the MPI wheel into ($GPU_PREFIX, or the one above
    $MPI4PY_LIBMPI), beside this python, then mpiexec / mpirun on PATH."""
    cands = [env.get("MPIEXEC")]
    prefixes = [env.get("GPU_PREFIX")]
    libmpi = env.get("MPI4PY_LIBMPI", "").split(os.pathsep)[0]
    if libmpi:
        prefixes.append(str(Path(libmpi).parent.parent))
    cands += [str(Path(p) / "bin" / "mpiexec") for p in prefixes if p]
    cands += [str(Path(sys.executable).parent / "mpiexec")]
    cands += [shutil.which("mpiexec", path=env.get("PATH")),
              shutil.which("mpirun", path=env.get("PATH"))]
    return list(dict.fromkeys(c for c in cands if c and Path(c).exists()))


PROBE = ("from mpi4py import MPI; c = MPI.COMM_WORLD; print(f'rank{c.Get_rank()}of"
         "{c.Get_size()}'); c.Get_rank() or print('LIB ' + MPI.Get_library_version()"
         ".replace(chr(0), '').strip().splitlines()[0])")


def find_launcher(env: dict[str, str]) -> tuple[list[str] | None, str, str]:
    """(mpiexec command, how it was found, the MPI library's version line), probing that 2
    ranks see a world of size 2."""
    tried = []
    for cand in launcher_candidates(env):
        probe = [cand, "-n", "2", sys.executable, "-c", PROBE]
        try:
            res = subprocess.run(probe, capture_output=True, text=True, env=env, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            tried.append(f"{cand}: {type(err).__name__}")
            continue
        if sorted(re.findall(r"rank\d+of\d+", res.stdout)) == ["rank0of2", "rank1of2"]:
            lib = next((ln[4:] for ln in res.stdout.splitlines() if ln.startswith("LIB ")),
                       "?")
            return [cand], f"{cand} (probe: 2 ranks, world size 2)", lib
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
        tried.append(f"{cand}: rc {res.returncode}, printed {res.stdout.split()[:4]} "
                     f"{tail[0][:200]}")
    return None, "no working mpiexec: " + "; ".join(tried or ["none found"]), "?"


def load_cupy(dry: bool) -> Any:
    if dry:
        sys.path.insert(0, str(MOCK_DIR))
    import cupy  # noqa: PLC0415
    if dry and not getattr(cupy, "MOCK", False):
        raise RuntimeError("--dry-run must use the mock cupy of tests/fakecupy")
    return cupy


def device_facts(cp: Any) -> dict[str, Any]:
    rt = cp.cuda.runtime
    props = rt.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    facts = {"card": name, "devices": rt.getDeviceCount(), "cupy": cp.__version__,
             "cuda_runtime": rt.runtimeGetVersion(), "cuda_driver": rt.driverGetVersion(),
             "memory_GiB": round(props.get("totalGlobalMem", 0) / 2 ** 30, 1)}
    try:
        import numba  # noqa: PLC0415, F401
        facts["numba"] = numba.__version__
    except ImportError:
        facts["numba"] = "absent (CPU runs use the numpy references)"
    return facts


# ----- a. gradient check on cupy -------------------------------------------------------------

def pipeline_grad(model: Any, w: Any, xp: Any, batch: int) -> tuple[float, Any]:
    """Loss of `batch` through the stage modules and the stitched block gradient."""
    from rpd_mpi.objectives.charlm import stage_gradient  # noqa: PLC0415
    return stage_gradient(model, w, batch)


def gradient_check(cp: Any, probes: int = 12, h: float = 1e-5) -> dict[str, Any]:
    import numpy as np  # noqa: PLC0415
    from rpd_mpi.objectives.charlm import build_charlm  # noqa: PLC0415
    model = build_charlm(3, width=16, heads=2, context=8, batch_size=3, seed=5)
    w_np = model.init_weights() + 0.3 * np.random.default_rng(9).standard_normal(model.dim)
    w = cp.asarray(w_np)
    t0 = time.perf_counter()
    loss, grad = pipeline_grad(model, w, cp, 11)
    first_s = time.perf_counter() - t0
    loss_np, grad_np = pipeline_grad(model, w_np, np, 11)
    g = cp.asnumpy(grad)
    rng, worst, fails, rows = np.random.default_rng(3), 0.0, 0, []
    for s, sl in enumerate(model.slices):
        stage_worst = 0.0
        for j in rng.choice(np.arange(sl.start, sl.stop), size=probes, replace=False):
            old = float(w_np[j])
            w[int(j)] = old + h
            up = pipeline_grad(model, w, cp, 11)[0]
            w[int(j)] = old - h
            down = pipeline_grad(model, w, cp, 11)[0]
            w[int(j)] = old
            fd = (up - down) / (2 * h)
            fails += abs(fd - g[j]) > 1e-6 * abs(fd) + 1e-9
            stage_worst = max(stage_worst, abs(fd - g[j]) / max(abs(fd), abs(g[j]), 1e-12))
        rows.append({"stage": s, "probes": probes, "max_rel_error": stage_worst})
        worst = max(worst, stage_worst)
    vs_np = float(np.abs(g - grad_np).max() / np.abs(grad_np).max())
    full = float(np.abs(cp.asnumpy(model.full_gradient(w)) - model.full_gradient(w_np)).max())
    return {"pass": bool(fails == 0 and vs_np < 1e-10), "max_rel_error": worst,
            "failed_probes": int(fails), "rows": rows, "loss_cupy": loss, "loss_numpy": loss_np,
            "cupy_vs_numpy_rel": vs_np, "full_gradient_abs_diff": full,
            "first_call_s": first_s, "dtype": str(grad.dtype)}


def copy_rates(cp: Any, sizes: list[float], reps: int = 10) -> list[dict[str, Any]]:
    """One process, one message of each size (GB/s = 1e9 B/s). D2H, H2D and D2D are timed
    alike: `reps` asynchronous copies queued on one non-blocking stream (D2H into and H2D
    from pinned memory), then one synchronize, so the three columns compare. D2H+sync puts
    a synchronize after each copy, as the staged send must before its Isend."""
    from rpd_mpi.mpi.pinned import pinned_array  # noqa: PLC0415
    rows = []
    for mib in sizes:
        n = max(1, int(mib * 2 ** 20 / 8))
        src, dst = cp.ones(n), cp.empty(n)
        host, stream = pinned_array(cp, (n,), "float64"), cp.cuda.Stream(non_blocking=True)
        cp.cuda.get_current_stream().synchronize()      # `ones` has run before any copy
        ops = {"D2H": (lambda: src.get(stream=stream, out=host, blocking=False), False),
               "H2D": (lambda: dst.set(host, stream=stream), False),
               "D2D": (lambda: dst.data.copy_from_device_async(src.data, n * 8, stream),
                       False),
               "D2H+sync": (lambda: src.get(stream=stream, out=host, blocking=False), True)}
        row: dict[str, Any] = {"MiB": mib}
        for name, (op, each) in ops.items():
            op()
            stream.synchronize()                         # warm up
            t0 = time.perf_counter()
            for _ in range(reps):
                op()
                if each:
                    stream.synchronize()
            stream.synchronize()
            row[name] = n * 8 * reps / (time.perf_counter() - t0) / 1e9
        rows.append(row)
    return rows


# ----- b. training runs --------------------------------------------------------------------

def run_ranks(launcher: list[str], n: int, args: list[str], env: dict[str, str],
              limit: float) -> subprocess.CompletedProcess:
    cmd = [*launcher, "-n", str(n), sys.executable, "-m", "mpi4py", *args]
    limit = min(limit, DEADLINE[0] - time.monotonic())
    if limit < 15:
        return subprocess.CompletedProcess(cmd, 124, "", "skipped: the --budget is spent")
    return subprocess.run(["timeout", "-k", "10", str(int(limit)), *cmd], capture_output=True,
                          text=True, env=env, cwd=REPO)


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def train_run(launcher: list[str], env: dict[str, str], out: Path, device: str,
              transport: str, flags: list[str], limit: float) -> dict[str, Any]:
    gpu = ["--transport", transport] if device == "cuda" else []
    args = ["-m", "rpd_mpi", "train", "--device", device, *gpu, "--method", "pd",
            "--objective", "charlm", "--stages", "3", *flags, "--out", str(out), "--json"]
    t0 = time.perf_counter()
    res = run_ranks(launcher, 3, args, env, limit)
    row: dict[str, Any] = {"device": device, "transport": transport if gpu else "-",
                           "launch_s": time.perf_counter() - t0, "rc": res.returncode}
    if res.returncode != 0:
        row["error"] = (res.stderr or res.stdout).strip()[-600:]
        return row
    summary = last_json(res.stdout)
    row.update(wall_s=summary["wall_time"], utilization=summary["utilization"])
    row.update(step_times(out))
    return row


def step_times(path: Path) -> dict[str, Any]:
    """Median forward / backward seconds per stage (from the ledger's events) and losses."""
    import numpy as np  # noqa: PLC0415
    from rpd_mpi.ledger.run_file import read_run  # noqa: PLC0415
    from rpd_mpi.records import BWD, FWD  # noqa: PLC0415
    run = read_run(path)
    ev, out = run.events, {}
    for s in range(int(run.attrs["stages"])):
        for op, name in ((FWD, "F"), (BWD, "B")):
            sel = ev[(ev["stage"] == s) & (ev["op"] == op)]
            out[f"{name}{s}_ms"] = float(np.median(sel["end"] - sel["start"]) * 1e3)
    loss = run.updates.loss[np.isfinite(run.updates.loss)]
    out["loss_first"], out["loss_last"] = float(loss[0]), float(loss[-1])
    out["gpus"] = run.attrs.get("gpus", [])
    return out


def equivalence(launcher: list[str], env: dict[str, str], tmp: Path, transport: str,
                limit: float) -> dict[str, Any]:
    """A tiny static PD run on --device cuda against the CPU simulator (final blocks)."""
    import numpy as np  # noqa: PLC0415
    from rpd_mpi.config import RunConfig  # noqa: PLC0415
    from rpd_mpi.ledger.run_file import read_run  # noqa: PLC0415
    from rpd_mpi.build import simulate_run  # noqa: PLC0415
    out = tmp / f"tiny-{transport}.h5"
    row = train_run(launcher, env, out, "cuda", transport, TINY, limit)
    if row["rc"] != 0:
        return row
    run = read_run(out)
    sim = simulate_run(RunConfig.from_dict(run.config))
    rel = max(float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))
              for a, b in zip(run.final_blocks, sim.final_blocks))
    return {**row, "vs_simulator_rel": rel, "pass": rel < 1e-9}


# ----- c. bandwidth (worker runs under mpiexec -n 2) -----------------------------------------

def ping_pong(comm: Any, be: Any, xp: Any, links: Any, shape: tuple[int, ...], reps: int,
              warm: int = 2) -> float:
    """Seconds for `reps` round trips 0 -> 1 -> 0 of one message of `shape` (after `warm`)."""
    from rpd_mpi.mpi.comm import Waiter  # noqa: PLC0415
    waiter, total = Waiter("spin", 120.0), warm + reps
    if comm.stage == 0:
        out = links.send(comm.act_comm, 1, shape, waiter, "ping")
        back = links.recv(comm.grad_comm, 1, shape, total, waiter, "pong")
    else:
        inp = links.recv(comm.act_comm, 0, shape, total, waiter, "ping")
        ret = links.send(comm.grad_comm, 0, shape, waiter, "pong")
    payload = xp.ones(shape)
    be.synchronize()
    comm.barrier()
    t0 = time.perf_counter()
    for i in range(total):
        if i == warm:
            t0 = time.perf_counter()
        if comm.stage == 0:
            out.send(i, payload)
            back.take(i)
            be.synchronize()
            back.release()
        else:
            ret.send(i, inp.take(i))
            inp.release()
    seconds = time.perf_counter() - t0
    (out if comm.stage == 0 else ret).drain()
    comm.barrier()
    return seconds


def bandwidth_worker(kind: str, sizes: list[float], reps_bytes: int) -> None:
    """Ping-pong through the transport's links for each size; rank 0 prints JSON."""
    import numpy as np  # noqa: PLC0415
    from rpd_mpi.mpi import comm as commlib  # noqa: PLC0415
    from rpd_mpi.mpi import comm_gpu  # noqa: PLC0415
    from rpd_mpi.mpi.backend import select  # noqa: PLC0415
    comm = commlib.Comm()
    comm.split(2)
    be = select("cuda", comm_gpu.local_rank(comm.world), None)
    xp = np if kind == "host" else be.xp
    links = comm_gpu.HOST_LINKS if kind == "host" else comm_gpu.make_links(kind, be.xp)
    rows = []
    for mib in sizes:
        shape = (max(1, int(mib * 2 ** 20 / 8)),)
        reps = int(max(3, min(50, reps_bytes // (shape[0] * 8))))
        seconds = ping_pong(comm, be, xp, links, shape, reps)
        rows.append({"MiB": mib, "reps": reps, "round_trip_ms": seconds / reps * 1e3,
                     "GB_s": 2 * shape[0] * 8 * reps / seconds / 1e9})
        if kind != "host":           # the links of this size are gone: give their memory back
            be.xp.get_default_memory_pool().free_all_blocks()
            be.xp.get_default_pinned_memory_pool().free_all_blocks()
    if comm.rank == 0:
        aware, how = comm_gpu.cuda_aware_mpi()
        print(json.dumps({"kind": kind, "rows": rows, "cuda_aware": aware, "how": how,
                          "mpi": commlib.library_version()}))
    comm.barrier()


def bandwidth(launcher: list[str], env: dict[str, str], kind: str, sizes: list[float],
              reps_bytes: int, limit: float) -> dict[str, Any]:
    args = [str(Path(__file__).resolve()), "--bandwidth-worker", kind,
            "--sizes", *map(str, sizes), "--reps-bytes", str(reps_bytes)]
    res = run_ranks(launcher, 2, args, env, limit)
    if res.returncode != 0:
        return {"kind": kind, "error": (res.stderr or res.stdout).strip()[-600:]}
    return last_json(res.stdout)


# ----- d. the report -----------------------------------------------------------------------

def table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v).replace("|", "/").replace("\n", " ")
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def render(state: dict[str, Any]) -> str:
    f = state["facts"]
    out = ["# GPU check (issues 6 and 15)", ""]
    if state["dry"]:
        out += ["**DRY RUN against the numpy mock cupy (tests/fakecupy): no GPU was used; "
                "the numbers below say nothing about a GPU.**", ""]
    out += [f"- date: {state['date']}", f"- host: {state['host']}",
            f"- card: {f.get('card', '?')} ({f.get('devices', '?')} visible, "
            f"{f.get('memory_GiB', '?')} GiB)",
            f"- cupy {f.get('cupy', '?')}, CUDA runtime {f.get('cuda_runtime', '?')}, "
            f"driver {f.get('cuda_driver', '?')}; numba: {f.get('numba', '?')}",
            f"- python {platform.python_version()}; launcher: {state.get('launcher', '?')}",
            f"- MPI: {state.get('mpi', '?')}; CUDA-aware: {state.get('aware', '?')}",
            f"- command: `{state['command']}`; total {state.get('elapsed', 0):.0f} s", ""]
    for title, key in (("a. Gradient check on cupy (float64, charlm S = 3)", "grad"),
                       ("Copy rates in one process (GB/s)", "copies"),
                       ("b. Runs on --device cuda", "runs"),
                       ("c. Bandwidth between 2 ranks (ping-pong, GB/s each way)", "bw")):
        out += [f"## {title}", ""]
        out += [state["sections"].get(key, "(not run)"), ""]
    return "\n".join(out)


def section(state: dict[str, Any], key: str, fn: Callable[[], str]) -> None:
    t0 = time.perf_counter()
    try:
        state["sections"][key] = fn()
    except Exception:          # noqa: BLE001  (write it down, go on with the next section)
        state["sections"][key] = "FAILED:\n\n```\n" + traceback.format_exc()[-2000:] + "```"
    state["sections"][key] += f"\n\n({time.perf_counter() - t0:.1f} s)"
    state["elapsed"] = time.perf_counter() - state["t0"]
    save(state)


def save(state: dict[str, Any]) -> None:
    out = Path(state["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(state))
    out.with_suffix(".json").write_text(json.dumps(state["raw"], indent=1, default=str))


# ----- the sections, wired --------------------------------------------------------------------

def do_grad(state: dict[str, Any], cp: Any) -> str:
    r = gradient_check(cp)
    state["raw"]["grad"] = r
    verdict = "PASS" if r["pass"] else "FAIL"
    return (f"**{verdict}**: max relative error {r['max_rel_error']:.2e} over "
            f"{3 * r['rows'][0]['probes']} central differences (h = 1e-5; pass: |fd - g| <= "
            f"1e-6 |fd| + 1e-9, {r['failed_probes']} failed); cupy vs numpy gradient "
            f"{r['cupy_vs_numpy_rel']:.1e} (relative to max |g|); full gradient "
            f"max |diff| {r['full_gradient_abs_diff']:.1e}; loss {r['loss_cupy']:.6f} "
            f"(numpy {r['loss_numpy']:.6f}); first call {r['first_call_s']:.1f} s "
            f"(kernel compilation)\n\n" + table(r["rows"], ["stage", "probes", "max_rel_error"]))


def do_copies(state: dict[str, Any], cp: Any, sizes: list[float]) -> str:
    rows = copy_rates(cp, sizes)
    state["raw"]["copies"] = rows
    return (table(rows, ["MiB", "D2H", "H2D", "D2D", "D2H+sync"]) +
            "\n\nD2H, H2D, D2D: 10 asynchronous copies of one message queued on one "
            "non-blocking stream (D2H into, H2D from pinned memory), then one synchronize. "
            "D2H+sync: a synchronize after each D2H, as the staged send does before its "
            "Isend.")


def do_runs(state: dict[str, Any], p: dict[str, Any], tmp: Path) -> str:
    launcher, env, kinds = state["launcher_cmd"], state["env"], state["transports"]
    eq = [equivalence(launcher, env, tmp, k, 150) for k in kinds]
    flags = ["--width", str(p["width"]), "--heads", str(p["heads"]), "--context",
             str(p["context"]), "--batch-size", str(p["batch"]), "--microbatches",
             str(p["micro"]), "--lr", "0.01", "--eval-every", "8"]
    runs = [train_run(launcher, env, tmp / f"lm-{k}.h5", "cuda", k, flags, 200) for k in kinds]
    runs.append(train_run(launcher, env, tmp / "lm-cpu.h5", "cpu", "-", flags, 200))
    state["raw"]["equivalence"], state["raw"]["runs"] = eq, runs
    keys = ["device", "transport", "rc", "wall_s", "utilization"] + [
        f"{o}{s}_ms" for s in range(3) for o in "FB"] + ["loss_first", "loss_last"]
    text = ("Static PD equivalence (tiny charlm, S = 3, 8 microbatches): --device cuda vs "
            "the CPU simulator, max relative difference of the final blocks\n\n"
            + table(eq, ["transport", "rc", "vs_simulator_rel", "pass", "error"])
            + f"\n\ncharlm width {p['width']}, heads {p['heads']}, context {p['context']}, "
            f"batch {p['batch']}, S = 3, {p['micro']} microbatches, static PD, 3 ranks on "
            f"one node; F/B = median op time per stage (ms)\n\n" + table(runs, keys))
    errors = [r for r in eq + runs if r.get("error")]
    for r in errors:
        text += f"\n\n{r['device']}/{r['transport']} failed:\n\n```\n{r['error']}\n```"
    return text


def do_bandwidth(state: dict[str, Any], p: dict[str, Any]) -> str:
    launcher, env = state["launcher_cmd"], state["env"]
    results = [bandwidth(launcher, env, k, p["sizes"], p["reps_bytes"], 150)
               for k in ("host", "staged", "ipc")]
    aware = results[1].get("cuda_aware")
    state["aware"] = f"{aware} ({results[1].get('how', '?')})"
    state["mpi"] = results[1].get("mpi", results[0].get("mpi", state.get("mpi", "?")))
    if aware:
        results.append(bandwidth(launcher, env, "direct", p["sizes"], p["reps_bytes"], 150))
        state["transports"].append("direct")
    state["raw"]["bandwidth"] = results
    rows = {}
    for res in results:
        for r in res.get("rows", []):
            rows.setdefault(r["MiB"], {"MiB": r["MiB"]})[res["kind"]] = r["GB_s"]
    kinds = [r["kind"] for r in results]
    text = table(list(rows.values()), ["MiB", *kinds])
    text += ("\n\nEach cell: bytes of one message x 2 x round trips / seconds, ping-pong "
             "between 2 ranks through the links the runtime uses. host = numpy buffers "
             "through comm_links.SendLink/RecvLink (the MPI baseline); staged = D2H into pinned "
             "memory (its event synchronized before the Isend), host MPI, H2D; ipc = "
             "device-to-device into the peer's ring + a small MPI message; direct = device "
             "buffers to MPI.")
    if not aware:
        text += f" direct: not run, the MPI library is not CUDA-aware ({state['aware']})."
    for res in results:
        if "error" in res:
            text += f"\n\n{res['kind']} failed:\n\n```\n{res['error']}\n```"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="Markdown report (default docs/gpu-check.md; "
                    "dry run: a temporary file)")
    ap.add_argument("--dry-run", action="store_true", help="mock cupy, tiny sizes")
    ap.add_argument("--budget", type=float, default=360.0, help="seconds after which no "
                    "rank job starts (default 360)")
    ap.add_argument("--bandwidth-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=float, nargs="+", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reps-bytes", type=int, default=FULL["reps_bytes"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bandwidth_worker:
        bandwidth_worker(args.bandwidth_worker, args.sizes, args.reps_bytes)
        return 0
    p = DRY if args.dry_run else FULL
    DEADLINE[0] = time.monotonic() + args.budget
    out = args.out or (os.path.join(tempfile.gettempdir(), "gpu-check-dry.md") if args.dry_run
                       else str(REPO / "docs" / "gpu-check.md"))
    state: dict[str, Any] = {
        "dry": args.dry_run, "out": out, "t0": time.perf_counter(), "sections": {},
        "raw": {}, "facts": {}, "host": socket.gethostname(), "transports": ["staged", "ipc"],
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python3", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])])}
    try:
        cp = load_cupy(args.dry_run)
        state["facts"] = state["raw"]["facts"] = device_facts(cp)
    except Exception:          # noqa: BLE001  (no cupy or no GPU: say so in the report)
        state["sections"]["grad"] = "FAILED (cupy):\n\n```\n" + traceback.format_exc() + "```"
        state["elapsed"] = time.perf_counter() - state["t0"]
        save(state)
        print(f"gpu_check: cupy or the GPU is not usable; wrote {out}")
        return 2
    state["env"] = child_env(args.dry_run)
    section(state, "grad", lambda: do_grad(state, cp))
    section(state, "copies", lambda: do_copies(state, cp, p["sizes"]))
    state["launcher_cmd"], state["launcher"], state["mpi"] = find_launcher(state["env"])
    if state["launcher_cmd"] is None:
        state["sections"]["runs"] = state["sections"]["bw"] = f"not run: {state['launcher']}"
    else:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
            section(state, "bw", lambda: do_bandwidth(state, p))
            section(state, "runs", lambda: do_runs(state, p, Path(tmp)))
    save(state)
    print(f"gpu_check: wrote {out} ({state['elapsed']:.0f} s)")
    grad_ok = state["raw"].get("grad", {}).get("pass", False)
    return 0 if grad_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
