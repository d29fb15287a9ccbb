"""`lca train --overwrite` replaces only a store of ours: a trajectory store holding Zarr groups and nothing
else. A folder holding anything else, or a link out of the store, is refused and left as it was."""

import subprocess
from pathlib import Path

import pytest
import zarr

from .conftest import LCA, ROOT, small_digits_workflow

pytestmark = pytest.mark.timeout(300)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(result):
    assert result.returncode == 1, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def train_cli(store):
    return subprocess.run(LCA + ["train", str(ROOT / "workflows" / "digits-fc.toml"), "--store", str(store),
                                 "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=240)


def test_overwrite_replaces_only_a_store_of_ours(store_copy, tmp_path):
    from pipeline.train.loop import train

    sibling = tmp_path / "outside"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("precious")
    (sibling / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    sibling_before = snapshot(sibling)
    # A folder holding a zarr.json that is not a trajectory store, and one file: refused, both kept.
    assert "not a trajectory store" in one_error_line(train_cli(sibling))
    assert snapshot(sibling) == sibling_before
    # A trajectory store with an unrelated file beside its groups: refused, nothing deleted.
    store = Path(store_copy())
    (store / "notes.txt").write_text("mine")
    before = snapshot(store)
    assert "notes.txt, which is not part of a trajectory store" in one_error_line(train_cli(store))
    assert snapshot(store) == before
    # A trajectory store with a group linked to the sibling folder: refused, the sibling untouched.
    (store / "notes.txt").unlink()
    (store / "extra").symlink_to(sibling, target_is_directory=True)
    assert "holds extra, which is not part of a trajectory store" in one_error_line(train_cli(store))
    assert snapshot(sibling) == sibling_before
    # Our own store, nothing else: replaced.
    (store / "extra").unlink()
    train(small_digits_workflow(steps=4, chunk_steps=4), str(store), overwrite=True, progress=False)
    assert zarr.open_group(str(store), mode="r")["trajectory"].attrs["checkpoints"] == 5
