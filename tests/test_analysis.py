"""The `ds.lca` accessor against hand-computed numbers, on fake Datasets shaped like `open_lca`'s."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback

from pipeline import analysis
from pipeline.analysis.accessor import coincidences, local_peaks, shuffled_coincidences
from pipeline.errors import LCAError

REPO = Path(__file__).resolve().parents[1]


def make_dataset(lca, layers, *, residual=None, loss0=2.0, heldout=None, chunks=(2, 4),
                 lazy=True) -> xr.Dataset:
    """A Dataset with exactly the ARCHITECTURE.md schema.

    layers: [(tensor name, module, shape)] in parameter order, unit axis 0 (so a unit's parameters are
    contiguous). loss_change = sum of LCA + residual, so conservation holds by construction.
    """
    lca = np.asarray(lca, dtype=np.float32) if not isinstance(lca, da.Array) else lca
    t, p = lca.shape
    names, mods, offs, sizes, units = [], [], [], [], []
    param_layer, param_unit, off = [], [], 0
    for name, mod, shape in layers:
        size, n_units = int(np.prod(shape)), int(shape[0])
        names.append(name), mods.append(mod), offs.append(off), sizes.append(size), units.append(n_units)
        param_layer += [name] * size
        param_unit += list(np.arange(size) // (size // n_units))
        off += size
    assert off == p, "layers must cover the parameter columns"
    coords = {
        "iteration": np.arange(t), "parameter": np.arange(p), "layer": names,
        "param_layer": ("parameter", np.array(param_layer, dtype=object)),
        "param_unit": ("parameter", np.array(param_unit, dtype=np.int64)),
        "layer_module": ("layer", mods), "layer_offset": ("layer", offs),
        "layer_size": ("layer", sizes), "layer_units": ("layer", units),
    }
    variables = {}
    splits = [("", lca, residual)] + ([("heldout_", heldout, None)] if heldout is not None else [])
    for prefix, x, res in splits:
        arr = x if isinstance(x, da.Array) else (da.from_array(x, chunks=chunks) if lazy else np.asarray(x))
        by_layer = da.stack([da.asarray(arr)[:, o:o + s].sum(axis=1, dtype=np.float64)
                             for o, s in zip(offs, sizes)], axis=1)
        if not lazy:
            by_layer = by_layer.compute()
        step = by_layer.sum(axis=1)
        res = np.zeros(t) if res is None else np.asarray(res, dtype=np.float64)
        change = step + res
        xp = da if isinstance(change, da.Array) else np
        loss = loss0 + xp.concatenate([np.zeros(1), xp.cumsum(change)])
        variables |= {
            f"{prefix}lca_param": (("iteration", "parameter"), arr),
            f"{prefix}lca_layer": (("iteration", "layer"), by_layer),
            f"{prefix}loss": ("iteration", loss[:-1]), f"{prefix}loss_after": ("iteration", loss[1:]),
            f"{prefix}loss_change": ("iteration", change),
            f"{prefix}residual": ("iteration", res),
            f"{prefix}points": ("iteration", np.full(t, 2, dtype=np.int32)),
            f"{prefix}splits": ("iteration", np.full(t, 2, dtype=np.int32)),
        }
    attrs = {"store": "fake.zarr", "rule": "rk4", "tol": 1e-6, "workflow": "{}", "blocks_done": 1,
             "blocks_total": 1}
    return xr.Dataset(variables, coords=coords, attrs=attrs)


# one module "a": weight (2 units x 2 inputs) + bias (2): P = 6, columns w00 w01 w10 w11 b0 b1
LAYERS_A = [("a.weight", "a", (2, 2)), ("a.bias", "a", (2,))]
HAND = np.array([
    [-1, 2, 0, -3, 0, 4],      # moved 4, helped 2 -> 0.5
    [-1, -1, -1, 1, 0, 0],     # moved 4, helped 3 -> 0.75
    [1, 1, 1, -1, -1, 0],      # moved 5, helped 2 -> 0.4
], dtype=np.float32)


def test_accessor_is_registered_and_lazy():
    ds = make_dataset(HAND, LAYERS_A)
    assert isinstance(ds.lca, analysis.LCAAccessor)
    frac = ds.lca.helped_fraction()
    assert isinstance(frac.data, da.Array)  # nothing computed yet
    np.testing.assert_allclose(frac.values, [0.5, 0.75, 0.4])


def test_helped_fraction_stats_by_hand():
    s = make_dataset(HAND, LAYERS_A).lca.helped_fraction_stats()
    assert s["mean"] == pytest.approx(0.55)
    assert s["std"] == pytest.approx(math.sqrt((0.05**2 + 0.2**2 + 0.15**2) / 3))  # population std 0.1472
    assert s["pooled"] == pytest.approx(7 / 13)
    assert (s["min"], s["max"], s["median"], s["iterations"]) == (pytest.approx(0.4), pytest.approx(0.75),
                                                                   pytest.approx(0.5), 3)


def test_helped_fraction_skips_unmoved_and_missing():
    x = np.array([[0, 0, 0, 0, 0, 0], [np.nan, -1, 1, 1, np.nan, 0]], dtype=np.float32)
    frac = make_dataset(x, LAYERS_A).lca.helped_fraction().values
    assert np.isnan(frac[0]) and frac[1] == pytest.approx(1 / 3)


def test_layer_module_totals_and_hurting():
    x = np.concatenate([HAND, np.array([[1, 0], [2, -1], [0, 1]], np.float32)], axis=1)
    ds = make_dataset(x, LAYERS_A + [("b.weight", "b", (1, 2))], chunks=(2, 3))
    tot = ds.lca.layer_totals().values
    # a.weight: (-1+2+0-3) + (-1-1-1+1) + (1+1+1-1) = -2 - 2 + 2 = -2; a.bias: 4 + 0 - 1 = 3; b.weight: 3
    np.testing.assert_allclose(tot, [-2, 3, 3])
    mod = ds.lca.layer_totals(by="module")
    assert list(mod.module.values) == ["a", "b"]
    np.testing.assert_allclose(mod.values, [1, 3])
    assert ds.lca.hurting() == {"a.bias": 3.0, "b.weight": 3.0}
    assert ds.lca.hurting(by="module") == {"b": 3.0, "a": 1.0}
    cum = ds.lca.cumulative().values
    np.testing.assert_allclose(cum[:, 0], [-2, -4, -2])
    np.testing.assert_allclose(ds.lca.cumulative(by="module").values[:, 1], [1, 2, 3])


def test_unit_lca_by_hand():
    # unit 0 = w00 + w01 + b0, unit 1 = w10 + w11 + b1; chunks of 4 columns split the bias from its rows
    ds = make_dataset(HAND, LAYERS_A, chunks=(2, 4))
    u = ds.lca.unit_lca()
    assert isinstance(u.data, da.Array)
    np.testing.assert_allclose(u.values, [[1, 1], [-2, 0], [1, 0]])
    assert list(u.unit_module.values) == ["a", "a"] and list(u.unit_index.values) == [0, 1]
    np.testing.assert_allclose(ds.lca.unit_totals().values, [0, 1])


def test_unit_lca_orders_modules_by_layer_order():
    layers = [("z.weight", "z", (2, 1)), ("z.bias", "z", (2,)), ("b.weight", "b", (1, 1))]
    x = np.array([[1, 2, 10, 20, 5]], np.float32)
    u = make_dataset(x, layers, chunks=(1, 2)).lca.unit_lca()
    assert list(u.unit_module.values) == ["z", "z", "b"]
    np.testing.assert_allclose(u.values, [[11, 22, 5]])


def test_reconstruction_by_hand():
    # per-step LCA sums -0.5, -0.3, +0.1; residuals 0.01, -0.02, 0: true losses 1.51, 1.19, 1.29
    x = np.array([[-0.5, 0, 0, 0, 0, 0], [0, -0.3, 0, 0, 0, 0], [0, 0, 0.1, 0, 0, 0]])
    ds = make_dataset(x, LAYERS_A, residual=[0.01, -0.02, 0.0], loss0=2.0)
    r = ds.lca.reconstruction()
    np.testing.assert_allclose(r.loss_after.values, [1.51, 1.19, 1.29], rtol=1e-6)
    np.testing.assert_allclose(r.reconstructed.values, [1.5, 1.2, 1.3], rtol=1e-6)
    np.testing.assert_allclose(r.error.values, [-0.01, 0.01, 0.01], atol=1e-6)  # = -cumsum(residual)
    assert r.attrs["max_relative_error"] == pytest.approx(0.01 / 1.19, rel=1e-4)
    assert r.attrs["error_over_loss_change"] == pytest.approx(0.01 / 0.71, rel=1e-4)
    # a gap: each contiguous run restarts from its own true loss, so step 2 alone is exact
    gap = ds.isel(iteration=[0, 2]).lca.reconstruction()
    np.testing.assert_allclose(gap.reconstructed.values, [1.5, 1.29], rtol=1e-6)
    stats = ds.lca.residual_stats()
    assert stats["max_abs"] == pytest.approx(0.02) and stats["sum"] == pytest.approx(-0.01)


def test_completed_drops_unfinished_iterations():
    x = HAND.copy()
    x[1] = np.nan
    ds = make_dataset(x, LAYERS_A, residual=[0, np.nan, 0])
    done = ds.lca.completed()
    assert list(done.iteration.values) == [0, 2]
    assert isinstance(done["lca_param"].data, da.Array)


def test_distribution_moments_by_hand():
    # symmetric: mean 0, var 58/6, skew 0, kurtosis (1282/6) / (58/6)^2 - 3
    x = np.array([[-2, 0, 0], [2, 5, -5]], np.float32)
    d = make_dataset(x, [("w", "m", (3,))], chunks=(1, 2)).lca.distribution(
        quantiles=(0.0, 0.5, 1.0))
    assert d["count"] == 6 and d["mean"] == pytest.approx(0, abs=1e-12)
    assert d["std"] == pytest.approx(math.sqrt(58 / 6))
    assert d["skew"] == pytest.approx(0, abs=1e-12)
    assert d["excess_kurtosis"] == pytest.approx(7692 / 3364 - 3)
    assert d["fraction_zero"] == pytest.approx(1 / 3) and d["fraction_negative"] == pytest.approx(1 / 3)
    assert d["quantiles"] == {0.0: -5.0, 0.5: 0.0, 1.0: 5.0}
    # skewed: [0, 0, 0, 4]: mean 1, m2 3, m3 6, m4 21 -> skew 6/3^1.5, excess kurtosis 21/9 - 3
    y = np.array([[0, 0], [0, 4]], np.float32)
    d = make_dataset(y, [("w", "m", (2,))], chunks=(1, 1)).lca.distribution()
    assert d["mean"] == pytest.approx(1) and d["std"] == pytest.approx(math.sqrt(3))
    assert d["skew"] == pytest.approx(6 / 3**1.5) and d["excess_kurtosis"] == pytest.approx(21 / 9 - 3)


def test_distribution_heavy_tails_match_numpy():
    rng = np.random.default_rng(1)
    x = (rng.standard_t(3, size=(200, 300)) * 1e-4 + 2e-5).astype(np.float32)
    d = make_dataset(x, [("w", "m", (300,))], chunks=(37, 55)).lca.distribution()
    v = x.astype(np.float64).ravel()
    c = v - v.mean()
    assert d["mean"] == pytest.approx(v.mean(), rel=1e-9)
    assert d["std"] == pytest.approx(v.std(), rel=1e-9)
    assert d["skew"] == pytest.approx((c**3).mean() / v.std() ** 3, rel=1e-6)
    assert d["excess_kurtosis"] == pytest.approx((c**4).mean() / v.std() ** 4 - 3, rel=1e-6)
    assert d["excess_kurtosis"] > 3  # heavy-tailed
    for q, got in d["quantiles"].items():
        want = np.quantile(v, q)
        assert got == pytest.approx(want, rel=0.02, abs=0.01 * v.std()), q
    a = np.sort(np.abs(v))[::-1]
    assert d["top_1pct_abs_share"] == pytest.approx(a[: a.size // 100].sum() / a.sum(), abs=0.01)


def test_local_peaks_by_hand():
    h = np.array([0, 3, 1, 5, 5, 2, 0, 4, 0, 1], float)
    assert np.flatnonzero(local_peaks(h, quantile=0.0)[:, 0]).tolist() == [1, 3, 7, 9]  # plateau 3-4 once
    assert np.flatnonzero(local_peaks(h, quantile=0.5, local=None)[:, 0]).tolist() == [1, 3, 7]  # median 1.5
    assert np.flatnonzero(local_peaks(h, quantile=0.0, order=2)[:, 0]).tolist() == [3, 7]
    assert not local_peaks(-h, quantile=0.0).any()  # a layer that only hurts never peaks
    # a moving threshold: the 75% quantile of the 5 iterations around t, mirrored at the ends
    g = np.array([1, 0, 2, 0, 9, 0, 3, 0], float)
    # t=0: window (2, 0, 1, 0, 2) -> 2 > 1, no; t=2: (1, 0, 2, 0, 9) -> 2, yes; t=4: -> 3, yes;
    # t=6: (9, 0, 3, 0, 3) -> 3, yes. Over the whole run the 75% quantile is 2.25: only 4 and 6.
    assert np.flatnonzero(local_peaks(g, quantile=0.75, local=5)[:, 0]).tolist() == [2, 4, 6]
    assert np.flatnonzero(local_peaks(g, quantile=0.75, local=None)[:, 0]).tolist() == [4, 6]
    # on a Dataset, peaks are of -LCA: the most helpful (most negative) iterations
    x = np.zeros((10, 6), np.float32)
    x[:, 0] = -h
    pk = make_dataset(x, LAYERS_A, chunks=(5, 6)).lca.peaks(quantile=0.0)
    assert pk.dims == ("iteration", "module") and np.flatnonzero(pk.values[:, 0]).tolist() == [1, 3, 7, 9]


def _mask(t, *peak_lists):
    m = np.zeros((t, len(peak_lists)), bool)
    for j, ps in enumerate(peak_lists):
        m[list(ps), j] = True
    return m


def test_coincidences_by_hand():
    m = _mask(10, [2, 5], [5, 8])
    assert coincidences(m, 0) == 1  # (5, 5)
    assert coincidences(m, 1) == 1
    assert coincidences(m, 3) == 3  # (2, 5), (5, 5), (5, 8); not (2, 8)
    assert coincidences(_mask(10, [2, 5], [5, 8], [5]), 0) == 3  # three layers at t=5: C(3, 2)
    assert coincidences(_mask(10, [1, 2, 3], [9]), 1) == 0  # pairs inside one layer do not count


@pytest.mark.parametrize("null", ["shift", "permute"])
def test_chance_baseline_matches_analytic_expectation(null):
    # two layers, 10 and 20 peaks among T = 100: E[coincidences at window 0] = 10 * 20 / 100 = 2
    rng = np.random.default_rng(3)
    m = _mask(100, rng.choice(100, 10, replace=False), rng.choice(100, 20, replace=False))
    draws = shuffled_coincidences(m, 0, draws=4000, null=null, seed=5)
    assert draws.mean() == pytest.approx(2.0, rel=0.05)
    # a single layer has no pairs, shuffled or not
    assert shuffled_coincidences(_mask(7, [0, 3]), 0, draws=10).tolist() == [0] * 10


def _spiky(t, peak_lists, noise=0.0, seed=0):
    """Per-module LCA: -1 at each listed peak, tiny positive noise elsewhere (never a helpful peak)."""
    rng = np.random.default_rng(seed)
    cols = []
    for ps in peak_lists:
        c = rng.uniform(0, noise, t) if noise else np.zeros(t)
        c[list(ps)] = -1.0
        cols.append(c)
    x = np.stack(cols, axis=1).astype(np.float32)
    layers = [(f"m{j}.weight", f"m{j}", (1,)) for j in range(len(peak_lists))]
    return make_dataset(x, layers, chunks=(t, 1))


def test_synchronisation_when_peaks_always_coincide():
    # 10 shared, irregularly spaced peaks (a periodic train would realign under some circular shifts);
    # 3 modules: 3 pairs x 10 = 30 coincidences
    common = [3, 17, 30, 58, 71, 99, 120, 141, 163, 190]
    s = _spiky(200, [common, common, common], noise=0.01).lca.synchronisation(draws=500, seed=1)
    assert s["observed"] == 30 and s["peaks"] == {"m0": 10, "m1": 10, "m2": 10}
    assert s["expected_uniform"] == pytest.approx(3 * 10 * 10 / 200)  # 1.5
    assert s["expected"] == pytest.approx(1.5, rel=0.2)
    assert s["ratio"] > 10 and s["p_value"] == pytest.approx(1 / 501)


def test_synchronisation_of_independent_peaks_is_chance():
    rng = np.random.default_rng(7)
    # 40 uniformly placed, never adjacent spikes per module (so each spike is its own peak)
    lists = [np.sort(rng.choice(400 - 39, 40, replace=False)) + np.arange(40) for _ in range(4)]
    ds = _spiky(400, lists)
    for null in ("shift", "permute"):
        s = ds.lca.synchronisation(draws=1000, null=null, seed=2)
        assert sum(s["peaks"].values()) == 160
        assert 0.6 < s["ratio"] < 1.5 and s["p_value"] > 0.05, s
        assert s["expected"] == pytest.approx(s["expected_uniform"], rel=0.1)  # 6 * 40 * 40 / 400 = 24


def test_peaks_of_a_shared_decay_alone_are_not_synchronised():
    """Independent noise under one decaying envelope: a whole-run threshold puts every module's peaks at
    the start and reports synchronisation that is not there; the moving threshold does not."""
    rng = np.random.default_rng(0)
    t, n = 1000, 5
    x = (np.exp(-np.arange(t) / 100)[:, None] * rng.standard_normal((t, n))).astype(np.float32)
    ds = make_dataset(x, [(f"m{j}.weight", f"m{j}", (1,)) for j in range(n)], chunks=(t, 1))
    spurious = ds.lca.synchronisation(local=None, draws=300)
    assert spurious["ratio"] > 2 and spurious["p_value"] < 0.01
    fair = ds.lca.synchronisation(draws=300)
    assert 0.8 < fair["ratio"] < 1.2 and fair["p_value"] > 0.1


def test_heldout_comparison():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    ds = make_dataset(x, LAYERS_A, heldout=2 * x)
    c = ds.lca.heldout_comparison()
    np.testing.assert_allclose(c.heldout_total.values, 2 * c.train_total.values, rtol=1e-5)
    np.testing.assert_allclose(c.correlation.values, 1.0, rtol=1e-6)
    assert c.attrs["correlation_total"] == pytest.approx(1.0) and c.attrs["sign_agreement"] == 1.0
    assert ds.lca.helped_fraction("heldout").values == pytest.approx(ds.lca.helped_fraction().values)
    with pytest.raises(LCAError, match="heldout_lca"):
        make_dataset(x, LAYERS_A).lca.heldout_comparison()


def test_works_on_numpy_backed_dataset():
    ds = make_dataset(HAND, LAYERS_A, lazy=False)
    assert ds.lca.helped_fraction_stats()["mean"] == pytest.approx(0.55)
    np.testing.assert_allclose(ds.lca.unit_totals().values, [0, 1])
    assert ds.lca.distribution()["count"] == 18


class _LargestResult(Callback):
    """Records the biggest array any dask task returned: proof that no task held the whole `lca`."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        self.largest = max(self.largest, getattr(result, "nbytes", 0))


