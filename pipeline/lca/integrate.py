"""Path integrals of the gradient along each training step: the LCA of every parameter, and its error.

LCA_{t,i} = Delta_{t,i} * integral_0^1 dL/dtheta_i(theta_t + s Delta_t) ds. Three rules:

- "rk4": composite Simpson's rule (the paper's "RK4") with n = 2 sub-intervals, doubled while the step
  misses its accuracy target and n < `max_splits`. Two new gradients per step at n = 2.
- "fast": the trapezoid rule (n = 1, endpoints only: one new gradient per step), refined by adding the
  midpoint (Simpson n = 2) and then by Simpson doubling only where the target is missed. A step refined
  to n >= 2 is bit-for-bit the "rk4" step: every gradient is reused and the sums are the same.
- "first-order": the gradient at theta_t only (the paper's comparison rule); never refined.

The accuracy target: |r_t| <= `tol` (the conservation residual r_t = L(theta_{t+1}) - L(theta_t) -
sum_i LCA_{t,i}, a sum whose terms cancel), and, if `rtol` > 0, error_t <= `rtol`, where error_t is a
per-parameter estimate at no extra gradient cost: the embedded coarser rule on the points already taken,

    error_t = sum_i |Delta_i (I_i - C_i)| / sum_i |LCA_{t,i}|,

with I the accepted mean gradient and C the coarser one: the trapezoid on every other point (T_{n/2})
inside Simpson n, the first-order rule inside the trapezoid, and for the first-order rule (the left
rectangle rule) the right one: where a gradient is monotone along the path the two rectangles bracket the
integral, so their difference bounds the first-order error and half of it the trapezoid's.
Because LCA's per-parameter error falls like 1/n (ReLU kinks), not like 1/n^4, the coarse rule's error is
a few times the fine one's, so the difference overstates the error slightly: a bound, not a guess.

Memory is a small constant per parameter, whatever the block length: checkpoints stream through the block
(`RowStream`), every gradient is folded into two running sums as soon as it arrives, finished LCA rows go
to a sink (`on_row`) instead of a [B, P] buffer, and elementwise work runs on column slices so its
temporaries are O(COLS). Per step in flight it holds E = g(0) + g(1) + 2 * (older interior points) and the
newest level's interior sum (Simpson: (E + 4 odd) / 3n; trapezoid: (E + 2 odd) / 2n), plus the gradient
that starts the next step: three float64 P-vectors. See docs/ARCHITECTURE.md ("Worker memory").

Bit-identity: every step's arithmetic depends only on its own two checkpoints and its own gradients, folded
in a fixed order, so on CPU (where the evaluator computes points one at a time) a step's numbers do not
depend on the block it falls in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np

GradFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
RowSink = Callable[[int, np.ndarray], None]
Rule = Literal["rk4", "fast", "first-order"]
RULES: tuple[str, ...] = ("rk4", "fast", "first-order")

COLS = 1 << 16          # columns per slice of elementwise work: temporaries are O(COLS), not O(P)
SMALL_BYTES = 64 << 20  # below this much integration state, no need to narrow the pass for memory
STATE_PER_STEP = 36     # bytes per parameter per step in flight: 3 float64 sums + 2 float32 rows + 1 row out
STATE_PER_POINT = 20    # bytes per parameter per path point in a pass: the point and its float64 gradient


@dataclass
class BlockResult:
    """LCA of consecutive steps [start, stop) and the per-step scalars the store keeps beside it."""

    lca: np.ndarray | None  # float32 [B, P]; None when rows went to a sink
    loss: np.ndarray        # float64 [B + 1]: L at each checkpoint theta_start .. theta_stop
    residual: np.ndarray    # float64 [B]: loss change minus the sum of the stored (float32) LCA
    points: np.ndarray      # int32 [B]: gradient evaluations spent on each step
    splits: np.ndarray      # int32 [B]: accepted sub-intervals n (1: trapezoid or first-order)
    error: np.ndarray       # float64 [B]: estimated per-parameter L1 error relative to sum |LCA|


class RowStream:
    """Checkpoints theta_0 .. theta_B of one block, read in order `group` rows at a time.

    Only the current group is held (plus rows the integrator still refers to), so a block of any length
    costs a few rows of memory. `read(i, j)` returns rows [i, j) as a 2-D array. Groups end at multiples
    of `group` counted from `offset` (the block's first step in the run), so that with `group` dividing
    the store's chunk length no read straddles two chunks. The last row of a group is handed out as a
    copy: a step that still needs it then does not keep the whole group alive.
    """

    def __init__(self, read: Callable[[int, int], np.ndarray], count: int, *, group: int = 1,
                 offset: int = 0) -> None:
        if count < 2:
            raise ValueError("a block needs at least two checkpoints")
        self.count = int(count)
        self._read = read
        self._group = max(1, int(group))
        self._offset = int(offset)
        self._lo, self._rows = 0, None

    @classmethod
    def of(cls, rows: "np.ndarray | RowStream") -> "RowStream":
        if isinstance(rows, RowStream):
            return rows
        arr = np.asarray(rows)
        if arr.ndim != 2 or arr.shape[0] < 2:
            raise ValueError("a block needs at least two checkpoints")
        return cls(lambda i, j: arr[i:j], arr.shape[0], group=arr.shape[0])

    def __len__(self) -> int:
        return self.count

    def row(self, i: int) -> np.ndarray:
        if self._rows is None or not self._lo <= i < self._lo + len(self._rows):
            if self._rows is not None and i < self._lo:
                raise ValueError("RowStream is read forwards only")
            self._rows = None  # let the old group go before the next one is read
            end = ((self._offset + i) // self._group + 1) * self._group - self._offset
            self._lo = i
            self._rows = np.asarray(self._read(i, min(self.count, end)))
        j = i - self._lo
        return self._rows[j].copy() if j == len(self._rows) - 1 and len(self._rows) > 1 else self._rows[j]


@dataclass(eq=False)
class _Step:
    t: int
    a: np.ndarray                    # theta_t, as read (float32 from a store)
    b: np.ndarray                    # theta_{t+1}
    E: np.ndarray | None = None      # g(0) + g(1) + 2 * (interior points of older levels), float64
    odd: np.ndarray | None = None    # interior points of the newest level (first-order: g(0); fast n=1: g(1))
    has_start: bool = False
    has_end: bool = False
    n: int = 0                       # sub-intervals of the level being gathered
    waiting: int = 0                 # requested points not yet folded in
    fresh: bool = True               # the next interior point starts a new `odd` sum
    row: np.ndarray | None = None    # the accepted LCA row, until it is handed on in order
    done: bool = False


def pass_width(size: int, points_per_pass: int, per_step: int) -> tuple[int, int]:
    """(points per grad_fn call, steps in flight) for `size` parameters: the evaluator's width, narrowed
    until the integration state fits in 64 bytes per parameter (or SMALL_BYTES, for small models)."""
    k = max(1, int(points_per_pass))
    budget = max(SMALL_BYTES, 64 * size)
    while True:
        window = max(1, k // per_step)
        if k == 1 or size * (window * STATE_PER_STEP + k * STATE_PER_POINT) <= budget:
            return k, window
        k //= 2


def _slices(size: int) -> range:
    return range(0, size, COLS)


def integrate_block(
    grad_fn: GradFn,
    rows: "np.ndarray | RowStream",
    *,
    rule: Rule = "rk4",
    tol: float = 1e-4,
    rtol: float = 0.0,
    max_splits: int = 32,
    points_per_pass: int = 16,
    point_dtype: "np.dtype | type" = np.float64,
    on_row: RowSink | None = None,
) -> BlockResult:
    """LCA for the steps between consecutive checkpoints of `rows` (theta_start .. theta_stop).

    `grad_fn(thetas [K, P]) -> (loss [K], grad [K, P] float64)` is the full-split evaluator; path points
    theta_t + s Delta_t are formed in float64 and handed over as `point_dtype` (the evaluator's compute
    dtype: rounding once, as the evaluator would). Up to `points_per_pass` points of several steps share
    one call, so a vmap evaluator fills its K slots. With `on_row`, each step's float32 LCA row is passed
    to `on_row(step, row)` in step order as soon as it is final, and `BlockResult.lca` is None.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid: {', '.join(RULES)}")
    stream = RowStream.of(rows)
    steps = len(stream) - 1
    size = int(np.asarray(stream.row(0)).shape[-1])
    out = BlockResult(
        lca=None if on_row is not None else np.empty((steps, size), np.float32),
        loss=np.empty(steps + 1, np.float64),
        residual=np.empty(steps, np.float64),
        points=np.zeros(steps, np.int32),
        splits=np.zeros(steps, np.int32),
        error=np.empty(steps, np.float64),
    )
    first_level = 2 if rule == "rk4" else 1
    k, window = pass_width(size, points_per_pass, first_level)
    point_dtype = np.dtype(point_dtype)

    queue: deque[tuple[_Step, float, str]] = deque()
    inflight: list[_Step] = []
    carry: np.ndarray | None = None  # g(theta_next) when the step it starts is not admitted yet
    next_t, emitted = 0, 0

    def admit() -> None:
        nonlocal next_t, carry
        while len(inflight) < window and next_t < steps:
            st = _Step(next_t, stream.row(next_t), stream.row(next_t + 1), n=first_level)
            if next_t == 0:
                queue.append((st, 0.0, "start"))
                st.waiting += 1
                out.points[0] += 1  # the block's first start gradient: the one no earlier step paid for
            elif carry is not None:
                _fold_start(st, carry)
                carry = None
            queue.append((st, 1.0, "end"))
            st.waiting += 1
            out.points[st.t] += 1
            if rule == "rk4":
                queue.append((st, 0.5, "mid"))
                st.waiting += 1
                out.points[st.t] += 1
            inflight.append(st)
            next_t += 1

    def _fold_start(st: _Step, g: np.ndarray) -> None:
        if rule == "first-order":
            st.odd = g.copy()
        if st.E is None:
            st.E = g
        else:
            np.add(st.E, g, out=st.E)
        st.has_start = True

    def fold(st: _Step, s: float, kind: str, loss: float, g: np.ndarray, own: bool) -> None:
        nonlocal carry
        st.waiting -= 1
        if kind == "start":
            out.loss[0] = loss
            _fold_start(st, g if own else g.copy())
            return
        if kind == "end":
            out.loss[st.t + 1] = loss
            if rule == "fast":
                st.odd = g.copy()
            if st.E is None:
                st.E = g.copy()
            else:
                np.add(st.E, g, out=st.E)
            st.has_end = True
            follower = next((x for x in inflight if x.t == st.t + 1), None)
            g_next = g if own else g.copy()
            if follower is not None:
                _fold_start(follower, g_next)
            elif st.t + 1 < steps:
                carry = g_next
            return
        if st.fresh:  # the first interior point of a new level
            st.odd = g if own else g.copy()
            st.fresh = False
        else:
            np.add(st.odd, g, out=st.odd)

    def point(st: _Step, s: float, dst: np.ndarray) -> None:
        for c in _slices(size):
            a = st.a[c:c + COLS].astype(np.float64)
            if s == 0.0:
                dst[c:c + COLS] = a
            elif s == 1.0:
                dst[c:c + COLS] = st.b[c:c + COLS]
            else:
                dst[c:c + COLS] = a + s * (st.b[c:c + COLS].astype(np.float64) - a)

    def evaluate(st: _Step) -> bool:
        """LCA, residual and error estimate at the step's current level; True if it is accepted."""
        row = out.lca[st.t] if out.lca is not None else np.empty(size, np.float32)
        n = st.n
        lca_sum = abs_sum = err_sum = 0.0
        for c in _slices(size):
            sl = slice(c, c + COLS)
            d = st.b[sl].astype(np.float64) - st.a[sl].astype(np.float64)
            E = st.E[sl]
            if rule == "first-order":                      # left rectangle, checked by the right one:
                mean = st.odd[sl]                           # for a monotone gradient the two bracket
                coarse = E - mean                           # the integral; g(1) = E - g(0)
            elif n == 1:                                    # fast: the trapezoid, checked by first-order
                mean = 0.5 * E
                coarse = E - st.odd[sl]                     # g(0) = E - g(1)
            else:                                           # Simpson n, checked by trapezoid n/2
                mean = (E + 4.0 * st.odd[sl]) / (3.0 * n)
                coarse = E / n
            exact = d * mean
            piece = exact.astype(np.float32)
            row[sl] = piece
            lca_sum += float(piece.sum(dtype=np.float64))
            abs_sum += float(np.abs(exact).sum())
            err_sum += float(np.abs(d * (mean - coarse)).sum())
        out.residual[st.t] = float((out.loss[st.t + 1] - out.loss[st.t]) - lca_sum)
        out.error[st.t] = err_sum / abs_sum if abs_sum > 0 else 0.0
        out.splits[st.t] = n
        st.row = row
        if rule == "first-order" or n >= max_splits:
            return True
        return abs(out.residual[st.t]) <= tol and (rtol <= 0 or out.error[st.t] <= rtol)

    def refine(st: _Step) -> None:
        if st.n == 1:       # fast: trapezoid -> Simpson n = 2; E = g(0) + g(1) already
            fracs = [0.5]
            st.n = 2
        else:               # Simpson n -> 2n: this level's points join E with weight 2
            for c in _slices(size):
                st.E[c:c + COLS] += 2.0 * st.odd[c:c + COLS]
            fracs = [(2.0 * j + 1.0) / (2.0 * st.n) for j in range(st.n)]
            st.n *= 2
        st.odd, st.fresh, st.row = None, True, None
        for s in fracs:
            queue.append((st, s, "mid"))
        st.waiting += len(fracs)
        out.points[st.t] += len(fracs)

    while emitted < steps:
        admit()
        batch = [queue.popleft() for _ in range(min(k, len(queue)))]
        if batch:
            thetas = np.empty((len(batch), size), point_dtype)
            for j, (st, s, _) in enumerate(batch):
                point(st, s, thetas[j])
            losses, grads = grad_fn(thetas)
            del thetas
            own = len(batch) == 1  # a lone gradient is its whole buffer: keep it without a copy
            for j, (st, s, kind) in enumerate(batch):
                fold(st, s, kind, float(losses[j]), grads[j], own)
            del grads, losses
        for st in list(inflight):
            if st.waiting or st.done or not (st.has_start and st.has_end):
                continue
            if evaluate(st):
                st.done = True
                st.E = st.odd = None
            else:
                refine(st)
        while inflight and inflight[0].done:  # hand rows on in step order
            st = inflight.pop(0)
            if on_row is not None:
                on_row(st.t, st.row)
            st.row = None
            emitted += 1
    return out


def simpson_weights(n: int) -> np.ndarray:
    """Composite Simpson weights on n + 1 equally spaced points (n even), normalised to sum 1."""
    if n < 2 or n % 2:
        raise ValueError("Simpson's rule needs an even number of sub-intervals")
    w = np.array([1.0] + [4.0 if i % 2 else 2.0 for i in range(1, n)] + [1.0])
    return w / w.sum()


def trapezoid_weights(n: int) -> np.ndarray:
    w = np.array([1.0] + [2.0] * (n - 1) + [1.0])
    return w / w.sum()


def rule_weights(rule: str, n: int) -> np.ndarray:
    """Weights of the mean gradient on the n + 1 points k/n, for a reference computation (the bench)."""
    if rule == "first-order":
        return np.array([1.0] + [0.0] * n)
    if n == 1:
        return trapezoid_weights(1)
    return simpson_weights(n)


__all__: Sequence[str] = ("BlockResult", "RowStream", "integrate_block", "pass_width", "RULES", "rule_weights")
