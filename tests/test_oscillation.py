"""Oscillation analysis on synthetic trajectories whose phase lag, sign-flip rate and autocorrelation are
known by construction, and `lca watch` on a real store."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.oscillation import _contiguous, flag_layers, oscillation_arrays


def _phase_run(rng: np.random.Generator, steps: int, params: int, lag: float, k: int = 8):
    """Descent direction -g = a_i sin(w t + c_i) + noise; motion = b_i sin(w t + c_i - lag) + noise, so the
    motion trails the gradient by `lag` radians (w = 2 pi k / steps). LCA = Delta * g, as LCA defines it."""
    t = np.arange(steps)[:, None]
    w = 2 * np.pi * k / steps
    c = rng.uniform(0, 2 * np.pi, params)
    a, b = rng.uniform(0.5, 2, params), rng.uniform(0.5, 2, params)
    descent = a * np.sin(w * t + c) + 0.3 * rng.standard_normal((steps, params))
    motion = 1e-3 * (b * np.sin(w * t + c - lag) + 0.3 * rng.standard_normal((steps, params)))
    theta = np.vstack([rng.standard_normal(params), motion]).cumsum(0)
    return theta, motion * -descent


def test_recovers_a_known_phase_lag_per_layer() -> None:
    rng = np.random.default_rng(0)
    steps, lags = 256, (0.0, 0.6, -1.2)  # -1.2: motion ahead of the gradient
    parts = [_phase_run(rng, steps, 40, lag) for lag in lags]
    theta = np.hstack([p[0] for p in parts])
    lca = np.hstack([p[1] for p in parts])
    ids = np.repeat(np.arange(3), 40)
    ly, un = oscillation_arrays(theta, lca, ids, 3, ids.copy(), 3, columns=50)  # blocks cross layers
    np.testing.assert_allclose(ly["phase_lag"], lags, atol=0.05)
    np.testing.assert_allclose(ly["lag_steps"], np.array(lags) / (2 * np.pi * 8 / steps), atol=0.05 * 32 / np.pi)
    np.testing.assert_allclose(ly["period_steps"], 32)
    assert np.all(ly["coherence"] > 0.8)  # below 1: noise, and amplitudes a_i, b_i not proportional
    np.testing.assert_allclose(un["phase_lag"], ly["phase_lag"])


def test_gradient_is_recovered_exactly_from_lca_over_delta() -> None:
    """The lag is measured against g = LCA / Delta, which is exact: a run whose motion IS the gradient
    step (plain SGD on the full loss) has zero lag and full coherence, whatever the gradient looks like."""
    rng = np.random.default_rng(1)
    g = rng.standard_normal((128, 30)).cumsum(0) * 0.1 + rng.standard_normal((128, 30))
    theta = np.vstack([np.zeros(30), -0.01 * g]).cumsum(0)
    lca = np.diff(theta, axis=0) * g
    ly, _ = oscillation_arrays(theta, lca, np.zeros(30, dtype=np.int64), 1, None, 0)
    assert abs(ly["phase_lag"][0]) < 1e-6 and ly["coherence"][0] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("p_flip", [0.1, 0.35, 0.7])
def test_recovers_a_known_sign_flip_rate(p_flip: float) -> None:
    """Every parameter of a layer shares one sign chain that flips with probability p_flip per step; the
    magnitudes differ. The layer's and each parameter's LCA flip exactly as the chain does."""
    rng = np.random.default_rng(2)
    steps, params = 400, 25
    flips = rng.random(steps - 1) < p_flip
    sign = np.r_[1, np.where(flips, -1, 1)].cumprod()
    mag = rng.uniform(0.1, 1.0, (steps, params))
    delta = 1e-3 * rng.uniform(0.5, 1.5, (steps, params))      # always forward: no motion reversals
    theta = np.vstack([np.zeros(params), delta]).cumsum(0)
    lca = sign[:, None] * mag
    ids = np.zeros(params, dtype=np.int64)
    ly, un = oscillation_arrays(theta, lca, ids, 1, np.arange(params), params, columns=7)
    expected = flips.mean()
    assert abs(expected - p_flip) < 0.07                        # the chain itself is what we asked for
    assert ly["lca_flip_rate"][0] == pytest.approx(expected, abs=1e-12)
    assert ly["param_flip_rate"][0] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(un["lca_flip_rate"], expected, atol=1e-12)
    assert ly["motion_reversal_rate"][0] == 0 and ly["path_efficiency"][0] == pytest.approx(1.0)


def test_motion_autocorrelation_and_flags() -> None:
    """AR(1) motion with coefficient rho: the pooled lag-1 autocorrelation recovers rho; a layer whose moves
    alternate (rho < 0) is flagged as oscillating, a smooth one is not."""
    import xarray as xr

    rng = np.random.default_rng(3)
    steps, params = 2000, 20
    out = []
    for rho in (0.8, -0.6):
        e = rng.standard_normal((steps, params))
        d = np.zeros_like(e)
        for t in range(1, steps):
            d[t] = rho * d[t - 1] + e[t]
        out.append(np.vstack([np.zeros(params), d]).cumsum(0))
    theta = np.hstack(out)
    ids = np.repeat([0, 1], params)
    ly, _ = oscillation_arrays(theta, None, ids, 2, None, 0)
    np.testing.assert_allclose(ly["motion_autocorr"], [0.8, -0.6], atol=0.03)
    assert "lca_flip_rate" not in ly
    stats = xr.Dataset({k: ("layer", v) for k, v in ly.items()}, coords={"layer": ["smooth", "zigzag"]})
    assert flag_layers(stats) == ["zigzag"]


def test_contiguous_steps() -> None:
    assert _contiguous(np.array([0, 1, 2, 5, 6, 7, 8, 9])) == slice(5, 10)
    assert _contiguous(np.array([], dtype=int)) == slice(0, 0)


def test_watch_cli_is_bounded_and_flags(digits_store) -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    res = CliRunner().invoke(main, ["watch", str(digits_store), "--window", "20", "--interval", "0.1",
                                    "--timeout", "5"])
    assert res.exit_code == 0, res.output
    assert "steps 28..47 of 48 (complete)" in res.output and "layers.0.weight" in res.output
    assert "autocorr" in res.output
    bad = CliRunner().invoke(main, ["watch", "/nonexistent/store.zarr", "--timeout", "1"])
    assert bad.exit_code == 1 and bad.output.startswith("error: ") and len(bad.output.strip().splitlines()) == 1


def test_watch_reads_a_run_that_is_still_recording(tmp_path) -> None:
    """The writer is still open: watch sees the committed steps, flags the zig-zagging layer, and gives up
    after its timeout instead of waiting for the run to end."""
    import torch

    from pipeline.analysis.oscillation import watch
    from trajectory_store import TrajectoryWriter

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    lines: list[str] = []
    with TrajectoryWriter.create(str(tmp_path / "live.zarr"), model, chunk_steps=4) as w:
        for t in range(12):
            with torch.no_grad():
                model[0].weight += 0.01                      # steady drift
                model[1].weight += 0.01 * (-1) ** t           # back and forth
            w.record(model, loss=1.0, lr=0.1)
        w.flush()
        flagged = watch(str(tmp_path / "live.zarr"), window=10, interval=0.05, timeout=0.2, echo=lines.append)
    assert flagged == ["1.weight"]
    assert lines and "of 12 (recording)" in lines[-1] and "1.weight" in lines[-1].split("oscillating layer(s):")[1]
