"""`build_report` / `write_report` on fake Datasets: six readable figures, summary.json, one-line errors."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pytest

import pipeline.analysis.dataset
from pipeline.errors import LCAError
from pipeline.analysis.report import FIGURES, build_report, write_report
from tests.test_analysis import make_dataset

LAYERS = [("fc1.weight", "fc1", (16, 10)), ("fc1.bias", "fc1", (16,)),
          ("fc2.weight", "fc2", (8, 16)), ("fc2.bias", "fc2", (8,)),
          ("fc3.weight", "fc3", (3, 8)), ("fc3.bias", "fc3", (3,))]
KEYS = {"store", "rule", "tol", "steps", "steps_total", "parameters", "layers", "modules", "helped_fraction",
        "distribution", "layer_totals", "hurting_layers", "module_totals", "hurting_modules", "units",
        "synchronisation", "residual", "reconstruction", "points", "heldout", "figures", "run", "settings",
        "figure_files", "parameters_kept", "missing", "oscillation"}


def training_like(t: int = 150, seed: int = 0, heldout: bool = False, **kw):
    """Heavy-tailed LCA shrinking over training, a shared per-step signal (synchronised layers), and fc3
    pushed positive (a layer that hurts)."""
    rng = np.random.default_rng(seed)
    p = sum(int(np.prod(s)) for _, _, s in LAYERS)
    scale = 2e-4 * np.exp(-np.arange(t) / 60)[:, None]
    shared = rng.standard_normal(t)[:, None] - 0.4
    x = scale * (0.5 * rng.standard_t(3, (t, p)) + shared * rng.uniform(0.5, 1.5, p))
    x[:, -27:] += 0.8 * scale
    x = x.astype(np.float32)
    res = rng.normal(0, 1e-6, t)
    return make_dataset(x, LAYERS, residual=res, chunks=(40, 100),
                        heldout=(0.8 * x + 0.2 * scale * rng.standard_normal((t, p))) if heldout else None, **kw)


def _non_blank(path) -> None:
    img = mpimg.imread(path)[..., :3]
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert img.std() > 0.05, path
    assert (img.min(axis=2) < 0.9).mean() > 0.02, path  # more than a frame on white


def test_build_report_writes_six_figures_and_summary(tmp_path, capsys):
    s = build_report(training_like(), tmp_path, draws=200)
    assert set(s) == KEYS
    for name in FIGURES.values():
        _non_blank(tmp_path / name)
    assert len(list(tmp_path.glob("*.png"))) == 6 and len(list(tmp_path.glob("*.svg"))) == 6
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == s
    assert s["steps"] == s["steps_total"] == 150 and s["parameters"] == 339 and s["modules"] == 3
    assert 0.3 < s["helped_fraction"]["mean"] < 0.8 and s["helped_fraction"]["std"] > 0
    assert "fc3" in s["hurting_modules"] and s["module_totals"]["fc3"] > 0
    assert s["synchronisation"]["ratio"] > 1.5 and s["synchronisation"]["p_value"] < 0.05
    assert s["reconstruction"]["max_relative_error"] < 1e-3
    assert s["residual"]["max_abs"] < 1e-5 and s["heldout"] is None
    assert s["points"] == {"total": 300, "mean_per_step": 2.0, "splits": {"2": 150}}
    assert s["distribution"]["excess_kurtosis"] > 1
    printed = capsys.readouterr().out
    assert "helped fraction" in printed and "synchronisation" in printed and "fc3" in printed


def test_report_uses_completed_steps_and_heldout(tmp_path):
    ds = training_like(t=90, heldout=True)
    lca = ds["lca_param"].values.copy()
    lca[60:] = np.nan  # the last blocks are still being computed
    res = ds["residual"].values.copy()
    res[60:] = np.nan
    ds = ds.assign(lca_param=(ds["lca_param"].dims, lca), residual=("iteration", res),
                   lca_layer=ds["lca_layer"].where(ds.iteration < 60))
    s = build_report(ds, tmp_path, draws=50, verbose=False)
    assert s["steps"] == 60 and s["steps_total"] == 90
    h = s["heldout"]
    assert h["steps"] == 60 and h["correlation_per_iteration"] > 0.9
    assert set(h["layer_totals"]["fc1.weight"]) == {"train", "heldout", "correlation"}


@pytest.mark.parametrize("case", ["all-nan", "no-lca", "no-steps"])
def test_no_lca_yet_is_a_one_line_error(tmp_path, case):
    ds = training_like(t=10)
    if case == "all-nan":
        ds = ds.assign(lca_layer=ds["lca_layer"] * np.nan, residual=ds["residual"] * np.nan)
    elif case == "no-lca":
        ds = ds.drop_vars([k for k in ds.data_vars if "lca" in k])
    else:
        ds = ds.isel(iteration=slice(0, 0))
    with pytest.raises(LCAError, match=r"lca compute fake\.zarr.*make lca") as err:
        build_report(ds, tmp_path)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "summary.json").exists()


def test_write_report_opens_the_store(tmp_path, monkeypatch):
    opened = []

    def fake_open(path, result=None, verify=None):
        opened.append((path, result, verify))
        return training_like(t=40)

    monkeypatch.setattr(pipeline.analysis.dataset, "open_lca", fake_open)
    s = write_report("runs/x.zarr", str(tmp_path / "out"), result="fo")
    # The report reads every block back against its checksums before drawing anything.
    assert opened == [("runs/x.zarr", "fo", True)] and s["steps"] == 40
    assert (tmp_path / "out" / "summary.json").exists()


def test_lca_report_on_a_real_computed_run(digits_store, tmp_path) -> None:
    """What `make report` does on the default workflow: a real store, the real CLI, six figures."""
    import shutil
    import subprocess

    from pipeline.lca.compute import compute_lca
    from tests.conftest import LCA, ROOT

    store = tmp_path / "run.zarr"
    shutil.copytree(digits_store, store)
    compute_lca(str(store), workers=1, progress=False)
    out = tmp_path / "report"
    result = subprocess.run(LCA + ["report", str(store), "--out", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert KEYS <= set(summary)
    assert summary["steps"] == 48 and summary["parameters"] == 12060
    assert 0.5 < summary["helped_fraction"]["mean"] < 1.0  # early training: most moving parameters help
    for name in FIGURES:
        _non_blank(out / FIGURES[name])
    assert 0 <= summary["oscillation"]["score"] <= 1 and "oscillation.png" in summary["figures"]
    _non_blank(out / "oscillation.png")
    assert "helped" in result.stdout.lower()


def test_figures_are_stamped_vector_and_fit_their_canvas(tmp_path, monkeypatch):
    """Every figure: PNG plus the asked vector format, the run's name in it, and no text outside the
    canvas before `bbox_inches="tight"` would rescue it (the helped-fraction title once ran off)."""
    import pipeline.analysis.report as report

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    checked = []
    original = report._write

    def checking_write(fig, path, style):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()  # runs the constrained layout, stamp included
        tight = fig.get_tightbbox(canvas.get_renderer())
        box = fig.bbox_inches
        assert tight.x0 >= -0.02 and tight.y0 >= -0.02 and tight.x1 <= box.x1 + 0.02 and \
            tight.y1 <= box.y1 + 0.02, (path.name, tight, box)
        checked.append(path.name)
        original(fig, path, style)

    monkeypatch.setattr(report, "_write", checking_write)
    s = build_report(training_like(t=80), tmp_path, draws=50, verbose=False, formats=("svg",))
    assert sorted(checked) == sorted(FIGURES.values())
    for name in FIGURES.values():
        svg = (tmp_path / name).with_suffix(".svg").read_text()
        assert "run fake" in svg and "rule rk4" in svg, name
        assert "RdYlGn" not in svg
    assert s["run"] == "fake" and s["settings"]["rule"] == "rk4"
    assert report.DIVERGING == "RdBu_r" and (report.HELPED, report.HURT) == ("#2166ac", "#b2182b")


def test_bad_figure_format_is_one_line():
    from pipeline.analysis.report import parse_formats

    assert parse_formats("png,pdf") == ("png", "pdf") and parse_formats("svg") == ("png", "svg")
    with pytest.raises(LCAError, match="--format 'jpg' is not a figure format"):
        parse_formats("png,jpg")
