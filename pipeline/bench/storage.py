"""Section 5, what the record costs on disk.

"Trajectory storage" -- the parameter trajectory [checkpoints, P] float32 in the reference's format
(h5py gzip level 4, one chunk per iteration) against the store's codec chain
(`trajectory_store.measure.compare_codecs`), "x smaller" = h5py bytes / store bytes, the store's actual
bytes on disk, and two bit-exact checks: the codec chain's round trip, and the written store read back
against the rows the trainer handed to the writer (compared as uint32 bit patterns).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.bench.table import MiB
from pipeline.errors import LCAError

TITLE = "5. Trajectory storage: the store's codec chain vs h5py gzip (the reference's format)"
# (header, json key, format spec, scale): see pipeline/bench/table.py
COLUMNS = [
    ("run", "run", "s", 1), ("checkpoints", "checkpoints", "d", 1), ("params", "params", ",d", 1),
    ("raw MiB", "raw_bytes", ".2f", 1 / MiB), ("h5py gzip(4) MiB", "h5py_gzip_bytes", ".2f", 1 / MiB),
    ("store MiB", "store_bytes", ".2f", 1 / MiB), ("x smaller", "x_smaller", ".2f", 1),
    ("on-disk MiB", "store_on_disk_bytes", ".2f", 1 / MiB), ("bit-exact chain", "chain_exact", "yesno", 1),
    ("bit-exact store", "store_exact", "yesno", 1),
]


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def bench_storage(check: dict[str, Any]) -> list[dict[str, Any]]:
    from trajectory_store.codecs import params_codecs
    from trajectory_store.measure import candidate_chains, compare_codecs

    params = check["params"]
    codec_rows = compare_codecs(params, chunk_steps=check["chunk_steps"])
    # compare_codecs quotes every ratio against its first row, the reference's h5py gzip(4).
    h5 = next((r for r in codec_rows if "h5py gzip(4)" in r["codec"]), codec_rows[0])
    store_chain = params_codecs()
    names = {name for name, chain in candidate_chains().items() if chain == store_chain}
    ours = next((r for r in codec_rows if r["codec"] in names), None) or \
        next((r for r in codec_rows if "store" in r["codec"] or "params_codecs" in r["codec"]), None)
    if ours is None:
        raise LCAError("trajectory_store.measure.compare_codecs has no row for the store's chain "
                       "(codecs.params_codecs); the storage table needs it")
    on_disk = _store_bytes(Path(check["store"]) / "trajectory" / "params")
    return [{
        "run": check["run"], "checkpoints": int(params.shape[0]), "params": int(params.shape[1]),
        "raw_bytes": int(params.nbytes), "h5py_gzip_bytes": int(h5["bytes"]), "store_bytes": int(ours["bytes"]),
        "store_on_disk_bytes": int(on_disk), "x_smaller": h5["bytes"] / ours["bytes"],
        "codec": ours["codec"], "chain_exact": bool(ours["exact"]), "h5py_exact": bool(h5["exact"]),
        "store_exact": bool(check["store_exact"]),
        "encode_mb_s": float(ours["encode_mb_s"]), "decode_mb_s": float(ours["decode_mb_s"]),
    }]
