"""Outputs that scale: per-unit and per-layer LCA written at compute time, and per-parameter LCA as a choice.

Blocks run in this process (the worker's own task function, no cluster) so the checks stay quick.
"""

import numpy as np
import pytest
import torch
import zarr

from pipeline.errors import LCAError, WorkflowError
from trajectory_store import open_trajectory

pytestmark = pytest.mark.timeout(300)


def compute_here(store, *, block=None, recompute=False, **overrides):
    """compute_lca run block by block in this process (executor="inline"), one torch thread."""
    from pipeline.lca.compute import compute_lca

    threads = torch.get_num_threads()
    try:
        return compute_lca(store, executor="inline", threads_per_worker=1, block_steps=block,
                           recompute=recompute, progress=False, **overrides)
    finally:
        torch.set_num_threads(threads)


def stored(store, name=None):
    from pipeline.lca.plan import array_names
    from pipeline.lca.results import select_result

    root = zarr.open_group(store, mode="r")
    path = select_result(root, name, store).path
    return {k: np.asarray(root[v][:]) for k, v in array_names("train", path).items() if v in root}


def sum_bound(values, axis):
    """Honest bound on the gap between two float64 sums of the same float32 values in different orders:
    each may be off by (n - 1) * 2^-53 * sum |x| (Higham), whatever the order."""
    n = values.shape[axis]
    return 2 * n * 2.0 ** -53 * np.abs(values.astype(np.float64)).sum(axis=axis)


@pytest.fixture(scope="module")
def full(digits_store, tmp_path_factory):
    import shutil

    dest = tmp_path_factory.mktemp("outputs") / "full.zarr"
    shutil.copytree(digits_store, dest)
    compute_here(str(dest))
    return str(dest)


def test_unit_and_layer_arrays_are_the_sums_of_the_per_parameter_array(full):
    from pipeline.lca.outputs import UnitMap

    reader = open_trajectory(full)
    layout = reader.layout
    a = stored(full)
    lca = a["lca"]
    assert lca.shape == (reader.num_steps, layout.size) and np.isfinite(lca).all()
    # Units, rebuilt here from the layout's own definition: a module's tensors, index along axis 0.
    mods = list(dict.fromkeys(t.module for t in layout.tensors))
    expect_units, expect_layers, bounds_u, bounds_l = [], [], [], []
    for m in mods:
        tensors = [t for t in layout.tensors if t.module == m]
        for k in range(max(t.shape[0] for t in tensors)):
            cols = np.concatenate([lca[:, t.offset:t.offset + t.size].reshape(len(lca), *t.shape)[:, k].reshape(len(lca), -1)
                                   for t in tensors if k < t.shape[0]], axis=1)
            expect_units.append(cols.astype(np.float64).sum(axis=1))
            bounds_u.append(sum_bound(cols, 1))
    for t in layout.tensors:
        cols = lca[:, t.offset:t.offset + t.size]
        expect_layers.append(cols.astype(np.float64).sum(axis=1))
        bounds_l.append(sum_bound(cols, 1))
    units, layers = np.stack(expect_units, 1), np.stack(expect_layers, 1)
    assert a["unit"].shape == units.shape == (reader.num_steps, 100 + 50 + 10)
    assert np.all(np.abs(a["unit"] - units) <= np.stack(bounds_u, 1))
    assert np.all(np.abs(a["layer"] - layers) <= np.stack(bounds_l, 1))
    # ... and they carry the conservation of the per-parameter LCA.
    change = np.diff(a["loss"])
    np.testing.assert_allclose(a["layer"].sum(1) + a["residual"], change, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a["unit"].sum(1) + a["residual"], change, rtol=0, atol=1e-12)
    um = UnitMap.from_layout(layout)
    assert list(um.module[:3]) == ["layers.0"] * 3 and list(um.index[:3]) == [0, 1, 2]


def test_bit_identical_across_block_sizes(full, store_copy):
    ref = stored(full)
    for block in (8, 48):
        other = store_copy(f"block{block}.zarr")
        compute_here(other, block=block)
        got = stored(other)
        for key in ("lca", "unit", "layer", "loss", "residual", "splits"):
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"block {block}: {key}", strict=True)


