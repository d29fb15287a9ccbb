"""The writer at scale: compression spread over threads, rows staged outside memory, bits unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from trajectory_store import ParamLayout, TrajectoryWriter, open_trajectory
from trajectory_store.errors import StoreError
from trajectory_store.writer import STAGING_NAME, default_writer_threads

P = 100_003  # 64 rows of it pass 8 MiB, so a chunk row is cut into several column slices


def rows(n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    r = np.cumsum(rng.standard_normal((n, P)).astype(np.float32) * 1e-3, axis=0, dtype=np.float32)
    r += rng.standard_normal(P).astype(np.float32)
    r[3, 17] = -0.0
    r[5, 99] = np.float32(np.nan)
    r[7, 1000] = np.frombuffer(np.uint32(0x7FC0_1234).tobytes(), np.float32)[0]  # a NaN payload
    r[9, 5] = np.inf
    return r


@pytest.mark.parametrize("threads, max_buffer_bytes", [(3, 1 << 30), (2, 1)])
def test_threaded_compression_round_trips_bit_exactly(tmp_path, threads, max_buffer_bytes):
    layout = ParamLayout.from_named_shapes([("a.weight", (1000, 100)), ("a.bias", (3,))])
    data = rows(70)
    path = tmp_path / "t.zarr"
    w = TrajectoryWriter.create(path, layout, initial=data[0], chunk_steps=64, threads=threads,
                                max_buffer_bytes=max_buffer_bytes, flush_seconds=None)
    assert len(range(0, P, open_trajectory(path).group["trajectory/params"].chunks[1])) > 1
    staging = path / "trajectory" / STAGING_NAME
    assert staging.exists() == (max_buffer_bytes == 1)
    for i in range(1, 70):
        w.record_flat(data[i], loss=float(i))
        if i in (10, 40):
            w.flush()  # a partial chunk committed, then rewritten whole when it fills
            assert open_trajectory(path).num_checkpoints == i + 1
    w.close()
    assert not staging.exists()
    got = open_trajectory(path).params()
    assert np.array_equal(got.view(np.uint32), data.view(np.uint32))


def test_thread_budget_and_bad_values(tmp_path):
    assert default_writer_threads(2) == 1 and default_writer_threads(1) == 1
    assert default_writer_threads(8) == 4 and default_writer_threads(64) == 4
    layout = ParamLayout.from_named_shapes([("w", (4,))])
    with pytest.raises(StoreError, match="threads must be at least 1"):
        TrajectoryWriter.create(tmp_path / "a.zarr", layout, initial=np.zeros(4), threads=0)
    with pytest.raises(StoreError, match="max_buffer_bytes must be positive"):
        TrajectoryWriter.create(tmp_path / "b.zarr", layout, initial=np.zeros(4), max_buffer_bytes=0)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
