"""What to compute: a run's steps cut into blocks aligned with the output chunks, and the arrays they fill.

Following rechunker's plan/execute split, everything that touches shared metadata happens here, on the
client, before any task runs: creating the `lca/` arrays and checking that earlier results were computed
with the same settings. Tasks then only write whole chunks that no other task writes, and record their
block as done last, so a killed task or client leaves nothing half-claimed and a rerun resumes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import LCAError
from pipeline.lca.integrate import BlockResult

FORMAT = 1


@dataclass(frozen=True)
class Settings:
    """Everything that changes the numbers; results computed under other settings are never mixed in."""

    rule: str
    tol: float
    max_splits: int
    precision: str
    eval_batch_size: int
    rtol: float = 0.0  # per-parameter error target (0: none); results from before it existed had none

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


LCA_ROWS_BYTES = 4 << 20  # an output chunk holds at most this many bytes of rows (or one row)


def lca_chunk_rows(block: int, size: int) -> int:
    """Rows per chunk of `lca/<split>`: the largest divisor of `block` whose rows fit LCA_ROWS_BYTES.

    A worker buffers one chunk's rows before writing them, so this bounds its output memory: one row
    (4 bytes per parameter) for a large model, the whole block for a small one.
    """
    fit = max(1, LCA_ROWS_BYTES // max(1, 4 * size))
    return max(r for r in range(1, block + 1) if block % r == 0 and r <= fit)


@dataclass(frozen=True)
class Block:
    split: str
    index: int
    start: int  # first step (theta_start -> theta_start+1)
    stop: int   # one past the last step; reads checkpoints start .. stop


@dataclass
class SplitPlan:
    split: str
    settings: Settings
    steps: int
    block: int
    blocks: list[Block]
    pending: list[Block]


def split_prefix(split: str) -> str:
    """Names of the training split's results are bare; the held-out split's carry `heldout_`."""
    return "" if split == "train" else f"{split}_"


def array_names(split: str) -> dict[str, str]:
    """Store paths of one split's results."""
    prefix = split_prefix(split)
    return {
        "lca": f"lca/{split}",
        "loss": f"lca/{prefix}loss",
        "residual": f"lca/{prefix}residual",
        "points": f"lca/{prefix}points",
        "splits": f"lca/{prefix}splits",
        "error": f"lca/{prefix}error",
        "done": f"lca/{prefix}blocks_done",
    }


def _compressors() -> list[Any]:
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]


