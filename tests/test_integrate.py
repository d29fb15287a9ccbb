"""The integrator and evaluator against analytic losses and an independent float64 computation."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.lca.evaluate import Evaluator
from pipeline.lca.integrate import RowStream, integrate_block
from trajectory_store.layout import ParamLayout


def quadratic(seed=0, size=50):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(size, size))
    a = m @ m.T / size
    b = rng.normal(size=size)

    def grad_fn(thetas):
        thetas = np.atleast_2d(thetas)
        loss = 0.5 * np.einsum("ki,ij,kj->k", thetas, a, thetas) + thetas @ b
        return loss, thetas @ a + b

    return grad_fn


def trajectory(size=50, steps=12, seed=1):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(scale=0.3, size=(steps + 1, size)), axis=0).astype(np.float32)


def test_simpson_is_exact_on_a_quadratic_loss():
    rows = trajectory()
    out = integrate_block(quadratic(), rows, rule="rk4", tol=1e-30, max_splits=2)
    loss_change = np.diff(out.loss)
    assert np.all(out.splits == 2)
    # Only the float32 storage of LCA and float64 rounding remain.
    scale = np.abs(out.lca).sum(axis=1)
    assert np.all(np.abs(out.residual) <= 1e-6 * scale + 1e-12)
    assert np.allclose(out.lca.sum(axis=1, dtype=np.float64) + out.residual, loss_change, rtol=0, atol=1e-12)


def test_lca_of_a_quadratic_matches_the_closed_form():
    grad_fn = quadratic()
    rows = trajectory().astype(np.float64)
    out = integrate_block(grad_fn, rows, rule="rk4", tol=1.0, max_splits=2)
    # integral_0^1 (A(theta + s d) + b) ds = A(theta + d/2) + b, exactly.
    _, g_mid = grad_fn(0.5 * (rows[:-1] + rows[1:]))
    expected = np.diff(rows, axis=0) * g_mid
    np.testing.assert_allclose(out.lca, expected, rtol=2e-6, atol=1e-6)


def test_simpson_is_exact_when_the_gradient_is_cubic_along_the_path():
    """L = sum(theta^4)/4 has gradient theta^3, cubic in s: Simpson at n = 2 is exact, the trapezoid rule
    or any other wrong weights summing to one are not. Exact LCA: (b^4 - a^4) / 4 for each parameter."""

    def grad_fn(thetas):
        thetas = np.atleast_2d(thetas)
        return (thetas ** 4).sum(axis=1) / 4, thetas ** 3

    rows = trajectory(size=20, steps=6)
    out = integrate_block(grad_fn, rows, rule="rk4", tol=1e-30, max_splits=2)
    a, b = rows[:-1].astype(np.float64), rows[1:].astype(np.float64)
    np.testing.assert_allclose(out.lca, (b ** 4 - a ** 4) / 4, rtol=1e-5, atol=1e-6)


def test_adaptive_refinement_reuses_points_and_meets_tolerance():
    # A quartic loss: Simpson is not exact, so refinement must kick in.
    def grad_fn(thetas):
        thetas = np.atleast_2d(thetas)
        return (thetas ** 4).sum(axis=1) / 4, thetas ** 3

    rows = trajectory(size=20, steps=6) * 3
    out = integrate_block(grad_fn, rows, rule="rk4", tol=1e-9, max_splits=32)
    assert np.all((np.abs(out.residual) <= 1e-9) | (out.splits == 32))
    assert out.splits.max() > 2
    # n sub-intervals cost n new evaluations per step (the start is reused), plus the block's first start.
    expected_points = out.splits.copy()
    expected_points[0] += 1
    np.testing.assert_array_equal(out.points, expected_points)


def test_first_order_rule_leaves_a_larger_residual():
    def grad_fn(thetas):
        thetas = np.atleast_2d(thetas)
        return (thetas ** 4).sum(axis=1) / 4, thetas ** 3

    rows = trajectory(size=20, steps=8)
    rk4 = integrate_block(grad_fn, rows, rule="rk4", tol=1e-30, max_splits=2)
    first = integrate_block(grad_fn, rows, rule="first-order", tol=1e-30)
    assert np.all(first.splits == 1)
    assert np.abs(first.residual).mean() > 20 * np.abs(rk4.residual).mean()


def test_bad_block_is_rejected():
    with pytest.raises(ValueError, match="two checkpoints"):
        integrate_block(quadratic(), trajectory()[:1])


def small_problem(seed=0, with_bn=False):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(16, 12)]
    if with_bn:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.ReLU(), nn.Linear(12, 3)]
    model = nn.Sequential(*layers)
    x = torch.randn(97, 1, 4, 4)
    y = torch.randint(0, 3, (97,))
    layout = ParamLayout.from_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rows = [layout.flatten(model)]
    for t in range(5):
        idx = torch.arange(t * 16, t * 16 + 16) % 97
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        rows.append(layout.flatten(model))
    return model, layout, x, y, np.stack(rows)


def plain_float64_lca(model, layout, x, y, rows, n, batch_size):
    """Written out plainly: Simpson's rule with n sub-intervals, autograd on the full set, float64."""
    net = __import__("copy").deepcopy(model).double()
    for m in net.modules():  # batch statistics only, as the method says
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    net.eval()
    params = list(net.parameters())

    def full_grad(theta):
        offset = 0
        with torch.no_grad():
            for p in params:
                p.copy_(torch.as_tensor(theta[offset:offset + p.numel()]).view_as(p))
                offset += p.numel()
        total, grads = 0.0, [torch.zeros_like(p) for p in params]
        for s in range(0, len(y), batch_size):
            loss = nn.functional.cross_entropy(net(x[s:s + batch_size].double()), y[s:s + batch_size],
                                               reduction="sum")
            for acc, g in zip(grads, torch.autograd.grad(loss, params)):
                acc += g
            total += loss.item()
        return total / len(y), torch.cat([g.reshape(-1) for g in grads]).numpy() / len(y)

    weights = np.array([1.0] + [4.0 if i % 2 else 2.0 for i in range(1, n)] + [1.0]) / (3.0 * n)
    out, losses = [], []
    for t in range(len(rows) - 1):
        a, b = rows[t].astype(np.float64), rows[t + 1].astype(np.float64)
        mean_grad = sum(w * full_grad(a + (k / n) * (b - a))[1] for k, w in enumerate(weights))
        out.append((b - a) * mean_grad)
        losses.append(full_grad(a)[0])
    losses.append(full_grad(rows[-1].astype(np.float64))[0])
    return np.array(out), np.array(losses)


