"""Path integrals of the gradient along each training step: the LCA of every parameter.

LCA_{t,i} = Delta_{t,i} * integral_0^1 dL/dtheta_i(theta_t + s Delta_t) ds, by composite Simpson's rule
(the paper's "RK4") with n = 2 sub-intervals, doubled while the conservation residual
r_t = (L(theta_{t+1}) - L(theta_t)) - sum_i LCA_{t,i} exceeds `tol` and n < `max_splits`.

Cost is what matters, so nothing is evaluated twice: the gradient at theta_{t+1} ends step t and starts
step t+1, and doubling n keeps every gradient already taken. Simpson's weights [1, 4, 2, 4, ..., 2, 4, 1]
make that cheap to track with three running sums per step: the two endpoints, the points that were
midpoints at the current level (weight 4) and all older interior points (weight 2). Doubling moves the
"4" sum into the "2" sum and fills a new "4" sum with the n new midpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

GradFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Rule = Literal["rk4", "first-order"]


@dataclass
class BlockResult:
    """LCA of consecutive steps [start, stop) and the per-step scalars the store keeps beside it."""

    lca: np.ndarray        # float32 [B, P]
    loss: np.ndarray       # float64 [B + 1]: L at each checkpoint theta_start .. theta_stop
    residual: np.ndarray   # float64 [B]: loss change minus the sum of the stored (float32) LCA
    points: np.ndarray     # int32 [B]: gradient evaluations spent on each step
    splits: np.ndarray     # int32 [B]: accepted composite-Simpson n (1 for the first-order rule)


@dataclass
class _Step:
    delta: np.ndarray      # float64 [P]
    ends: np.ndarray       # g(0) + g(1)
    odd: np.ndarray        # sum of the current level's midpoints (weight 4)
    even: np.ndarray       # sum of the older interior points (weight 2)
    n: int = 2


def _lca_and_residual(delta: np.ndarray, mean_grad: np.ndarray, loss_change: float) -> tuple[np.ndarray, float]:
    lca = (delta * mean_grad).astype(np.float32)
    return lca, float(loss_change - lca.sum(dtype=np.float64))


def integrate_block(
    grad_fn: GradFn,
    rows: np.ndarray,
    *,
    rule: Rule = "rk4",
    tol: float = 1e-4,
    max_splits: int = 32,
    points_per_pass: int = 16,
) -> BlockResult:
    """LCA for the steps between consecutive rows of `rows` (checkpoints theta_start .. theta_stop).

    `grad_fn(thetas [K, P] float64) -> (loss [K], grad [K, P])` is the full-split evaluator. Points are
    gathered across several steps before each call so a vmap evaluator fills its K slots.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise ValueError("a block needs at least two checkpoints")
    steps, size = rows.shape[0] - 1, rows.shape[1]
    out = BlockResult(
        lca=np.empty((steps, size), np.float32),
        loss=np.empty(steps + 1, np.float64),
        residual=np.empty(steps, np.float64),
        points=np.zeros(steps, np.int32),
        splits=np.zeros(steps, np.int32),
    )
    theta = rows.astype(np.float64)
    loss0, grad0 = grad_fn(theta[:1])
    out.loss[0], g_start = loss0[0], grad0[0]
    out.points[0] += 1  # the block's first start gradient is the one evaluation no earlier step paid for
    window = max(1, points_per_pass // 2) if rule == "rk4" else max(1, points_per_pass)

    for a in range(0, steps, window):
        b = min(steps, a + window)
        deltas = theta[a + 1:b + 1] - theta[a:b]
        if rule == "first-order":
            loss_end, grad_end = grad_fn(theta[a + 1:b + 1])
            for j, t in enumerate(range(a, b)):
                out.loss[t + 1] = loss_end[j]
                out.lca[t], out.residual[t] = _lca_and_residual(deltas[j], g_start, loss_end[j] - out.loss[t])
                out.points[t] += 1
                out.splits[t] = 1
                g_start = grad_end[j]
            continue

        points = np.concatenate([theta[a + 1:b + 1], theta[a:b] + 0.5 * deltas])
        loss_new, grad_new = grad_fn(points)
        m = b - a
        active: dict[int, _Step] = {}
        for j, t in enumerate(range(a, b)):
            out.loss[t + 1] = loss_new[j]
            active[t] = _Step(deltas[j], g_start + grad_new[j], grad_new[m + j].copy(), np.zeros(size))
            out.points[t] += 2
            g_start = grad_new[j]

        while True:
            for t, st in list(active.items()):
                mean_grad = (st.ends + 4.0 * st.odd + 2.0 * st.even) / (3.0 * st.n)
                out.lca[t], out.residual[t] = _lca_and_residual(st.delta, mean_grad, out.loss[t + 1] - out.loss[t])
                out.splits[t] = st.n
                if abs(out.residual[t]) <= tol or st.n >= max_splits:
                    del active[t]
            if not active:
                break
            order = list(active)
            fine = []
            for t in order:
                st = active[t]
                s = (2.0 * np.arange(st.n) + 1.0) / (2.0 * st.n)
                fine.append(theta[t][None] + s[:, None] * st.delta[None])
            _, grad_fine = grad_fn(np.concatenate(fine))
            offset = 0
            for t in order:
                st = active[t]
                st.even += st.odd
                st.odd = grad_fine[offset:offset + st.n].sum(axis=0)
                offset += st.n
                out.points[t] += st.n
                st.n *= 2
    return out
