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

from pipeline.errors import IncompleteResultError, IncompleteResultWarning, LCAError
from pipeline.lca.plan import array_names, split_prefix, split_stats


def _split_variables(root: Any, split: str, layout: Any, steps: int, block: int) -> dict[str, tuple]:
    names = array_names(split)
    prefix = split_prefix(split)
    lca = da.from_zarr(root[names["lca"]])
    # Layers are contiguous column ranges, so per-layer sums are slices, accumulated in float64.
    by_layer = da.stack([lca[:, t.offset:t.offset + t.size].sum(axis=1, dtype=np.float64)
                         for t in layout.tensors], axis=1)
    loss = da.from_zarr(root[names["loss"]])
    per_step = {
        f"{prefix}loss": loss[:steps],
        f"{prefix}loss_after": loss[1:steps + 1],
        f"{prefix}loss_change": loss[1:steps + 1] - loss[:steps],
        f"{prefix}residual": da.from_zarr(root[names["residual"]]),
        f"{prefix}points": da.from_zarr(root[names["points"]]),
        f"{prefix}splits": da.from_zarr(root[names["splits"]]),
        **({f"{prefix}lca_error": da.from_zarr(root[names["error"]])}  # the per-parameter error estimate
           if names["error"] in root else {}),  # (stores computed before it existed have none)
    }
    # Uniform chunks along iteration (slicing loss by one row leaves chunks like (63, 1, 63, 1, ...)), and
    # one chunk across layers: what `to_zarr` needs to write the Dataset out as it is.
    variables = {f"{prefix}lca_param": (("iteration", "parameter"), lca),
                 f"{prefix}lca_layer": (("iteration", "layer"), by_layer.rechunk((block, -1)))}
    variables |= {k: (("iteration",), v.rechunk(block)) for k, v in per_step.items()}
    return variables


def _complete(root: Any, split: str, steps: int, block: int) -> np.ndarray:
    """Per iteration: is its block recorded as done (the completion record, not a scan for NaN)."""
    flags = np.asarray(root[array_names(split)["done"]][:]).astype(bool)
    return np.repeat(flags, block)[:steps] if flags.size else np.zeros(steps, dtype=bool)


def computed_splits(root: Any) -> list[str]:
    return [s for s in ("train", "heldout") if array_names(s)["lca"] in root]


def open_lca(path: str, incomplete: str = "warn") -> xr.Dataset:
    """Open a store's LCA as a lazy Dataset (dims iteration, parameter, layer); see docs/ARCHITECTURE.md.

    A result still being computed has NaN rows, which xarray's reductions skip by default; so a partial
    result never opens silently. `incomplete`: "warn" (default: an `IncompleteResultWarning` with the count
    of missing iterations; the `complete` coordinate marks the finished ones and `ds.lca` analyses refuse
    the result until it is whole or narrowed with `ds.lca.completed()`), "raise" (an
    `IncompleteResultError`), or "drop" (only the finished iterations, with a warning saying how many
    were left out).
    """
    import warnings

    from trajectory_store import open_trajectory

    if incomplete not in ("warn", "raise", "drop"):
        raise LCAError(f"incomplete must be 'warn', 'raise' or 'drop', not {incomplete!r}")
    reader = open_trajectory(path)
    root, layout = reader.group, reader.layout
    splits = computed_splits(root)
    if not splits:
        raise LCAError(f"{path} has no LCA yet; compute it with `lca compute {path}` (or `make lca`)")
    steps = int(root[array_names(splits[0])["lca"]].shape[0])
    variables: dict[str, tuple] = {}
    complete: dict[str, tuple] = {}
    done, total = 0, 0
    for split in splits:
        lca_attrs = root[array_names(split)["lca"]].attrs
        block = int(lca_attrs.get("block", steps) or steps) or 1
        variables.update(_split_variables(root, split, layout, steps, block))
        flags = np.asarray(root[array_names(split)["done"]][:])
        done, total = done + int(flags.sum()), total + flags.size
        complete[f"{split_prefix(split)}complete"] = ("iteration", _complete(root, split, steps, block))
    settings = dict(root[array_names(splits[0])["lca"]].attrs.get("settings", {}))
    coords = {
        "iteration": np.arange(steps),
        "parameter": np.arange(layout.size),
        "layer": np.array([t.name for t in layout.tensors], dtype=object),
        "param_layer": ("parameter", np.array(layout.names, dtype=object)[layout.layer_of_parameter()]),
        "param_unit": ("parameter", layout.unit_of_parameter()),
        "layer_module": ("layer", np.array([t.module for t in layout.tensors], dtype=object)),
        "layer_offset": ("layer", [t.offset for t in layout.tensors]),
        "layer_size": ("layer", [t.size for t in layout.tensors]),
        "layer_units": ("layer", [t.num_units for t in layout.tensors]),
        "layer_shape": ("layer", np.array([json.dumps(list(t.shape)) for t in layout.tensors], dtype=object)),
        **complete,
    }
    missing = {s: int((~complete[f"{split_prefix(s)}complete"][1]).sum()) for s in splits}
    # Plain str / int / float attributes only, so to_netcdf and to_zarr store them as they are.
    attrs = {
        "store": str(path),
        "rule": str(settings.get("rule", "")),
        "tol": float(settings.get("tol", np.nan)),
        "precision": str(settings.get("precision", "")),
        "rtol": float(settings.get("rtol", 0.0)),
        "splits_computed": ",".join(splits),
        "workflow": json.dumps(reader.workflow or {}),
        "settings": json.dumps(settings),
        "blocks_done": done,
        "blocks_total": total,
        "iterations_missing": max(missing.values()),
    }
    problem = reader.attrs.get("problem")
    if problem:  # the model, data and loss by reference (issue 8), kept as JSON text like the workflow
        attrs["problem"] = problem if isinstance(problem, str) else json.dumps(problem)
    ds = xr.Dataset(variables, coords=coords, attrs=attrs)
    if any(missing.values()):
        what = ", ".join(f"{n} of {steps} iterations of lca/{s}" for s, n in missing.items() if n)
        hint = f"finish it with `lca compute {path}`"
        if incomplete == "raise":
            raise IncompleteResultError(f"{path} is incomplete: {what} not computed yet; {hint}")
        if incomplete == "drop":
            keep = np.all([c[1] for c in complete.values()], axis=0)
            ds = ds.isel(iteration=np.flatnonzero(keep))
            warnings.warn(f"{path}: left out {what} (not computed yet); {hint}", IncompleteResultWarning,
                          stacklevel=2)
        else:
            warnings.warn(f"{path} is incomplete: {what} not computed yet (NaN rows, which .sum() would skip); "
                          f"{hint}, or analyse the finished part with ds.lca.completed()",
                          IncompleteResultWarning, stacklevel=2)
    return ds