@pytest.mark.parametrize("with_bn", [False, True])
@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_agrees_with_an_independent_float64_computation(with_bn, mode):
    model, layout, x, y, rows = small_problem(with_bn=with_bn)
    n = 8
    expected, losses = plain_float64_lca(model, layout, x, y, rows, n=n, batch_size=40)
    # LCA is stored as float32 (relative rounding 6e-8), losses as float64.
    for precision, rtol, loss_rtol in [("fp64", 1e-6, 1e-12), ("fp32", 2e-3, 1e-5)]:
        ev = Evaluator(model, layout, x, y, batch_size=40, precision=precision, mode=mode, points_per_pass=4)
        out = integrate_block(ev.loss_and_grad, rows, rule="rk4", tol=1e-30, max_splits=n)
        assert np.all(out.splits == n)
        np.testing.assert_allclose(out.loss, losses, rtol=loss_rtol)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(out.lca, expected, rtol=rtol, atol=rtol * scale)


def test_evaluator_leaves_batchnorm_running_stats_alone():
    model, layout, x, y, rows = small_problem(with_bn=True)
    bn = model[2]
    before = bn.running_mean.clone()
    Evaluator(model, layout, x, y, batch_size=50).loss_and_grad(rows[:2])
    assert torch.equal(bn.running_mean, before)


