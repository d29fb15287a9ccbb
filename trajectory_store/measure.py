"""Measuring codec chains on a real trajectory, so the chain in `codecs.params_codecs` is chosen by numbers.

The reference (Lan et al.) stores one gzip-compressed HDF5 row per iteration, so h5py gzip chunked that way
is the baseline every ratio is quoted against. Zarr chains are written and read one chunk of iterations at
a time, the way `TrajectoryWriter` writes and the LCA phase reads, so the speeds are those the pipeline sees.

Run: python -m trajectory_store.measure --data data/fashion-mnist --steps 512   (docs/store-codecs.md)
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, TransposeCodec, ZstdCodec

from .codecs import BitDeltaCodec, params_codecs
from .chunking import param_chunk_for

MiB = 1 << 20


def _blosc(shuffle: str, clevel: int = 5, blocksize: int = 0) -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=clevel, shuffle=shuffle, typesize=4, blocksize=blocksize)


def _chain(filters: list[Any], compressor: Any) -> dict[str, Any]:
    return {"filters": filters, "serializer": BytesCodec(), "compressors": [compressor, Crc32cCodec()]}


def candidate_chains() -> dict[str, dict[str, Any]]:
    """Every zarr chain compared; each ends in crc32c, as the store's does. blosc clevel c is zstd level 2c-1."""
    t = TransposeCodec(order=(1, 0))

    def delta(mode: str, columns: bool = False) -> list[Any]:
        return [BitDeltaCodec(mode=mode, columns=columns)]  # type: ignore[arg-type]

    mb = 1 << 20
    return {
        "zstd(3)": _chain([], ZstdCodec(level=3)),
        "blosc shuffle+zstd(9)": _chain([], _blosc("shuffle")),
        "transpose + shuffle+zstd(9)": _chain([t], _blosc("shuffle")),
        "transpose + bitshuffle+zstd(9)": _chain([t], _blosc("bitshuffle")),
        "xor-delta + shuffle+zstd(9)": _chain(delta("xor"), _blosc("shuffle")),
        "xor-delta + bitshuffle+zstd(9)": _chain(delta("xor"), _blosc("bitshuffle")),
        "int-delta + bitshuffle+zstd(9)": _chain(delta("sub"), _blosc("bitshuffle")),
        "int-delta + shuffle+zstd(9)": _chain(delta("sub"), _blosc("shuffle")),
        "int-delta2 + shuffle+zstd(9)": _chain(delta("sub2"), _blosc("shuffle")),
        "xor-delta, columns + shuffle+zstd(1), 1 MiB blocks": _chain(delta("xor", True), _blosc("shuffle", 1, mb)),
        "int-delta, columns + shuffle+zstd(1), 1 MiB blocks": _chain(delta("sub", True), _blosc("shuffle", 1, mb)),
        "int-delta2, columns + bitshuffle+zstd(1), 1 MiB blocks":
            _chain(delta("sub2", True), _blosc("bitshuffle", 1, mb)),
        "int-delta2, columns + shuffle+zstd(3), 1 MiB blocks": _chain(delta("sub2", True), _blosc("shuffle", 2, mb)),
        "int-delta2, columns + shuffle+zstd(5), 1 MiB blocks": _chain(delta("sub2", True), _blosc("shuffle", 3, mb)),
        "int-delta2, columns + shuffle+zstd(1), 1 MiB blocks = store's chain": params_codecs(),
    }


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _best(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    runs = [_timed(fn) for _ in range(max(repeat, 1))]
    return runs[-1][0], min(t for _, t in runs)


def _zarr_case(name: str, params: np.ndarray, chain: dict[str, Any], chunk_steps: int,
               repeat: int) -> dict[str, Any]:
    objects: dict[str, Any] = {}
    store = zarr.storage.MemoryStore(objects)
    n, p = params.shape
    arr = zarr.create_array(store, name="params", shape=params.shape, dtype="float32",
                            chunks=(chunk_steps, param_chunk_for(p, chunk_steps)),
                            config={"write_empty_chunks": True}, **chain)

    def encode() -> None:
        for a in range(0, n, chunk_steps):
            arr[a:a + chunk_steps] = params[a:a + chunk_steps]

    def decode() -> np.ndarray:
        return np.concatenate([arr[a:a + chunk_steps] for a in range(0, n, chunk_steps)])

    _, t_enc = _best(encode, repeat)
    back, t_dec = _best(decode, repeat)
    size = sum(len(v) for k, v in objects.items() if k.startswith("params/c/"))
    return {"codec": name, "bytes": size, "encode_s": t_enc, "decode_s": t_dec,
            "exact": bool(np.array_equal(back.view(np.uint32), params.view(np.uint32)))}


def _h5_case(name: str, params: np.ndarray, level: int, repeat: int) -> dict[str, Any]:
    import h5py

    bio = io.BytesIO()
    with h5py.File(bio, "w") as f:
        # The reference's layout: one chunk per iteration, gzip, no shuffle filter.
        ds = f.create_dataset("params", shape=params.shape, dtype="float32", chunks=(1, params.shape[1]),
                              compression="gzip", compression_opts=level, shuffle=False)
        _, t_enc = _best(lambda: ds.__setitem__(slice(None), params), repeat)
        f.flush()
        size = ds.id.get_storage_size()
        back, t_dec = _best(lambda: ds[:], repeat)
    return {"codec": name, "bytes": int(size), "encode_s": t_enc, "decode_s": t_dec,
            "exact": bool(np.array_equal(back.view(np.uint32), params.view(np.uint32)))}


def compare_codecs(params: np.ndarray, *, chunk_steps: int = 64, repeat: int = 1) -> list[dict[str, Any]]:
    """Size, speed and bit-exactness of each candidate chain on `params` [checkpoints, P] float32.

    Each dict: codec, bytes, ratio_vs_raw, ratio_vs_h5py_gzip4 (how many times smaller than the reference's
    format), encode_mb_s and decode_mb_s (raw MiB per second, best of `repeat` runs; zarr may encode the
    column chunks of one row block in parallel, h5py encodes serially), exact.
    """
    params = np.ascontiguousarray(params, dtype=np.float32)
    if params.ndim != 2:
        raise ValueError(f"params must be [checkpoints, P], got shape {params.shape}")
    rows = [_h5_case("h5py gzip(4), row chunks (reference)", params, 4, repeat),
            _h5_case("h5py gzip(9), row chunks", params, 9, repeat)]
    rows += [_zarr_case(name, params, chain, chunk_steps, repeat) for name, chain in candidate_chains().items()]
    raw, ref = params.nbytes, rows[0]["bytes"]
    for r in rows:
        r["ratio_vs_raw"] = raw / r["bytes"]
        r["ratio_vs_h5py_gzip4"] = ref / r["bytes"]
        r["encode_mb_s"] = raw / MiB / max(r.pop("encode_s"), 1e-9)
        r["decode_mb_s"] = raw / MiB / max(r.pop("decode_s"), 1e-9)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, as pasted into docs/store-codecs.md."""
    lines = ["| chain | MiB | x raw | x h5py gzip(4) | encode MiB/s | decode MiB/s | bit-exact |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['codec']} | {r['bytes'] / MiB:.2f} | {r['ratio_vs_raw']:.2f} | "
                     f"{r['ratio_vs_h5py_gzip4']:.2f} | {r['encode_mb_s']:.0f} | {r['decode_mb_s']:.0f} | "
                     f"{'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines)


# ---- a realistic trajectory to measure on ------------------------------------------------------------


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _training_data(data: str | None) -> tuple[np.ndarray, np.ndarray]:
    if data:
        x = _read_idx(Path(data) / "train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
        y = _read_idx(Path(data) / "train-labels-idx1-ubyte.gz").astype(np.int64)
        return x, y
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def sgd_trajectory(steps: int, *, data: str | None = None, skip: int = 0, lr: float = 0.05,
                   momentum: float = 0.9, batch_size: int = 64, weight_decay: float = 0.0,
                   seed: int = 0) -> np.ndarray:
    """Checkpoints [steps+1, P] of an FC (in-100-50-10) net trained with SGD + momentum, every step kept.

    `data` is a Fashion-MNIST IDX folder; None uses scikit-learn's digits (64 inputs). `skip` steps are
    trained before recording starts, to measure a later, slower part of training.
    """
    import torch

    torch.manual_seed(seed)
    x, y = _training_data(data)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 100), torch.nn.ReLU(), torch.nn.Linear(100, 50),
                                torch.nn.ReLU(), torch.nn.Linear(50, 10))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    rows = []

    def flat() -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()

    for step in range(skip + steps):
        if step == skip:
            rows.append(flat())
        idx = torch.randint(0, len(xt), (batch_size,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        opt.step()
        if step >= skip:
            rows.append(flat())
    return np.stack(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="Fashion-MNIST IDX folder [default: sklearn digits]")
    ap.add_argument("--steps", type=int, default=512)
    ap.add_argument("--skip", type=int, default=0, help="steps trained before recording")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--chunk-steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="best of this many timings")
    ap.add_argument("--params", default=None, help="measure this saved [checkpoints, P] .npy instead of training")
    ap.add_argument("--save", default=None, help="save the trajectory as .npy")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.params:
        params = np.load(args.params)
    else:
        params = sgd_trajectory(args.steps, data=args.data, skip=args.skip, weight_decay=args.weight_decay)
    if args.save:
        np.save(args.save, params)
    rows = compare_codecs(params, chunk_steps=args.chunk_steps, repeat=args.repeat)
    print(f"params {params.shape[0]} x {params.shape[1]} float32 = {params.nbytes / MiB:.1f} MiB")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
