"""A deliberately naive sequential reference for block-linear pipelines (tests only).

Full-history copies of every block, obvious loops, the loss written out by hand; it shares
nothing with the simulator but the model's data (X, y, slices) and the timeline.
"""

from __future__ import annotations

import math

import numpy as np

from rpd_mpi.records import BWD, FWD


def _dot(a, b) -> float:
    total = 0.0
    for x, y in zip(a, b):
        total += float(x) * float(y)
    return total


def _pred_grad(model, p: float, y: float) -> float:
    """d loss / d prediction for one row (before dividing by the batch size)."""
    if model.kind == "squares":
        return p - y
    return 1.0 / (1.0 + math.exp(-p)) - y


def _row_loss(model, p: float, y: float) -> float:
    if model.kind == "squares":
        return 0.5 * (p - y) ** 2
    return max(p, 0.0) + math.log1p(math.exp(-abs(p))) - y * p


def reference_pipeline(tl, model, lr: float, groups: int = 1) -> dict:
    """Run timeline `tl` naively; returns final weights and (stage, mb, version) per update."""
    S, R, b = tl.stages, tl.trajectories, model.batch_size
    copies = groups * R
    hist = [[[np.zeros(sl.stop - sl.start)] for sl in model.slices] for _ in range(copies)]
    rngs = [[np.random.default_rng([model.seed, g, s]) for s in range(S)] for g in range(groups)]
    read, acts, grads, acc = {}, {}, {}, {}
    updates = []
    for t in range(tl.slots):
        for g in range(groups):
            for s in range(S):
                op, mb = int(tl.kind[t, s]), int(tl.mb[t, s])
                if not op:
                    continue
                c = g * R + mb % R
                batch = (g + groups * mb) % model.num_batches
                rows = range(batch * b, (batch + 1) * b)
                cols = range(model.slices[s].start, model.slices[s].stop)
                if op == FWD:
                    v = len(hist[c][s]) - 1
                    w = hist[c][s][v].copy()
                    read[(g, mb, s)] = v
                    prev = acts[(g, mb, s - 1)] if s else [0.0] * b
                    acts[(g, mb, s)] = [prev[i] + _dot(model.X[r, cols.start:cols.stop], w)
                                        for i, r in enumerate(rows)]
                    continue
                v = read[(g, mb, s)]
                w_read = hist[c][s][v]
                if s == S - 1:
                    g_out = [_pred_grad(model, acts[(g, mb, s)][i], model.y[r]) / b
                             for i, r in enumerate(rows)]
                else:
                    g_out = grads[(g, mb, s + 1)]
                grads[(g, mb, s)] = g_out
                gw = np.array([sum(g_out[i] * model.X[r, col] for i, r in enumerate(rows))
                               for col in cols])
                gw = gw + model.lam * w_read
                if model.noise:
                    gw = gw + model.noise * rngs[g][s].standard_normal(gw.size)
                if tl.flush:
                    acc.setdefault((c, s), []).append(gw)
                    if not (mb % tl.flush == tl.flush - 1 or mb == tl.microbatches - 1):
                        continue
                    gw = sum(acc.pop((c, s))) / (mb % tl.flush + 1)
                loss = sum(_row_loss(model, acts[(g, mb, S - 1)][i], model.y[r])
                           for i, r in enumerate(rows)) / b
                current = hist[c][s][-1]
                hist[c][s].append(current - lr * gw)
                updates.append((s, g, mb, v, loss))
        if t in tl.averages:
            for s in range(S):
                mean = sum(hist[c][s][-1] for c in range(copies)) / copies
                for c in range(copies):
                    hist[c][s][-1] = mean.copy()
    final = np.concatenate([sum(hist[c][s][-1] for c in range(copies)) / copies
                            for s in range(S)])
    return {"weights": final, "updates": updates}


def reference_rpd(model, lr: float, plan) -> dict:
    """Algorithm 1 with every global iterate kept: z_k built from the full history."""
    iterates = [np.zeros(model.dim)]
    b = model.batch_size
    for k in range(plan.stage.size):
        s_k, batch = int(plan.stage[k]), int(plan.batch[k])
        z = np.zeros(model.dim)
        for i, sl in enumerate(model.slices):
            z[sl] = iterates[k - int(plan.delays[k, i])][sl]
        rows = range(batch * b, (batch + 1) * b)
        g_out = [_pred_grad(model, _dot(model.X[r], z), model.y[r]) / b for r in rows]
        sl = model.slices[s_k]
        gw = np.array([sum(g_out[i] * model.X[r, col] for i, r in enumerate(rows))
                       for col in range(sl.start, sl.stop)]) + model.lam * z[sl]
        w = iterates[-1].copy()
        w[sl] = w[sl] - lr * gw
        iterates.append(w)
    return {"weights": iterates[-1]}