def test_keep_unit_writes_no_per_parameter_array_and_analysis_still_works(full, store_copy, tmp_path):
    from pipeline import open_lca
    from pipeline.analysis.report import write_report

    store = store_copy("unit.zarr")
    compute_here(store, keep="unit")
    a, ref = stored(store), stored(full)
    assert "lca" not in a
    for key in ("unit", "layer", "residual"):
        np.testing.assert_array_equal(a[key], ref[key], err_msg=key, strict=True)
    ds = open_lca(store)
    assert "lca_param" not in ds and {"lca_unit", "lca_layer"} <= set(ds.data_vars)
    full_ds = open_lca(full)
    np.testing.assert_array_equal(ds.lca.layer_totals().values, full_ds.lca.layer_totals().values)
    np.testing.assert_array_equal(ds.lca.unit_totals().values, full_ds.lca.unit_totals().values)
    assert ds.lca.hurting() == full_ds.lca.hurting()
    with pytest.raises(LCAError, match="per-parameter LCA.*--keep parameter"):
        ds.lca.helped_fraction_stats()
    summary = write_report(store, tmp_path / "report")
    assert summary["helped_fraction"] is None and "per-parameter" in summary["missing"]["helped_fraction"]
    assert (tmp_path / "report" / "layer_totals.png").exists()
    assert not (tmp_path / "report" / "helped_fraction.png").exists()


def test_keep_layer_keeps_layers_only(full, store_copy):
    from pipeline import open_lca

    store = store_copy("layer.zarr")
    compute_here(store, keep="layer")
    a = stored(store)
    assert "lca" not in a and "unit" not in a
    np.testing.assert_array_equal(a["layer"], stored(full)["layer"], strict=True)
    ds = open_lca(store)
    assert set(ds.lca.hurting()) == set(open_lca(full).lca.hurting())
    with pytest.raises(LCAError, match="per-unit"):
        ds.lca.unit_totals()


def test_layer_glob_keeps_per_parameter_lca_of_those_layers_only(full, store_copy):
    from pipeline import open_lca

    store = store_copy("glob.zarr")
    compute_here(store, keep="unit", keep_layers=["layers.2"])
    layout = open_trajectory(store).layout
    last = [t for t in layout.tensors if t.module == "layers.2"]
    a, ref = stored(store), stored(full)
    lo, hi = last[0].offset, last[-1].offset + last[-1].size
    np.testing.assert_array_equal(a["lca"], ref["lca"][:, lo:hi], strict=True)
    ds = open_lca(store)
    assert ds["lca_param"].sizes["parameter"] == hi - lo
    assert set(ds["param_layer"].values) == {"layers.2.weight", "layers.2.bias"}
    np.testing.assert_array_equal(ds["parameter"].values, np.arange(lo, hi))
    # The helped fraction of the kept layers: the same as the full result restricted to them.
    part = ds.lca.helped_fraction().values
    whole = open_lca(full).isel(parameter=slice(lo, hi)).lca.helped_fraction().values
    np.testing.assert_array_equal(part, whole)


def test_bad_keep_settings_are_one_line_and_write_nothing(store_copy):
    from pipeline.config import load_workflow
    from .conftest import ROOT

    store = store_copy("bad.zarr")
    with pytest.raises(LCAError, match="'nope\\*' matches no parameter tensor.*layers.0.weight"):
        compute_here(store, keep_layers=["nope*"])
    assert "lca" not in zarr.open_group(store, mode="r")
    with pytest.raises(WorkflowError, match="keep"):
        load_workflow(ROOT / "workflows" / "digits-fc.toml").replace(lca={"keep": "neuron"})
    compute_here(store, keep="unit", name="k")
    with pytest.raises(LCAError, match="keep='unit'.*--recompute"):
        compute_here(store, keep="parameter", name="k")
    compute_here(store, keep="parameter", recompute=True, name="k")
    assert "lca" in stored(store, "k")
    compute_here(store, keep="layer", recompute=True, name="k")  # keeping less leaves no finer arrays
    assert "lca" not in stored(store, "k") and "unit" not in stored(store, "k")


def test_stores_from_before_unit_and_layer_arrays_still_open(full, store_copy):
    """An older (format-1) result has only `lca/train` (with the attributes): open_lca sums it lazily; a
    compute adds a named result beside it instead of writing into arrays that are not there."""
    import shutil
    from pathlib import Path

    from pipeline import open_lca
    from pipeline.lca.results import select_result

    store = store_copy("old.zarr")
    shutil.rmtree(Path(store) / "lca", ignore_errors=True)
    version = select_result(zarr.open_group(full, mode="r"), None, full).path
    shutil.copytree(Path(full) / version, Path(store) / "lca")
    root = zarr.open_group(store, mode="a")
    del root["lca/layer"], root["lca/unit"], root["lca/blocks_crc"]
    ds, ref = open_lca(store), open_lca(full)
    assert ds.attrs["result"] == "lca" and "lca_unit" not in ds and ds.attrs["tol"] == ref.attrs["tol"]
    np.testing.assert_allclose(ds["lca_layer"].values, ref["lca_layer"].values, rtol=0,
                               atol=1e-12 * float(np.abs(ref["lca_layer"].values).max()))
    np.testing.assert_allclose(ds.lca.unit_totals().values, ref.lca.unit_totals().values, rtol=1e-9)
    compute_here(store)
    assert "lca_unit" in open_lca(store) and "lca_unit" not in open_lca(store, result="lca")