def _problem_lines(reader: Any, root: Any, splits: list[str]) -> list[str]:
    """What L is: the recorded problem (model, data, loss by reference) and the data's fingerprints."""
    from pipeline.problem.definition import Problem

    lines = []
    if reader.problem:
        lines.append("problem     (recorded by training)")
        lines.extend("  " + line for line in Problem.from_json(reader.problem).describe())
    else:
        lines.append("problem     not recorded (compute needs --workflow FILE or --model/--data)")
    for split in splits:
        used = root[array_names(split)["lca"]].attrs.get("problem")
        if isinstance(used, dict) and (not reader.problem or used != reader.problem):
            p = Problem.from_json(used)
            lines.append(f"lca/{split:<7} computed with model {p.model}, data {p.data}, loss {p.loss}, "
                         f"fingerprint {p.fingerprints.get(split, '?')}")
    return lines


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
    frozen = reader.frozen()
    if frozen:
        lines.append(f"frozen      {sum(v.size for v in frozen.values()):,} parameters in {len(frozen)} tensors "
                     f"(requires_grad=False: held fixed, outside the layout, no LCA): "
                     + ", ".join(list(frozen)[:4]) + (" ..." if len(frozen) > 4 else ""))
    root = reader.group
    splits = computed_splits(root)
    lines.extend(_problem_lines(reader, root, splits))
    if not splits:
        lines.append(f"lca         not computed yet: run `lca compute {path}`")
    for split in splits:
        names = array_names(split)
        settings = root[names["lca"]].attrs.get("settings", {})
        tol = float(settings.get("tol", np.inf))
        rtol = float(settings.get("rtol", 0.0))
        st = split_stats(root, split, tol, rtol)
        lines.append(f"lca/{split:<7} {st.blocks_done}/{st.blocks_total} blocks done "
                     f"({100 * st.blocks_done / st.blocks_total:.0f}%); rule {settings.get('rule')}, "
                     f"tol {settings.get('tol')}" + (f", rtol {rtol:g}" if rtol > 0 else "")
                     + f", {settings.get('precision')}")
        if st.steps_done:
            lines.append(f"  residual  |r| max {st.residual_abs_max:.3e}, mean {st.residual_abs_mean:.3e}, "
                         f"median {st.residual_abs_median:.3e}; {100 * st.within_tol:.1f}% of steps within tol")
            lines.append(f"  points    {st.points_mean:.3f} gradient evaluations per step (max {st.points_max})")
            if np.isfinite(st.error_median):
                lines.append(f"  error     per-parameter estimate sum|e_i|/sum|LCA_i| median {st.error_median:.2e}, "
                             f"max {st.error_max:.2e}"
                             + (f"; {100 * st.within_rtol:.1f}% of steps within rtol" if rtol > 0 else ""))
    return "\n".join(lines)
