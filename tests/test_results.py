"""Named results side by side in one store: selecting, listing, replacing only once complete, old stores."""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline import describe, open_lca
from pipeline.errors import LCAError
from pipeline.lca.compute import compute_lca
from pipeline.lca.plan import array_names
from pipeline.lca.results import list_results

from .conftest import LCA, ROOT

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def two_results(digits_store, tmp_path_factory):
    """One store holding the default rk4 result and a first-order one named by the user."""
    dest = tmp_path_factory.mktemp("two") / "two.zarr"
    shutil.copytree(digits_store, dest)
    rk4 = compute_lca(str(dest), workers=1, threads_per_worker=1, progress=False)
    first = compute_lca(str(dest), workers=1, threads_per_worker=1, rule="first-order", name="fo",
                        progress=False)
    return str(dest), rk4.name, first.name


def test_results_live_side_by_side_and_are_selected_by_name(two_results):
    store, rk4, first = two_results
    assert rk4.startswith("rk4-tol") and first == "fo"
    assert [r.name for r in list_results(zarr.open_group(store, mode="r"))] == [rk4, "fo"]
    default = open_lca(store)
    assert default.attrs["result"] == "fo" and default.attrs["rule"] == "first-order"  # the latest
    a = open_lca(store, result=rk4)
    assert a.attrs["rule"] == "rk4" and a.attrs["blocks_done"] == a.attrs["blocks_total"] == 3
    # Both conserve the loss change up to their own residual, and they really are different numbers.
    for ds in (a, default):
        total = ds["lca_param"].sum("parameter", dtype=np.float64).values if "lca_param" in ds \
            else ds["lca"].sum("parameter", dtype=np.float64).values
        np.testing.assert_allclose(total + ds["residual"].values, ds["loss_change"].values, atol=1e-12)
    assert np.abs(default["residual"]).mean() > 20 * np.abs(a["residual"]).mean()
    with pytest.raises(LCAError, match=f"no LCA result named 'nope'.*{rk4}, fo"):
        open_lca(store, result="nope")