def test_large_lazy_dataset_is_never_materialised():
    t, p = 2000, 50_000  # 400 MB as float32; chunks of 250 x 5000 (5 MB)
    lca = da.random.default_rng(0).standard_normal((t, p), chunks=(250, 5000), dtype=np.float32)
    layers = [(f"l{i}.weight", f"l{i}", (100, 99)) for i in range(5)] + [
        (f"l{i}.bias", f"l{i}", (100,)) for i in range(5)]
    ds = make_dataset(lca, layers)
    assert isinstance(ds["lca_param"].data, da.Array)
    start = time.perf_counter()
    with dask.config.set(scheduler="sync"), _LargestResult() as cb:
        frac = ds.lca.helped_fraction()
        assert isinstance(frac.data, da.Array)
        scan = ds.lca.scan(iteration_bins=100)
    assert isinstance(ds["lca_param"].data, da.Array)
    assert cb.largest < 16e6, cb.largest  # a chunk is 5 MB; the whole array 400 MB
    hf = scan["helped_fraction_stats"]
    assert hf["iterations"] == t and abs(hf["mean"] - 0.5) < 0.01
    d = scan["distribution"]
    assert d["count"] == t * p and abs(d["std"] - 1) < 0.01 and abs(d["excess_kurtosis"]) < 0.05
    assert scan["unit_lca"].shape == (100, 500)
    assert time.perf_counter() - start < 60


