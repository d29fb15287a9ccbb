"""The result as one lazy xarray Dataset, and a text summary of a store.

The Dataset is dask-backed straight from the Zarr arrays, so `ds.lca_param` of a run too big for memory
still slices, reduces and plots like any Pangeo dataset. Variables and coordinates follow
docs/ARCHITECTURE.md; the `ds.lca` accessor (pipeline/analysis/accessor.py) adds the paper's analyses.
"""

from __future__ import annotations

import json
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from pipeline.errors import LCAError
from pipeline.lca.plan import array_names, split_prefix, split_stats


def _split_variables(root: Any, split: str, layout: Any, steps: int) -> dict[str, tuple]:
    names = array_names(split)
    prefix = split_prefix(split)
    lca = da.from_zarr(root[names["lca"]])
    # Layers are contiguous column ranges, so per-layer sums are slices, accumulated in float64.
    by_layer = da.stack([lca[:, t.offset:t.offset + t.size].sum(axis=1, dtype=np.float64)
                         for t in layout.tensors], axis=1)
    loss = da.from_zarr(root[names["loss"]])
    return {
        f"{prefix}lca_param": (("iteration", "parameter"), lca),
        f"{prefix}lca_layer": (("iteration", "layer"), by_layer),
        f"{prefix}loss": (("iteration",), loss[:steps]),
        f"{prefix}loss_after": (("iteration",), loss[1:steps + 1]),
        f"{prefix}loss_change": (("iteration",), loss[1:steps + 1] - loss[:steps]),
        f"{prefix}residual": (("iteration",), da.from_zarr(root[names["residual"]])),
        f"{prefix}points": (("iteration",), da.from_zarr(root[names["points"]])),
        f"{prefix}splits": (("iteration",), da.from_zarr(root[names["splits"]])),
    }


def computed_splits(root: Any) -> list[str]:
    return [s for s in ("train", "heldout") if array_names(s)["lca"] in root]


def open_lca(path: str) -> xr.Dataset:
    """Open a store's LCA as a lazy Dataset (dims iteration, parameter, layer); see docs/ARCHITECTURE.md."""
    from trajectory_store import open_trajectory

    reader = open_trajectory(path)
    root, layout = reader.group, reader.layout
    splits = computed_splits(root)
    if not splits:
        raise LCAError(f"{path} has no LCA yet; compute it with `lca compute {path}` (or `make lca`)")
    steps = int(root[array_names(splits[0])["lca"]].shape[0])
    variables: dict[str, tuple] = {}
    done, total = 0, 0
    for split in splits:
        variables.update(_split_variables(root, split, layout, steps))
        flags = np.asarray(root[array_names(split)["done"]][:])
        done, total = done + int(flags.sum()), total + flags.size
    settings = dict(root[array_names(splits[0])["lca"]].attrs.get("settings", {}))
    coords = {
        "iteration": np.arange(steps),
        "parameter": np.arange(layout.size),
        "layer": [t.name for t in layout.tensors],
        "param_layer": ("parameter", np.array(layout.names, dtype=object)[layout.layer_of_parameter()]),
        "param_unit": ("parameter", layout.unit_of_parameter()),
        "layer_module": ("layer", [t.module for t in layout.tensors]),
        "layer_offset": ("layer", [t.offset for t in layout.tensors]),
        "layer_size": ("layer", [t.size for t in layout.tensors]),
        "layer_units": ("layer", [t.num_units for t in layout.tensors]),
    }
    attrs = {
        "store": str(path),
        "rule": settings.get("rule", ""),
        "tol": float(settings.get("tol", np.nan)),
        "precision": settings.get("precision", ""),
        "splits_computed": ",".join(splits),
        "workflow": json.dumps(reader.workflow or {}),
        "blocks_done": done,
        "blocks_total": total,
    }
    return xr.Dataset(variables, coords=coords, attrs=attrs)


def describe(path: str) -> str:
    """`lca info`: what a store holds and how well its LCA conserves the loss, in a dozen lines."""
    from trajectory_store import open_trajectory

    reader = open_trajectory(path)
    layout = reader.layout
    wf = reader.workflow or {}
    lines = [
        f"store       {path}",
        f"workflow    {wf.get('name', '(none: recorded by a user loop)')}",
        f"steps       {reader.num_steps} ({reader.num_checkpoints} checkpoints)",
        f"parameters  {layout.size:,} in {len(layout)} tensors: "
        + ", ".join(f"{t.name}{list(t.shape)}" for t in layout.tensors[:8])
        + (" ..." if len(layout) > 8 else ""),
    ]
    root = reader.group
    splits = computed_splits(root)
    if not splits:
        lines.append(f"lca         not computed yet: run `lca compute {path}`")
    for split in splits:
        names = array_names(split)
        settings = root[names["lca"]].attrs.get("settings", {})
        tol = float(settings.get("tol", np.inf))
        st = split_stats(root, split, tol)
        lines.append(f"lca/{split:<7} {st.blocks_done}/{st.blocks_total} blocks done "
                     f"({100 * st.blocks_done / st.blocks_total:.0f}%); rule {settings.get('rule')}, "
                     f"tol {settings.get('tol')}, {settings.get('precision')}")
        if st.steps_done:
            lines.append(f"  residual  |r| max {st.residual_abs_max:.3e}, mean {st.residual_abs_mean:.3e}, "
                         f"median {st.residual_abs_median:.3e}; {100 * st.within_tol:.1f}% of steps within tol")
            lines.append(f"  points    {st.points_mean:.3f} gradient evaluations per step (max {st.points_max})")
    return "\n".join(lines)
