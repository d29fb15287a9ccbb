"""`report/index.html`: the whole report on one page that needs nothing but itself.

Figures are inlined as PNG data URIs and the style sheet is inline, so the page can be mailed, attached to
a lab notebook or opened from a laptop without the folder. A Content-Security-Policy that allows only
inline styles and data: images makes that a promise: a browser refuses (and logs) any outside resource.
No script runs. `write_html` is called by `build_report` after the figures and `summary.json` exist.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5em 2em 4em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.stamp { color: #555; font-size: 0.9em; } .warn { background: #fff4e0; border-left: 4px solid #d08000;
       padding: 0.5em 0.9em; margin: 0.8em 0; }
table { border-collapse: collapse; margin: 0.6em 0; } td, th { border: 1px solid #ddd; padding: 0.25em 0.6em;
       text-align: left; vertical-align: top; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.helped { color: #2166ac; } .hurt { color: #b2182b; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { margin: 1.6em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.9em; margin-top: 0.3em; }
nav a { margin-right: 1em; }
"""

CAPTIONS = {
    "loss": "The full training-set loss rebuilt from LCA alone (dashed) against the true loss; below, the "
            "per-step residual (what the integration left unallocated).",
    "helped": "Finding 1: per iteration, the share of moving parameters whose move lowered the loss.",
    "layers": "Finding 2: total LCA of each layer over training (negative: the layer paid for the loss drop).",
    "cumulative": "When in training each layer did its share: running total of its LCA.",
    "units": "LCA of each unit (output neuron or channel) over training, on a symmetric log colour scale.",
    "sync": "Finding 3: iterations where each module's helpful LCA peaks, and how often peaks coincide "
            "compared with shuffled peaks.",
}


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


def _rows(pairs: list[tuple[str, Any]]) -> str:
    return "\n".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)


def _findings(s: dict[str, Any]) -> str:
    # helped fraction and distribution are None when the result kept no per-parameter LCA (--keep unit)
    hf, d, sy, r = s["helped_fraction"] or {}, s["distribution"] or {}, s["synchronisation"], s["residual"]
    hurt = ", ".join(f"{k} ({v:+.3g})" for k, v in list(s["hurting_layers"].items())[:8]) or "none"
    rows = [
        ("1. parameters that helped, per step", "about 50.7%",
         f"{_num(100 * hf['mean'] if hf.get('mean') is not None else None, '.1f')}% "
         f"(sd {_num(100 * hf['std'] if hf.get('std') is not None else None, '.1f')}%)"),
        ("LCA distribution", "heavy-tailed around zero",
         f"top 1% of entries carry {_num(100 * d['top_1pct_abs_share'] if d.get('top_1pct_abs_share') is not None else None, '.0f')}% "
         f"of |LCA|; excess kurtosis {_num(d.get('excess_kurtosis'), '.3g')}"),
        ("2. layers that hurt in total", "some (first and last of a ResNet)", hurt),
        ("3. peak synchronisation vs chance", "more than chance",
         f"{_num(sy.get('ratio'), '.3g')}x ({sy.get('observed')} vs {_num(sy.get('expected'), '.3g')}, "
         f"p = {_num(sy.get('p_value'), '.3g')})"),
        ("conservation |residual| max / mean", "under 1% overall",
         f"{_num(r.get('max_abs'), '.2e')} / {_num(r.get('mean_abs'), '.2e')} "
         f"(sum |r| / sum |dL| = {_num(r.get('relative_to_loss_change'), '.2e')})"),
    ]
    body = "\n".join(f"<tr><th>{_e(a)}</th><td>{_e(b)}</td><td>{_e(c)}</td></tr>" for a, b, c in rows)
    return f"<table><tr><th>finding</th><th>paper (Lan et al. 2019)</th><th>this run</th></tr>\n{body}</table>"


