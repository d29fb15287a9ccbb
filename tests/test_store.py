"""TrajectoryWriter / TrajectoryReader: exact round trips, the commit count, safety, URLs, chunking, checksums."""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trajectory_store import (ParamLayout, StoreError, TrajectoryReader, TrajectoryWriter, open_trajectory,
                              store_exists)


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def train_and_record(path: str | Path, steps: int, *, known_steps: bool, chunk_steps: int = 4,
                     **kw: object) -> tuple[np.ndarray, list[float], list[np.ndarray]]:
    """SGD on random data; returns the rows, losses and index batches that were recorded."""
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    layout = ParamLayout.from_model(model)
    rows, losses, batches = [layout.flatten(model)], [], []
    with TrajectoryWriter.create(path, model, steps=steps if known_steps else None, chunk_steps=chunk_steps,
                                 attrs={"seed": 3, "model": {"name": "fc"}}, **kw) as w:
        for t in range(steps):
            x = torch.randn(8, 6)
            loss = model(x).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            idx = np.arange(t, t + 1 + t % 3)
            w.record(model, loss=loss.item(), lr=0.1 / (t + 1), batch_indices=idx)
            rows.append(layout.flatten(model))
            losses.append(loss.item())
            batches.append(idx)
    return np.stack(rows), losses, batches


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("known_steps", [True, False])
def test_round_trip_model(tmp_path: Path, known_steps: bool) -> None:
    rows, losses, batches = train_and_record(tmp_path / "s.zarr", 11, known_steps=known_steps)
    r = open_trajectory(tmp_path / "s.zarr")
    assert isinstance(r, TrajectoryReader)
    assert (r.num_steps, r.num_checkpoints, r.chunk_steps, r.param_chunk) == (11, 12, 4, rows.shape[1])
    assert same_bits(r.params(0, 12), rows) and same_bits(r.params(), rows)
    assert same_bits(r.params(5, 9), rows[5:9])
    assert r.params(3, 3).shape == (0, rows.shape[1])
    assert r.minibatch_loss.dtype == np.float64 and np.array_equal(r.minibatch_loss, losses)
    assert np.allclose(r.lr, [0.1 / (t + 1) for t in range(11)])
    bi = r.batch_indices
    assert bi is not None and bi.dtype == np.int64 and bi.shape == (11, 3)
    for t, idx in enumerate(batches):
        assert list(bi[t, :len(idx)]) == list(idx) and (bi[t, len(idx):] == -1).all()
    # Arrays are trimmed to what was recorded, whether preallocated or grown.
    assert r.params_array.shape == (12, rows.shape[1]) and r.group["trajectory/lr"].shape == (11,)
    assert r.status == "complete" and r.layout == ParamLayout.from_model(small_model())
    a = r.attrs
    assert a["format_version"] == 1 and a["seed"] == 3 and a["model"] == {"name": "fc"}
    assert a["workflow"] is None and r.workflow is None
    assert set(a["versions"]) >= {"torch", "zarr", "numcodecs", "python"} and "created" in a
    assert ParamLayout.from_json(a["layout"]) == r.layout
    json.dumps(a)  # JSON only


def test_workflow_attr_and_more_steps_than_announced(tmp_path: Path) -> None:
    model = small_model()
    with TrajectoryWriter.create(tmp_path / "s.zarr", model, steps=2, chunk_steps=2,
                                 attrs={"workflow": {"train": {"steps": 2}}}) as w:
        for _ in range(5):
            w.record(model)
    r = open_trajectory(tmp_path / "s.zarr")
    assert r.num_steps == 5 and r.workflow == {"train": {"steps": 2}}
    assert np.isnan(r.minibatch_loss).all() and r.batch_indices is None


def test_fewer_steps_than_announced_and_zero_steps(tmp_path: Path) -> None:
    model = small_model()
    with TrajectoryWriter.create(tmp_path / "a.zarr", model, steps=100, chunk_steps=8) as w:
        for _ in range(3):
            w.record(model, loss=1.0, lr=0.5)
    r = open_trajectory(tmp_path / "a.zarr")
    assert r.num_steps == 3 and r.params_array.shape[0] == 4 and list(r.lr) == [0.5] * 3
    with TrajectoryWriter.create(tmp_path / "b.zarr", model, steps=10):
        pass
    r = open_trajectory(tmp_path / "b.zarr")
    assert (r.num_steps, r.num_checkpoints) == (0, 1) and r.minibatch_loss.shape == (0,)
    assert same_bits(r.params(0, 1)[0], ParamLayout.from_model(model).flatten(model))