def test_info_lists_every_result(two_results):
    store, rk4, _ = two_results
    out = subprocess.run(LCA + ["info", store], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert f"result {rk4}: rule rk4" in out and "result fo  (default): rule first-order" in out
    assert out.count("3/3 blocks done") == 2


def test_bad_result_name_is_one_line(two_results, store_copy):
    store = store_copy()
    for bad in ("a/b", "train", "..", "-x"):
        with pytest.raises(LCAError, match="result name .* is not allowed"):
            compute_lca(store, workers=1, name=bad, progress=False)
    assert not list_results(zarr.open_group(store, mode="r"))


def test_killed_recompute_leaves_the_old_result_intact(two_results, tmp_path):
    src, rk4, _ = two_results
    store = str(tmp_path / "s.zarr")
    shutil.copytree(src, store)
    before = open_lca(store, result=rk4)["residual"].values
    # A slow recompute under the same name (block 8 and a tiny tol: ~33 evaluations per step), killed
    # with its workers once its first block is committed.
    proc = subprocess.Popen(LCA + ["compute", store, "--name", rk4, "--recompute", "--workers", "1",
                                   "--tol", "1e-12", "--block-steps", "8", "--threads-per-worker", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    group = f"lca/{rk4}"
    try:
        import time

        deadline = time.time() + 200
        while time.time() < deadline:
            root = zarr.open_group(store, mode="r")
            pending = root[group].attrs.get("pending")
            if pending and np.asarray(root[array_names("train", f"{group}/{pending}")["done"]][:]).any():
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        else:
            raise AssertionError("the recompute committed no block in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    ds = open_lca(store, result=rk4)
    assert ds.attrs["tol"] == 1e-4 and ds.attrs["blocks_done"] == 3
    np.testing.assert_array_equal(ds["residual"].values, before)
    # Finished under the original settings: the same name, replaced only now, and the old version is gone.
    redone = compute_lca(store, workers=1, threads_per_worker=1, name=rk4, rule="first-order", recompute=True,
                         progress=False)
    assert redone.splits[0].blocks_computed == 3
    root = zarr.open_group(store, mode="r")
    assert open_lca(store, result=rk4).attrs["rule"] == "first-order"
    assert root[group].attrs["pending"] is None and list(root[group].group_keys()) == [root[group].attrs["current"]]


def _flatten(store: str, name: str) -> None:
    """Rewrite a store into format 1: one unnamed result directly in lca/, settings on lca/train."""
    root = zarr.open_group(store, mode="r+")
    path = f"lca/{name}/{root[f'lca/{name}'].attrs['current']}"
    attrs = dict(root[path].attrs)
    for entry in Path(store, path).iterdir():
        if entry.name not in ("zarr.json",) and not entry.name.endswith("blocks_crc"):
            entry.rename(Path(store, "lca", entry.name))
    shutil.rmtree(Path(store, "lca", name))
    root = zarr.open_group(store, mode="r+")
    del root["lca"].attrs["format"]
    root["lca/train"].attrs.update({"format": 1, "settings": attrs["settings"], "block": attrs["block"],
                                    "steps": attrs["steps"]})


def test_format_1_stores_stay_readable(two_results, tmp_path):
    src, rk4, _ = two_results
    store = str(tmp_path / "old.zarr")
    shutil.copytree(src, store)
    shutil.rmtree(Path(store, "lca", "fo"))
    expected = open_lca(store, result=rk4)["residual"].values
    _flatten(store, rk4)
    ds = open_lca(store)
    assert ds.attrs["result"] == "lca" and ds.attrs["rule"] == "rk4"
    np.testing.assert_array_equal(ds["residual"].values, expected)
    assert "format-1 store" in describe(store) and "3/3 blocks done" in describe(store)


def test_missing_or_damaged_blocks_are_named_and_recomputed(two_results, tmp_path):
    src, rk4, _ = two_results
    store = str(tmp_path / "d.zarr")
    shutil.copytree(src, store)
    version = zarr.open_group(store, mode="r")[f"lca/{rk4}"].attrs["current"]
    folder = Path(store, "lca", rk4, version)
    expected = {k: np.asarray(zarr.open_group(store, mode="r")[v][:])
                for k, v in array_names("train", f"lca/{rk4}/{version}").items()}
    (folder / "train" / "c" / "1" / "0").unlink()                    # a lost chunk
    chunk = folder / "residual" / "c" / "2"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01                                      # one flipped bit
    chunk.write_bytes(bytes(data))

    info = subprocess.run(LCA + ["info", store], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "1/3 blocks done" in info.stdout
    assert "2 train block(s) marked done failed verification: block 1 (steps 16-31): missing chunk " \
           f"lca/{rk4}/{version}/train/c/1/0; block 2 (steps 32-47): unreadable lca/{rk4}/{version}/residual " \
           "(crc32c mismatch)" in info.stdout
    with pytest.raises(LCAError, match=r"block 1 \(steps 16-31\): missing chunk.*block 2 \(steps 32-47\)"):
        open_lca(store, result=rk4)
    report = subprocess.run(LCA + ["report", store, "--result", rk4, "--out", str(tmp_path / "r")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = [l for l in report.stderr.splitlines() if l.strip()]
    assert report.returncode == 1 and len(lines) == 1 and "block 2 (steps 32-47)" in lines[0], report.stderr
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())

    redo = subprocess.run(LCA + ["compute", store, "--name", rk4, "--workers", "1"], capture_output=True,
                          text=True, cwd=ROOT, timeout=240)
    assert redo.returncode == 0, redo.stderr
    assert "note: recomputing 2 train block(s)" in redo.stdout and "(2 computed now" in redo.stdout
    root = zarr.open_group(store, mode="r")
    for key, path in array_names("train", f"lca/{rk4}/{version}").items():
        np.testing.assert_array_equal(np.asarray(root[path][:]), expected[key], err_msg=key)
    assert open_lca(store, result=rk4).attrs["blocks_done"] == 3
