"""Transformer layers with hand-derived backward passes, for an array module `xp`.

Owns the math of the character language model: token + position embedding, LayerNorm,
affine maps, causal multi-head self-attention, the GELU MLP, the pre-LN transformer block,
the final LayerNorm + LM head and softmax cross-entropy, and `units_forward` /
`units_backward`, which run a sequence of those units (a partitioned stage, or the whole
model). Every `*_forward` has a `*_backward` derived by hand (checked against finite
differences in tests/test_charlm.py).

Arrays are numpy or cupy; the module of the inputs decides (`array_module`). On numpy the
fused numba kernels of `rpd_mpi.objectives.kernels_lm` run where they are faster, their references
otherwise. Activations are (batch, context, width); parameters come as dicts of named views
into a stage's flat block (see `rpd_mpi.objectives.charlm`). A block's backward recomputes
its forward from the stashed input (what PipeDream does), so nothing but the input is kept
between a forward and its backward.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from rpd_mpi.objectives.kernels_lm import array_module, kernel

Array = Any                 # numpy.ndarray or cupy.ndarray
Params = dict[str, Array]   # parameter name -> view into the stage's flat block
LN_EPS = 1e-5


def _rows(x: Array) -> Array:
    """x as a 2-D (rows, last axis) array; a view when x is contiguous."""
    return x.reshape(-1, x.shape[-1])


# ----- embedding ---------------------------------------------------------------------------

def embedding_forward(wte: Array, wpe: Array, ids: Array) -> Array:
    """wte[ids] + wpe[:context]; ids (b, t) int -> (b, t, c)."""
    return wte[ids] + wpe[: ids.shape[1]]


def embedding_backward(ids: Array, g: Array, vocab: int, context: int
                       ) -> tuple[Array, Array]:
    """(g_wte (vocab, c), g_wpe (context, c)) for the upstream gradient g (b, t, c)."""
    xp = array_module(g)
    g_wte = kernel("embedding_backward", xp)(ids.reshape(-1), _rows(g), vocab)
    g_wpe = xp.zeros((context, g.shape[-1]), dtype=g.dtype)
    g_wpe[: ids.shape[1]] = g.sum(axis=0)
    return g_wte, g_wpe


# ----- LayerNorm, affine, GELU -----------------------------------------------------------

def layernorm_forward(x: Array, g: Array, b: Array) -> tuple[Array, tuple[Array, Array]]:
    """(y, (mean, rstd)) of LayerNorm over the last axis."""
    y, mean, rstd = kernel("layernorm_forward", array_module(x))(_rows(x), g, b, LN_EPS)
    return y.reshape(x.shape), (mean, rstd)


def layernorm_backward(gy: Array, x: Array, g: Array, stats: tuple[Array, Array]
                       ) -> tuple[Array, Array, Array]:
    """(gx, g_gain, g_bias) of LayerNorm, from the input x and its (mean, rstd)."""
    gx, gg, gb = kernel("layernorm_backward", array_module(x))(_rows(gy), _rows(x), g, *stats)
    return gx.reshape(x.shape), gg, gb


def affine_forward(x: Array, w: Array, b: Array | None) -> Array:
    """x @ w (+ b); x (..., n), w (n, m)."""
    y = x @ w
    if b is not None:
        y += b
    return y


def affine_backward(gy: Array, x: Array, w: Array) -> tuple[Array, Array, Array]:
    """(gx, gw, gb) of x @ w + b (gb also when the map has no bias: then ignore it)."""
    g2 = _rows(gy)
    return gy @ w.T, _rows(x).T @ g2, g2.sum(axis=0)


def gelu_forward(u: Array) -> Array:
    return kernel("gelu_forward", array_module(u))(u.reshape(-1)).reshape(u.shape)


def gelu_backward(u: Array, ga: Array) -> Array:
    fn = kernel("gelu_backward", array_module(u))
    return fn(u.reshape(-1), ga.reshape(-1)).reshape(u.shape)


# ----- causal multi-head self-attention ---------------------------------------------------

def _split_heads(qkv: Array, heads: int) -> tuple[Array, Array, Array]:
    """q, k, v of shape (b, h, t, d) from qkv (b, t, 3c)."""
    b, t, c3 = qkv.shape
    parts = qkv.reshape(b, t, 3, heads, c3 // (3 * heads)).transpose(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


def attention_forward(qkv: Array, heads: int) -> tuple[Array, Array]:
    """(y (b, t, c), att (b, h, t, t)): softmax(q k^T / sqrt(d), causal) v, heads merged."""
    q, k, v = _split_heads(qkv, heads)
    b, h, t, d = q.shape
    s = q @ k.swapaxes(-1, -2)
    att = kernel("causal_softmax_forward", array_module(qkv))(
        s.reshape(b * h, t, t), 1.0 / math.sqrt(d)).reshape(b, h, t, t)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, h * d)
    return y, att


def attention_backward(gy: Array, qkv: Array, att: Array, heads: int) -> Array:
    """g_qkv (b, t, 3c) from the gradient gy (b, t, c) of attention_forward's y."""
    xp = array_module(qkv)
    q, k, v = _split_heads(qkv, heads)
    b, h, t, d = q.shape
    gyh = gy.reshape(b, t, h, d).transpose(0, 2, 1, 3)
    g_att = gyh @ v.swapaxes(-1, -2)
    g_s = kernel("causal_softmax_backward", xp)(
        att.reshape(b * h, t, t), g_att.reshape(b * h, t, t),
        1.0 / math.sqrt(d)).reshape(b, h, t, t)
    grads = xp.stack([g_s @ k, g_s.swapaxes(-1, -2) @ q, att.swapaxes(-1, -2) @ gyh])
    return grads.transpose(1, 3, 0, 2, 4).reshape(b, t, 3 * h * d)