def test_importing_pipeline_registers_the_accessor():
    code = "import xarray as xr, pipeline\nassert isinstance(xr.Dataset().lca, pipeline.analysis.accessor.LCAAccessor)\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_variable_names_do_not_collide_with_the_accessor():
    """`ds.lca` is the accessor; every variable is reachable as an attribute with xarray's own methods."""
    ds = make_dataset(HAND, LAYERS_A)
    assert isinstance(ds.lca, analysis.LCAAccessor)
    np.testing.assert_array_equal(ds.lca_param.sel(iteration=0).values, HAND[0])
    np.testing.assert_allclose(ds.lca_layer.sel(iteration=1).values, [-2, 0])
    for name in ds.data_vars:
        assert getattr(ds, name).sel(iteration=0) is not None


def test_datasets_with_the_old_names_still_analyse():
    ds = make_dataset(HAND, LAYERS_A).rename({"lca_param": "lca", "lca_layer": "lca_by_layer"})
    np.testing.assert_allclose(ds.lca.helped_fraction().values, [0.5, 0.75, 0.4])
    np.testing.assert_allclose(ds.lca.layer_totals().values, [-2, 3])


def test_helped_fraction_per_layer_and_module_in_model_order():
    # layer b before a in parameter order: the result must keep model order, not sort names
    layers = [("b.weight", "b", (2, 2)), ("b.bias", "b", (2,))]
    ds = make_dataset(HAND, layers)
    per_layer = ds.lca.helped_fraction(by="layer")
    assert list(per_layer.layer.values) == ["b.weight", "b.bias"] and per_layer.dims == ("iteration", "layer")
    # iteration 0: weight [-1, 2, 0, -3] moved 3 helped 2; bias [0, 4] moved 1 helped 0
    # iteration 1: weight [-1, -1, -1, 1] 3/4; bias [0, 0] nothing moved -> NaN
    np.testing.assert_allclose(per_layer.values[:2], [[2 / 3, 0.0], [0.75, np.nan]])
    per_module = ds.lca.helped_fraction(by="module")
    np.testing.assert_allclose(per_module.values[:, 0], [0.5, 0.75, 0.4])
    stats = ds.lca.helped_fraction_stats(by="layer")
    assert list(stats.layer.values) == ["b.weight", "b.bias"]
    # pooled over iterations: weight helped 2 + 3 + 1 = 6 of moved 3 + 4 + 4 = 11
    assert float(stats.pooled.sel(layer="b.weight")) == pytest.approx(6 / 11)
    with pytest.raises(ValueError, match="by must be"):
        ds.lca.helped_fraction(by="unit")


def test_synchronisation_result_has_a_short_repr_and_warns_when_too_short():
    from pipeline.analysis.accessor import Synchronisation
    from pipeline.errors import ShortRunWarning

    rng = np.random.default_rng(0)
    x = rng.standard_normal((66, 6)).astype(np.float32)
    with pytest.warns(ShortRunWarning, match="66 iterations are fewer than two 51-iteration windows"):
        s = make_dataset(x, LAYERS_A).lca.synchronisation(by="layer", draws=300)
    assert isinstance(s, Synchronisation) and s.null_counts.shape == (300,)
    text = repr(s)
    assert text.count("\n") <= 1 and len(text) < 400 and "ratio" in text and "warning" in text
    assert s["ratio"] == s.ratio and "null_counts" in s.keys()
