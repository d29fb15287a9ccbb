"""`lca report`: the paper's findings for one run as `summary.json`, six figures and a printed table.

`build_report(ds, out)` does the work on any Dataset shaped like `open_lca`'s (tests pass fakes);
`write_report(store, out)` opens the store first. Figures are PNG plus SVG or PDF (`formats`), in a
colour-blind-safe blue-red scheme, each stamped with the run's name and settings; `index.html` puts them,
the summary table, the settings and the problem definition on one self-contained page. Only iterations
whose LCA is complete are used, so a report of a run still being computed describes the finished part (with
a warning giving the count). `lca_param` is read once (`ds.lca.scan`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np
    import xarray as xr

FIGURES = {
    "loss": "loss_reconstruction.png",
    "helped": "helped_fraction.png",
    "layers": "layer_totals.png",
    "cumulative": "cumulative_lca.png",
    "units": "unit_heatmap.png",
    "sync": "synchronisation.png",
}
HEATMAP_BINS = 400  # iteration bins in the unit heat map: finer than any figure shows
MAX_PANELS = 24
# Colour-blind-safe diverging scheme (ColorBrewer RdBu): blue helped (LCA < 0), red hurt. Red-green maps
# (RdYlGn) lose their meaning for the 1 in 12 men with red-green colour blindness.
HELPED, HURT = "#2166ac", "#b2182b"
DIVERGING = "RdBu_r"
FORMATS = ("png", "svg", "pdf")  # PNG always; SVG / PDF beside it for print (`lca report --format png,pdf`)
DPI = 200


def write_report(store: str, out: str, formats: Sequence[str] = ("png", "svg"),
                 result: str | None = None) -> dict[str, Any]:
    """Open STORE's LCA result (by default the latest) and write the report into OUT; returns the summary
    (also `OUT/summary.json`). Every block is read back against its checksums first, so a damaged chunk is
    named in one line instead of failing deep inside a figure."""
    from pipeline.analysis.dataset import open_lca

    return build_report(open_lca(store, result, verify=True), out, formats=formats)


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """`--format png,svg`: PNG always (the HTML page and READMEs embed it), plus any of svg / pdf."""
    from pipeline.errors import LCAError

    items = [f.strip().lower().lstrip(".") for f in (text.split(",") if isinstance(text, str) else text)]
    bad = [f for f in items if f and f not in FORMATS]
    if bad:
        raise LCAError(f"--format {bad[0]!r} is not a figure format; choose from {', '.join(FORMATS)} "
                       f"(comma-separated, e.g. png,pdf)")
    return ("png",) + tuple(dict.fromkeys(f for f in items if f and f != "png"))


def build_report(ds: xr.Dataset, out: str | Path, *, draws: int = 1000, window: int = 0,
                 quantile: float = 0.9, seed: int = 0, verbose: bool = True,
                 formats: Sequence[str] = ("png", "svg")) -> dict[str, Any]:
    """Compute the summary of `ds`, write figures (PNG plus `formats`), `summary.json` and the one-page
    `index.html` into `out`, print the table."""
    from pipeline.analysis import accessor as analysis
    from pipeline.analysis.html import write_html
    from pipeline.errors import LCAError

    formats = parse_formats(formats)

    store = ds.attrs.get("store", "STORE")
    hint = f"run `lca compute {store}` (or `make lca`) first"
    if not analysis.LCAAccessor(ds).has_split("train") or ds.sizes.get("iteration", 0) == 0:
        raise LCAError(f"no LCA in {store} yet: {hint}")
    steps_total = int(ds.sizes["iteration"])
    ds = _load_small(ds)  # one pass for lca_layer (a lazy reduction of lca_param in open_lca)
    ds = analysis.LCAAccessor(ds).completed("train")
    if ds.sizes["iteration"] == 0:
        raise LCAError(f"no completed LCA steps in {store} yet: {hint}")
    if ds.sizes["iteration"] < steps_total:
        import warnings

        from pipeline.errors import IncompleteResultWarning

        warnings.warn(f"{steps_total - ds.sizes['iteration']} of {steps_total} iterations of {store} are not computed "
                      f"yet; the report covers the {ds.sizes['iteration']} finished ones ({hint} to finish)",
                      IncompleteResultWarning, stacklevel=2)
    acc = analysis.LCAAccessor(ds)

    scan = acc.scan("train", iteration_bins=HEATMAP_BINS)
    layer_totals = acc.layer_totals("train").compute()
    module_totals = acc.layer_totals("train", "module").compute()
    unit_totals = scan["unit_lca"].sum("iteration") if scan["unit_lca"] is not None else None
    sync = acc.synchronisation("train", by="module", quantile=quantile, window=window, draws=draws, seed=seed)
    recon = acc.reconstruction("train")
    heldout = _heldout_summary(ds, acc)

    summary: dict[str, Any] = {
        "store": store,
        "rule": ds.attrs.get("rule", ""),
        "tol": ds.attrs.get("tol"),
        "steps": int(ds.sizes["iteration"]),
        "steps_total": steps_total,
        "parameters": int(ds["layer_size"].sum()),
        # per-parameter LCA kept for (all, some or none of them: `lca compute --keep`, `--keep-layers`)
        "parameters_kept": int(ds.sizes.get("parameter", 0)),
        "layers": int(ds.sizes["layer"]),
        "modules": len(acc.modules()),
        "helped_fraction": scan["helped_fraction_stats"],
        "distribution": scan["distribution"],
        "layer_totals": _named(layer_totals),
        "hurting_layers": {k: v for k, v in sorted(_named(layer_totals).items(), key=lambda p: -p[1]) if v > 0},
        "module_totals": _named(module_totals),
        "hurting_modules": {k: v for k, v in sorted(_named(module_totals).items(), key=lambda p: -p[1])
                            if v > 0},
        "units": _unit_summary(unit_totals) if unit_totals is not None else None,
        # what this result could not answer, and why (it kept only coarser LCA)
        "missing": scan["missing"],
        "synchronisation": {k: v for k, v in sync.items() if k != "null_counts"},
        "residual": acc.residual_stats("train"),
        "reconstruction": dict(recon.attrs),
        "points": _points(ds),
        "heldout": heldout,
        "figures": [v for k, v in FIGURES.items()
                    if not (k == "helped" and scan["helped_fraction"] is None)
                    and not (k == "units" and scan["unit_lca"] is None)],
    }

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    style = Style(stamp=run_stamp(ds, steps_total), formats=formats)
    summary["run"] = run_name(ds)
    summary["settings"] = _settings(ds)
    summary["figure_files"] = [f"{Path(n).stem}.{fmt}" for n in summary["figures"] for fmt in formats]
    _plot_loss(out / FIGURES["loss"], ds, recon, style)
    if scan["helped_fraction"] is not None:
        _plot_helped(out / FIGURES["helped"], scan["helped_fraction"], summary["helped_fraction"], style)
    _plot_layer_totals(out / FIGURES["layers"], layer_totals, style)
    _plot_cumulative(out / FIGURES["cumulative"], acc.cumulative("train").compute(), style)
    if scan["unit_lca"] is not None:
        _plot_units(out / FIGURES["units"], ds, scan["unit_lca"], style)
    _plot_sync(out / FIGURES["sync"], acc.peaks("train", "module", quantile), sync, style)
    from pipeline.analysis.oscillation import report_oscillation

    summary["oscillation"] = report_oscillation(ds, out)  # oscillation.png; None without a trajectory
    if summary["oscillation"]:
        summary["figures"].append(summary["oscillation"]["figure"])
    summary = _jsonable(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    write_html(out, summary, format_summary(summary), problem=_problem(ds), workflow=_workflow(ds),
               stamp=style.stamp)
    if verbose:
        print(format_summary(summary, out))
    return summary


# ----------------------------------------------------------------------------------------------------------
# what the run was: its name and settings, on every figure and on the page


def _workflow(ds: xr.Dataset) -> dict[str, Any]:
    try:
        wf = json.loads(ds.attrs.get("workflow") or "{}")
    except (TypeError, ValueError):
        wf = {}
    return wf if isinstance(wf, dict) else {}


def _problem(ds: xr.Dataset) -> dict[str, Any] | None:
    """The problem definition (model, data, loss by reference) when the store records one."""
    raw = ds.attrs.get("problem")
    if not raw:
        return None
    try:
        return json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (TypeError, ValueError):
        return {"raw": str(raw)}


def _settings(ds: xr.Dataset) -> dict[str, Any]:
    try:
        settings = json.loads(ds.attrs.get("settings") or "{}")
    except (TypeError, ValueError):
        settings = {}
    base = {"rule": ds.attrs.get("rule"), "tol": ds.attrs.get("tol"), "precision": ds.attrs.get("precision")}
    return {k: v for k, v in (base | settings).items() if v not in (None, "")}


def run_name(ds: xr.Dataset) -> str:
    """The workflow's name, else the store's folder name: what a reader of a figure calls the run."""
    name = _workflow(ds).get("name")
    if name:
        return str(name)
    store = str(ds.attrs.get("store", "") or "")
    return Path(store.rstrip("/")).stem or "LCA run"


def run_stamp(ds: xr.Dataset, steps_total: int | None = None) -> str:
    """One line naming the run and how its LCA was computed; printed on every figure."""
    st = _settings(ds)
    parts = [f"run {run_name(ds)}"]
    if ds.attrs.get("store"):
        parts.append(f"store {ds.attrs['store']}")
    how = ", ".join(f"{k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v}"
                    for k, v in st.items() if k in ("rule", "tol", "max_splits", "precision"))
    if how:
        parts.append(how)
    steps = int(ds.sizes.get("iteration", 0))
    parts.append(f"{steps} of {steps_total} iterations" if steps_total and steps_total != steps
                 else f"{steps} iterations")
    return "  ·  ".join(parts)


@dataclass(frozen=True)
class Style:
    stamp: str
    formats: tuple[str, ...] = ("png",)


# ----------------------------------------------------------------------------------------------------------
# summary pieces


def _load_small(ds: xr.Dataset) -> xr.Dataset:
    """Compute every variable without a `parameter` dim in one go (lca_layer may itself be a lazy
    reduction of `lca_param`), so later steps never recompute them."""
    import dask

    names = [k for k, v in ds.data_vars.items() if "parameter" not in v.dims]
    values = dask.compute(*[ds[k] for k in names])
    return ds.assign(dict(zip(names, values)))


def _named(da: xr.DataArray) -> dict[str, float]:
    dim = da.dims[0]
    return {str(k): float(v) for k, v in zip(da[dim].values, da.values)}


def _unit_summary(totals: xr.DataArray, top: int = 5) -> dict[str, Any]:
    import numpy as np

    v = totals.values
    order = np.argsort(v)

    def rows(idx):
        return [{"module": str(totals.unit_module.values[i]), "unit": int(totals.unit_index.values[i]),
                 "total": float(v[i])} for i in idx]

    return {"count": int(v.size), "hurting": int((v > 0).sum()),
            "most_helpful": rows([i for i in order[:top] if v[i] < 0]),
            "most_hurtful": rows([i for i in order[::-1][:top] if v[i] > 0])}


def _points(ds: xr.Dataset) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {}
    if "points" in ds:
        p = np.asarray(ds["points"].values, dtype=np.float64)
        out |= {"total": int(np.nansum(p)), "mean_per_step": float(np.nanmean(p)) if p.size else None}
    if "splits" in ds:
        s = np.asarray(ds["splits"].values)
        vals, counts = np.unique(s[np.isfinite(s)] if s.dtype.kind == "f" else s, return_counts=True)
        out["splits"] = {str(int(a)): int(b) for a, b in zip(vals, counts)}
    return out


def _heldout_summary(ds: xr.Dataset, acc: Any) -> dict[str, Any] | None:
    """Held-out LCA next to train LCA, when it was computed (`--split train,heldout`)."""
    import numpy as np

    if not acc.has_split("heldout"):
        return None
    ok = acc.complete_mask("heldout").values
    if not ok.any():
        return None
    cmp = acc.heldout_comparison("layer")
    sub = type(acc)(ds.isel(iteration=np.flatnonzero(ok)))
    return {
        "steps": int(ok.sum()),
        "helped_fraction": sub.helped_fraction_stats("heldout") if sub.has_parameters("heldout") else None,
        "correlation_per_iteration": cmp.attrs["correlation_total"],
        "sign_agreement": cmp.attrs["sign_agreement"],
        "layer_totals": {str(k): {"train": float(a), "heldout": float(b), "correlation": float(c)}
                         for k, a, b, c in zip(cmp.layer.values, cmp.train_total.values,
                                               cmp.heldout_total.values, cmp.correlation.values)},
        "hurting_layers": sub.hurting("heldout"),
        "residual": sub.residual_stats("heldout"),
    }


def _jsonable(x: Any) -> Any:
    """Plain JSON: numpy scalars to Python, NaN/inf to null."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def format_summary(s: dict[str, Any], out: Path | str | None = None) -> str:
    """The printed table: each finding in one or two lines, with the paper's number beside ours."""

    def f(v: Any, spec: str = ".4g") -> str:
        return "n/a" if v is None else format(v, spec)

    hf, d, sy, r, rc = s["helped_fraction"], s["distribution"], s["synchronisation"], s["residual"], s["reconstruction"]
    hurt = ", ".join(f"{k} {v:+.3g}" for k, v in list(s["hurting_layers"].items())[:6]) or "none"
    hurt_m = ", ".join(f"{k} {v:+.3g}" for k, v in list(s["hurting_modules"].items())[:6]) or "none"
    w = 28
    lines = [
        f"LCA report for {s['store']}",
        f"{'steps':<{w}}{s['steps']} of {s['steps_total']} complete (rule {s['rule'] or '?'}, tol {f(s['tol'])})",
        f"{'parameters':<{w}}{s['parameters']:,} in {s['layers']} layers / {s['modules']} modules"
        + ("" if s.get("parameters_kept", s["parameters"]) == s["parameters"] else
           f" (per-parameter LCA kept for {s.get('parameters_kept', 0):,})"),
        "-" * 78,
        f"{'1 helped fraction / step':<{w}}mean {f(hf['mean'], '.4f')}  std {f(hf['std'], '.4f')}  "
        f"range {f(hf['min'], '.3f')}-{f(hf['max'], '.3f')}  (paper: 0.507)" if hf else
        f"{'1 helped fraction / step':<{w}}n/a: {s.get('missing', {}).get('helped_fraction', 'not computed')}",
        f"{'  LCA distribution':<{w}}std {f(d['std'], '.3g')}  skew {f(d['skew'], '.3g')}  "
        f"excess kurtosis {f(d['excess_kurtosis'], '.3g')}  top 1% carry {f(d['top_1pct_abs_share'], '.1%')} of |LCA|"
        if d else f"{'  LCA distribution':<{w}}n/a",
        f"{'2 layers that hurt (total)':<{w}}{hurt}",
        f"{'  modules that hurt':<{w}}{hurt_m}",
        f"{'3 peak synchronisation':<{w}}observed {sy['observed']}  chance {f(sy['expected'], '.3g')}  "
        f"ratio {f(sy['ratio'], '.3g')}  p {f(sy['p_value'], '.3g')}  ({sy['draws']} {sy['null']} draws, "
        f"window {sy['window']})",
        "-" * 78,
        f"{'residual |r_t|':<{w}}mean {f(r['mean_abs'], '.3g')}  max {f(r['max_abs'], '.3g')}  "
        f"sum |r| / sum |dL| {f(r['relative_to_loss_change'], '.3g')}",
        f"{'loss from LCA':<{w}}final {f(rc['final_reconstructed'])} vs true {f(rc['final_loss'])}  "
        f"max rel. error {f(rc['max_relative_error'], '.3g')}",
    ]
    if s.get("points"):
        lines.append(f"{'gradient evaluations':<{w}}{s['points'].get('total', 'n/a')} "
                     f"({f(s['points'].get('mean_per_step'), '.3g')} per step)")
    if s.get("heldout"):
        h = s["heldout"]
        lines.append(f"{'held-out':<{w}}helped {f((h['helped_fraction'] or {}).get('mean'), '.4f')}  corr with train "
                     f"{f(h['correlation_per_iteration'], '.3f')}  "
                     f"layers agreeing in sign {f(h['sign_agreement'], '.0%')}")
    if out is not None:
        lines.append(f"{'written to':<{w}}{out}/index.html (open it in a browser), summary.json and "
                     f"{len(s['figures'])} figures")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# figures (matplotlib's object API: no pyplot state, no backend switch, Agg rendering)


