"""What to compute: a run's steps cut into blocks aligned with the output chunks, and the arrays they fill.

Following rechunker's plan/execute split, everything that touches shared metadata happens here, on the
client, before any task runs: creating the result's arrays (in its version group, see results.py) and
checking that earlier results were computed with the same settings. Tasks then only write whole chunks that
no other task writes, and commit a block last: they read its rows back, record their checksums, then mark
it done. A killed task or client leaves nothing half-claimed, a rerun resumes, and a block whose data went
missing or was damaged afterwards no longer counts as done (`verify_split`).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline.errors import LCAError
from pipeline.lca.integrate import BlockResult
from pipeline.lca.outputs import OutputSpec, Reducer
from pipeline.lca.results import FORMAT, GROUP, now, valid_version, validate_name
from trajectory_store.chunking import param_chunk_for

# Per block, one checksum per array, in this order (the `crc` array's columns).
CHECKED = ("lca", "loss", "residual", "points", "splits", "unit", "layer")  # kept ones only; absent: 0
# Reading a result back against its checksums costs a full read: done by default only up to this size of
# its per-parameter array (larger results get the cheap presence check unless asked: `lca info --verify`).
DEEP_VERIFY_BYTES = 1 << 30


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
    damaged: dict[int, str] = field(default_factory=dict)  # blocks marked done whose data failed verification


@dataclass
class ResultPlan:
    """One named result: the version group tasks write, and the version it replaces once complete."""

    name: str
    path: str
    replaces: str | None
    extra: dict[str, Any]
    splits: list[SplitPlan]

    @property
    def pending(self) -> list[Block]:
        return [b for p in self.splits for b in p.pending]


def split_prefix(split: str) -> str:
    """Names of the training split's results are bare; the held-out split's carry `heldout_`."""
    return "" if split == "train" else f"{split}_"


def array_names(split: str, result: str) -> dict[str, str]:
    """Store paths of one split's arrays inside the result group `result` (a `ResultRef.path`, e.g.
    "lca/rk4-tol1e-07-fp32-n16-eb4096/r1"; "lca" in a format-1 store). The one place paths are spelled.
    `lca` (per parameter) exists only when kept, `unit` unless keep="layer"; `layer` always (format 1 before
    per-layer arrays: `lca` only)."""
    prefix = split_prefix(split)
    return {
        "lca": f"{result}/{split}",
        "unit": f"{result}/{prefix}unit",
        "layer": f"{result}/{prefix}layer",
        "loss": f"{result}/{prefix}loss",
        "residual": f"{result}/{prefix}residual",
        "points": f"{result}/{prefix}points",
        "splits": f"{result}/{prefix}splits",
        "done": f"{result}/{prefix}blocks_done",
        "crc": f"{result}/{prefix}blocks_crc",
    }


def result_meta(root: zarr.Group, split: str, result: str) -> zarr.Array | None:
    """The array carrying a split's attributes (outputs, problem): `layer`, or in stores from before it
    existed, `lca`."""
    names = array_names(split, result)
    for key in ("layer", "lca"):
        if names[key] in root and isinstance(root[names[key]], zarr.Array):
            return root[names[key]]
    return None


def computed_splits(root: zarr.Group, result: str) -> list[str]:
    return [s for s in ("train", "heldout") if result_meta(root, s, result) is not None]


def _present(root: zarr.Group, names: dict[str, str]) -> dict[str, Any]:
    """The checked arrays this result keeps (a result kept per layer has no `lca` or `unit`)."""
    return {k: root[names[k]] for k in CHECKED if names[k] in root}


def _compressors() -> list[Any]:
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]


LCA_ROWS_BYTES = 4 << 20  # an output chunk holds at most this many bytes of rows (or one row)


def lca_chunk_rows(block: int, size: int) -> int:
    """Rows per chunk of the per-parameter array: the largest divisor of `block` whose rows fit
    LCA_ROWS_BYTES, so a task writes its chunks as its steps finish instead of holding the whole block."""
    fit = max(1, LCA_ROWS_BYTES // max(1, 4 * size))
    return max(r for r in range(1, block + 1) if block % r == 0 and r <= fit)


def _create_arrays(root: zarr.Group, result: str, split: str, steps: int, layout: Any, block: int,
                   settings: Settings) -> None:
    names = array_names(split, result)
    nblocks = -(-steps // block)
    # Dimension names (as in trajectory/) let plain xarray open a version group:
    # `xr.open_zarr(store, group="lca/<name>/r1")`.
    out = OutputSpec.build(layout, settings.keep, settings.keep_layers)
    n_units = Reducer(layout).units.size
    specs = {
        "layer": ((steps, len(layout)), (block, len(layout)), "float64", float("nan"), ("step", "layer")),
        "loss": ((steps + 1,), (block,), "float64", float("nan"), ("checkpoint",)),
        "residual": ((steps,), (block,), "float64", float("nan"), ("step",)),
        "points": ((steps,), (block,), "int32", 0, ("step",)),
        "splits": ((steps,), (block,), "int32", 0, ("step",)),
        "crc": ((nblocks, len(CHECKED)), (1, len(CHECKED)), "uint32", 0, ("block", "checked")),
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


def _new_version(root: zarr.Group, name: str, wanted: dict[str, Any]) -> str:
    group = root[f"{GROUP}/{name}"]
    taken = [int(k[1:]) for k in group.group_keys() if k[:1] == "r" and k[1:].isdigit()]
    version = f"r{max(taken, default=0) + 1}"
    group.create_group(version, attributes={"format": FORMAT, "created": now(), **wanted})
    return version


def _any_done(root: zarr.Group, path: str) -> bool:
    return any(np.asarray(root[array_names(s, path)["done"]][:]).any() for s in computed_splits(root, path))


def _matches(root: zarr.Group, path: str, wanted: dict[str, Any]) -> bool:
    attrs = dict(root[path].attrs)
    return all(attrs.get(k) == v for k, v in wanted.items())


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    for key in new:
        if key == "settings":
            o = old.get("settings") or {}
            diffs += [f"{k}={o.get(k)!r}" for k, v in new["settings"].items() if o.get(k) != v]
        elif old.get(key) != new[key]:
            diffs.append(f"{key}={old.get(key)!r}")
    return ", ".join(diffs) or "other settings"


def ensure_result_group(root: zarr.Group, name: str) -> zarr.Group:
    """`lca/<name>`, created if needed (its attributes: `current`, `pending`, `claim`)."""
    validate_name(name)
    lca = root.require_group(GROUP)
    if "format" not in lca.attrs:
        lca.attrs["format"] = FORMAT
    if name not in lca:
        lca.create_group(name, attributes={"current": None, "pending": None, "claim": None})
    return lca[name]


def stored_threads(root: zarr.Group, name: str, settings: Settings, recompute: bool) -> int | None:
    """The thread count of the version a compute would resume (same settings), if it recorded one."""
    group = root.get(f"{GROUP}/{name}")
    if group is None:
        return None
    version = group.attrs.get("pending" if recompute else "current")
    if not valid_version(version) or version not in group:
        return None
    attrs = group[version].attrs
    threads = attrs.get("threads")
    return threads if attrs.get("settings") == settings.to_json() and isinstance(threads, int) else None


def plan_result(root: zarr.Group, name: str, splits: list[str], *, steps: int, layout: Any, block: int,
                settings: Settings, recompute: bool = False,
                extra: dict[str, Any] | None = None) -> ResultPlan:
    """Choose the version of result `name` to write, create its missing arrays, list what is left to do.

    `extra` holds further attributes that must match for results to be mixed (threads per worker, the
    store's creation stamp). Without `recompute`, a result computed under other settings is refused; with it
    the new version is computed beside the old one, which `finish_result` replaces only once all is done.
    """
    OutputSpec.build(layout, settings.keep, settings.keep_layers)  # a bad keep or glob fails before any write
    group = ensure_result_group(root, name)
    wanted = {"settings": settings.to_json(), "block": block, "steps": steps, **(extra or {})}
    current, pending = group.attrs.get("current"), group.attrs.get("pending")
    current = current if valid_version(current) and current in group else None
    pending = pending if valid_version(pending) and pending in group else None
    base = f"{GROUP}/{name}"
    replaces = None
    if current and not recompute and _matches(root, f"{base}/{current}", wanted):
        target = current
    elif current and not recompute and _any_done(root, f"{base}/{current}"):
        what = _describe_difference(dict(root[f"{base}/{current}"].attrs), wanted)
        raise LCAError(f"LCA result {name!r} in this store was computed with {what}; pass --recompute to replace "
                       f"it (the old one stays readable until the new one is complete) or --name NEW to keep both")
    elif current and recompute:
        if not (pending and _matches(root, f"{base}/{pending}", wanted)):
            if pending:
                del group[pending]  # an abandoned recompute under other settings
            pending = _new_version(root, name, wanted)
            group.attrs["pending"] = pending
        target, replaces = pending, current
    else:  # nothing readable yet, or a current version with nothing done: start afresh as the current one
        for stale in {current, pending} - {None}:
            del group[stale]
        target = _new_version(root, name, wanted)
        group.attrs.update({"current": target, "pending": None})
    path = f"{base}/{target}"
    plans = []
    for split in splits:
        if array_names(split, path)["done"] not in root:
            _create_arrays(root, path, split, steps, layout, block, settings)
        names = array_names(split, path)
        done = np.asarray(root[names["done"]][:]).astype(bool)
        damaged = verify_split(root, path, split)
        blocks = [Block(split, i, s, min(steps, s + block)) for i, s in enumerate(range(0, steps, block))]
        plans.append(SplitPlan(split, settings, steps, block, blocks,
                               [b for b in blocks if not done[b.index] or b.index in damaged], damaged))
    return ResultPlan(name, path, replaces, extra or {}, plans)


def finish_result(root: zarr.Group, plan: ResultPlan) -> bool:
    """Make a completed recompute the current version and drop the one it replaces; True if it did."""
    if plan.replaces is None:
        return False
    for split in computed_splits(root, plan.path):
        if not np.asarray(root[array_names(split, plan.path)["done"]][:]).all():
            return False
    group = root[f"{GROUP}/{plan.name}"]
    group.attrs.update({"current": plan.path.rsplit("/", 1)[1], "pending": None})  # the switch: one write
    if plan.replaces in group:
        del group[plan.replaces]
    return True


# ---- what a finished block is --------------------------------------------------------------------------


def _rows(split_steps: int, block: Block | int, block_size: int, key: str) -> slice:
    index = block if isinstance(block, int) else block.index
    start = index * block_size
    stop = min(split_steps, start + block_size)
    # The final checkpoint's loss lives in the last block's rows.
    return slice(start, stop + 1 if key == "loss" and stop == split_steps else stop)


def _checksums(root: zarr.Group, names: dict[str, str], index: int, block_size: int, steps: int) -> list[int]:
    out = []
    for key in CHECKED:
        if names[key] not in root:
            out.append(0)
            continue
        arr = root[names[key]]
        data = np.ascontiguousarray(arr[_rows(steps, index, block_size, key)], dtype=arr.dtype)
        out.append(zlib.crc32(data.tobytes()))
    return out


def _chunk_keys(arr: zarr.Array, rows: slice) -> list[str]:
    first, last = rows.start // arr.chunks[0], (rows.stop - 1) // arr.chunks[0]
    rest = [range(-(-n // c)) for n, c in zip(arr.shape[1:], arr.chunks[1:])]
    grid = np.stack(np.meshgrid(range(first, last + 1), *rest, indexing="ij"), -1).reshape(-1, arr.ndim)
    return [f"{arr.path}/{arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))}" for coords in grid]


def verify_split(root: zarr.Group, result: str, split: str, *, deep: bool | None = None) -> dict[int, str]:
    """Blocks marked done whose data is not what the task committed, each with a short reason.

    Always checks that every chunk of a done block exists (a listing, cheap). `deep` also reads the block
    back and compares the checksums recorded at commit time, which catches flipped bytes and rows
    overwritten by somebody else; `None` does so when the result is at most `DEEP_VERIFY_BYTES`.
    Format-1 results recorded no checksums; only presence is checked there.
    """
    from zarr.core.sync import sync

    names = array_names(split, result)
    done = np.flatnonzero(np.asarray(root[names["done"]][:]))
    if not done.size:
        return {}
    arrays = _present(root, names)
    if deep is None:
        deep = sum(a.nbytes for a in arrays.values()) <= DEEP_VERIFY_BYTES
    steps = int(arrays["residual"].shape[0])
    block = int(arrays["residual"].chunks[0])
    store = root.store
    present = set()
    for arr in arrays.values():
        present.update(sync(_list(store, f"{arr.path}/")))
    crc = root[names["crc"]] if names["crc"] in root else None
    recorded = np.asarray(crc[:]) if crc is not None and deep else None
    problems: dict[int, str] = {}
    for index in map(int, done):
        missing = [k for key, arr in arrays.items() for k in _chunk_keys(arr, _rows(steps, index, block, key))
                   if k not in present]
        if missing:
            problems[index] = f"missing chunk {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            continue
        if recorded is None:
            continue
        bad = []
        for column, key in enumerate(CHECKED):
            if key not in arrays:
                continue
            arr = arrays[key]
            try:
                data = np.ascontiguousarray(arr[_rows(steps, index, block, key)], dtype=arr.dtype)
            except Exception as e:  # the chunk's own crc32c failed, or it does not decode: zarr raises several kinds
                reason = "crc32c mismatch" if "checksum" in str(e).lower() else type(e).__name__
                bad.append(f"unreadable {names[key]} ({reason})")
                continue
            if zlib.crc32(data.tobytes()) != int(recorded[index][column]):
                bad.append(f"checksum mismatch in {names[key]}")
        if bad:
            problems[index] = ", ".join(bad)
    return problems


async def _list(store: Any, prefix: str) -> set[str]:
    return {key async for key in store.list_prefix(prefix)}


def describe_damage(split: str, problems: dict[int, str], block: int, steps: int) -> str:
    """One line naming the damaged blocks (at most three spelled out)."""
    items = sorted(problems.items())
    shown = "; ".join(f"block {i} (steps {i * block}-{min(steps, (i + 1) * block) - 1}): {why}"
                      for i, why in items[:3])
    more = f"; and {len(items) - 3} more" if len(items) > 3 else ""
    return f"{len(items)} {split} block(s) marked done failed verification: {shown}{more}"


# ---- statistics ----------------------------------------------------------------------------------------


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


def split_stats(root: zarr.Group, result: str, split: str, tol: float,
                exclude: dict[int, str] | None = None) -> SplitStats:
    """Statistics over the steps of finished blocks (the completion record, not the values, says which);
    blocks in `exclude` (failed verification) do not count as finished."""
    names = array_names(split, result)
    done = np.asarray(root[names["done"]][:]).astype(bool)
    for index in exclude or {}:
        done[index] = False
    steps = int(root[names["residual"]].shape[0])
    block = int(root[names["residual"]].chunks[0])
    mask = np.repeat(done, block)[:steps]
    # Block by block, so that a damaged chunk of a block that is not counted is never decoded.
    rows = [slice(i * block, min(steps, (i + 1) * block)) for i in np.flatnonzero(done)]
    r = np.abs(np.concatenate([np.asarray(root[names["residual"]][sl]) for sl in rows] or [np.zeros(0)]))
    points = np.concatenate([np.asarray(root[names["points"]][sl]) for sl in rows] or [np.zeros(0, np.int32)])
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
    per-layer and per-step arrays, reads them back into the checksum record, then marks the block done: the
    mark is the commit point a rerun trusts. `guard` (this compute still owns the result and the store is
    still the one it planned on) is checked before the first write and again before the mark.
    """

    def __init__(self, root: zarr.Group, result: str, block: Block, steps: int, layout: Any, settings: Settings,
                 reducer: Reducer | None = None, guard: Callable[[], None] = lambda: None) -> None:
        guard()  # first: a store replaced under this compute may lack the arrays looked up below
        self.root, self.block, self.steps, self.guard = root, block, steps, guard
        self.names = array_names(block.split, result)
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
        size = int(self.root[names["residual"]].chunks[0])
        self.root[names["crc"]][self.block.index] = np.asarray(
            _checksums(self.root, names, self.block.index, size, self.steps), dtype=np.uint32)
        self.guard()
        self.root[names["done"]][self.block.index] = 1


def write_block(root: zarr.Group, result: str, block: Block, out: BlockResult, steps: int, layout: Any,
                settings: Settings, reducer: Reducer | None = None, guard: Callable[[], None] = lambda: None) -> None:
    """Write one block's rows (held in `out.lca`) into version group `result`, then mark it done."""
    writer = BlockWriter(root, result, block, steps, layout, settings, reducer, guard)
    for j, lca_row in enumerate(out.lca):
        writer.row(j, lca_row)
    writer.finish(out)
