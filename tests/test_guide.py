"""From measurement to action on one computed run: oscillation through the accessor, LCA-guided freezing
retrained from the same seed and minibatch order, and the comparison of the two runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.errors import LCAError


@pytest.fixture(scope="module")
def computed(digits_store, tmp_path_factory) -> str:
    from pipeline.lca.compute import compute_lca

    dest = tmp_path_factory.mktemp("guide") / "base.zarr"
    shutil.copytree(digits_store, dest)
    compute_lca(str(dest), workers=1, threads_per_worker=1)
    return str(dest)


def test_oscillation_accessor_on_a_computed_store(computed, tmp_path: Path) -> None:
    """ds.lca.oscillation() reads the trajectory the dataset came from; the per-layer LCA series it sums
    agrees with the dataset's own layer sums, and the score is a rate."""
    import pipeline

    ds = pipeline.open_lca(computed)
    res = ds.lca.oscillation()
    assert res.iterations == ds.sizes["iteration"] and 0 <= res.score <= 1
    by_layer = "lca_layer" if "lca_layer" in ds else "lca_by_layer"
    np.testing.assert_allclose(res.layers["total_lca"].values, ds[by_layer].sum("iteration").values, rtol=1e-9)
    assert res.units is not None and res.units.sizes["unit"] == 100 + 50 + 10
    w = 2 * np.pi / res.layers["period_steps"].values      # digits-fc trains with momentum 0.9
    np.testing.assert_allclose(res.layers["momentum_lag"].values, np.arctan2(0.9 * np.sin(w), 1 - 0.9 * np.cos(w)))
    d = res.to_dict()
    assert set(d["layers"]) >= {"lca_flip_rate", "param_flip_rate", "motion_autocorr", "phase_lag", "lag_steps"}
    from pipeline.analysis.oscillation import report_oscillation  # what `lca report` adds

    summary = report_oscillation(ds, tmp_path)
    assert summary["score"] == res.score and (tmp_path / "oscillation.png").stat().st_size > 10_000
    assert report_oscillation(ds.assign_attrs(store="/nonexistent.zarr"), tmp_path / "none") is None
    # a subset of iterations: the longest contiguous run of them is used
    sub = ds.isel(iteration=[0, 1, 2, 3, 10, 11, 12, 13, 14, 15])
    assert sub.lca.oscillation(units=False).first_iteration == 10


def test_rank_and_guided_retrain_then_compare(computed, tmp_path: Path) -> None:
    import pipeline
    from pipeline.analysis.guide import rank_units, select_units
    from pipeline.lca.compute import compute_lca
    from trajectory_store import open_trajectory

    ranking = rank_units(pipeline.open_lca(computed))
    tot = ranking["total_lca"].values
    assert np.all(np.diff(tot) <= 0) and ranking["share"].sum() == pytest.approx(1.0)
    small = select_units(ranking, "negligible", 4)       # units that moved (total != 0) but did least
    moving = np.abs(tot[tot != 0])
    assert np.all(small["total_lca"].values != 0) and np.all(np.abs(small["total_lca"].values) <= np.sort(moving)[3])
    if tot[0] > 0:
        assert np.all(select_units(ranking, "hurting", 2)["total_lca"].values > 0)
    else:  # 48 digits steps: no unit hurts in total, and the error says what to do instead
        with pytest.raises(LCAError, match="no unit hurts in total"):
            select_units(ranking, "hurting", 2)
    worst = "layers.2"  # output units all move: freezing the least useful ones changes the run
    chosen = select_units(ranking, "negligible", 3, modules=[worst])
    assert set(chosen["unit_module"].values) == {worst}

    out, wf_out = tmp_path / "guided.zarr", tmp_path / "guided.toml"
    res = CliRunner().invoke(main, ["guide", computed, "--out", str(out), "--select", "negligible", "--top", "3",
                                    "--modules", worst, "--workflow-out", str(wf_out)])
    assert res.exit_code == 0, res.output
    base, new = open_trajectory(computed), open_trajectory(str(out))
    np.testing.assert_array_equal(base.batch_indices, new.batch_indices)        # same minibatch order
    np.testing.assert_array_equal(base.params(0, 1), new.params(0, 1))          # same seed: same theta_0
    units = sorted(int(u) for u in chosen["unit_index"].values)
    rec = new.attrs["interventions"]["tensors"][f"{worst}.weight"]["freeze"][0]
    assert rec["units"] == units and rec["from_step"] == 0
    w = next(t for t in new.layout.tensors if t.name == f"{worst}.weight")
    rows = (w.offset + np.array(units)[:, None] * w.shape[1] + np.arange(w.shape[1])).ravel()
    theta = np.asarray(new.params())
    assert np.all(theta[:, rows] == theta[0, rows]) and not np.array_equal(theta[-1], base.params(48, 49)[0])
    from pipeline.config import Workflow, load_workflow  # the written workflow reproduces the run's

    assert load_workflow(wf_out).interventions == Workflow.from_dict(new.workflow).interventions

    compute_lca(str(out), workers=1, threads_per_worker=1)
    res = CliRunner().invoke(main, ["compare", computed, str(out), "--label", "baseline", "--label", "guided",
                                    "--out", str(tmp_path / "cmp")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert summary["same_minibatch_order"] is True
    b, g = summary["runs"]
    ds = pipeline.open_lca(str(out))
    assert g["final_loss"] == pytest.approx(float(ds["loss_after"][-1]))
    assert b["layer_totals"].keys() == g["layer_totals"].keys()
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert md.startswith("| intervention | final full-split loss | layers hurting in total | oscillation score |")
    assert "| guided |" in md and (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000

    bad = CliRunner().invoke(main, ["guide", computed, "--out", str(tmp_path / "x.zarr"), "--layers", "nope.*"])
    assert bad.exit_code == 1 and "glob 'nope.*' matches no parameter" in bad.output
    assert not (tmp_path / "x.zarr").exists()