# ----- pre-LN transformer block -----------------------------------------------------------

BLOCK_NAMES = ("ln1_g", "ln1_b", "attn_w", "attn_b", "proj_w", "proj_b",
               "ln2_g", "ln2_b", "fc_w", "fc_b", "out_w", "out_b")


def attention_sublayer_forward(x: Array, p: Params, heads: int
                               ) -> tuple[Array, dict[str, Any]]:
    """x + proj(attention(LN1 x)); returns (out, intermediates for the backward)."""
    h1, st1 = layernorm_forward(x, p["ln1_g"], p["ln1_b"])
    qkv = affine_forward(h1, p["attn_w"], p["attn_b"])
    y, att = attention_forward(qkv, heads)
    return x + affine_forward(y, p["proj_w"], p["proj_b"]), dict(st1=st1, h1=h1, qkv=qkv,
                                                                   att=att, y=y)


def attention_sublayer_backward(g_out: Array, x: Array, p: Params, heads: int,
                                m: dict[str, Any], grads: Params) -> Array:
    """g_x of attention_sublayer_forward (residual included); fills grads."""
    g_y, grads["proj_w"], grads["proj_b"] = affine_backward(g_out, m["y"], p["proj_w"])
    g_qkv = attention_backward(g_y, m["qkv"], m["att"], heads)
    g_h1, grads["attn_w"], grads["attn_b"] = affine_backward(g_qkv, m["h1"], p["attn_w"])
    g_x, grads["ln1_g"], grads["ln1_b"] = layernorm_backward(g_h1, x, p["ln1_g"], m["st1"])
    return g_x + g_out


def mlp_sublayer_forward(x: Array, p: Params) -> tuple[Array, dict[str, Any]]:
    """x + out(GELU(fc(LN2 x))); returns (out, intermediates for the backward)."""
    h2, st2 = layernorm_forward(x, p["ln2_g"], p["ln2_b"])
    u = affine_forward(h2, p["fc_w"], p["fc_b"])
    a = gelu_forward(u)
    return x + affine_forward(a, p["out_w"], p["out_b"]), dict(st2=st2, h2=h2, u=u, a=a)


