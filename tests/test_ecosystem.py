"""The habits of Zarr, xarray and Dask users, on one real computed digits-fc store: plain zarr/xarray read it
without our package, the Dataset writes out as it is, partial results never sum silently, the dashboard
is printed and listens on loopback, an unreachable tolerance is reported."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline.analysis.dataset import open_lca
from pipeline.errors import IncompleteResultError, IncompleteResultWarning, LCAError
from tests.conftest import LCA, ROOT

pytestmark = pytest.mark.timeout(300)


def result_group(store) -> str:
    """The group holding the store's (only) LCA result: `lca/<name>/r<k>` (docs/ARCHITECTURE.md)."""
    from pipeline.lca.results import select_result

    return select_result(zarr.open_group(str(store), mode="r"), None, str(store)).path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def computed(digits_store, tmp_path_factory):
    """The 48-step digits store with its LCA, computed through the real CLI with a chosen dashboard port and
    a tolerance that Simpson n = 2 in fp32 cannot reach (one cluster start serves both checks; the other
    tests only read the result)."""
    store = tmp_path_factory.mktemp("eco") / "run.zarr"
    shutil.copytree(digits_store, store)
    port = free_port()
    proc = subprocess.run(LCA + ["compute", str(store), "--workers", "1", "--dashboard-address", str(port),
                                 "--tol", "1e-12", "--max-splits", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return store, port, proc


def test_every_run_prints_its_dashboard_on_loopback(computed):
    _, port, proc = computed
    assert f"Dask dashboard: http://127.0.0.1:{port}/status" in proc.stdout
    assert f"dashboard was at http://127.0.0.1:{port}/status" in proc.stdout  # and in the closing summary


def test_unreachable_tolerance_warns_with_the_share(computed):
    """`--tol 1e-12` cannot be met at n = 2 in fp32: one `warning:` line with the share that made it."""
    store, _, proc = computed
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("warning:")]
    m = re.match(r"warning: only (\d+\.\d)% of 48 train steps reached \|residual\| <= tol 1e-12 .*max splits 2", line)
    assert m, line
    residual = np.abs(np.asarray(zarr.open_group(str(store), mode="r")[f"{result_group(store)}/residual"][:]))
    assert float(m.group(1)) == pytest.approx(100 * (residual <= 1e-12).mean(), abs=0.05)


def test_tolerance_warning_on_resume_and_not_when_within_tol(computed):
    """A rerun with nothing left to compute still says so (no cluster starts); a result within tol does not."""
    import dataclasses

    from pipeline.errors import ToleranceWarning
    from pipeline.lca.compute import _warn_unreached_tolerance, compute_lca

    store = str(computed[0])
    with pytest.warns(ToleranceWarning, match=r"only \d+\.\d% of 48 train steps"):
        summary = compute_lca(store, tol=1e-12, max_splits=2, progress=False)
    assert summary.splits[0].blocks_computed == 0 and summary.workers == 0
    sp = summary.splits[0]
    summary.splits = [dataclasses.replace(sp, stats=dataclasses.replace(sp.stats, within_tol=1.0))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_unreached_tolerance(summary)


def test_local_cluster_listens_only_on_loopback():
    import psutil

    from pipeline.lca.compute import _client

    with _client(1, None) as client:
        me = psutil.Process()
        listening = [c.laddr for p in [me, *me.children(recursive=True)]
                     for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert client.dashboard_link.startswith("http://127.0.0.1:")
        workers = list(client.scheduler_info()["workers"])
    assert workers and all(w.startswith("tcp://127.0.0.1:") for w in workers)
    assert len(listening) >= 4  # scheduler, dashboard, nanny, worker
    assert {a.ip for a in listening} == {"127.0.0.1"}, listening


@pytest.mark.parametrize("address, bound", [(None, "127.0.0.1:0"), ("8787", "127.0.0.1:8787"),
                                            ("0.0.0.0:9000", "0.0.0.0:9000"), (":9000", ":9000")])
def test_dashboard_address_forms(address, bound):
    from pipeline.lca.compute import dashboard_bind

    assert dashboard_bind(address) == bound


@pytest.mark.parametrize("bad", ["localhost:http", "127.0.0.1:70000", "abc", "a b:80"])
def test_bad_dashboard_address(bad):
    from pipeline.lca.compute import dashboard_bind

    with pytest.raises(LCAError, match="--dashboard-address must be PORT, HOST:PORT"):
        dashboard_bind(bad)


def test_bad_dashboard_address_is_one_line_and_starts_nothing(computed, tmp_path):
    bad = "127.0.0.1:70000"
    store = tmp_path / "c.zarr"
    shutil.copytree(computed[0], store)
    before = {p.name: p.stat().st_mtime_ns for p in (store / "lca").iterdir()}
    proc = subprocess.run(LCA + ["compute", str(store), "--recompute", "--dashboard-address", bad], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --dashboard-address") and proc.stderr.count("\n") == 1, proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (store / "lca").iterdir()} == before


# -- plain zarr and xarray, without our package ------------------------------------------------------------

FRESH = r"""
import json, sys
import numpy as np, xarray as xr, zarr
assert not any(m.split(".")[0] in ("trajectory_store", "pipeline") for m in sys.modules)
store = sys.argv[1]
root = zarr.open_group(store, mode="r")
out = {"params_sum": float(np.asarray(root["trajectory/params"][:], dtype=np.float64).sum())}
def walk(g, prefix=""):
    for k, v in g.members():
        if isinstance(v, zarr.Group):
            yield from walk(v, prefix + k + "/")
        else:
            yield prefix + k, v
out["arrays"] = {k: list(np.asarray(a[...]).shape) for k, a in walk(root)}
traj = xr.open_zarr(store, group="trajectory", consolidated=False)
out["xr_params_sum"] = float(traj["params"].astype("float64").sum())
out["xr_dims"] = dict(traj.sizes)
lca = xr.open_zarr(store, group=sys.argv[2], consolidated=False)
out["xr_lca_sum"] = float(lca["train"].astype("float64").sum())
print(json.dumps(out))
"""


def test_plain_zarr_and_xarray_read_every_array_in_a_fresh_interpreter(computed, tmp_path):
    from trajectory_store import open_trajectory

    store, _, _ = computed
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    group = result_group(store)
    proc = subprocess.run([sys.executable, "-c", FRESH, str(store), group], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    reader = open_trajectory(str(store))
    params = np.asarray(reader.params(0, reader.num_checkpoints), dtype=np.float64)
    assert out["params_sum"] == pytest.approx(params.sum(), rel=1e-12)
    assert out["xr_params_sum"] == pytest.approx(params.sum(), rel=1e-12)
    assert {"trajectory/params", "trajectory/lr", "trajectory/minibatch_loss", "trajectory/batch_indices",
            *(f"{group}/{k}" for k in ("train", "loss", "residual", "points", "splits", "blocks_done",
                                       "blocks_crc"))} <= set(out["arrays"])
    assert out["xr_dims"]["checkpoint"] == 49 and out["xr_dims"]["parameter"] == 12060
    lca = np.asarray(zarr.open_group(str(store), mode="r")[f"{group}/train"][:], dtype=np.float64)
    assert out["xr_lca_sum"] == pytest.approx(lca.sum(), rel=1e-9)


def test_the_codec_is_registered_as_a_zarr_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="zarr.codecs") if e.name == "lca.bit_delta"]
    from trajectory_store.codecs import BitDeltaCodec

    assert ep.load() is BitDeltaCodec


# -- the Dataset writes out as it is -----------------------------------------------------------------------


def test_open_lca_round_trips_through_to_zarr_and_to_netcdf(computed, tmp_path):
    ds = open_lca(str(computed[0]))
    ds.to_zarr(tmp_path / "copy.zarr", zarr_format=3, consolidated=False)
    back = xr.open_zarr(tmp_path / "copy.zarr", consolidated=False)
    xr.testing.assert_identical(back.load(), ds.load())
    ds.to_netcdf(tmp_path / "copy.nc")
    with xr.open_dataset(tmp_path / "copy.nc") as nc:
        xr.testing.assert_allclose(nc.load(), ds.load())
        assert nc.attrs["store"] == ds.attrs["store"] and json.loads(nc.attrs["settings"])["rule"] == "rk4"
        assert list(nc["layer"].values) == list(ds["layer"].values)


def test_names_do_not_collide_on_a_real_store(computed):
    ds = open_lca(str(computed[0]))
    assert ds.lca_param.sel(iteration=0).shape == (12060,)
    assert ds.lca_layer.sel(iteration=0).shape == (6,)
    assert "lca" not in ds.variables


def test_tensor_in_its_own_shape(computed):
    from trajectory_store import open_trajectory

    ds = open_lca(str(computed[0]))
    layout = open_trajectory(str(computed[0])).layout
    spec = next(t for t in layout.tensors if t.name.endswith("weight"))
    got = ds.lca.tensor(spec.name, 5)
    assert got.shape == tuple(spec.shape) and got.dims[0] == "unit"
    flat = np.asarray(zarr.open_group(str(computed[0]), mode="r")[f"{result_group(computed[0])}/train"][5])
    np.testing.assert_array_equal(got.values, flat[spec.offset:spec.offset + spec.size].reshape(spec.shape))
    total = ds.lca.tensor(spec.name)
    np.testing.assert_allclose(total.values.sum(), float(ds.lca_layer.sel(layer=spec.name).sum()), rtol=1e-6)
    with pytest.raises(LCAError, match="no parameter tensor named 'nope'"):
        ds.lca.tensor("nope", 0)


# -- partial results ---------------------------------------------------------------------------------------


@pytest.fixture
def partial(computed, tmp_path):
    """The computed store as an interrupted run leaves it: its middle block not done, its rows NaN."""
    store = tmp_path / "partial.zarr"
    shutil.copytree(computed[0], store)
    root = zarr.open_group(str(store), mode="r+")
    group = result_group(store)
    root[f"{group}/blocks_done"][1] = 0
    root[f"{group}/train"][16:32] = np.nan
    root[f"{group}/residual"][16:32] = np.nan
    return store


def test_partial_result_warns_on_open_with_the_count(partial):
    with pytest.warns(IncompleteResultWarning, match=r"16 of 48 iterations of train \(result .*\) not computed"):
        ds = open_lca(str(partial))
    assert int((~ds["complete"]).sum()) == 16 and ds.attrs["iterations_missing"] == 16


def test_partial_result_analyses_refuse_and_completed_works(partial):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteResultWarning)
        ds = open_lca(str(partial))
    for call in (lambda: ds.lca.layer_totals(), lambda: ds.lca.helped_fraction_stats(),
                 lambda: ds.lca.distribution(), lambda: ds.lca.cumulative(), lambda: ds.lca.tensor("layers.0.weight")):
        with pytest.raises(IncompleteResultError, match=r"16 of 48 iterations .* not computed yet"):
            call()
    done = ds.lca.completed()
    assert done.sizes["iteration"] == 32
    assert np.isfinite(done.lca.layer_totals().values).all()


def test_partial_result_raise_and_drop(partial):
    with pytest.raises(IncompleteResultError, match="16 of 48"):
        open_lca(str(partial), incomplete="raise")
    with pytest.warns(IncompleteResultWarning, match="left out 16 of 48"):
        ds = open_lca(str(partial), incomplete="drop")
    assert ds.sizes["iteration"] == 32 and bool(ds["complete"].all())


@pytest.fixture(scope="module")
def partial_report(computed, tmp_path_factory):
    """`lca report --format png,pdf` on a partial store, through the real CLI."""
    base = tmp_path_factory.mktemp("partial-report")
    store = base / "partial.zarr"
    shutil.copytree(computed[0], store)
    root = zarr.open_group(str(store), mode="r+")
    group = result_group(store)
    root[f"{group}/blocks_done"][1] = 0
    root[f"{group}/train"][16:32] = np.nan
    root[f"{group}/residual"][16:32] = np.nan
    out = base / "report"
    proc = subprocess.run(LCA + ["report", str(store), "--out", str(out), "--format", "png,pdf"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_report_of_a_partial_result_warns_with_the_count(partial_report):
    out, proc = partial_report
    assert re.search(r"warning: .*16 of 48 iterations", proc.stderr), proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 32 and summary["steps_total"] == 48


def test_report_writes_png_plus_the_asked_vector_format(partial_report):
    from pipeline.analysis.report import FIGURES

    out, _ = partial_report
    for png in FIGURES.values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / png).with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
        assert not (out / png).with_suffix(".svg").exists()


class _Page:
    """What index.html asks a browser to load, and its text."""

    def __init__(self, text: str) -> None:
        from html.parser import HTMLParser

        self.resources: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.text: list[str] = []
        page = self

        class Parser(HTMLParser):
            def handle_starttag(self, tag, attrs):
                page.tags.append(tag)
                for k, v in attrs:
                    if k in ("src", "href", "data", "poster", "srcset"):
                        page.resources.append((tag, k, v or ""))

            def handle_data(self, data):
                page.text.append(data)

        Parser().feed(text)


def test_html_report_is_one_self_contained_page(partial_report):
    import base64
    import io

    import matplotlib.image as mpimg

    from pipeline.analysis.report import FIGURES

    out, _ = partial_report
    page = _Page((out / "index.html").read_text())
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    images = [v for tag, k, v in page.resources if tag == "img"]
    assert len(images) == len(FIGURES)
    for src in images:
        assert src.startswith("data:image/png;base64,")
        img = mpimg.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")
        assert img.shape[0] > 300 and img[..., :3].std() > 0.05
    others = [v for tag, k, v in page.resources if tag != "img"]
    assert all(v.startswith("#") for v in others), others  # in-page anchors only
    text = " ".join(" ".join(page.text).split())
    summary = json.loads((out / "summary.json").read_text())
    assert f"Loss Change Allocation: {summary['run']}" in text
    assert "16 of 48 iterations are not computed yet" in text  # the partial result is flagged on the page
    for needle in ("parameters that helped, per step", "Settings", "tol", "rk4", "Problem definition",
                   "Workflow", "peak synchronisation", "layers.0.weight", "helped fraction / step"):
        assert needle in text, needle


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def _open_in_chromium(page: Path, shot: Path) -> list[str]:
    """Load `page` in headless Chromium, screenshot it, return its console messages."""
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed: `make test-browser` installs "
                                                 "Debian's chromium and runs this test")
def test_html_report_opens_in_headless_chromium(partial_report, tmp_path):
    import matplotlib.image as mpimg

    out, _ = partial_report
    # The check can fail: a page with an outside image and a script error gives console messages.
    bad = tmp_path / "bad.html"
    bad.write_text((out / "index.html").read_text().replace(
        "</body>", "<img src='http://example.invalid/x.png'><script>missing()</script></body>"))
    assert _open_in_chromium(bad, tmp_path / "bad.png")
    console = _open_in_chromium(out / "index.html", tmp_path / "shot.png")
    assert console == [], console
    shot = mpimg.imread(tmp_path / "shot.png")[..., :3]
    assert shot.std() > 0.05 and (shot.min(axis=2) < 0.5).mean() > 0.01  # text and tables, not a blank page


# -- TensorBoard -------------------------------------------------------------------------------------------


def test_tensorboard_export_reads_back(computed, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = computed[0]
    logdir = tmp_path / "tb"
    proc = subprocess.run(LCA + ["export", "tensorboard", str(store), str(logdir), "--histogram-every", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tensorboard --logdir" in proc.stdout
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    ds = open_lca(str(store))
    layers = [str(n) for n in ds.layer.values]
    assert {f"lca_layer/{n}" for n in layers} | {f"helped_fraction/{n}" for n in layers} | \
        {"helped_fraction/all", "loss/train"} <= set(tags["scalars"])
    lca = np.asarray(zarr.open_group(str(store), mode="r")[f"{result_group(store)}/train"][:], dtype=np.float64)
    for t in ds.layer.values.tolist():
        i = layers.index(t)
        off, size = int(ds.layer_offset[i]), int(ds.layer_size[i])
        got = events.Scalars(f"lca_layer/{t}")
        assert [e.step for e in got] == list(range(48))
        np.testing.assert_allclose([e.value for e in got], lca[:, off:off + size].sum(1), rtol=1e-5, atol=1e-9)
        block = lca[:, off:off + size]
        helped = (block < 0).sum(1) / np.maximum((block != 0).sum(1), 1)
        np.testing.assert_allclose([e.value for e in events.Scalars(f"helped_fraction/{t}")], helped, rtol=1e-6)
        hist = events.Histograms(f"lca_hist/{t}")
        assert [h.step for h in hist] == list(range(0, 48, 8))
        assert [h.histogram_value.num for h in hist] == [size] * 6
        assert hist[0].histogram_value.sum == pytest.approx(block[0].sum(), rel=1e-4, abs=1e-9)


def test_tensorboard_export_of_a_store_without_lca_is_one_line(digits_store, tmp_path):
    proc = subprocess.run(LCA + ["export", "tensorboard", str(digits_store), str(tmp_path / "tb")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "tb").exists()


# -- small things ------------------------------------------------------------------------------------------


def test_version():
    from importlib.metadata import version

    proc = subprocess.run(LCA + ["--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"lca {version('lca-pipeline')}"


def test_default_worker_count_agrees_between_code_help_and_readme(monkeypatch):
    from pipeline.lca import compute

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert compute.default_workers(False) == compute.MAX_CPU_WORKERS == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert compute.default_workers(False) == 2
    phrase = "one per GPU, else one per CPU core, at most 4"
    proc = subprocess.run(LCA + ["compute", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert phrase in " ".join(proc.stdout.split())
    assert phrase in " ".join((ROOT / "README.md").read_text().split())


def test_docs_link_only_to_files_in_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{doc.name} links to {target}, which is not in the repository"
            assert ROOT in path.parents or path == ROOT, f"{doc.name} links outside the repository: {target}"
        assert "shared/DESIGN.md" not in doc.read_text(), doc


def test_pyproject_has_no_setuptools_license_deprecation():
    """What `pip install` prints comes from setuptools reading pyproject.toml: read it the same way."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message) for w in caught]
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)