def test_cpu_results_do_not_depend_on_how_points_are_grouped():
    model, layout, x, y, rows = small_problem()
    ev = Evaluator(model, layout, x, y, batch_size=40)
    assert ev.mode == "loop"
    _, all_at_once = ev.loss_and_grad(rows)
    _, in_pieces = ev.loss_and_grad(rows[2:5])
    assert np.array_equal(all_at_once[2:5], in_pieces)


def test_conv_model_channels_last_path_agrees_with_plain_float64_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(50, 1, 8, 8), torch.randint(0, 3, (50,))
    layout = ParamLayout.from_model(model)
    ev = Evaluator(model, layout, x, y, batch_size=50)
    assert ev.mode == "loop" and ev.channels_last
    theta = layout.flatten(model)
    loss, grad = ev.loss_and_grad(theta)

    plain = __import__("copy").deepcopy(model).double()
    plain[1].track_running_stats, plain[1].running_mean, plain[1].running_var = False, None, None
    value = nn.functional.cross_entropy(plain(x.double()), y)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(plain.parameters()))]).numpy()
    np.testing.assert_allclose(loss[0], value.item(), rtol=1e-5)
    np.testing.assert_allclose(grad[0], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_each_evaluator_computes_in_its_own_precision():
    model, layout, x, y, rows = small_problem()
    fp32 = Evaluator(model, layout, x, y, batch_size=40, precision="fp32")
    Evaluator(model, layout, x, y, batch_size=40, precision="tf32")  # flips torch's process-wide flags
    fp32.loss_and_grad(rows[:1])
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def _cubic_grad(thetas):
    thetas = np.atleast_2d(thetas)
    return (thetas ** 4).sum(axis=1) / 4, thetas ** 3


@pytest.mark.parametrize("rule", ["rk4", "fast", "first-order"])
def test_same_bits_whatever_the_block_size_and_row_streaming(rule):
    """Each step's numbers depend only on its own checkpoints: cutting the run into other blocks, reading
    rows one at a time and handing rows to a sink changes no bit (the CPU evaluator's contract)."""
    model, layout, x, y, rows = small_problem()
    ev = Evaluator(model, layout, x, y, batch_size=40)
    rows = rows[:1] + 0.3 * (rows - rows[:1])  # gentler steps: some are refined, some not
    kw = dict(rule=rule, tol=1e-2, rtol=2e-2, max_splits=8, points_per_pass=1, point_dtype=np.float32)
    whole = integrate_block(ev.loss_and_grad, rows, **kw)
    assert rule == "first-order" or whole.splits.max() > whole.splits.min()  # refinement really happened
    steps = len(rows) - 1
    for cut in ([0, 2, steps], [0, 1, 2, 4, steps]):
        parts, sunk = [], {}
        for a, b in zip(cut[:-1], cut[1:]):
            stream = RowStream(lambda i, j, a=a: rows[a + i:a + j].copy(), b - a + 1, group=1)
            parts.append(integrate_block(ev.loss_and_grad, stream, **kw,
                                         on_row=lambda t, row, a=a: sunk.__setitem__(a + t, row.copy())))
            assert parts[-1].lca is None
        assert sorted(sunk) == list(range(steps))
        np.testing.assert_array_equal(np.stack([sunk[t] for t in range(steps)]), whole.lca)
        for key in ("residual", "error", "splits"):
            np.testing.assert_array_equal(np.concatenate([getattr(p, key) for p in parts]), getattr(whole, key))
        np.testing.assert_array_equal(np.concatenate([p.loss[:-1] for p in parts] + [parts[-1].loss[-1:]]),
                                      whole.loss)


def test_window_of_several_steps_gives_the_same_numbers_as_one_step_at_a_time():
    """A wide pass (vmap-style, several steps in flight) folds the same gradients in the same order."""
    rows = trajectory(size=20, steps=7) * 2
    one = integrate_block(_cubic_grad, rows, rule="rk4", tol=1e-9, max_splits=32, points_per_pass=1)
    wide = integrate_block(_cubic_grad, rows, rule="rk4", tol=1e-9, max_splits=32, points_per_pass=16)
    for key in ("lca", "residual", "error", "splits", "points", "loss"):
        np.testing.assert_array_equal(getattr(wide, key), getattr(one, key))


def _true_l1(lca, expected):
    return np.abs(lca.astype(np.float64) - expected).sum(axis=1) / np.abs(expected).sum(axis=1)


def test_error_estimate_bounds_the_true_error_against_an_independent_float64_n32():
    """The stored estimate (embedded coarser rule, no extra gradient) against the per-parameter error
    measured from a plain float64 Simpson n = 32 written in this file: it bounds it, and not uselessly."""
    model, layout, x, y, rows = small_problem(with_bn=True)
    rows = rows[:1] + 0.3 * (rows - rows[:1])
    expected, _ = plain_float64_lca(model, layout, x, y, rows, n=32, batch_size=40)
    ev = Evaluator(model, layout, x, y, batch_size=40, precision="fp64")
    for rule, kw in [("rk4", dict(max_splits=2)), ("rk4", dict(max_splits=8)), ("fast", dict(max_splits=1)),
                     ("first-order", {})]:
        out = integrate_block(ev.loss_and_grad, rows, rule=rule, tol=0.0, points_per_pass=1, **kw)
        true = _true_l1(out.lca, expected)
        assert np.all(out.error >= true), (rule, kw, out.error, true)
        assert np.all(out.error <= 30 * true), (rule, kw, out.error, true)
    # Finer rules have smaller true errors and smaller estimates.
    coarse = integrate_block(ev.loss_and_grad, rows, rule="rk4", tol=0.0, max_splits=2, points_per_pass=1)
    fine = integrate_block(ev.loss_and_grad, rows, rule="rk4", tol=0.0, max_splits=16, points_per_pass=1)
    assert np.all(fine.error < coarse.error)
    assert np.all(_true_l1(fine.lca, expected) < _true_l1(coarse.lca, expected))


def test_fast_rule_conserves_and_refines_only_where_the_residual_asks():
    model, layout, x, y, rows = small_problem()
    rows = rows[:1] + 0.3 * (rows - rows[:1])
    ev = Evaluator(model, layout, x, y, batch_size=40, precision="fp64")
    tol = 1e-4
    fast = integrate_block(ev.loss_and_grad, rows, rule="fast", tol=tol, max_splits=32, points_per_pass=1)
    rk4 = integrate_block(ev.loss_and_grad, rows, rule="rk4", tol=tol, max_splits=32, points_per_pass=1)
    # Conservation, independently of our evaluator: the loss change from a plain float64 forward pass.
    _, losses = plain_float64_lca(model, layout, x, y, rows, n=2, batch_size=40)
    np.testing.assert_allclose(fast.lca.sum(axis=1, dtype=np.float64) + fast.residual, np.diff(losses),
                               rtol=0, atol=1e-12)
    assert np.all((np.abs(fast.residual) <= tol) | (fast.splits == 32))
    trapezoid = fast.splits == 1
    assert trapezoid.any() and (~trapezoid).any()  # both kinds of step occur on this trajectory
    # One new gradient per trapezoid step; a refined step is bit for bit the rk4 step (every point reused).
    new = fast.points.copy()
    new[0] -= 1
    assert np.all(new[trapezoid] == 1)
    np.testing.assert_array_equal(fast.lca[~trapezoid], rk4.lca[~trapezoid])
    assert fast.points.sum() < rk4.points.sum()


def test_rtol_refines_until_the_per_parameter_estimate_holds():
    model, layout, x, y, rows = small_problem()
    rows = rows[:1] + 0.3 * (rows - rows[:1])
    ev = Evaluator(model, layout, x, y, batch_size=40, precision="fp64")
    plain = integrate_block(ev.loss_and_grad, rows, rule="rk4", tol=1e-2, max_splits=32, points_per_pass=1)
    rtol = 0.5 * float(np.median(plain.error))
    out = integrate_block(ev.loss_and_grad, rows, rule="rk4", tol=1e-2, rtol=rtol, max_splits=32,
                          points_per_pass=1)
    assert np.all((out.error <= rtol) | (out.splits == 32))
    assert np.all((np.abs(out.residual) <= 1e-2) | (out.splits == 32))
    refined = plain.error > rtol
    assert refined.any() and np.all(out.splits[refined] > plain.splits[refined])
    # Steps already within rtol stop where they stopped without it: it only ever adds points.
    np.testing.assert_array_equal(out.splits[~refined], plain.splits[~refined])
    # Both must hold: a step within rtol but outside tol is still refined.
    strict = integrate_block(ev.loss_and_grad, rows, rule="rk4", tol=1e-12, rtol=1.0, max_splits=4,
                             points_per_pass=1)
    assert np.all(strict.splits == 4)
    # Unreachable: refinement stops at max_splits.
    capped = integrate_block(ev.loss_and_grad, rows, rule="rk4", tol=1e-2, rtol=1e-9, max_splits=8,
                             points_per_pass=1)
    assert np.all(capped.splits == 8)


def test_pass_width_narrows_for_large_models_and_points_fit_free_memory():
    from pipeline.lca.evaluate import points_that_fit
    from pipeline.lca.integrate import pass_width

    assert pass_width(12_000, 16, 2) == (16, 8)          # small model: the evaluator's full width
    k, w = pass_width(25_000_000, 16, 2)
    assert (k, w) == (1, 1)                               # 25M parameters: one point, one step at a time
    k, w = pass_width(1_000_000, 16, 2)
    assert 1 <= k < 16 and 1_000_000 * (w * 36 + k * 20) <= 64 * 1_000_000 + (64 << 20)
    assert points_that_fit(10_000, 128, 1000, free=1 << 34) == 16
    assert points_that_fit(25_000_000, 128, 1000, free=1 << 30) == 1
    assert 1 < points_that_fit(1_000_000, 128, 1000, free=200 << 20) < 16


def test_block_writer_streams_whole_output_chunks_and_undoes_a_failed_block(tmp_path):
    """A large model's output chunk holds fewer rows than a block: rows are written chunk by chunk as they
    arrive (never the whole block in memory), and a block that fails part-way leaves NaN, as never run."""
    import zarr

    from pipeline.lca.plan import Block, BlockWriter, Settings, lca_chunk_rows, plan_split

    size = 300_000  # 1.2 MB per row: 3 rows fit the 4 MiB chunk, so 2 rows per chunk of an 8-step block
    assert lca_chunk_rows(8, size) == 2 and lca_chunk_rows(64, 12_000) == 64
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    settings = Settings("rk4", 1e-4, 32, "fp32", 100)
    plan_split(root, "train", steps=8, size=size, block=8, param_chunk=size, settings=settings)
    assert root["lca/train"].chunks[0] == 2
    rows = np.random.default_rng(0).normal(size=(8, size)).astype(np.float32)
    writer = BlockWriter(root, Block("train", 0, 0, 8), 8)
    for j in range(3):
        writer.row(j, rows[j])
    assert not np.isnan(root["lca/train"][0:2]).any() and np.isnan(root["lca/train"][2:4]).all()
    writer.abort()
    assert np.isnan(root["lca/train"][:]).all() and root["lca/blocks_done"][0] == 0
    writer = BlockWriter(root, Block("train", 0, 0, 8), 8)
    for j in range(8):
        writer.row(j, rows[j])
    result = type("R", (), dict(loss=np.zeros(9), residual=np.zeros(8), points=np.ones(8, np.int32),
                                splits=np.ones(8, np.int32), error=np.zeros(8)))()
    writer.finish(result)
    np.testing.assert_array_equal(root["lca/train"][:], rows)
    assert root["lca/blocks_done"][0] == 1
