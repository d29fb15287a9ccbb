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
from pipeline.lca.outputs import OutputSpec, Reducer
from trajectory_store.chunking import param_chunk_for

FORMAT = 1


@dataclass(frozen=True)
class Settings:
    """Everything that changes the numbers; results computed under other settings are never mixed in."""

    rule: str
    tol: float
    max_splits: int
    precision: str
    eval_batch_size: int
    # Not numbers but which arrays exist: a result kept per unit cannot resume as a per-parameter one.
    keep: str = "parameter"
    keep_layers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_layers"] = list(self.keep_layers)
        return d


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
    """Store paths of one split's results. `lca` (per parameter) exists only when kept, `unit` unless
    keep="layer"; `layer` always, and it carries the result's attributes (settings, block, steps)."""
    prefix = split_prefix(split)
    return {
        "lca": f"lca/{split}",
        "unit": f"lca/{prefix}unit",
        "layer": f"lca/{prefix}layer",
        "loss": f"lca/{prefix}loss",
        "residual": f"lca/{prefix}residual",
        "points": f"lca/{prefix}points",
        "splits": f"lca/{prefix}splits",
        "done": f"lca/{prefix}blocks_done",
    }


def _compressors() -> list[Any]:
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]


LCA_ROWS_BYTES = 4 << 20  # an output chunk holds at most this many bytes of rows (or one row)