def _figure(**kw: Any):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kw)


def _wrap(text: str, width_in: float, fontsize: float = 10) -> str:
    """Break a title into lines that fit `width_in` inches (about 1.9 characters per point-inch), so a long
    conclusion wraps instead of running off the figure."""
    import textwrap

    return "\n".join(textwrap.wrap(text, max(20, int(width_in * 144 / fontsize / 1.05)))) or text


def _save(fig: Any, path: Path, style: Style) -> None:
    """PNG (at DPI) plus the vector formats asked for. The run's stamp goes under the figure, inside the
    layout; `bbox_inches="tight"` then makes sure no title, label or legend is cut off at the edge."""
    fig.supxlabel(_wrap(style.stamp, fig.get_figwidth(), 7.5), fontsize=7.5, color="#444444", ha="center")
    _write(fig, path, style)


def _write(fig: Any, path: Path, style: Style) -> None:
    import matplotlib

    # SVG keeps its text as text (not glyph paths), so a figure can be edited and searched for its run name.
    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):
        for fmt in style.formats:
            target = path.with_suffix(f".{fmt}")
            fig.savefig(target, dpi=DPI if fmt == "png" else None, bbox_inches="tight", pad_inches=0.12,
                        metadata=None if fmt == "png" else {"Title": path.stem})


