"""The result as one lazy xarray Dataset, and a text summary of a store.

The Dataset is dask-backed straight from the Zarr arrays, so `ds.lca_param` of a run too big for memory
still slices, reduces and plots like any Pangeo dataset. Variables and coordinates follow
docs/ARCHITECTURE.md; the `ds.lca` accessor (pipeline/analysis/accessor.py) adds the paper's analyses.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from pipeline.errors import IncompleteResultError, IncompleteResultWarning, LCAError
from pipeline.lca.outputs import OutputSpec, UnitMap
from pipeline.lca.plan import (array_names, computed_splits, describe_damage, result_meta, split_prefix, split_stats,
                               verify_split)
from pipeline.lca.results import list_results, select_result


def _split_variables(root: Any, result: str, split: str, layout: Any, steps: int,
                     block: int) -> tuple[dict[str, tuple], Any]:
    """One split's variables (whatever the result kept), and the global columns its per-parameter LCA covers
    (None: not kept)."""
    names = array_names(split, result)
    prefix = split_prefix(split)
    variables: dict[str, tuple] = {}
    columns = None
    if names["lca"] in root:
        lca = da.from_zarr(root[names["lca"]])
        kept = (result_meta(root, split, result).attrs.get("outputs") or {}).get("kept_layers")
        # Stores from before per-unit outputs kept every parameter; a glob keeps a subset of the tensors.
        spec = OutputSpec.build(layout, "unit", kept) if kept is not None and len(kept) < len(layout) else None
        columns = spec.kept_columns() if spec is not None else np.arange(layout.size)
        variables[f"{prefix}lca_param"] = (("iteration", "parameter"), lca)
    if names["layer"] in root:
        by_layer = da.from_zarr(root[names["layer"]])
    else:  # written before per-layer outputs: layers are contiguous column ranges of the full array
        by_layer = da.stack([lca[:, t.offset:t.offset + t.size].sum(axis=1, dtype=np.float64)
                             for t in layout.tensors], axis=1)
    variables[f"{prefix}lca_layer"] = (("iteration", "layer"), by_layer.rechunk((block, -1)))
    if names["unit"] in root:
        units = da.from_zarr(root[names["unit"]])
        variables[f"{prefix}lca_unit"] = (("iteration", "unit"), units.rechunk((block, units.chunksize[1])))
    loss = da.from_zarr(root[names["loss"]])
    per_step = {
        f"{prefix}loss": loss[:steps],
        f"{prefix}loss_after": loss[1:steps + 1],
        f"{prefix}loss_change": loss[1:steps + 1] - loss[:steps],
        f"{prefix}residual": da.from_zarr(root[names["residual"]]),
        f"{prefix}points": da.from_zarr(root[names["points"]]),
        f"{prefix}splits": da.from_zarr(root[names["splits"]]),
    }
    # Uniform chunks along iteration (slicing loss by one row leaves chunks like (63, 1, 63, 1, ...)), and
    # one chunk across layers: what `to_zarr` needs to write the Dataset out as it is.
    variables |= {k: (("iteration",), v.rechunk(block)) for k, v in per_step.items()}
    return variables, columns


def _complete(root: Any, result: str, split: str, steps: int, block: int) -> np.ndarray:
    """Per iteration: is its block recorded as done (the completion record, not a scan for NaN)."""
    flags = np.asarray(root[array_names(split, result)["done"]][:]).astype(bool)
    return np.repeat(flags, block)[:steps] if flags.size else np.zeros(steps, dtype=bool)


def open_lca(path: str, result: str | None = None, *, incomplete: str = "warn",
             verify: bool | None = None) -> xr.Dataset:
    """Open one LCA result of a store as a lazy Dataset (dims iteration, parameter, layer).

    `result` names it (`lca info` lists them); by default the only one, else the most recently started.
    A block marked done whose chunks are missing or fail their checksums is refused with one line naming
    it (`lca compute` redoes it); `verify` reads every block back against its checksums (default: when the
    result is at most 1 GiB; otherwise only that its chunks exist).

    A result still being computed has NaN rows, which xarray's reductions skip by default; so a partial
    result never opens silently. `incomplete`: "warn" (default: an `IncompleteResultWarning` with the count
    of missing iterations; the `complete` coordinate marks the finished ones and `ds.lca` analyses refuse
    the result until it is whole or narrowed with `ds.lca.completed()`), "raise" (an
    `IncompleteResultError`), or "drop" (only the finished iterations, with a warning saying how many
    were left out). See docs/ARCHITECTURE.md for the variables.
    """
    from trajectory_store import open_trajectory

    if incomplete not in ("warn", "raise", "drop"):
        raise LCAError(f"incomplete must be 'warn', 'raise' or 'drop', not {incomplete!r}")
    reader = open_trajectory(path)
    root, layout = reader.group, reader.layout
    ref = select_result(root, result, str(path))
    splits = computed_splits(root, ref.path)
    if not splits:
        raise LCAError(f"{path}: LCA result {ref.name!r} holds no split yet; compute it with `lca compute {path}`")
    steps = int(root[array_names(splits[0], ref.path)["residual"]].shape[0])
    variables: dict[str, tuple] = {}
    complete: dict[str, tuple] = {}
    done, total = 0, 0
    columns = None
    for split in splits:
        problems = verify_split(root, ref.path, split, deep=verify)
        if problems:
            raise LCAError(f"{path}, result {ref.name!r}: {describe_damage(split, problems, ref.block, steps)}; "
                           f"run `lca compute {path}` to recompute them")
        block = int(root[array_names(split, ref.path)["residual"]].chunks[0]) or 1
        split_vars, cols = _split_variables(root, ref.path, split, layout, steps, block)
        if cols is not None and columns is not None and not np.array_equal(cols, columns):
            # One `parameter` dim per dataset: a split that kept other layers shows its sums only.
            warnings.warn(f"{split} LCA kept per-parameter values of other layers than "
                          f"{splits[0]}; its `{split_prefix(split)}lca_param` is left out", stacklevel=2)
            split_vars.pop(f"{split_prefix(split)}lca_param")
        elif cols is not None:
            columns = cols
        variables.update(split_vars)
        flags = np.asarray(root[array_names(split, ref.path)["done"]][:])
        done, total = done + int(flags.sum()), total + flags.size
        complete[f"{split_prefix(split)}complete"] = ("iteration", _complete(root, ref.path, split, steps, block))
    settings = ref.settings
    units = UnitMap.from_layout(layout)
    coords = {
        "iteration": np.arange(steps),
        "layer": np.array([t.name for t in layout.tensors], dtype=object),
        "unit": np.arange(units.size),
        "unit_module": ("unit", units.module.astype(object)),
        "unit_index": ("unit", units.index),
        "layer_module": ("layer", np.array([t.module for t in layout.tensors], dtype=object)),
        "layer_offset": ("layer", [t.offset for t in layout.tensors]),
        "layer_size": ("layer", [t.size for t in layout.tensors]),
        "layer_units": ("layer", [t.num_units for t in layout.tensors]),
        "layer_shape": ("layer", np.array([json.dumps(list(t.shape)) for t in layout.tensors], dtype=object)),
        **complete,
    }
    if columns is not None:  # the parameter dim exists only where per-parameter LCA was kept
        coords["parameter"] = columns
        coords["param_layer"] = ("parameter",
                                 np.array(layout.names, dtype=object)[layout.layer_of_parameter()[columns]])
        coords["param_unit"] = ("parameter", layout.unit_of_parameter()[columns])
    missing = {s: int((~complete[f"{split_prefix(s)}complete"][1]).sum()) for s in splits}
    # Plain str / int / float attributes only, so to_netcdf and to_zarr store them as they are.
    attrs = {
        "store": str(path),
        "result": ref.name,
        "rule": str(settings.get("rule", "")),
        "tol": float(settings.get("tol", np.nan)),
        "precision": str(settings.get("precision", "")),
        "keep": str(settings.get("keep", "parameter")),
        "keep_layers": json.dumps(list(settings.get("keep_layers", []))),
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
        what = ", ".join(f"{n} of {steps} iterations of {s} (result {ref.name})" for s, n in missing.items() if n)
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


def _problem_lines(reader: Any, root: Any, refs: list[Any]) -> list[str]:
    """What L is: the recorded problem (model, data, loss by reference) and the data's fingerprints, and
    the problem each result was computed with where it differs from the recorded one."""
    from pipeline.problem.definition import Problem

    lines = []
    if reader.problem:
        lines.append("problem     (recorded by training)")
        lines.extend("  " + line for line in Problem.from_json(reader.problem).describe())
    else:
        lines.append("problem     not recorded (compute needs --workflow FILE or --model/--data)")
    for ref in refs:
        for split in computed_splits(root, ref.path):
            used = result_meta(root, split, ref.path).attrs.get("problem")
            if isinstance(used, dict) and (not reader.problem or used != reader.problem):
                p = Problem.from_json(used)
                lines.append(f"{ref.name}/{split} computed with model {p.model}, data {p.data}, loss {p.loss}, "
                             f"fingerprint {p.fingerprints.get(split, '?')}")
    return lines


def describe(path: str, *, verify: bool | None = None) -> str:
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
    from pipeline.train.interventions import describe as describe_interventions

    lines += describe_interventions(reader.attrs.get("interventions"))
    root = reader.group
    refs = list_results(root)
    lines.extend(_problem_lines(reader, root, refs))
    if not refs:
        lines.append(f"lca         not computed yet: run `lca compute {path}`")
    for ref in refs:
        s = ref.settings
        default = "  (default)" if ref is refs[-1] and len(refs) > 1 else ""
        lines.append(f"result {ref.name}{default}: rule {s.get('rule')}, tol {s.get('tol')}, {s.get('precision')}, "
                     f"max splits {s.get('max_splits')}, eval batch {s.get('eval_batch_size')}"
                     + (f"; started {ref.created[:19]}" if ref.created else "; format-1 store"))
        for split in computed_splits(root, ref.path):
            lines += _describe_split(root, ref, split, verify, layout)
    return "\n".join(lines)


def _describe_split(root: Any, ref: Any, split: str, verify: bool | None, layout: Any) -> list[str]:
    tol = float(ref.settings.get("tol", np.inf))
    problems = verify_split(root, ref.path, split, deep=verify)
    st = split_stats(root, ref.path, split, tol, exclude=problems)
    lines = [f"  {split:<9} {st.blocks_done}/{st.blocks_total} blocks done ({100 * st.blocks_done / st.blocks_total:.0f}%)"]
    if problems:
        steps = int(root[array_names(split, ref.path)["residual"]].shape[0])
        lines.append(f"  damaged   {describe_damage(split, problems, ref.block, steps)}; "
                     f"`lca compute` recomputes them")
    kept = result_meta(root, split, ref.path).attrs.get("outputs")
    if kept:
        per_param = ("every tensor" if len(kept["kept_layers"]) == len(layout) else
                     ", ".join(kept["kept_layers"]) or "none")
        lines.append(f"  keeps     per-layer{'' if kept['keep'] == 'layer' else ', per-unit'} LCA; "
                     f"per-parameter for {per_param}")
    if st.steps_done:
        lines.append(f"  residual  |r| max {st.residual_abs_max:.3e}, mean {st.residual_abs_mean:.3e}, "
                     f"median {st.residual_abs_median:.3e}; {100 * st.within_tol:.1f}% of steps within tol")
        lines.append(f"  points    {st.points_mean:.3f} gradient evaluations per step (max {st.points_max})")
    return lines