SPECIAL_BITS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
                0x00000001, 0x807FFFFF, 0x00400000, 0x3F800000, 0x7F7FFFFF]


@st.composite
def bit_matrices(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    n = draw(st.integers(1, 13))
    p = draw(st.integers(1, 17))
    cells = st.one_of(st.sampled_from(SPECIAL_BITS), st.integers(0, 2**32 - 1))
    bits = np.array(draw(st.lists(cells, min_size=n * p, max_size=n * p)), dtype=np.uint32).reshape(n, p)
    if draw(st.booleans()):
        bits[draw(st.integers(0, n - 1))] = 0x80000000  # a whole row (maybe a whole chunk) of -0.0
    return bits.view(np.float32), draw(st.integers(1, 7))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bit_matrices(), known=st.booleans())
def test_round_trip_is_bit_exact_for_any_pattern(tmp_path: Path, case: tuple[np.ndarray, int], known: bool) -> None:
    rows, chunk_steps = case
    n, p = rows.shape
    layout = ParamLayout.from_named_shapes([("w", (p,))])
    path = tmp_path / f"{uuid.uuid4().hex}.zarr"
    with TrajectoryWriter.create(path, layout, initial=rows[0], steps=n - 1 if known else None,
                                 chunk_steps=chunk_steps) as w:
        for i, row in enumerate(rows[1:]):
            w.record_flat(row, loss=float(i), lr=math.inf)
    r = open_trajectory(path, mode="r")
    assert r.num_checkpoints == n and same_bits(r.params(), rows)
    assert r.param_chunk == p and r.chunk_steps == chunk_steps


def test_layout_without_model_needs_initial_row(tmp_path: Path) -> None:
    layout = ParamLayout.from_named_shapes([("a", (2, 3)), ("b", (3,))])
    with pytest.raises(StoreError, match="initial"):
        TrajectoryWriter.create(tmp_path / "s.zarr", layout)
    with pytest.raises(StoreError, match="9 parameters"):
        TrajectoryWriter.create(tmp_path / "s.zarr", layout, initial=np.zeros(4, np.float32))
    with TrajectoryWriter.create(tmp_path / "s.zarr", layout, initial=np.arange(9)) as w:
        with pytest.raises(StoreError, match="has 8 values"):
            w.record_flat(np.zeros(8, np.float32))
        w.record_flat(torch.ones(9))
    assert open_trajectory(tmp_path / "s.zarr").params()[1].tolist() == [1.0] * 9


def test_batch_indices_lazy_widening_and_fixed_width(tmp_path: Path) -> None:
    model = small_model()
    with TrajectoryWriter.create(tmp_path / "a.zarr", model, chunk_steps=2) as w:
        w.record(model)  # no indices yet: the array does not exist
        w.record(model, batch_indices=[4, 5])
        w.record(model, batch_indices=torch.tensor([7, 8, 9, 10]))  # wider than the first: widened
        w.record(model, batch_indices=[1])
    bi = open_trajectory(tmp_path / "a.zarr").batch_indices
    assert bi is not None and bi.tolist() == [[-1] * 4, [4, 5, -1, -1], [7, 8, 9, 10], [1, -1, -1, -1]]
    with TrajectoryWriter.create(tmp_path / "b.zarr", model, batch_size=3, steps=2) as w:
        w.record(model, batch_indices=[2])
        w.record(model)
    assert open_trajectory(tmp_path / "b.zarr").batch_indices.tolist() == [[2, -1, -1], [-1, -1, -1]]