def _create_arrays(root: zarr.Group, split: str, steps: int, size: int, block: int, param_chunk: int,
                   settings: Settings) -> None:
    names = array_names(split)
    nblocks = -(-steps // block)
    # Dimension names (as in trajectory/) let plain xarray open the group: `xr.open_zarr(store, group="lca")`.
    specs = {
        "lca": ((steps, size), (lca_chunk_rows(block, size), param_chunk), "float32", float("nan"), ("step", "parameter")),
        "loss": ((steps + 1,), (block,), "float64", float("nan"), ("checkpoint",)),
        "residual": ((steps,), (block,), "float64", float("nan"), ("step",)),
        "points": ((steps,), (block,), "int32", 0, ("step",)),
        "splits": ((steps,), (block,), "int32", 0, ("step",)),
        "error": ((steps,), (block,), "float64", float("nan"), ("step",)),
    }
    # The completion record goes first and empty: if planning dies half-way, nothing claims to be done.
    root.create_array(names["done"], shape=(nblocks,), chunks=(1,), dtype="uint8", fill_value=0,
                      overwrite=True, dimension_names=("block",))
    for key, (shape, chunks, dtype, fill, dims) in specs.items():
        root.create_array(names[key], shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                          compressors=_compressors(), overwrite=True, dimension_names=dims)
    root[names["lca"]].attrs.update({"format": FORMAT, "settings": settings.to_json(), "block": block,
                                     "steps": steps})


def plan_split(root: zarr.Group, split: str, *, steps: int, size: int, block: int, param_chunk: int,
               settings: Settings, recompute: bool = False) -> SplitPlan:
    """Create or check the split's arrays and list the blocks still to compute."""
    names = array_names(split)
    existing = dict(root[names["lca"]].attrs) if names["lca"] in root else None
    if existing is not None and isinstance(existing.get("settings"), dict):
        existing["settings"] = {"rtol": 0.0, **existing["settings"]}  # stored before rtol existed
    same = existing is not None and existing.get("settings") == settings.to_json() \
        and existing.get("block") == block and existing.get("steps") == steps and names["done"] in root
    if not same or recompute:
        if existing is not None and not recompute and names["done"] in root \
                and np.asarray(root[names["done"]][:]).any():
            old = existing.get("settings", {})
            diff = ", ".join(f"{k}={old.get(k)!r}" for k, v in settings.to_json().items() if old.get(k) != v)
            what = diff or f"block={existing.get('block')}, steps={existing.get('steps')}"
            raise LCAError(f"{split} LCA in this store was computed with {what}; pass --recompute to "
                           f"replace it with the new settings")
        _create_arrays(root, split, steps, size, block, param_chunk, settings)
    done = np.asarray(root[names["done"]][:]).astype(bool)
    blocks = [Block(split, i, s, min(steps, s + block)) for i, s in enumerate(range(0, steps, block))]
    return SplitPlan(split, settings, steps, block, blocks, [b for b in blocks if not done[b.index]])


@dataclass
class SplitStats:
    """How complete and how exact one split's LCA is: what `lca compute` and `lca info` both print."""

    blocks_done: int
    blocks_total: int
    steps_done: int
    residual_abs_max: float
    residual_abs_mean: float
    residual_abs_median: float
    within_tol: float        # fraction of finished steps with |residual| <= tol (NaN residuals count as not)
    points_mean: float
    points_max: int
    error_median: float = float("nan")  # the per-parameter error estimate (relative L1 per step)
    error_max: float = float("nan")
    within_rtol: float = float("nan")   # fraction of finished steps with error <= rtol (NaN: no rtol)


def split_stats(root: zarr.Group, split: str, tol: float, rtol: float = 0.0) -> SplitStats:
    """Statistics over the steps of finished blocks (the completion record, not the values, says which)."""
    names = array_names(split)
    done = np.asarray(root[names["done"]][:]).astype(bool)
    block = int(root[names["lca"]].attrs["block"])
    steps = int(root[names["residual"]].shape[0])
    mask = np.repeat(done, block)[:steps]
    r = np.abs(np.asarray(root[names["residual"]][:])[mask])
    points = np.asarray(root[names["points"]][:])[mask]
    nan = float("nan")
    err = np.asarray(root[names["error"]][:])[mask] if names["error"] in root else np.zeros(0)
    err_ok = err.size and np.isfinite(err).any()
    return SplitStats(
        int(done.sum()), int(done.size), int(mask.sum()),
        float(np.nanmax(r)) if r.size else nan, float(np.nanmean(r)) if r.size else nan,
        float(np.nanmedian(r)) if r.size else nan, float((r <= tol).mean()) if r.size else nan,
        float(points.mean()) if r.size else nan, int(points.max()) if r.size else 0,
        float(np.nanmedian(err)) if err_ok else nan, float(np.nanmax(err)) if err_ok else nan,
        float((err <= rtol).mean()) if err_ok and rtol > 0 else nan,
    )


def write_block(root: zarr.Group, block: Block, result: BlockResult, steps: int) -> None:
    """Write one block's rows (held in `result.lca`), then mark it done."""
    writer = BlockWriter(root, block, steps)
    for j, row in enumerate(result.lca):
        writer.row(j, row)
    writer.finish(result)


class BlockWriter:
    """Writes one block as its rows arrive, a whole output chunk of rows at a time, then the per-step
    arrays, then the completion mark: the mark is the commit point a rerun trusts.

    `row(j, lca_row)` takes the block's j-th step in order (the integrator's `on_row` sink); only the
    rows of the chunk being filled are held, so a block of any length costs one chunk of rows.
    """

    def __init__(self, root: zarr.Group, block: Block, steps: int, *, concurrency: int | None = None) -> None:
        self.root, self.block, self.steps = root, block, steps
        self.concurrency = concurrency  # chunks zarr encodes at once (None: zarr's default)
        self.names = array_names(block.split)
        self.array = root[self.names["lca"]]
        self.chunk_rows = max(1, int(self.array.chunks[0]))
        self._buf: np.ndarray | None = None
        self._lo = 0  # absolute step of the buffer's first row
        self._filled = 0
        self._written = block.start  # rows [block.start, _written) are in the store

    def row(self, j: int, lca_row: np.ndarray) -> None:
        t = self.block.start + j
        if self._buf is None:
            lo = t - t % self.chunk_rows
            hi = min(self.block.stop, lo + self.chunk_rows)
            self._buf, self._lo, self._filled = np.empty((hi - lo, lca_row.shape[0]), np.float32), lo, 0
        self._buf[t - self._lo] = lca_row
        self._filled += 1
        if self._filled == len(self._buf):
            with zarr.config.set({"async.concurrency": self.concurrency} if self.concurrency else {}):
                self.array[self._lo:self._lo + len(self._buf)] = self._buf
            self._written = self._lo + len(self._buf)
            self._buf = None

    def abort(self) -> None:
        """Undo a failed block's rows (NaN, as never computed), so a failure leaves nothing half-written."""
        self._buf = None
        if self._written > self.block.start:
            cols = self.array.shape[1]
            for lo in range(self.block.start, self._written, self.chunk_rows):
                hi = min(self._written, lo + self.chunk_rows)
                self.array[lo:hi] = np.full((hi - lo, cols), np.nan, np.float32)
            self._written = self.block.start

    def finish(self, result: BlockResult) -> None:
        if self._buf is not None:
            raise RuntimeError("block finished before all of its rows arrived")
        names, s, e, steps = self.names, self.block.start, self.block.stop, self.steps
        root = self.root
        # The final checkpoint's loss lives in the last block's chunk, so only the last block writes it.
        root[names["loss"]][s:e + 1 if e == steps else e] = result.loss if e == steps else result.loss[:-1]
        root[names["residual"]][s:e] = result.residual
        root[names["points"]][s:e] = result.points
        root[names["splits"]][s:e] = result.splits
        if names["error"] in root:  # absent in stores planned before the estimate existed
            root[names["error"]][s:e] = result.error
        root[names["done"]][self.block.index] = 1
