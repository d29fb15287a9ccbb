"""The delta filter and the chosen chain: exact for every bit pattern, registered with zarr, measurable."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trajectory_store import BitDeltaCodec, params_codecs
from trajectory_store.chunking import param_chunk_for
from trajectory_store.codecs import DELTA_CODEC_NAME, delta_decode, delta_encode
from trajectory_store.measure import compare_codecs, format_table

MODES = ["xor", "sub", "sub2"]


@settings(max_examples=150, deadline=None)
@given(a=arrays(np.uint32, st.tuples(st.integers(0, 9), st.integers(0, 9))),
       mode=st.sampled_from(MODES), columns=st.booleans())
def test_delta_round_trip_any_bits(a: np.ndarray, mode: str, columns: bool) -> None:
    f = a.view(np.float32)
    enc = delta_encode(f, mode, columns)  # type: ignore[arg-type]
    assert enc.shape == f.shape and enc.dtype == f.dtype
    assert np.array_equal(delta_decode(enc, mode, columns).view(np.uint32), a)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint64])
@pytest.mark.parametrize("mode", MODES)
def test_delta_round_trip_other_widths_and_ranks(dtype: type, mode: str) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, np.iinfo(dtype).max, size=(6, 3, 2), dtype=dtype, endpoint=True)
    for columns in (False, True):
        assert np.array_equal(delta_decode(delta_encode(a, mode, columns), mode, columns), a)  # type: ignore[arg-type]


def test_delta_makes_slow_paths_small() -> None:
    # Why the filter exists: a smooth path's second differences are tiny integers.
    rng = np.random.default_rng(0)
    steps = np.cumsum(rng.normal(0, 1e-4, size=(64, 200)), axis=0)
    path = (1.0 + np.cumsum(steps, axis=0)).astype(np.float32)
    enc = delta_encode(path, "sub2", columns=True).view(np.uint32)
    assert np.median(enc[: enc.size - 200]) < 2**16 < np.median(path.view(np.uint32))


def test_codec_is_registered_and_serialises() -> None:
    assert zarr.registry.get_codec_class(DELTA_CODEC_NAME) is BitDeltaCodec
    c = BitDeltaCodec(mode="sub2", columns=True)
    assert BitDeltaCodec.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        BitDeltaCodec(mode="nope")  # type: ignore[arg-type]


def test_chain_order_delta_first_checksum_last() -> None:
    chain = params_codecs()
    assert isinstance(chain["filters"][0], BitDeltaCodec)
    assert isinstance(chain["compressors"][-1], zarr.codecs.Crc32cCodec)


def test_param_chunk_splits_in_powers_of_two() -> None:
    assert param_chunk_for(1000, 64) == 1000
    P = 300_000  # 64 x 300k x 4 B = 73 MiB -> 16 parts of 18750 columns (4.6 MiB)
    width = param_chunk_for(P, 64)
    assert width == -(-P // 16) and width * 64 * 4 <= 8 << 20
    assert param_chunk_for(10**9, 64) * 64 * 4 <= 8 << 20


def test_compare_codecs_reports_every_chain_exact() -> None:
    rng = np.random.default_rng(0)
    steps = np.cumsum(rng.normal(0, 1e-4, size=(40, 300)), axis=0)
    path = (rng.normal(0, 0.1, size=300) + np.cumsum(steps, axis=0)).astype(np.float32)
    path[5, :3] = [np.nan, -0.0, np.inf]
    rows = compare_codecs(path, chunk_steps=16)
    assert rows[0]["codec"].startswith("h5py gzip(4)") and rows[0]["ratio_vs_h5py_gzip4"] == 1.0
    assert all(r["exact"] for r in rows)
    store_row = rows[-1]
    assert "store's chain" in store_row["codec"] and store_row["ratio_vs_h5py_gzip4"] > 1.2
    assert "| h5py gzip(4)" in format_table(rows)


@pytest.mark.parametrize("shape", [(2, 5), (3, 1), (17, 9000), (64, 4099), (5, 3, 4)])
def test_fast_sub2_column_encoding_gives_the_reference_bits(shape):
    """The writer's fast path against the generic one (the format is defined by the generic code)."""
    from trajectory_store.codecs import _rows, _uint_view, _zigzag

    rng = np.random.default_rng(3)
    u = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
    u.reshape(shape[0], -1)[0, :1] = 0xFFFFFFFF
    a = u.view(np.float32)
    r = _rows(u)
    ref = r.copy()
    with np.errstate(over="ignore"):
        ref[1:2] = _zigzag(r[1:2] - r[:1])
        ref[2:] = _zigzag(r[2:] - (r[1:-1] << np.uint32(1)) + r[:-2])
    ref = np.concatenate([ref[1:].T.reshape(-1), ref[0]])
    got = delta_encode(a, "sub2", columns=True)
    assert got.shape == a.shape and got.dtype == a.dtype
    assert np.array_equal(got.view(np.uint32).reshape(-1), ref)
    assert np.array_equal(delta_decode(got, "sub2", columns=True).view(np.uint32), u)