def mlp_sublayer_backward(g_out: Array, x: Array, p: Params, m: dict[str, Any],
                          grads: Params) -> Array:
    """g_x of mlp_sublayer_forward (residual included); fills grads."""
    g_a, grads["out_w"], grads["out_b"] = affine_backward(g_out, m["a"], p["out_w"])
    g_u = gelu_backward(m["u"], g_a)
    g_h2, grads["fc_w"], grads["fc_b"] = affine_backward(g_u, m["h2"], p["fc_w"])
    g_x, grads["ln2_g"], grads["ln2_b"] = layernorm_backward(g_h2, x, p["ln2_g"], m["st2"])
    return g_x + g_out


def block_forward(x: Array, p: Params, heads: int) -> tuple[Array, dict[str, Any]]:
    """The pre-LN block: x2 = attention sublayer(x), out = MLP sublayer(x2)."""
    x2, m_attn = attention_sublayer_forward(x, p, heads)
    out, m_mlp = mlp_sublayer_forward(x2, p)
    return out, {"x2": x2, "attn": m_attn, "mlp": m_mlp}


def block_backward(x: Array, p: Params, heads: int, g_out: Array) -> tuple[Array, Params]:
    """(g_x, parameter gradients) of block_forward, recomputing it from the input x."""
    _, m = block_forward(x, p, heads)
    grads: Params = {}
    g_x2 = mlp_sublayer_backward(g_out, m["x2"], p, m["mlp"], grads)
    return attention_sublayer_backward(g_x2, x, p, heads, m["attn"], grads), grads


# ----- final LayerNorm + LM head, cross-entropy -------------------------------------------

def head_forward(x: Array, p: Params) -> tuple[Array, tuple[Array, Any]]:
    """(logits (b, t, vocab), (LN output, LN stats)): LN_f(x) @ head_w, no bias."""
    h, st = layernorm_forward(x, p["lnf_g"], p["lnf_b"])
    return h @ p["head_w"], (h, st)


def head_backward(x: Array, p: Params, g_logits: Array) -> tuple[Array, Params]:
    """(g_x, {lnf_g, lnf_b, head_w}) of head_forward, recomputing it from x."""
    _, (h, st) = head_forward(x, p)
    g_h, g_head, _ = affine_backward(g_logits, h, p["head_w"])
    g_x, g_g, g_b = layernorm_backward(g_h, x, p["lnf_g"], st)
    return g_x, {"lnf_g": g_g, "lnf_b": g_b, "head_w": g_head}


def cross_entropy(logits: Array, targets: Array) -> tuple[float, Array]:
    """(mean next-character cross-entropy over all (b, t), its gradient wrt logits)."""
    xp = array_module(logits)
    loss, g = kernel("softmax_xent", xp)(_rows(logits), targets.reshape(-1))
    return float(loss), g.reshape(logits.shape)


# ----- units in sequence (a charlm stage, or the whole model) -----------------------------

def units_forward(kinds: Sequence[str], params: Sequence[dict[str, Array]], x: Array | None,
                  ids: Array | None, heads: int) -> tuple[Array, list[Array | None]]:
    """Output of the units in order from input x (None before the embedding; `ids` the token
    ids, needed only then), and each unit's input (kept for the backward)."""
    inputs: list[Array | None] = []
    for kind, p in zip(kinds, params):
        inputs.append(x)
        if kind == "embed":
            x = embedding_forward(p["wte"], p["wpe"], ids)
        elif kind == "block":
            x = block_forward(x, p, heads)[0]
        else:
            x = head_forward(x, p)[0]
    return x, inputs


def units_backward(kinds: Sequence[str], params: Sequence[dict[str, Array]],
                   grads: Sequence[dict[str, Array]], inputs: Sequence[Array | None],
                   g: Array, ids: Array | None, heads: int, vocab: int, context: int
                   ) -> Array | None:
    """Backward through the units in reverse; writes each unit's parameter gradient into the
    views `grads[u]`, returns the gradient of the first unit's input (None: the embedding)."""
    for u in range(len(kinds) - 1, -1, -1):
        kind, p, x = kinds[u], params[u], inputs[u]
        if kind == "embed":
            found = dict(zip(("wte", "wpe"), embedding_backward(ids, g, vocab, context)))
            g = None
        elif kind == "block":
            g, found = block_backward(x, p, heads, g)
        else:
            g, found = head_backward(x, p, g)
        for name, view in grads[u].items():
            view[...] = found[name]
    return g