def _layer_table(s: dict[str, Any]) -> str:
    rows = []
    for name, v in s["layer_totals"].items():
        cls = "hurt" if v is not None and v > 0 else "helped"
        rows.append(f"<tr><td>{_e(name)}</td><td class='num {cls}'>{_e(_num(v, '+.4g'))}</td></tr>")
    return "<table><tr><th>layer</th><th>total LCA</th></tr>\n" + "\n".join(rows) + "</table>"


def _figure(out: Path, key: str, png: str, formats: list[str]) -> str:
    data = base64.b64encode((out / png).read_bytes()).decode("ascii")
    stem = Path(png).stem
    others = " · ".join(f"{fmt.upper()}: {_e(stem)}.{fmt}" for fmt in formats if fmt != "png")
    return (f"<figure id='{_e(key)}'><img alt='{_e(CAPTIONS.get(key, stem))}' "
            f"src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(CAPTIONS.get(key, ''))}{(' (also as ' + others + ' beside this page)') if others else ''}"
            f"</figcaption></figure>")


def render_html(out: Path, summary: dict[str, Any], table: str, *, problem: dict[str, Any] | None,
                workflow: dict[str, Any], stamp: str) -> str:
    """The page as a string (figures read from `out`)."""
    from pipeline.analysis.report import FIGURES

    run = summary.get("run") or "LCA run"
    formats = sorted({Path(f).suffix.lstrip(".") for f in summary.get("figure_files", [])} | {"png"})
    warnings = []
    if summary["steps"] < summary["steps_total"]:
        warnings.append(f"{summary['steps_total'] - summary['steps']} of {summary['steps_total']} iterations are "
                        f"not computed yet: this report covers the {summary['steps']} finished ones.")
    if summary["synchronisation"].get("warning"):
        warnings.append(f"Synchronisation: {summary['synchronisation']['warning']}.")
    settings = [(k, v) for k, v in summary.get("settings", {}).items()]
    settings += [("steps analysed", f"{summary['steps']} of {summary['steps_total']}"),
                 ("parameters", f"{summary['parameters']:,} in {summary['layers']} tensors / {summary['modules']} modules")]
    if summary.get("points"):
        settings.append(("gradient evaluations per step", _num(summary["points"].get("mean_per_step"), ".3f")))
    problem_html = (f"<pre>{_e(json.dumps(problem, indent=2, sort_keys=True))}</pre>" if problem else
                    "<p>Not recorded as a factory reference in this store: the model, data and loss are the "
                    "workflow's own (below).</p>")
    figures = "\n".join(_figure(out, key, png, formats) for key, png in FIGURES.items() if (out / png).exists())
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LCA report: {_e(run)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>Loss Change Allocation: {_e(run)}</h1>
<p class="stamp">{_e(stamp)}</p>
{''.join(f'<p class="warn">{_e(w)}</p>' for w in warnings)}
<nav><a href="#summary">summary</a><a href="#figures">figures</a><a href="#layers">layers</a>
<a href="#settings">settings</a><a href="#problem">problem definition</a></nav>
<h2 id="summary">Summary</h2>
{_findings(summary)}
<pre>{_e(table)}</pre>
<h2 id="figures">Figures</h2>
{figures}
<h2 id="layers">Total LCA per layer</h2>
{_layer_table(summary)}
<h2 id="settings">Settings</h2>
<table>{_rows(settings)}</table>
<h2 id="problem">Problem definition</h2>
{problem_html}
<h3>Workflow</h3>
<pre>{_e(json.dumps(workflow, indent=2, sort_keys=True)) if workflow else 'none recorded (a user loop)'}</pre>
</body>
</html>
"""


def write_html(out: Path, summary: dict[str, Any], table: str, *, problem: dict[str, Any] | None,
               workflow: dict[str, Any], stamp: str) -> Path:
    """Write `out/index.html` (written to a temporary name first, so a half page never stands there)."""
    page = render_html(out, summary, table, problem=problem, workflow=workflow, stamp=stamp)
    target = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target
