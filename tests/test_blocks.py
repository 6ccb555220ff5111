"""The shared block-update object and the one meaning of --eval-every (pure tests)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from rpd_mpi.build import simulate_run
from rpd_mpi.config import ObjectiveConfig, RunConfig, ScheduleConfig
from rpd_mpi.engines.blocks import BlockState, FlushBuffer, batch_of
from rpd_mpi.engines.cadence import due, snapshot_every
from rpd_mpi.records import UPDATE_ROW_DTYPE, UpdateRow, row_array, to_updates

PACKAGE = Path(__file__).resolve().parents[1] / "rpd_mpi"


def test_apply_steps_the_block_in_place_and_describes_the_update() -> None:
    w = np.arange(6.0)
    state = BlockState(2, [w[0:3], w[3:6]], 0.5, group=1)
    v = state.read(1, key=7, cache="c")
    state.blocks[1] += 1.0                       # another update lands before B reads the stash
    state.version[1] += 1
    read = state.take(7)
    assert read.version == v == 0 and read.cache == "c" and read.block.tolist() == [3, 4, 5]
    g = np.array([2.0, 0.0, 0.0])
    row = state.apply(1, g, microbatch=7, batch=3, version=read.version, trajectory=1,
                      loss=0.25, start=4.0, end=5.0)
    assert w.tolist() == [0, 1, 2, 3.0, 5, 6]    # the view was updated: 4 - 0.5 * 2 = 3
    assert row == UpdateRow(2, 1, 1, 7, 3, 0, 1, 0.25, 2.0, 4.0, 5.0)
    assert state.version == [0, 2] and state.last_step.tolist() == [1.0, 0.0, 0.0]


def test_flush_accumulates_and_applies_the_mean_once() -> None:
    state = BlockState(0, [np.zeros(2)], 1.0, flush=FlushBuffer(3, 5))
    rows = [state.apply(0, np.array([float(mb), 1.0]), microbatch=mb, batch=mb, version=0)
            for mb in range(5)]
    assert [r is None for r in rows] == [True, True, False, True, False]
    assert state.blocks[0].tolist() == [-(1.0 + 3.5), -2.0]   # mean(0,1,2) then mean(3,4)
    assert state.version == [2]


def test_history_reads_the_block_after_j_global_updates() -> None:
    state = BlockState(0, [np.zeros(1)], 1.0, history=2)
    for k in (0, 3, 4):
        state.apply(0, np.ones(1), microbatch=k, batch=0, version=state.version[0])
    assert [state.read_at(j)[1] for j in (4, 5)] == [2, 3]
    assert state.read_at(4)[0].tolist() == [-2.0] and state.read_at(5)[0].tolist() == [-3.0]
    with pytest.raises(IndexError):
        state.read_at(0)                             # version 0 is older than the 3 kept


def test_end_may_be_a_clock_read_after_the_step() -> None:
    state = BlockState(0, [np.zeros(1)], 1.0)
    row = state.apply(0, np.ones(1), microbatch=0, batch=0, version=0, end=lambda: 9.5)
    assert row is not None and row.end == 9.5 and math.isnan(row.loss)


def test_rows_to_updates_keeps_order_and_fields() -> None:
    rows = row_array([UpdateRow(1, 0, 0, 5, 2, 3, 1, 0.5, 1.5, 0.0, 7.0),
                      UpdateRow(0, 1, 1, 6, 4, 0, 0, 0.25, 2.5, 1.0, 8.0)])
    assert rows.dtype == UPDATE_ROW_DTYPE
    u = to_updates(rows, np.array([[0, 1], [2, 3], [9, 9]]))
    assert u.stage.tolist() == [1, 0] and u.group.tolist() == [0, 1]
    assert u.microbatch.tolist() == [5, 6] and u.time.tolist() == [7.0, 8.0]
    assert u.delays.tolist() == [[0, 1], [2, 3]] and u.delays.dtype == np.int64
    assert len(to_updates(row_array([]), np.zeros((0, 2)))) == 0


def test_batch_rule() -> None:
    assert [batch_of(0, 1, mb, 4) for mb in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [batch_of(1, 2, mb, 5) for mb in range(4)] == [1, 3, 0, 2]


#: The compiled block-linear fast paths (docs/DESIGN.md 4.1) repeat the step inside numba
#: kernels; tests/test_fast_sim.py and tests/test_fast_rpd.py hold them to the BlockState
#: path bit for bit, so they are the only other places allowed.
COMPILED_COPIES = ("objectives/kernels.py",)


def test_one_place_applies_an_sgd_step() -> None:
    """`<something> -= <something with lr>` or `lr * g` on a block: only in engines/blocks.py
    (and its compiled copies, checked bit for bit against it)."""
    places = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                names = {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "")
                         for n in (node.left, node.right)}
                if "lr" in names and not path.match("analysis/theory.py") and \
                        not any(path.match(p) for p in COMPILED_COPIES):
                    places.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert len(places) == 1 and places[0].startswith("engines/blocks.py:"), places


def test_due_and_snapshot_cadence() -> None:
    assert [due(b, a, 4) for b, a in ((0, 3), (3, 4), (4, 7), (7, 9), (0, 0))] == \
        [False, True, False, True, False]
    assert snapshot_every(1, 4) == 1 and snapshot_every(40, 4) == 10 and snapshot_every(3, 4) == 1


def _cfg(method: str, every: int, **sched: int) -> RunConfig:
    return RunConfig(schedule=ScheduleConfig(method=method, stages=4, microbatches=12, **sched),
                     objective=ObjectiveConfig(dim=16, examples=24, batch_size=4),
                     lr=0.05, eval_every=every, out="unused.h5")


@pytest.mark.parametrize("method,sched", [("pd", {}), ("rpd", {}),
                                          ("localsgd", {"trajectories": 2, "local_steps": 2})])
@pytest.mark.parametrize("every", [1, 5, 8])
def test_eval_every_means_block_updates_in_every_engine(method: str, sched: dict[str, int],
                                                        every: int) -> None:
    rec = simulate_run(_cfg(method, every, **sched))
    k = rec.objective.k.tolist()
    K = len(rec.updates)
    assert k[0] == 0 and k[-1] == K
    assert k == sorted(k)
    for prev, cur in zip(k[:-2], k[1:-1]):          # every interior point passed a multiple
        assert due(prev, cur, every), (prev, cur)
    for m in range(every, K + 1, every):            # and every multiple has its point
        assert any(p < m <= c for p, c in zip(k, k[1:])), m
    assert np.isfinite(rec.objective.value).all()
