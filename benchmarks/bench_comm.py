"""Comm layer benchmarks, under `mpiexec -n 2`:

(a) activation/gradient ping-pong through rpd_mpi's SendLink/RecvLink vs a raw mpi4py
    Send/Recv ping-pong of the same sizes (MiB/s, and the ratio);
(b) the LocalSGD averaging step (`Comm.allreduce_mean`: in-place Allreduce over the stage
    communicator, then the division) vs a raw mpi4py Allreduce of the same size;
(c) measured utilization of a compute-bound balanced S = 2 pipeline (block-linear model with
    a large batch) against the schedule's ideal N / (N + S - 1), for both wait strategies.

    mpiexec -n 2 python benchmarks/bench_comm.py [--sizes-mib 0.001 1 4 16 64] [--micro 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from mpi4py import MPI

from rpd_mpi.mpi.comm import Comm, Waiter
from rpd_mpi.mpi.comm_links import RecvLink, SendLink
from rpd_mpi.config import ObjectiveConfig, RunConfig, RuntimeConfig, ScheduleConfig
from rpd_mpi.ledger.run_file import read_run
from rpd_mpi.ledger.report import summarize
from rpd_mpi.mpi.train import train

WORLD = MPI.COMM_WORLD


def raw_pingpong(a: np.ndarray, iters: int) -> float:
    """`iters` round trips of a plain mpi4py Send/Recv ping-pong on one buffer."""
    WORLD.Barrier()
    t0 = MPI.Wtime()
    for _ in range(iters):
        if WORLD.rank == 0:
            WORLD.Send(a, dest=1, tag=1)
            WORLD.Recv(a, source=1, tag=2)
        else:
            WORLD.Recv(a, source=0, tag=1)
            WORLD.Send(a, dest=0, tag=2)
    return MPI.Wtime() - t0


class LinkPair:
    """One SendLink and one RecvLink to the other rank, as a pipeline stage holds them for
    a whole run: their buffers are allocated once and reused by every round. Each pair has
    communicators of its own (receives are posted ahead with any tag)."""

    def __init__(self, n: int, messages: int, strategy: str) -> None:
        waiter = Waiter(strategy, 60.0)
        self.rank, peer = WORLD.rank, 1 - WORLD.rank
        down, up = WORLD.Dup(), WORLD.Dup()
        out_comm, in_comm = (down, up) if self.rank == 0 else (up, down)
        self.send = SendLink(out_comm, peer, (n,), waiter, "bench")
        self.recv = RecvLink(in_comm, peer, (n,), messages, waiter, "bench")
        self.mb = 0

    def pingpong(self, iters: int) -> float:
        """`iters` round trips: rank 0 sends and takes the reply, rank 1 the other way."""
        send, recv = self.send, self.recv
        WORLD.Barrier()
        t0 = MPI.Wtime()
        for _ in range(iters):
            if self.rank == 0:
                send.send(self.mb, send.buffer())
                recv.take(self.mb)
                recv.release()
            else:
                recv.take(self.mb)
                recv.release()
                send.send(self.mb, send.buffer())
            self.mb += 1
        send.drain()
        return MPI.Wtime() - t0


def bandwidth_table(sizes_mib: list[float], rounds: int = 3) -> None:
    """Per size: one raw buffer and one link pair per wait strategy, allocated up front and
    warmed by an untimed round (first-touch page faults are start-up, not steady state),
    then `rounds` interleaved timed rounds; best of them."""
    if WORLD.rank == 0:
        print(f"{'size MiB':>9s} {'raw MiB/s':>11s} {'spin MiB/s':>11s} {'polite MiB/s':>13s}"
              f" {'spin/raw':>9s} {'polite/raw':>11s}")
    for mib in sizes_mib:
        n = max(1, int(mib * 2 ** 20 / 8))
        iters = max(5, min(2000, int(2 ** 28 / (n * 8))))
        raw = np.ones(n)
        links = {s: LinkPair(n, iters * (rounds + 1), s) for s in ("spin", "polite")}
        raw_pingpong(raw, iters)
        for pair in links.values():
            pair.pingpong(iters)
        best = {k: float("inf") for k in ("raw", "spin", "polite")}
        for _ in range(rounds):
            best["raw"] = min(best["raw"], raw_pingpong(raw, iters))
            for strategy, pair in links.items():
                best[strategy] = min(best[strategy], pair.pingpong(iters))
        rate = {k: 2 * iters * n * 8 / 2 ** 20 / v for k, v in best.items()}
        if WORLD.rank == 0:
            print(f"{mib:9.3f} {rate['raw']:11.0f} {rate['spin']:11.0f} {rate['polite']:13.0f}"
                  f" {rate['spin'] / rate['raw']:9.2f} {rate['polite'] / rate['raw']:11.2f}")


def allreduce_table(sizes_mib: list[float]) -> None:
    comm = Comm()
    comm.split(1)                    # one stage, two groups: the stage communicator is the world
    if WORLD.rank == 0:
        print(f"\n{'size MiB':>9s} {'raw ms':>9s} {'averaging ms':>13s} {'ratio':>7s}")
    for mib in sizes_mib:
        n = max(1, int(mib * 2 ** 20 / 8))
        a, b = np.ones(n), np.empty(n)
        iters = max(3, min(500, int(2 ** 26 / (n * 8))))
        best_raw = best_avg = float("inf")
        for _ in range(3):
            WORLD.Barrier()
            t0 = MPI.Wtime()
            for _ in range(iters):
                WORLD.Allreduce(a, b, op=MPI.SUM)
            best_raw = min(best_raw, (MPI.Wtime() - t0) / iters)
            WORLD.Barrier()
            t0 = MPI.Wtime()
            for _ in range(iters):
                comm.allreduce_mean(a, 2)
            best_avg = min(best_avg, (MPI.Wtime() - t0) / iters)
        if WORLD.rank == 0:
            print(f"{mib:9.3f} {best_raw * 1e3:9.3f} {best_avg * 1e3:13.3f} "
                  f"{best_avg / best_raw:7.2f}")


def utilization_table(micro: int) -> None:
    folder = WORLD.bcast(tempfile.mkdtemp() if WORLD.rank == 0 else None)
    S = 2
    ideal = micro / (micro + S - 1)
    if WORLD.rank == 0:
        print(f"\ncompute-bound S=2 pipeline, N={micro}, ideal N/(N+S-1) = {ideal:.3f}")
        print(f"{'wait':>7s} {'wall s':>8s} {'utilization':>12s} {'of ideal':>9s}")
    for strategy in ("spin", "polite"):
        cfg = RunConfig(schedule=ScheduleConfig(method="pd", stages=S, microbatches=micro),
                        objective=ObjectiveConfig(dim=2 * 1024, examples=4096,
                                                  batch_size=2048),
                        runtime=RuntimeConfig(wait=strategy, timeout=120.0), lr=1e-9,
                        eval_every=micro * S, out=f"{folder}/util-{strategy}.h5")
        t0 = time.perf_counter()
        train(lambda: cfg)
        wall = time.perf_counter() - t0
        if WORLD.rank == 0:
            summary = summarize(read_run(cfg.out))
            u = summary["utilization"]
            print(f"{strategy:>7s} {summary['wall_time']:8.3f} {u:12.3f} {u / ideal:9.3f}"
                  f"   (whole command {wall:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mib", type=float, nargs="+",
                    default=[0.001, 0.0625, 1, 4, 16, 64])
    ap.add_argument("--micro", type=int, default=32)
    args = ap.parse_args()
    if WORLD.size != 2:
        raise SystemExit("run under mpiexec -n 2")
    bandwidth_table(args.sizes_mib)
    allreduce_table(args.sizes_mib)
    utilization_table(args.micro)


if __name__ == "__main__":
    main()