def lca_chunk_rows(block: int, size: int) -> int:
    """Rows per chunk of the per-parameter array: the largest divisor of `block` whose rows fit
    LCA_ROWS_BYTES, so a task writes its chunks as its steps finish instead of holding the whole block."""
    fit = max(1, LCA_ROWS_BYTES // max(1, 4 * size))
    return max(r for r in range(1, block + 1) if block % r == 0 and r <= fit)


def _create_arrays(root: zarr.Group, split: str, steps: int, layout: Any, block: int,
                   settings: Settings) -> None:
    names = array_names(split)
    nblocks = -(-steps // block)
    # Dimension names (as in trajectory/) let plain xarray open the group: `xr.open_zarr(store, group="lca")`.
    out = OutputSpec.build(layout, settings.keep, settings.keep_layers)
    n_units = Reducer(layout).units.size
    specs = {
        "layer": ((steps, len(layout)), (block, len(layout)), "float64", float("nan"), ("step", "layer")),
        "loss": ((steps + 1,), (block,), "float64", float("nan"), ("checkpoint",)),
        "residual": ((steps,), (block,), "float64", float("nan"), ("step",)),
        "points": ((steps,), (block,), "int32", 0, ("step",)),
        "splits": ((steps,), (block,), "int32", 0, ("step",)),
    }
    if out.units:
        specs["unit"] = ((steps, n_units), (block, param_chunk_for(n_units, block, itemsize=8)), "float64",
                         float("nan"), ("step", "unit"))
    if out.parameters:
        rows = lca_chunk_rows(block, out.kept_size)
        specs["lca"] = ((steps, out.kept_size), (rows, param_chunk_for(out.kept_size, rows)), "float32",
                        float("nan"), ("step", "parameter"))
    # The completion record goes first and empty: if planning dies half-way, nothing claims to be done.
    root.create_array(names["done"], shape=(nblocks,), chunks=(1,), dtype="uint8", fill_value=0,
                      overwrite=True, dimension_names=("block",))
    for key in ("lca", "unit"):  # a rerun that keeps less must not leave the old finer arrays behind
        if key not in specs and names[key] in root:
            del root[names[key]]
    for key, (shape, chunks, dtype, fill, dims) in specs.items():
        root.create_array(names[key], shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                          compressors=_compressors(), overwrite=True, dimension_names=dims)
    attrs = {"format": FORMAT, "settings": settings.to_json(), "block": block, "steps": steps,
             "outputs": out.to_json()}
    root[names["layer"]].attrs.update(attrs)
    if out.parameters:  # a copy for readers that look for the settings on the per-parameter array
        root[names["lca"]].attrs.update(attrs)


def result_meta(root: zarr.Group, split: str) -> zarr.Array | None:
    """The array carrying a result's attributes: `layer`, or in stores from before it existed, `lca`."""
    names = array_names(split)
    for key in ("layer", "lca"):
        if names[key] in root and "settings" in root[names[key]].attrs:
            return root[names[key]]
    return None


def has_result(root: zarr.Group, split: str) -> bool:
    return result_meta(root, split) is not None


def plan_split(root: zarr.Group, split: str, *, steps: int, layout: Any, block: int,
               settings: Settings, recompute: bool = False) -> SplitPlan:
    """Create or check the split's arrays and list the blocks still to compute."""
    names = array_names(split)
    OutputSpec.build(layout, settings.keep, settings.keep_layers)  # a bad keep or glob fails before any write
    meta = result_meta(root, split)
    existing = dict(meta.attrs) if meta is not None else None
    if existing is not None and meta.path == names["lca"] and not recompute \
            and np.asarray(root[names["done"]][:]).any():
        raise LCAError(f"{split} LCA in this store was written before per-unit and per-layer arrays existed; "
                       f"it still opens with open_lca, but to compute more of it pass --recompute")
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
        _create_arrays(root, split, steps, layout, block, settings)
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


def split_stats(root: zarr.Group, split: str, tol: float) -> SplitStats:
    """Statistics over the steps of finished blocks (the completion record, not the values, says which)."""
    names = array_names(split)
    done = np.asarray(root[names["done"]][:]).astype(bool)
    block = int(result_meta(root, split).attrs["block"])
    steps = int(root[names["residual"]].shape[0])
    mask = np.repeat(done, block)[:steps]
    r = np.abs(np.asarray(root[names["residual"]][:])[mask])
    points = np.asarray(root[names["points"]][:])[mask]
    nan = float("nan")
    return SplitStats(
        int(done.sum()), int(done.size), int(mask.sum()),
        float(np.nanmax(r)) if r.size else nan, float(np.nanmean(r)) if r.size else nan,
        float(np.nanmedian(r)) if r.size else nan, float((r <= tol).mean()) if r.size else nan,
        float(points.mean()) if r.size else nan, int(points.max()) if r.size else 0,
    )


class BlockWriter:
    """Takes a block's LCA rows as they are finished and writes what the result keeps.

    `row(j, lca_row)` takes the block's j-th step (any order). Per-unit and per-layer sums are taken from
    each row at once; kept per-parameter columns are written a chunk of rows at a time as soon as those rows
    are all in, so a worker holds one chunk's rows of them, not the block's. `finish` writes the per-unit,
    per-layer and per-step arrays and then marks the block done: the mark is the commit point a rerun trusts.
    """

    def __init__(self, root: zarr.Group, block: Block, steps: int, layout: Any, settings: Settings,
                 reducer: Reducer | None = None) -> None:
        self.root, self.block, self.steps = root, block, steps
        self.names = array_names(block.split)
        self.out = OutputSpec.build(layout, settings.keep, settings.keep_layers)
        self.reducer = reducer or Reducer(layout)
        n = block.stop - block.start
        self.units = np.full((n, self.reducer.units.size), np.nan) if self.out.units else None
        self.layers = np.full((n, len(layout)), np.nan)
        self.param = root[self.names["lca"]] if self.out.parameters else None
        self.chunk_rows = self.param.chunks[0] if self.param is not None else n
        self._pending: dict[int, np.ndarray] = {}
        self._written: list[tuple[int, int]] = []

    def row(self, j: int, lca_row: np.ndarray) -> None:
        """Step block.start + j's float32 LCA row [P]."""
        units, self.layers[j] = self.reducer(lca_row)
        if self.units is not None:
            self.units[j] = units
        if self.param is None:
            return
        self._pending[j] = np.array(self.out.select(lca_row), dtype=np.float32, copy=True)
        g0 = (j // self.chunk_rows) * self.chunk_rows
        g1 = min(g0 + self.chunk_rows, self.block.stop - self.block.start)
        if all(k in self._pending for k in range(g0, g1)):
            rows = np.stack([self._pending.pop(k) for k in range(g0, g1)])
            self.param[self.block.start + g0:self.block.start + g1] = rows
            self._written.append((self.block.start + g0, self.block.start + g1))

    def abort(self) -> None:
        """Undo a failed block's per-parameter rows (NaN, as never computed): nothing half-written stays."""
        self._pending.clear()
        for lo, hi in self._written:
            self.param[lo:hi] = np.full((hi - lo, self.param.shape[1]), np.nan, np.float32)
        self._written = []

    def finish(self, result: BlockResult) -> None:
        if self._pending:
            raise RuntimeError(f"block {self.block.index}: steps {sorted(self._pending)} were never completed")
        names, s, e = self.names, self.block.start, self.block.stop
        if self.units is not None:
            self.root[names["unit"]][s:e] = self.units
        self.root[names["layer"]][s:e] = self.layers
        # The final checkpoint's loss lives in the last block's chunk, so only the last block writes it.
        last = e == self.steps
        self.root[names["loss"]][s:e + 1 if last else e] = result.loss if last else result.loss[:-1]
        self.root[names["residual"]][s:e] = result.residual
        self.root[names["points"]][s:e] = result.points
        self.root[names["splits"]][s:e] = result.splits
        self.root[names["done"]][self.block.index] = 1


def write_block(root: zarr.Group, block: Block, result: BlockResult, steps: int, layout: Any,
                settings: Settings, reducer: Reducer | None = None) -> None:
    """Write one block's rows (held in `result.lca`), then mark it done."""
    writer = BlockWriter(root, block, steps, layout, settings, reducer)
    for j, lca_row in enumerate(result.lca):
        writer.row(j, lca_row)
    writer.finish(result)
