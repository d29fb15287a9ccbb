"""The lossless codec chain for `trajectory/params`, and the delta filter that makes it small.

Consecutive checkpoints of one parameter differ by a single optimiser step, so their float32 bit patterns
share sign, exponent and the top of the mantissa. A general-purpose compressor sees none of that on raw
rows; differencing each row against the previous one (inside a chunk, along the iteration axis) turns the
shared bits into runs of zeros that shuffle + zstd squeeze out. The filter works on the raw bits (never on
float values), so the round trip is exact for every pattern, NaN payloads and -0.0 included.

docs/store-codecs.md has the measurements behind `params_codecs()`; `trajectory_store.measure` reruns them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from zarr.abc.codec import ArrayArrayCodec
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import NDBuffer

DELTA_CODEC_NAME = "lca.bit_delta"
DeltaMode = Literal["xor", "sub", "sub2"]
_MODES: tuple[str, ...] = ("xor", "sub", "sub2")


def _uint_view(a: np.ndarray) -> np.ndarray:
    if a.dtype.itemsize not in (1, 2, 4, 8):
        raise ValueError(f"{DELTA_CODEC_NAME} needs a 1, 2, 4 or 8 byte dtype, got {a.dtype}")
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}"))


def _zigzag(d: np.ndarray) -> np.ndarray:
    """Fold wrapped differences so that small steps of either sign become small unsigned numbers.

    Without it a tiny negative step is 0xFFFF...., which shuffling cannot compress.
    """
    bits = d.dtype.itemsize * 8
    s = d.view(np.dtype(f"i{d.dtype.itemsize}"))
    return ((s << 1) ^ (s >> (bits - 1))).view(d.dtype)


def _unzigzag(z: np.ndarray) -> np.ndarray:
    one = z.dtype.type(1)
    return (z >> one) ^ (np.zeros_like(z) - (z & one))


def _rows(a: np.ndarray) -> np.ndarray:
    """[k, ...] as [k, m]: the filter only cares about the iteration axis."""
    return a.reshape(a.shape[0], -1)


def _encode_sub2_columns(r: np.ndarray) -> np.ndarray:
    """`delta_encode(..., "sub2", columns=True)` of rows r [k >= 2, m], the same bits with fewer passes.

    This is the chain every checkpoint goes through, so it is on the writer's critical path: in-place
    ufuncs instead of temporaries, and the transpose done a column block at a time (a block of rows and
    its transpose stay in cache, where one big strided copy does not).
    """
    k, m = r.shape
    d = np.empty((k - 1, m), dtype=r.dtype)
    np.subtract(r[1], r[0], out=d[0])
    if k > 2:
        dd = d[1:]
        np.subtract(r[2:], r[1:-1], out=dd)
        np.subtract(dd, r[1:-1], out=dd)
        np.add(dd, r[:-2], out=dd)
    s = d.view(np.dtype(f"i{d.dtype.itemsize}"))
    sign = s >> (d.dtype.itemsize * 8 - 1)
    np.left_shift(s, 1, out=s)
    np.bitwise_xor(s, sign, out=s)
    out = np.empty(k * m, dtype=r.dtype)
    by_column = out[:(k - 1) * m].reshape(m, k - 1)
    step = 4096
    for c0 in range(0, m, step):
        by_column[c0:c0 + step] = d[:, c0:c0 + step].T
    out[(k - 1) * m:] = r[0]
    return out


def delta_encode(a: np.ndarray, mode: DeltaMode, columns: bool = False) -> np.ndarray:
    """Difference the raw bits of `a` along axis 0; the first row stays as it is (it seeds the decode).

    `columns` then lays the differences out parameter by parameter (each column's k-1 differences
    contiguous) with the seed row last, so a parameter's step sizes, which are alike, sit side by side
    for the compressor and the raw seed values do not break up the runs. Shape and dtype are unchanged.
    """
    u = _uint_view(a)
    if u.ndim == 0 or u.shape[0] < 2:
        return u.copy().view(a.dtype)
    r = _rows(u)
    if mode == "sub2" and columns:
        with np.errstate(over="ignore"):
            return _encode_sub2_columns(r).reshape(u.shape).view(a.dtype)
    out = r.copy()
    with np.errstate(over="ignore"):
        if mode == "xor":
            out[1:] ^= r[:-1]
        elif mode == "sub":
            out[1:] = _zigzag(r[1:] - r[:-1])
        elif mode == "sub2":
            out[1:2] = _zigzag(r[1:2] - r[:1])
            out[2:] = _zigzag(r[2:] - (r[1:-1] << r.dtype.type(1)) + r[:-2])
        else:
            raise ValueError(f"unknown {DELTA_CODEC_NAME} mode {mode!r}; expected one of {_MODES}")
    if columns:
        out = np.concatenate([out[1:].T.reshape(-1), out[0]])
    return out.reshape(u.shape).view(a.dtype)


def delta_decode(a: np.ndarray, mode: DeltaMode, columns: bool = False) -> np.ndarray:
    """Exact inverse of `delta_encode`: integer arithmetic wraps, so every bit pattern comes back."""
    if mode not in _MODES:
        raise ValueError(f"unknown {DELTA_CODEC_NAME} mode {mode!r}; expected one of {_MODES}")
    u = _uint_view(a)
    if u.ndim == 0 or u.shape[0] < 2:
        return u.copy().view(a.dtype)
    k = u.shape[0]
    if columns:
        flat = u.reshape(-1)
        m = flat.size // k
        d = np.empty((k, m), dtype=u.dtype)
        d[0] = flat[flat.size - m:]
        d[1:] = flat[:flat.size - m].reshape(m, k - 1).T
    else:
        d = _rows(u).copy()
    # Running sums row by row, in place: each row is contiguous, which beats np.cumsum(axis=0) by ~2x.
    with np.errstate(over="ignore"):
        if mode == "xor":
            for i in range(1, k):
                np.bitwise_xor(d[i], d[i - 1], out=d[i])
        else:
            d[1:] = _unzigzag(d[1:])
            if mode == "sub2":  # second differences: a first running sum restores the first differences
                for i in range(2, k):
                    np.add(d[i], d[i - 1], out=d[i])
            for i in range(1, k):
                np.add(d[i], d[i - 1], out=d[i])
    return d.reshape(u.shape).view(a.dtype)


@dataclass(frozen=True)
class BitDeltaCodec(ArrayArrayCodec):
    """Row-to-row difference of raw bits along the chunk's first (iteration) axis.

    modes: "xor" (bitwise), "sub" (wrapping integer subtraction, zigzag-folded), "sub2" (second
    difference: with momentum consecutive steps are alike, so their difference is smaller than either).
    `columns` groups each parameter's differences together (see `delta_encode`). Shape and dtype are
    unchanged, so any serializer and bytes codec can follow.
    """

    is_fixed_size = True
    mode: DeltaMode = "xor"
    columns: bool = False

    def __init__(self, *, mode: DeltaMode = "xor", columns: bool = False) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown {DELTA_CODEC_NAME} mode {mode!r}; expected one of {_MODES}")
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "columns", bool(columns))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        _, configuration = parse_named_configuration(data, DELTA_CODEC_NAME, require_configuration=False)
        return cls(**(configuration or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"name": DELTA_CODEC_NAME, "configuration": {"mode": self.mode, "columns": self.columns}}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        itemsize = np.dtype(dtype.to_native_dtype()).itemsize
        if itemsize not in (1, 2, 4, 8):
            raise ValueError(f"{DELTA_CODEC_NAME} needs a 1, 2, 4 or 8 byte dtype, got {dtype}")

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer | None:
        out = delta_encode(np.asarray(chunk_array.as_numpy_array()), self.mode, self.columns)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out)

    def _decode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer:
        out = delta_decode(np.asarray(chunk_array.as_numpy_array()), self.mode, self.columns)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(out)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)

    async def _decode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> NDBuffer:
        return await asyncio.to_thread(self._decode_sync, chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        return input_byte_length


register_codec(DELTA_CODEC_NAME, BitDeltaCodec)


def params_codecs() -> dict[str, Any]:
    """The chosen chain for `trajectory/params` (see docs/store-codecs.md for why this one).

    Returned as `create_array` keyword arguments; crc32c is last so a torn or flipped chunk fails to read.
    """
    return {
        "filters": [BitDeltaCodec(mode="sub2", columns=True)],
        "serializer": BytesCodec(),
        # blosc clevel 1 is zstd level 1: half the encode time of level 3 for 0.6% more bytes. 1 MiB blocks
        # compress about as well as whole chunks (smaller blocks lose ~1%).
        "compressors": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4, blocksize=1 << 20),
                        Crc32cCodec()],
    }


def small_codecs() -> dict[str, Any]:
    """Per-step arrays (loss, lr, batch indices) are tiny; plain zstd plus the checksum is enough."""
    return {"compressors": [ZstdCodec(level=3), Crc32cCodec()]}
