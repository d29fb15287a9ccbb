"""LCA-guided freezing and pruning: rank units by what they did to the loss, and derive a workflow that
freezes (or prunes) the chosen ones, to retrain from the same seed and the same minibatch order.

Why a derived workflow rather than surgery on a model: the retrained run is then an ordinary recorded run
(its `[interventions]` section says exactly what was frozen), LCA computes on it like on any other, and
the same seed gives the same initialisation and the same minibatch order (the loop draws minibatches from
a generator seeded by `workflow.seed` alone), so the two runs differ only by the intervention.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import LCAError

if TYPE_CHECKING:
    import xarray as xr

    from pipeline.config import Workflow

SELECTIONS = ("hurting", "negligible")


def rank_units(ds: "xr.Dataset", split: str = "train") -> "xr.Dataset":
    """Every unit with its total LCA over the computed steps, sorted from the most hurting (largest
    positive total) to the most helpful; `share` is its |total| over the sum of all units' |total|, and
    `rank_negligible` orders units from the smallest |total| (0) up: the units that contribute least."""
    from pipeline.analysis.accessor import LCAAccessor

    tot = LCAAccessor(LCAAccessor(ds).completed(split)).unit_totals(split).compute()
    order = np.argsort(-tot.values, kind="stable")
    ranked = tot.isel(unit=order)
    mag = np.abs(ranked.values)
    share = mag / mag.sum() if mag.sum() > 0 else np.zeros_like(mag)
    neg_rank = np.empty(len(mag), dtype=np.int64)
    neg_rank[np.argsort(mag, kind="stable")] = np.arange(len(mag))
    return ranked.to_dataset(name="total_lca").assign(share=("unit", share), rank_negligible=("unit", neg_rank))


def select_units(ranking: "xr.Dataset", select: str, top: int, modules: list[str] | None = None) -> "xr.Dataset":
    """The `top` units of a ranking: "hurting" (largest positive totals; fewer if fewer hurt) or
    "negligible" (smallest non-zero |total|: units that moved but contributed least), optionally only among
    modules matching the `modules` globs."""
    if select not in SELECTIONS:
        raise LCAError(f"--select must be one of {', '.join(SELECTIONS)}, not {select!r}")
    if top < 1:
        raise LCAError(f"--top must be at least 1, got {top}")
    r = ranking
    if modules:
        mods = [str(m) for m in r["unit_module"].values]
        keep = [i for i, m in enumerate(mods) if any(fnmatch.fnmatch(m, g) for g in modules)]
        if not keep:
            raise LCAError(f"--modules {', '.join(modules)} match no module; modules: "
                           f"{', '.join(dict.fromkeys(mods))}")
        r = r.isel(unit=keep)
    if select == "hurting":
        r = r.isel(unit=np.flatnonzero(r["total_lca"].values > 0)[:top])
        if r.sizes["unit"] == 0:
            raise LCAError("no unit hurts in total (every unit's summed LCA is <= 0); use --select negligible")
        return r
    # a unit whose total is exactly 0 never moved (a dead ReLU): freezing it would change nothing
    moving = np.flatnonzero(r["total_lca"].values != 0)
    order = moving[np.argsort(r["rank_negligible"].values[moving], kind="stable")]
    return r.isel(unit=order[:top])


def freeze_rules(selection: "xr.Dataset", layout: Any, mode: str = "freeze", from_step: int = 0) -> list[dict]:
    """[[interventions.freeze]] tables for the selected units: one per module, naming its tensors (a unit
    is the same index of every tensor of its module: the weights feeding a neuron or channel and its bias)."""
    by_module: dict[str, list[int]] = {}
    for m, i in zip(selection["unit_module"].values, selection["unit_index"].values):
        by_module.setdefault(str(m), []).append(int(i))
    rules = []
    for module, units in by_module.items():
        tensors = [t.name for t in layout.tensors if t.module == module and t.unit_axis is not None]
        rules.append({"params": tensors, "units": sorted(units), "from_step": int(from_step), "mode": mode})
    return rules


def guided_workflow(workflow: "Workflow", rules: list[dict], name: str | None = None) -> "Workflow":
    """`workflow` with `rules` added to its freeze section (validated again); data, seed, model and batch
    size are untouched, so minibatches come in the same order."""
    iv = workflow.to_dict()["interventions"]
    return workflow.replace(name=name or f"{workflow.name}-guided",
                            interventions={**iv, "freeze": list(iv["freeze"]) + rules})


def workflow_toml(workflow: "Workflow") -> str:
    """The workflow as TOML (tables and arrays of tables), so a derived run can be rerun by hand."""
    d = workflow.to_dict()
    lines = [f"name = {_toml(d.pop('name'))}", f"seed = {_toml(d.pop('seed'))}"]
    for section, body in d.items():
        scalars = {k: v for k, v in body.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
        tables = {k: v for k, v in body.items() if k not in scalars}
        scalars = {k: v for k, v in scalars.items() if v is not None and not (section == "interventions" and v == [])}
        if scalars or not tables:
            lines += ["", f"[{section}]"] + [f"{k} = {_toml(v)}" for k, v in scalars.items()]
        for key, items in tables.items():
            for item in items:
                lines += ["", f"[[{section}.{key}]]"] + [f"{k} = {_toml(v)}" for k, v in item.items() if v is not None]
    return "\n".join(lines) + "\n"


def _toml(v: Any) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (factory kwargs)
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(x)}" for k, x in v.items() if x is not None) + "}"
    raise LCAError(f"cannot write {v!r} to TOML")


def describe_selection(selection: "xr.Dataset", limit: int = 12) -> str:
    rows = [f"  {str(m)}[{int(i)}]  total LCA {float(t):+.3e}  ({100 * float(s):.2f}% of |LCA|)"
            for m, i, t, s in zip(selection["unit_module"].values, selection["unit_index"].values,
                                  selection["total_lca"].values, selection["share"].values)]
    more = f"\n  ... {len(rows) - limit} more" if len(rows) > limit else ""
    return "\n".join(rows[:limit]) + more


def guide(store: str, out: str, *, select: str = "hurting", top: int = 10, modules: list[str] | None = None,
          layers: list[str] | None = None, mode: str = "freeze", from_step: int = 0,
          workflow_out: str | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Freeze (or prune) units chosen by `store`'s LCA, or whole `layers` (tensor-name globs), and retrain
    its workflow from the same seed and minibatch order into the store `out`. Returns what was chosen and
    the training result; `workflow_out` also writes the derived workflow as TOML."""
    from trajectory_store import open_trajectory

    from pipeline.analysis.dataset import open_lca
    from pipeline.config import Workflow
    from pipeline.train.loop import train

    reader = open_trajectory(store)
    if not reader.workflow:
        raise LCAError(f"{store} was recorded by a user's own loop (no workflow): retrain it there with an "
                       f"[interventions] section instead")
    base = Workflow.from_dict(reader.workflow, f"the workflow stored in {store}")
    if layers:
        rules = [{"params": list(layers), "units": [], "from_step": int(from_step), "mode": mode}]
        chosen = f"layers {', '.join(layers)}"
    else:
        selection = select_units(rank_units(open_lca(store)), select, top, modules)
        rules = freeze_rules(selection, reader.layout, mode, from_step)
        chosen = f"{selection.sizes['unit']} {select} unit(s):\n{describe_selection(selection)}"
    wf = guided_workflow(base, rules)
    if workflow_out:
        from pathlib import Path

        Path(workflow_out).write_text(workflow_toml(wf))
    result = train(wf, out, overwrite=overwrite, progress=progress)
    return {"chosen": chosen, "rules": rules, "workflow": wf, "train": result}
