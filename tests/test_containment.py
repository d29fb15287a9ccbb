"""Nothing outside a store's folder is written or deleted, whatever the store holds; --overwrite removes only a
store of ours. Each case points into a sibling folder and checks that folder is untouched afterwards."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import zarr

from pipeline.lca.compute import compute_lca

from .conftest import LCA, ROOT

pytestmark = pytest.mark.timeout(300)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sibling(tmp_path):
    """A folder beside the store with a file in it that must survive."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    (folder / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    return folder


def run(*args):
    return subprocess.run(LCA + list(args), cwd=ROOT, capture_output=True, text=True, timeout=240)


def one_error_line(result):
    assert result.returncode == 1, result.stderr
    lines = [l for l in result.stderr.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("LCA:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_an_lca_entry_linked_outside_is_refused(store_copy, sibling):
    store = Path(store_copy())
    (store / "lca").symlink_to(sibling, target_is_directory=True)
    before = snapshot(sibling)
    line = one_error_line(run("compute", str(store), "--workers", "1", "--rule", "first-order"))
    assert "lca is a symbolic link" in line and str(sibling) in line
    line = one_error_line(run("unlock", str(store)))
    assert "symbolic link" in line
    assert snapshot(sibling) == before


def test_a_linked_array_inside_a_result_is_refused(store_copy, sibling):
    store = Path(store_copy())
    summary = compute_lca(str(store), workers=1, rule="first-order", progress=False)
    version = zarr.open_group(str(store), mode="r")[f"lca/{summary.name}"].attrs["current"]
    array = store / "lca" / summary.name / version / "residual"
    shutil.rmtree(array)
    (sibling / "residual").mkdir()
    (sibling / "residual" / "zarr.json").write_text("{}")
    array.symlink_to(sibling / "residual", target_is_directory=True)
    before = snapshot(sibling)
    # A recompute would delete the old version once done, and a resume would write into it: neither may run.
    for extra in ([], ["--recompute"]):
        line = one_error_line(run("compute", str(store), "--workers", "1", "--rule", "first-order", *extra))
        assert f"lca/{summary.name}/{version}/residual is a symbolic link" in line
    assert snapshot(sibling) == before


def test_a_version_attribute_with_dots_reaches_nothing_outside(store_copy, sibling):
    store = Path(store_copy())
    summary = compute_lca(str(store), workers=1, rule="first-order", progress=False)
    root = zarr.open_group(str(store), mode="r+")
    rel = os.path.relpath(sibling, store / "lca" / summary.name)
    root[f"lca/{summary.name}"].attrs.update({"current": rel, "pending": rel})
    before = snapshot(sibling)
    again = run("compute", str(store), "--workers", "1", "--rule", "first-order", "--recompute")
    assert again.returncode == 0, again.stderr
    assert snapshot(sibling) == before and sibling.is_dir()


def test_overwrite_replaces_only_a_store_of_ours(store_copy, tmp_path, sibling):
    from .conftest import small_digits_workflow

    wf = tmp_path / "wf.toml"
    text = (ROOT / "workflows" / "digits-fc.toml").read_text()
    wf.write_text(text)
    # A folder holding a zarr.json that is not a trajectory store, and one file: refused, both kept.
    before = sibling_before = snapshot(sibling)
    line = one_error_line(run("train", str(wf), "--store", str(sibling), "--overwrite"))
    assert "not a trajectory store" in line
    assert snapshot(sibling) == before
    # A trajectory store with an unrelated file beside its groups: refused, nothing deleted.
    store = Path(store_copy())
    (store / "notes.txt").write_text("mine")
    before = snapshot(store)
    line = one_error_line(run("train", str(wf), "--store", str(store), "--overwrite"))
    assert "notes.txt, which is not part of a trajectory store" in line
    assert snapshot(store) == before
    # A trajectory store with a group linked to the sibling folder: refused, the sibling untouched.
    (store / "notes.txt").unlink()
    (store / "extra").symlink_to(sibling, target_is_directory=True)
    line = one_error_line(run("train", str(wf), "--store", str(store), "--overwrite"))
    assert "holds extra, which is not part of a trajectory store" in line
    assert snapshot(sibling) == sibling_before
    # Our own store, nothing else: replaced.
    (store / "extra").unlink()
    from pipeline.train.loop import train

    train(small_digits_workflow(steps=4, chunk_steps=4), str(store), overwrite=True, progress=False)
    assert zarr.open_group(str(store), mode="r")["trajectory"].attrs["checkpoints"] == 5
