"""What to compute: a run's steps cut into blocks aligned with the output chunks, and the arrays they fill.

Following rechunker's plan/execute split, everything that touches shared metadata happens here, on the
client, before any task runs: creating the `lca/` arrays and checking that earlier results were computed
with the same settings. Tasks then only write whole chunks that no other task writes, and record their
block as done last, so a killed task or client leaves nothing half-claimed and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import LCAError
from trajectory_store import StoreError
from trajectory_store.location import describe_oserror
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
        "lca": ((steps, size), (block, param_chunk), "float32", float("nan"), ("step", "parameter")),
        "loss": ((steps + 1,), (block,), "float64", float("nan"), ("checkpoint",)),
        "residual": ((steps,), (block,), "float64", float("nan"), ("step",)),
        "points": ((steps,), (block,), "int32", 0, ("step",)),
        "splits": ((steps,), (block,), "int32", 0, ("step",)),
    }
    # The completion record goes first and empty: if planning dies half-way, nothing claims to be done,
    # and what was created is removed again (a full disk must not leave arrays without their settings).
    group = names["lca"].rsplit("/", 1)[0]
    had_group = group in root
    try:
        root.create_array(names["done"], shape=(nblocks,), chunks=(1,), dtype="uint8", fill_value=0,
                          overwrite=True, dimension_names=("block",))
        for key, (shape, chunks, dtype, fill, dims) in specs.items():
            root.create_array(names[key], shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                              compressors=_compressors(), overwrite=True, dimension_names=dims)
        root[names["lca"]].attrs.update({"format": FORMAT, "settings": settings.to_json(), "block": block,
                                         "steps": steps})
    except OSError as e:
        for name in names.values():
            with contextlib.suppress(Exception):
                del root[name]
        if not had_group:
            with contextlib.suppress(Exception):
                del root[group]
        where = str(getattr(root.store_path.store, "root", root.store_path))
        raise StoreError(f"cannot create the {split} LCA arrays in {where}: {describe_oserror(e)}; "
                         f"{_fix_for(e)}") from None


def _fix_for(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "free some disk space and run the same command again"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "make the store writable (or compute on a writable copy of it)"
    return "check the store's file system and run the same command again"


def read_done(root: zarr.Group, split: str, nblocks: int | None = None) -> np.ndarray:
    """The split's completion record (one flag per block), checked: missing or misshapen is one line."""
    names = array_names(split)
    fix = "recompute it with `lca compute STORE --recompute`"
    try:
        done = np.asarray(root[names["done"]][:])
    except KeyError:
        raise StoreError(f"the completion record {names['done']} is missing; {fix}") from None
    except (ValueError, TypeError, RuntimeError, zarr.errors.BaseZarrError) as e:
        raise StoreError(f"the completion record {names['done']} cannot be read ({type(e).__name__}); {fix}") from None
    if nblocks is None:
        lca = root[names["lca"]]
        block = lca.attrs.get("block")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1 or lca.ndim != 2:
            raise StoreError(f"{names['lca']} has no valid `block` attribute; {fix}")
        nblocks = -(-int(lca.shape[0]) // block)
    if done.shape != (nblocks,):
        raise StoreError(f"the completion record {names['done']} has shape {done.shape}, expected "
                         f"({nblocks},); {fix}")
    return done.astype(bool)


def plan_split(root: zarr.Group, split: str, *, steps: int, size: int, block: int, param_chunk: int,
               settings: Settings, recompute: bool = False) -> SplitPlan:
    """Create or check the split's arrays and list the blocks still to compute."""
    names = array_names(split)
    existing = dict(root[names["lca"]].attrs) if names["lca"] in root else None
    nblocks = -(-steps // block)
    intact = names["done"] in root and root[names["done"]].shape == (nblocks,)
    same = existing is not None and existing.get("settings") == settings.to_json() \
        and existing.get("block") == block and existing.get("steps") == steps and intact
    if existing is not None and not intact and not recompute:
        read_done(root, split)  # names what is wrong with the completion record, and the fix
    if not same or recompute:
        if existing is not None and not recompute and names["done"] in root \
                and np.asarray(root[names["done"]][:]).any():
            old = existing.get("settings", {})
            diff = ", ".join(f"{k}={old.get(k)!r}" for k, v in settings.to_json().items() if old.get(k) != v)
            what = diff or f"block={existing.get('block')}, steps={existing.get('steps')}"
            raise LCAError(f"{split} LCA in this store was computed with {what}; pass --recompute to "
                           f"replace it with the new settings")
        _create_arrays(root, split, steps, size, block, param_chunk, settings)
    done = read_done(root, split, nblocks)
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
    done = read_done(root, split)
    block = int(root[names["lca"]].attrs["block"])
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


def write_block(root: zarr.Group, block: Block, result: BlockResult, steps: int) -> None:
    """Write one block's rows, then mark it done: the mark is the commit point a rerun trusts."""
    names = array_names(block.split)
    s, e = block.start, block.stop
    root[names["lca"]][s:e] = result.lca
    # The final checkpoint's loss lives in the last block's chunk, so only the last block writes it.
    root[names["loss"]][s:e + 1 if e == steps else e] = result.loss if e == steps else result.loss[:-1]
    root[names["residual"]][s:e] = result.residual
    root[names["points"]][s:e] = result.points
    root[names["splits"]][s:e] = result.splits
    root[names["done"]][block.index] = 1
