"""The character LM: finite-difference gradient checks of every layer and of whole pipelines
(default and partitioned stages, float64 and float32), the stage contract (stash copies, reused
communication buffers), text batches, sizes, and training in the simulator (the loss falls on
the generated corpus, in float64 and in float32)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from rpd_mpi.ledger.run_file import read_run

from rpd_mpi.objectives import layers as L
from rpd_mpi.objectives.charlm import stage_gradient
from rpd_mpi.objectives.charlm import PRESETS, CharLM, build_charlm, parameter_count, stage_layout
from rpd_mpi.objectives.corpus import build_vocab, encode, generate_corpus
from rpd_mpi.schedule.generate import generate
from rpd_mpi.engines.sim import simulate

RTOL, ATOL = 1e-6, 1e-9
#: dtype -> (finite-difference step, rtol, atol) of the gradient checks: float32 rounds the
#: loss at ~1e-7 relative, so it needs a larger step and looser tolerances.
FD = {"float64": (1e-5, RTOL, ATOL), "float32": (1e-2, 3e-2, 2e-3)}
B, T, C, H = 2, 5, 8, 2


def fd_check(fun: Callable[[], float], x: np.ndarray, grad: np.ndarray, rng: np.random.Generator,
             probes: int = 12, h: float = 1e-5, rtol: float = RTOL, atol: float = ATOL) -> None:
    """Central differences of fun() at `probes` random entries of x (perturbed in place)."""
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    assert flat.base is x or flat is x or np.shares_memory(flat, x)
    for j in rng.choice(flat.size, size=min(probes, flat.size), replace=False):
        old = flat[j]
        flat[j] = old + h
        up = fun()
        flat[j] = old - h
        down = fun()
        flat[j] = old
        fd = (up - down) / (2 * h)
        assert abs(fd - gflat[j]) <= rtol * abs(fd) + atol, (j, fd, gflat[j])


def rand(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return scale * rng.standard_normal(shape)


def block_params(rng: np.random.Generator, c: int = C) -> dict[str, np.ndarray]:
    p = {name: rand(rng, *shape) for name, shape in stage_layout("block", c, T, 1)}
    p["ln1_g"] += 1.0
    p["ln2_g"] += 1.0
    return p


def test_layernorm_gradient() -> None:
    rng = np.random.default_rng(0)
    x, g, b, r = rand(rng, B, T, C, scale=2.0), rand(rng, C) + 1, rand(rng, C), rand(rng, B, T, C)
    fun = lambda: float((L.layernorm_forward(x, g, b)[0] * r).sum())  # noqa: E731
    gx, gg, gb = L.layernorm_backward(r, x, g, L.layernorm_forward(x, g, b)[1])
    for arr, grad in ((x, gx), (g, gg), (b, gb)):
        fd_check(fun, arr, grad, rng)


def test_affine_and_gelu_gradients() -> None:
    rng = np.random.default_rng(1)
    x, w, b, r = rand(rng, B, T, C), rand(rng, C, 3), rand(rng, 3), rand(rng, B, T, 3)
    fun = lambda: float((L.affine_forward(x, w, b) * r).sum())  # noqa: E731
    for arr, grad in zip((x, w, b), L.affine_backward(r, x, w)):
        fd_check(fun, arr, grad, rng)
    u, r = rand(rng, B, T, C, scale=2.0), rand(rng, B, T, C)
    fd_check(lambda: float((L.gelu_forward(u) * r).sum()), u, L.gelu_backward(u, r), rng)


def test_embedding_gradient() -> None:
    rng = np.random.default_rng(2)
    wte, wpe = rand(rng, 4, C), rand(rng, T + 3, C)
    ids, r = rng.integers(4, size=(B, T)), rand(rng, B, T, C)
    fun = lambda: float((L.embedding_forward(wte, wpe, ids) * r).sum())  # noqa: E731
    g_wte, g_wpe = L.embedding_backward(ids, r, 4, T + 3)
    fd_check(fun, wte, g_wte, rng, probes=32)
    fd_check(fun, wpe, g_wpe, rng, probes=32)


def test_attention_gradient_and_causality() -> None:
    rng = np.random.default_rng(3)
    qkv, r = rand(rng, B, T, 3 * C, scale=1.0), rand(rng, B, T, C)
    fun = lambda: float((L.attention_forward(qkv, H)[0] * r).sum())  # noqa: E731
    y, att = L.attention_forward(qkv, H)
    fd_check(fun, qkv, L.attention_backward(r, qkv, att, H), rng, probes=40)
    later = qkv.copy()
    later[:, -1] += 1.0                       # the last position must not change earlier ones
    assert np.array_equal(L.attention_forward(later, H)[0][:, :-1], y[:, :-1])


@pytest.mark.parametrize("part", ["attention", "mlp", "block"])
def test_block_gradients(part: str) -> None:
    rng = np.random.default_rng(4)
    x, p, r = rand(rng, B, T, C, scale=1.0), block_params(rng), rand(rng, B, T, C)
    forward = {"attention": lambda: L.attention_sublayer_forward(x, p, H)[0],
               "mlp": lambda: L.mlp_sublayer_forward(x, p)[0],
               "block": lambda: L.block_forward(x, p, H)[0]}[part]
    grads: dict[str, np.ndarray] = {}
    if part == "attention":
        m = L.attention_sublayer_forward(x, p, H)[1]
        g_x = L.attention_sublayer_backward(r, x, p, H, m, grads)
    elif part == "mlp":
        g_x = L.mlp_sublayer_backward(r, x, p, L.mlp_sublayer_forward(x, p)[1], grads)
    else:
        g_x, grads = L.block_backward(x, p, H, r)
    fun = lambda: float((forward() * r).sum())  # noqa: E731
    fd_check(fun, x, g_x, rng)
    for name, grad in grads.items():
        fd_check(fun, p[name], grad, rng, probes=6)
    assert len(grads) == (12 if part == "block" else 6)


def test_head_and_cross_entropy_gradient() -> None:
    rng = np.random.default_rng(5)
    x, targets = rand(rng, B, T, C, scale=1.5), rng.integers(6, size=(B, T))
    p = {"lnf_g": rand(rng, C) + 1, "lnf_b": rand(rng, C), "head_w": rand(rng, C, 6)}
    fun = lambda: L.cross_entropy(L.head_forward(x, p)[0], targets)[0]  # noqa: E731
    loss, g_logits = L.cross_entropy(L.head_forward(x, p)[0], targets)
    g_x, grads = L.head_backward(x, p, g_logits)
    fd_check(fun, x, g_x, rng)
    for name, grad in grads.items():
        fd_check(fun, p[name], grad, rng)


# ----- whole models --------------------------------------------------------------------------

def small_model(stages: int = 3, **kw: object) -> CharLM:
    args = dict(width=8, heads=2, context=6, batch_size=3, seed=5)
    return build_charlm(stages, **{**args, **kw})


def perturbed_weights(model: CharLM, seed: int = 9) -> np.ndarray:
    """Init plus noise, so that every parameter matters in the gradient checks."""
    return model.init_weights() + 0.3 * np.random.default_rng(seed).standard_normal(model.dim)


def pipeline(model: CharLM, w: np.ndarray, batch: int) -> tuple[float, np.ndarray]:
    """Loss of batch `batch` through the stage modules and the stitched block gradients."""
    return stage_gradient(model, w, batch)


@pytest.mark.parametrize("stages", [3, 4])
def test_pipeline_gradient_every_stage(stages: int) -> None:
    model, rng = small_model(stages), np.random.default_rng(stages)
    w = perturbed_weights(model)
    loss, grad = pipeline(model, w, batch=11)
    for sl in model.slices:
        fd_check(lambda: pipeline(model, w, 11)[0], w[sl], grad[sl], rng, probes=15)


#: (stages, layers, partition): all units on one stage; embedding + block and block + head;
#: blocks together in the middle; an uneven 4-stage split with embedding + block, block + head
PARTITIONS = [(1, 2, None), (2, 2, (2, 2)), (3, 3, (1, 3, 1)), (4, 4, (2, 1, 2, 1))]


@pytest.mark.parametrize("stages,layers,partition", PARTITIONS)
def test_partitioned_stage_gradients(stages: int, layers: int,
                                     partition: tuple[int, ...] | None) -> None:
    model = small_model(stages, layers=layers, partition=partition)
    rng = np.random.default_rng(stages)
    assert model.stages == stages and sum(model.partition) == layers + 2
    w = perturbed_weights(model)
    loss, grad = pipeline(model, w, batch=11)
    for sl in model.slices:
        fd_check(lambda: pipeline(model, w, 11)[0], w[sl], grad[sl], rng, probes=15)
    one_per_stage = small_model(layers + 2)           # the same model, one unit per stage
    assert np.array_equal(model.init_weights(), one_per_stage.init_weights())
    loss1, grad1 = pipeline(one_per_stage, w, batch=11)
    assert loss == loss1 and np.array_equal(grad, grad1)
    assert model.stage_parameters() == [sl.stop - sl.start for sl in model.slices]
    assert sum(model.stage_parameters()) == model.dim == one_per_stage.dim


def test_float32_gradients_and_dtypes() -> None:
    model = small_model(2, layers=2, partition=(2, 2), dtype="float32")
    w = (model.init_weights() + 0.3 * np.random.default_rng(9).standard_normal(model.dim)
         ).astype(np.float32)
    loss, grad = pipeline(model, w, batch=11)
    assert w.dtype == grad.dtype == np.float32
    a_out, cache = model.make_stage(0).forward(w[model.slices[0]], None, 11)
    assert a_out.dtype == np.float32
    h, rtol, atol = FD["float32"]
    rng = np.random.default_rng(1)
    for sl in model.slices:
        fd_check(lambda: pipeline(model, w, 11)[0], w[sl], grad[sl], rng, probes=15, h=h,
                 rtol=rtol, atol=atol)
    ref = small_model(2, layers=2, partition=(2, 2))
    loss64, grad64 = pipeline(ref, w.astype(np.float64), batch=11)
    assert abs(loss - loss64) < 1e-5 and np.abs(grad - grad64).max() < 1e-4
    assert model.full_gradient(w.astype(np.float64)).dtype == np.float64   # like its input


def test_full_objective_and_gradient() -> None:
    model, rng = small_model(3), np.random.default_rng(7)
    w = perturbed_weights(model)
    fd_check(lambda: model.full_objective(w), w, model.full_gradient(w), rng, probes=30)
    w0 = model.init_weights()
    assert model.full_objective(w0) == pytest.approx(np.log(len(model.vocab)), rel=0.05)


def test_cache_survives_reused_communication_buffer() -> None:
    """a_in and g_out are buffers that the runtime reuses after the call returns."""
    model = small_model(4)
    w = perturbed_weights(model)
    mods = [model.make_stage(s) for s in range(4)]
    a0, _ = mods[0].forward(w[model.slices[0]], None, 3)
    for s in (1, 3):
        buf = a0.copy() if s == 1 else mods[2].forward(
            w[model.slices[2]], mods[1].forward(w[model.slices[1]], a0, 3)[0], 3)[0]
        a_out, cache = mods[s].forward(w[model.slices[s]], buf, 3)
        g_out = mods[s].loss(a_out, 3)[1] if s == 3 else np.ones_like(a_out)
        expect = mods[s].backward(w[model.slices[s]], cache, g_out.copy(), 3)
        buf[...] = 123.0                         # the next message lands in the buffer
        a_out2, cache2 = mods[s].forward(w[model.slices[s]], buf, 4)
        got = mods[s].backward(w[model.slices[s]], cache, g_out, 3)
        assert all(np.array_equal(e, g) for e, g in zip(expect, got))
        assert not any(np.shares_memory(c, buf) for c in cache) and \
            not np.shares_memory(a_out, buf)


def test_stage_forward_does_not_alias_or_write_weights() -> None:
    model = small_model(3)
    w = perturbed_weights(model)
    frozen = w.copy()
    pipeline(model, w, 0)
    assert np.array_equal(w, frozen)
    view = model.unit_layouts[1].unpack(w[model.unit_slices[1]])["attn_w"]
    assert np.shares_memory(view, w)             # unpack gives views, not copies


def test_batches_are_seeded_windows_of_the_corpus() -> None:
    a, b = small_model(3, seed=1), small_model(4, seed=1)
    x1, y1 = a.make_stage(0).data.batch(17)
    x2, y2 = b.data.batch(17)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.array_equal(x1[:, 1:], y1[:, :-1]) and x1.shape == (3, 6)
    assert not np.array_equal(a.data.batch(18)[0], x1)
    assert not np.array_equal(small_model(3, seed=2).data.batch(17)[0], x1)
    text = "".join(a.vocab[i] for i in np.concatenate([x1[0], y1[0, -1:]]))
    assert text in generate_corpus()


def test_sizes_layout_and_validation() -> None:
    model = small_model(5)
    assert model.dim == parameter_count(5, 8, 6, len(model.vocab)) == model.slices[-1].stop
    assert model.activation_shape(0) == model.activation_shape(4) == (3, 6, 8)
    assert parameter_count(16, PRESETS["paper"]["width"], PRESETS["paper"]["context"],
                           65) == 11_123_200
    assert np.array_equal(model.init_weights(), small_model(5).init_weights())
    with pytest.raises(RuntimeError, match="not the last stage"):
        model.make_stage(1).loss(np.zeros((3, 6, len(model.vocab))), 0)
    with pytest.raises(ValueError, match="stage must be in"):
        model.make_stage(5)
    with pytest.raises(ValueError, match="needs layers"):
        build_charlm(2)
    with pytest.raises(ValueError, match="at least 5 layers"):
        build_charlm(7, layers=4)
    with pytest.raises(ValueError, match="sums to 5 units; the model has 6"):
        build_charlm(3, layers=4, partition=(2, 2, 1))
    with pytest.raises(ValueError, match="2 entries for 3 stages"):
        build_charlm(3, layers=4, partition=(3, 3))
    with pytest.raises(ValueError, match="at least one unit"):
        build_charlm(3, layers=4, partition=(0, 3, 3))
    with pytest.raises(ValueError, match="dtype"):
        build_charlm(3, dtype="float16")
    assert parameter_count(4, 8, 6, 7, n_layers=6) == small_model(
        4, layers=6, text="abcdefg" * 20).dim
    with pytest.raises(ValueError, match="divide width"):
        build_charlm(3, width=10, heads=3)
    with pytest.raises(ValueError, match="characters"):
        build_charlm(3, context=8, text="abc")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_charlm(3, text="hello world" * 10, vocab=["h", "e"])
    vocab = build_vocab("hello world")
    assert vocab == sorted(vocab) and encode("hello", vocab).tolist() == [3, 2, 4, 4, 5]


def test_pd_simulation_trains_on_generated_corpus() -> None:
    model = build_charlm(3, width=32, heads=2, context=32, batch_size=8, seed=0)
    trace = simulate(generate("pd", 3, 40), model, 0.1, eval_every=20)
    loss = trace.updates.loss[trace.updates.stage == 2]
    assert loss.size == 40 and np.isfinite(loss).all()
    assert loss[-10:].mean() < loss[:10].mean() - 0.3
    obj = trace.objective.value
    assert obj[-1] < obj[0] - 0.5
    assert trace.final_weights.shape == (model.dim,)


def test_float32_pd_simulation_loss_falls_on_two_stages() -> None:
    model = build_charlm(2, width=32, heads=2, context=32, batch_size=8, seed=0, layers=2,
                         partition=(2, 2), dtype="float32")
    assert model.init_weights().dtype == np.float32
    trace = simulate(generate("pd", 2, 40), model, 0.1, eval_every=20)
    loss = trace.updates.loss[trace.updates.stage == 1]
    assert loss.size == 40 and np.isfinite(loss).all()
    assert loss[-10:].mean() < loss[:10].mean() - 0.3
    assert trace.objective.value[-1] < trace.objective.value[0] - 0.5


# ----- S = 1 and S = 3 on real ranks (the MPI phases run at -n 2 and -n 4) -------------------

BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").exists() else "mpiexec"


@pytest.mark.parametrize("stages,extra", [(1, ["--layers", "2"]),
                                          (3, ["--layers", "3", "--partition", "2,1,2"])])
def test_static_pd_on_ranks_equals_simulator(tmp_path: Path, stages: int,
                                             extra: list[str]) -> None:
    """S = 1 (one process: the sequential baseline on the pipeline's code path) and an
    uneven S = 3, on an mpiexec job of S ranks, equal the simulator to 1e-10 (float64)."""
    args = ["--method", "pd", "--objective", "charlm", "--stages", str(stages),
            "--microbatches", "5", "--width", "16", "--heads", "2", "--context", "8",
            "--batch-size", "2", "--lr", "0.1", "--eval-every", "10", *extra]
    job = subprocess.run(["timeout", "-k", "5", "120", MPIEXEC, "-n", str(stages),
                          sys.executable, "-m", "rpd_mpi", "train", *args, "--out",
                          str(tmp_path / "mpi.h5")], capture_output=True, text=True,
                         timeout=150)
    assert job.returncode == 0, job.stderr
    sim = subprocess.run([sys.executable, "-m", "rpd_mpi", "simulate", *args, "--out",
                          str(tmp_path / "sim.h5")], capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    a, b = read_run(tmp_path / "mpi.h5"), read_run(tmp_path / "sim.h5")
    assert len(a.final_blocks) == stages and a.attrs["engine"] == "mpi"
    for x, y in zip(a.final_blocks, b.final_blocks):
        assert np.abs(x - y).max() <= 1e-10 * max(1.0, np.abs(y).max())
    np.testing.assert_allclose(a.updates.loss[a.updates.stage == stages - 1],
                               b.updates.loss[b.updates.stage == stages - 1], rtol=1e-10)
    assert a.attrs["partition"] == b.attrs["partition"]