def _plot_loss(path: Path, ds: xr.Dataset, recon: xr.Dataset, style: Style) -> None:
    import numpy as np

    it = ds["iteration"].values + 1  # loss_after at step t is the loss at checkpoint t + 1
    fig = _figure(figsize=(8, 5.5))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.3])
    top.plot(np.r_[it[0] - 1, it], np.r_[ds["loss"].values[0], recon.loss_after.values],
             color="black", lw=1.6, label="true loss L(θ_t)")
    top.plot(np.r_[it[0] - 1, it], np.r_[ds["loss"].values[0], recon.reconstructed.values],
             color="tab:orange", lw=1.2, ls="--", label="L(θ_0) + cumulative sum of LCA")
    top.set_ylabel("full training-set loss")
    top.set_title(f"Loss rebuilt from LCA (max relative error {recon.attrs['max_relative_error']:.2e})")
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(it, ds["residual"].values, color="tab:purple", lw=0.9, marker=".", ms=2)
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set_ylabel("residual r_t")
    bottom.set_xlabel("iteration")
    bottom.grid(alpha=0.3)
    _save(fig, path, style)


def _plot_helped(path: Path, frac: xr.DataArray, stats: dict[str, Any], style: Style) -> None:
    import numpy as np

    f = frac.values[np.isfinite(frac.values)]
    fig = _figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.hist(f, bins=int(np.clip(len(f) // 5, 10, 60)), color=HELPED, alpha=0.75, edgecolor="white")
    ax.axvline(0.5, color="grey", ls="--", lw=1, label="one half")
    ax.axvline(stats["mean"], color="black", lw=1.5,
               label=f"mean {stats['mean']:.4f} ± {stats['std']:.4f}")
    ax.set_xlabel("fraction of moved parameters that helped (LCA < 0), per iteration")
    ax.set_ylabel("iterations")
    ax.set_title(_wrap("Fraction of parameters that helped, per iteration (paper: 50.7%, barely over half)",
                       fig.get_figwidth() * 0.85))
    ax.legend()
    _save(fig, path, style)


def _plot_layer_totals(path: Path, totals: xr.DataArray, style: Style) -> None:
    import numpy as np

    v = totals.values
    names = [str(n) for n in totals.layer.values]
    fig = _figure(figsize=(8, max(3.0, 0.28 * len(v) + 1.5)))
    ax = fig.subplots()
    y = np.arange(len(v))
    ax.barh(y, v, color=[HELPED if x < 0 else HURT for x in v])
    ax.set_yticks(y, names, fontsize=8 if len(v) > 20 else 10)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("total LCA over training (negative: helped, positive: hurt)")
    ax.set_title("Total LCA per layer: blue helped, red hurt")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path, style)


def _plot_cumulative(path: Path, cum: xr.DataArray, style: Style) -> None:
    import numpy as np

    it = cum["iteration"].values
    final = cum.values[-1]
    n = cum.sizes["layer"]
    labelled = set(np.argsort(-np.abs(final))[:12]) if n > 12 else set(range(n))
    fig = _figure(figsize=(9, 5))
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(n)]
    for i, name in enumerate(cum.layer.values):
        ax.plot(it, cum.values[:, i], lw=1.2 if i in labelled else 0.6, color=colors[i],
                alpha=1.0 if i in labelled else 0.5, label=str(name) if i in labelled else None)
    ax.plot(it, cum.values.sum(1), color="black", ls="--", lw=1.2, label="all layers (= loss change - residual)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("cumulative LCA")
    ax.set_title(_wrap("Cumulative LCA per layer (below zero: the layer has lowered the loss so far)",
                       fig.get_figwidth() * 0.7))
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    _save(fig, path, style)


def _weight_modules(ds: xr.Dataset) -> list[str]:
    """Modules with a tensor that has more than one parameter per unit (weights, not norm scales)."""
    size, units = ds["layer_size"].values, ds["layer_units"].values
    mods = ds["layer_module"].values
    chosen = list(dict.fromkeys(str(m) for m, s, u in zip(mods, size, units) if s > u))
    return chosen or list(dict.fromkeys(str(m) for m in mods))


def _plot_units(path: Path, ds: xr.Dataset, units: xr.DataArray, style: Style) -> None:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    mods = _weight_modules(ds)
    if len(mods) > MAX_PANELS:
        mods = [mods[i] for i in np.linspace(0, len(mods) - 1, MAX_PANELS).round().astype(int)]
    ncols = min(4, len(mods))
    nrows = -(-len(mods) // ncols)
    fig = _figure(figsize=(4.2 * ncols, 3.2 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    it = units["iteration"].values
    step = (it[1] - it[0]) if it.size > 1 else 1
    for ax, mod in zip(axes, mods):
        sel = units.unit_module.values == mod
        data = units.values[:, sel].T  # (unit, iteration bin)
        norm = _symlog_norm(data)
        im = ax.imshow(data, aspect="auto", origin="lower", cmap=DIVERGING, norm=norm,
                       interpolation="nearest", extent=(it[0], it[-1] + step, -0.5, data.shape[0] - 0.5))
        ax.set_title(f"{mod} ({data.shape[0]} units)", fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("unit")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, shrink=0.85, label="LCA", ticks=_symlog_ticks(norm))
    for ax in axes[len(mods):]:
        ax.set_visible(False)
    fig.suptitle(_wrap("LCA per unit and iteration: blue helped, red hurt (symmetric log colour scale)",
                       fig.get_figwidth(), 12))
    _save(fig, path, style)


def _symlog_ticks(norm: Any) -> list[float]:
    """0 and up to three decades a side, none inside the linear zone (where labels would overprint)."""
    import numpy as np

    lo, hi = np.log10(norm.linthresh) + 0.5, np.log10(norm.vmax)
    ks = np.arange(np.ceil(lo), np.floor(hi) + 1)
    ks = ks[::-1][:: max(1, -(-len(ks) // 3))][::-1]
    pos = [float(10.0**k) for k in ks]
    return [-v for v in pos[::-1]] + [0.0] + pos


def _symlog_norm(data: np.ndarray):
    """Colour scale centred at 0 that stays readable across training: LCA shrinks by orders of magnitude
    as the loss converges, so a linear scale shows only the first iterations. Linear below the 5th
    percentile of |LCA| (noise), logarithmic up to the 99.5th (beyond saturates)."""
    import numpy as np
    from matplotlib.colors import SymLogNorm

    a = np.abs(data[np.isfinite(data) & (data != 0)])
    if not a.size:
        return SymLogNorm(linthresh=1.0, vmin=-1.0, vmax=1.0)
    vmax = float(np.quantile(a, 0.995))
    linthresh = min(float(np.quantile(a, 0.05)), vmax / 10) or vmax / 10
    return SymLogNorm(linthresh=linthresh, vmin=-vmax, vmax=vmax, base=10)


def _plot_sync(path: Path, peaks: xr.DataArray, sync: Any, style: Style) -> None:
    import numpy as np

    fig = _figure(figsize=(12, max(3.5, 0.3 * peaks.shape[1] + 2)))
    left, right = fig.subplots(1, 2, width_ratios=[2.2, 1])
    it = peaks["iteration"].values
    names = [str(n) for n in peaks[peaks.dims[1]].values]
    left.eventplot([it[peaks.values[:, i]] for i in range(len(names))], colors=HELPED,
                   lineoffsets=np.arange(len(names)), linelengths=0.8, linewidths=1.0)
    left.set_yticks(np.arange(len(names)), names, fontsize=8 if len(names) > 20 else 10)
    left.set_xlim(it[0] - 0.5, it[-1] + 0.5) if it.size else None
    left.set_ylim(len(names) - 0.5, -0.5)
    left.set_xlabel("iteration")
    where = f"{sync['local']}-iteration moving" if sync.get("local") else "whole-run"
    left.set_title(_wrap(f"Peaks of helpful LCA per module: local maxima of -LCA above its {where} "
                         f"{sync['quantile']:.0%} quantile", fig.get_figwidth() * 0.62), fontsize=10)
    null = np.asarray(sync["null_counts"])
    if null.size:
        lo, hi = int(null.min()), int(max(null.max(), sync["observed"]))
        bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < 60 else 40
        right.hist(null, bins=bins, color="grey", alpha=0.7, label=f"chance ({sync['null']}), mean "
                   f"{sync['expected']:.3g}")
    right.axvline(sync["observed"], color=HURT, lw=2, label=f"observed {sync['observed']}")
    right.set_xlabel(f"coinciding peak pairs (window {sync['window']})")
    right.set_ylabel("shuffled draws")
    ratio = sync["ratio"]
    right.set_title(f"ratio {ratio:.3g}, p = {sync['p_value']:.3g}" if ratio == ratio else "no peaks",
                    fontsize=10)
    right.legend(fontsize=8)
    _save(fig, path, style)