def test_record_copies_on_the_callers_thread(tmp_path: Path) -> None:
    model = small_model()
    layout = ParamLayout.from_model(model)
    with TrajectoryWriter.create(tmp_path / "s.zarr", model, queue_size=1) as w:
        before = layout.flatten(model)
        w.record(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # changing the model right after record must not change what was recorded
    assert same_bits(open_trajectory(tmp_path / "s.zarr").params(1, 2)[0], before)


def test_flush_commits_while_open_and_reader_trusts_the_count(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "s.zarr"
    with TrajectoryWriter.create(path, model, steps=50, chunk_steps=16, flush_seconds=None) as w:
        for _ in range(5):
            w.record(model, loss=2.0)
        w.flush()
        r = open_trajectory(path, mode="r")
        assert (r.num_checkpoints, r.status) == (6, "recording")
        assert r.params_array.shape[0] == 51  # preallocated, but only the committed rows count
        with pytest.raises(StoreError, match=r"outside \[0, 6\]"):
            r.params(0, 7)
        assert r.minibatch_loss.tolist() == [2.0] * 5
        w.record(model)
        w.flush()
        r.refresh()
        assert r.num_checkpoints == 7
    assert open_trajectory(path).status == "complete"


def test_periodic_flush(tmp_path: Path) -> None:
    model = small_model()
    with TrajectoryWriter.create(tmp_path / "s.zarr", model, chunk_steps=64, flush_seconds=0.05) as w:
        w.record(model)
        deadline = time.monotonic() + 10
        while open_trajectory(tmp_path / "s.zarr", mode="r").num_checkpoints < 2:
            assert time.monotonic() < deadline, "a partial chunk was never flushed"
            time.sleep(0.05)


def test_reader_range_errors(tmp_path: Path) -> None:
    train_and_record(tmp_path / "s.zarr", 3, known_steps=True)
    r = open_trajectory(tmp_path / "s.zarr")
    for bad in [(-1, 2), (0, 5), (3, 2), (5, 5)]:
        with pytest.raises(StoreError, match="outside"):
            r.params(*bad)
    with pytest.raises(StoreError, match="integers"):
        r.params(0.5, 2)  # type: ignore[arg-type]
    assert r.params(np.int64(1), np.int64(2)).shape == (1, r.layout.size)


def test_exception_inside_the_block_keeps_earlier_rows(tmp_path: Path) -> None:
    model = small_model()
    layout = ParamLayout.from_model(model)
    rows = [layout.flatten(model)]
    with pytest.raises(RuntimeError, match="diverged"):
        with TrajectoryWriter.create(tmp_path / "s.zarr", model, chunk_steps=4) as w:
            for t in range(6):
                with torch.no_grad():
                    next(model.parameters()).mul_(1.5)
                w.record(model, loss=float(t))
                rows.append(layout.flatten(model))
            raise RuntimeError("diverged")
    r = open_trajectory(tmp_path / "s.zarr")
    assert r.num_steps == 6 and r.status == "interrupted" and same_bits(r.params(), np.stack(rows))
    with pytest.raises(StoreError, match="closed"):
        w.record(model)


def test_writer_thread_error_surfaces_with_cause(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "s.zarr"
    w = TrajectoryWriter.create(path, model, chunk_steps=2, flush_seconds=None)
    w.flush()
    shutil.rmtree(path)
    path.write_text("the disk went away")  # every later chunk write now fails with an OSError
    with pytest.raises(StoreError, match=f"writing {path} failed") as info:
        for _ in range(50):
            w.record(model)
            time.sleep(0.01)
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(StoreError, match="failed"):
        w.close()


def test_error_on_close_does_not_mask_the_training_error(tmp_path: Path) -> None:
    model = small_model()
    path = tmp_path / "s.zarr"
    with pytest.raises(ValueError, match="training bug") as info:
        with TrajectoryWriter.create(path, model, chunk_steps=64) as w:
            w.record(model)
            shutil.rmtree(path)
            path.write_text("x")
            raise ValueError("training bug")
    assert any("failed" in n for n in getattr(info.value, "__notes__", []))


def test_overwrite_protection(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    train_and_record(path, 2, known_steps=True)
    assert store_exists(path) and not store_exists(tmp_path / "other.zarr")
    with pytest.raises(StoreError) as info:
        TrajectoryWriter.create(path, small_model())
    assert str(info.value) == f"store {path} already exists; pass --overwrite to replace it"
    assert open_trajectory(path).num_steps == 2  # untouched
    train_and_record(path, 5, known_steps=False, overwrite=True)
    assert open_trajectory(path).num_steps == 5
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a Zarr store"):
        TrajectoryWriter.create(folder, small_model(), overwrite=True)  # never deletes a non-store
    assert (folder / "keep.txt").read_text() == "mine"


def test_unwritable_path_is_one_clear_line(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("x")  # works as root too: nothing can be created under a regular file
    with pytest.raises(StoreError) as info:
        TrajectoryWriter.create(blocker / "run.zarr", small_model())
    msg = str(info.value)
    assert msg.startswith(f"cannot create store at {blocker / 'run.zarr'}: ") and "\n" not in msg
    assert "not a directory" in msg


@pytest.mark.parametrize("make", ["missing", "file", "folder", "plain-zarr", "no-params"])
def test_opening_a_non_store_names_it(tmp_path: Path, make: str) -> None:
    import zarr

    path = tmp_path / "x"
    if make == "file":
        path.write_text("x")
    elif make == "folder":
        (path / "sub").mkdir(parents=True)
    elif make == "plain-zarr":
        zarr.create_group(path)
    elif make == "no-params":
        zarr.create_group(path, attributes={"format_version": 1, "layout": []})
    with pytest.raises(StoreError, match=str(path)):
        open_trajectory(path)


def test_bad_attrs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="reserved|may not set"):
        TrajectoryWriter.create(tmp_path / "a.zarr", small_model(), attrs={"layout": []})
    with pytest.raises(StoreError, match="JSON"):
        TrajectoryWriter.create(tmp_path / "b.zarr", small_model(), attrs={"seed": object()})
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_file_url(tmp_path: Path) -> None:
    url = (tmp_path / "u.zarr").as_uri()
    assert url.startswith("file:///")
    rows, _, _ = train_and_record(url, 5, known_steps=False)
    r = open_trajectory(url)
    assert r.path == url and same_bits(r.params(), rows)
    assert same_bits(open_trajectory(tmp_path / "u.zarr").params(), rows)  # the same store, as a path
    with pytest.raises(StoreError, match="already exists"):
        TrajectoryWriter.create(url, small_model())


def test_fsspec_url_with_storage_options() -> None:
    url = f"memory://lca-test-{uuid.uuid4().hex}/s.zarr"
    rows, _, _ = train_and_record(url, 6, known_steps=True, storage_options={})
    r = open_trajectory(url, storage_options={})
    assert r.num_steps == 6 and same_bits(r.params(), rows)


def test_chunking_along_parameters_for_a_large_layout(tmp_path: Path) -> None:
    P = 300_000
    layout = ParamLayout.from_named_shapes([("big.weight", (600, 500)), ("big.bias", (0,))])
    assert layout.size == P
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(20, P)).astype(np.float32).cumsum(axis=0)
    with TrajectoryWriter.create(tmp_path / "s.zarr", layout, initial=rows[0], chunk_steps=16) as w:
        for row in rows[1:]:
            w.record_flat(row)
    r = open_trajectory(tmp_path / "s.zarr")
    assert r.param_chunk == -(-P // 4) and r.param_chunk * 16 * 4 <= 8 << 20
    assert len(list((tmp_path / "s.zarr/trajectory/params/c/0").iterdir())) == 4
    assert same_bits(r.params(), rows) and same_bits(r.params(15, 18), rows[15:18])


def test_checksum_in_metadata_and_corruption_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    train_and_record(path, 9, known_steps=True)
    meta = json.loads((path / "trajectory/params/zarr.json").read_text())
    names = [c["name"] for c in meta["codecs"]]
    assert names[-1] == "crc32c" and names[0] == "lca.bit_delta"
    chunk = path / "trajectory/params/c/1/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    r = open_trajectory(path)
    assert r.params(0, 4).shape[0] == 4  # other chunks still read
    with pytest.raises(StoreError, match="trajectory/params"):
        r.params(0, 10)


@pytest.mark.parametrize("steps", [None, 0])
@pytest.mark.parametrize("bits", [0x7FC00001, 0xFFC00000, 0x7F800001, 0xFFFFFFFF])
def test_a_chunk_of_only_non_canonical_nans_keeps_its_bits(tmp_path, steps, bits):
    """zarr skips chunks that equal the NaN fill value unless told not to; the payload must survive."""
    row = np.array([bits], dtype=np.uint32).view(np.float32)
    layout = ParamLayout.from_named_shapes([("w", (1,))])
    with TrajectoryWriter.create(str(tmp_path / "s.zarr"), layout, initial=row, steps=steps):
        pass
    assert open_trajectory(str(tmp_path / "s.zarr")).params().view(np.uint32)[0, 0] == bits
