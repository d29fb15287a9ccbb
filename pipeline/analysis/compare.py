"""Runs side by side: what an intervention changed. Loss curves and LCA per layer in one figure, and the
table the README shows (`intervention | final full-split loss | layers hurting in total | oscillation
score`), from stores whose LCA is computed.

The runs are expected to share seed, data and minibatch order (interventions and `lca guide` keep them),
so their differences are the intervention's; `compare_runs` says when the minibatch order differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

FIGURE = "comparison.png"


def run_summary(store: str, label: str | None = None) -> dict[str, Any]:
    """The numbers of one run: final full-split loss, per-layer totals, hurting layers, oscillation."""
    from trajectory_store import open_trajectory

    from pipeline.analysis.accessor import LCAAccessor
    from pipeline.analysis.dataset import open_lca

    reader = open_trajectory(store)
    ds = open_lca(store)
    acc = LCAAccessor(ds)
    ds = acc.completed("train")
    acc = LCAAccessor(ds)
    totals = acc.layer_totals("train").compute()
    osc = acc.oscillation(units=False, store=store)
    loss = np.asarray(ds["loss"].values, dtype=np.float64)
    after = np.asarray(ds["loss_after"].values, dtype=np.float64)
    names = [str(n) for n in totals["layer"].values]
    hurting = {n: float(v) for n, v in zip(names, totals.values) if v > 0}
    interventions = (reader.attrs.get("interventions") or {}).get("section")
    return {
        "label": label or Path(store.rstrip("/")).stem,
        "store": store,
        "steps": int(ds.sizes["iteration"]),
        "initial_loss": float(loss[0]),
        "final_loss": float(after[-1]),
        "loss_curve": np.r_[loss[:1], after].tolist(),
        "minibatch_loss": np.asarray(reader.minibatch_loss, dtype=np.float64).tolist(),
        "layer_totals": dict(zip(names, map(float, totals.values))),
        "hurting_layers": dict(sorted(hurting.items(), key=lambda p: -p[1])),
        "oscillation_score": osc.score,
        "layer_lca_flip_rate": {n: float(v) for n, v in zip(names, osc.layers["lca_flip_rate"].values)},
        "layer_phase_lag": {n: float(v) for n, v in zip(names, osc.layers["phase_lag"].values)},
        "residual_abs_max": float(np.nanmax(np.abs(np.asarray(ds["residual"].values)))),
        "interventions": interventions,
        "batch_indices_digest": _digest(reader.batch_indices),
    }


def _digest(idx: np.ndarray | None) -> str:
    import hashlib

    return "" if idx is None else hashlib.sha256(np.ascontiguousarray(idx).tobytes()).hexdigest()[:16]


def table(runs: list[dict[str, Any]]) -> str:
    """The README's markdown table, one row per run."""
    lines = ["| intervention | final full-split loss | layers hurting in total | oscillation score |",
             "|---|---:|---|---:|"]
    for r in runs:
        h = r["hurting_layers"]
        names = ", ".join(f"`{n}` ({v:+.2e})" for n, v in list(h.items())[:4]) + (" ..." if len(h) > 4 else "")
        lines.append(f"| {r['label']} | {r['final_loss']:.4f} | {len(h)}" + (f": {names}" if h else "")
                     + f" | {r['oscillation_score']:.3f} |")
    return "\n".join(lines)


def layer_table(runs: list[dict[str, Any]]) -> str:
    """Total LCA per layer, one column per run (positive: the layer hurt in total)."""
    layers = list(runs[0]["layer_totals"])
    head = "| layer | " + " | ".join(r["label"] for r in runs) + " |"
    lines = [head, "|---|" + "---:|" * len(runs)]
    for n in layers:
        lines.append(f"| `{n}` | " + " | ".join(f"{r['layer_totals'].get(n, float('nan')):+.3e}" for r in runs) + " |")
    return "\n".join(lines)


def compare_runs(stores: list[str], out: str, labels: list[str] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Summarise each run, write `comparison.png`, `comparison.md` and `comparison.json` into `out`."""
    from pipeline.errors import LCAError

    if labels and len(labels) != len(stores):
        raise LCAError(f"give one --label per store: {len(labels)} labels for {len(stores)} stores")
    if not stores:
        raise LCAError("name at least one store to compare")
    runs = [run_summary(s, (labels or [None] * len(stores))[i]) for i, s in enumerate(stores)]
    same_order = len({r["batch_indices_digest"] for r in runs}) == 1
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    _plot(out_p / FIGURE, runs)
    md = table(runs) + "\n\n" + layer_table(runs) + "\n"
    if not same_order:
        md += "\nNote: the runs did not see the same minibatches in the same order.\n"
    (out_p / "comparison.md").write_text(md)
    result = {"runs": runs, "same_minibatch_order": same_order, "figure": FIGURE}
    (out_p / "comparison.json").write_text(json.dumps(_finite(result), indent=2) + "\n")
    if verbose:
        print(table(runs))
        print(f"same minibatch order: {'yes' if same_order else 'NO'}; figure, tables and numbers in {out_p}")
    return result


def _finite(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _plot(path: Path, runs: list[dict[str, Any]]) -> None:
    from matplotlib import rcParams
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    layers = list(runs[0]["layer_totals"])
    fig = Figure(figsize=(13, max(4.5, 0.16 * len(layers) + 1.5)), layout="constrained")
    ax_loss, ax_lca = fig.subplots(1, 2, width_ratios=[1, 1.2])
    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        ax_loss.plot(np.arange(len(r["minibatch_loss"])), r["minibatch_loss"], color=c, alpha=0.25, lw=0.8)
        ax_loss.plot(np.arange(len(r["loss_curve"])), r["loss_curve"], color=c, lw=1.6,
                     label=f"{r['label']} (final {r['final_loss']:.3f})")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (full split: solid; minibatch: faint)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title("loss curves")
    y = np.arange(len(layers))
    h = 0.8 / len(runs)
    for i, r in enumerate(runs):
        vals = [r["layer_totals"].get(n, np.nan) for n in layers]
        ax_lca.barh(y + (i - (len(runs) - 1) / 2) * h, vals, height=h, color=colors[i % len(colors)],
                    label=r["label"])
    ax_lca.axvline(0, color="k", lw=0.6)
    ax_lca.set_yticks(y)
    ax_lca.set_yticklabels(layers, fontsize=6 if len(layers) > 20 else 8)
    ax_lca.invert_yaxis()
    ax_lca.set_xscale("symlog", linthresh=max(1e-6, float(np.nanmax([abs(v) for r in runs
                                                                       for v in r["layer_totals"].values()])) * 1e-3))
    ax_lca.set_xlabel("total LCA per layer (< 0 helped, > 0 hurt)")
    ax_lca.legend(fontsize=8, loc="lower left")
    ax_lca.set_title("LCA per layer")
    fig.savefig(path, dpi=110)
