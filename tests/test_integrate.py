"""The integrator and evaluator against analytic losses and an independent float64 computation."""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.lca.evaluate import Evaluator
from pipeline.lca.integrate import integrate_block
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
