"""`lca bench --smoke`: the table and bench.json are complete and self-consistent. No timing assertions:
CI machines are shared and tiny sizes measure overhead, so nothing here says which side is faster."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
import torch

import pytest

from pipeline.bench.run import COLUMNS, TITLES, run_bench

from .conftest import LCA, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # the smoke fixture runs every section

SECTIONS = ("gradient", "precision", "lca", "training", "storage", "accuracy", "precision_choice", "worker_memory")


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        v = row[key]
        assert isinstance(v, (int, float)) and not isinstance(v, bool), (key, v)
        assert math.isfinite(v) and v > 0, (key, v)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = run_bench(smoke=True, out=str(out), device="cpu")
    return result, buf.getvalue(), out


def test_the_table_names_every_section_and_column(smoke):
    result, text, _ = smoke
    head = text.splitlines()[:3]
    assert "smoke" in head[0] and result["meta"]["date"] in head[0]
    assert torch.__version__ in head[1] and result["meta"]["device_name"] in head[1]
    assert "peak fp32 matmul" in head[2]
    for section in SECTIONS:
        assert TITLES[section] in text
        lines = text.splitlines()
        header = lines[lines.index(TITLES[section]) + 1]
        for column, *_ in COLUMNS[section]:
            assert column in header, (section, column)


def test_bench_json_holds_what_was_returned(smoke):
    result, _, out = smoke
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    for section in SECTIONS:
        assert isinstance(on_disk[section], list) and on_disk[section], section
    assert not (out / "scratch").exists()  # scratch stores are cleaned up
    positive(on_disk["meta"], "peak_fp32_tflops", "threads")
    assert on_disk["meta"]["peak_tf32_tflops"] is None  # CPU: no TF32


def test_gradient_rows_are_consistent(smoke):
    rows = smoke[0]["gradient"]
    assert {r["arch"] for r in rows} == {"fc", "lenet", "resnet20"}
    for r in rows:
        positive(r, "samples", "params", "ref_batch", "ours_batch", "ref_s", "ours_s", "ratio", "flop",
                 "ref_tflops", "ours_tflops", "frac_fp32_peak")
        assert r["ratio"] == pytest.approx(r["ref_s"] / r["ours_s"], rel=1e-9)
        assert r["ours_tflops"] == pytest.approx(r["flop"] / r["ours_s"] / 1e12, rel=1e-9)
        assert r["ref_tflops"] == pytest.approx(r["flop"] / r["ref_s"] / 1e12, rel=1e-9)
        assert r["frac_fp32_peak"] == pytest.approx(
            r["ours_tflops"] / smoke[0]["meta"]["peak_fp32_tflops"], rel=1e-9)
        assert r["frac_tf32_peak"] is None
        # Both evaluators compute the same gradient: a check on the reference-style code, whose mistakes
        # would show as differences of order 1. On ResNet-20 over 16 smoke samples both are ~1e-3 from a
        # float64 gradient (measured: NCHW 9.5e-4, our channels_last 1.0e-3), so they differ by that much.
        assert 0 <= r["max_rel_diff"] < 1e-2
    fc = next(r for r in rows if r["arch"] == "fc")
    # 784-100-50-10: 2 FLOPs per multiply-add, forward + weight gradients + input gradients of layers 2, 3.
    macs = 784 * 100 + 100 * 50 + 50 * 10
    assert fc["flop"] == pytest.approx(fc["samples"] * 2 * (2 * macs + 100 * 50 + 50 * 10), rel=1e-12)
    assert fc["params"] == macs + 100 + 50 + 10


def test_precision_rows(smoke):
    rows = {r["precision"]: r for r in smoke[0]["precision"]}
    assert set(rows) == {"fp32", "fp64"}
    for r in rows.values():
        assert r["splits"] == 2
        positive(r, "steps", "mean_abs_loss_change", "mean_abs_residual", "max_abs_residual", "seconds")
        assert r["max_abs_residual"] >= r["mean_abs_residual"]
        assert 0 <= r["within_tol"] <= 1


def test_lca_rows(smoke):
    (r,) = smoke[0]["lca"]
    assert r["run"] == "digits-fc" and r["workers"] == 1
    positive(r, "steps", "params", "samples", "points_per_step", "points_per_step_in_process", "in_process_s",
             "in_process_steps_per_s", "dask_s", "dask_steps_per_s")
    assert r["points_per_step"] >= 2 and r["points_per_step_in_process"] >= 2
    assert r["points_per_step"] == pytest.approx(r["points_per_step_in_process"], abs=0.5)
    assert r["dask_steps_per_s"] == pytest.approx(r["steps"] / r["dask_s"], rel=1e-9)
    assert 0 <= r["within_tol"] <= 1 and math.isfinite(r["max_abs_residual"])


def test_training_rows(smoke):
    (r,) = smoke[0]["training"]
    positive(r, "steps", "params", "without_s", "with_s", "without_ms_per_step", "with_ms_per_step")
    assert math.isfinite(r["slowdown_pct"])  # its sign is noise on a shared CI machine
    assert r["slowdown_pct"] == pytest.approx(100 * (r["with_s"] / r["without_s"] - 1), rel=1e-9, abs=1e-9)


def test_storage_is_bit_exact_and_smaller_than_h5py_gzip(smoke):
    (r,) = smoke[0]["storage"]
    assert r["chain_exact"] is True and r["store_exact"] is True and r["h5py_exact"] is True
    positive(r, "checkpoints", "params", "raw_bytes", "h5py_gzip_bytes", "store_bytes", "store_on_disk_bytes")
    assert r["raw_bytes"] == 4 * r["checkpoints"] * r["params"]
    assert r["store_bytes"] < r["h5py_gzip_bytes"]
    assert r["x_smaller"] == pytest.approx(r["h5py_gzip_bytes"] / r["store_bytes"], rel=1e-9)


def test_cli_bench_smoke_exits_zero(tmp_path):
    # Every section already ran in-process (the `smoke` fixture); the CLI run checks the command, `--only`.
    proc = subprocess.run([*LCA, "bench", "--smoke", "--out", str(tmp_path / "b"), "--device", "cpu",
                           "--only", "training,storage"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert TITLES["storage"] in proc.stdout and TITLES["gradient"] not in proc.stdout
    assert {"training", "storage"} <= set(json.loads((tmp_path / "b" / "bench.json").read_text()))


def test_cli_bench_unknown_section_is_one_line(tmp_path):
    proc = subprocess.run([*LCA, "bench", "--smoke", "--out", str(tmp_path / "b"), "--only", "acuracy"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "unknown bench section 'acuracy'" in proc.stderr and "accuracy" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_cli_bench_cuda_without_cuda_is_a_one_line_error(tmp_path):
    proc = subprocess.run([*LCA, "bench", "--smoke", "--out", str(tmp_path / "b"), "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "CUDA" in proc.stderr
    assert not (tmp_path / "b").exists()


def test_bench_modules_do_not_import_the_cli():
    """The CLI imports the bench; the bench (and `python -m pipeline.bench`) must not import the CLI back."""
    code = ("import sys, pipeline.bench.run, pipeline.bench.__main__; "
            "assert 'pipeline.cli' not in sys.modules, 'bench imported the CLI'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--smoke" in proc.stdout, proc.stderr[-2000:]


def test_accuracy_rows(smoke):
    rows = smoke[0]["accuracy"]
    assert {r["run"] for r in rows} == {"digits-fc", "digits-bn-conv"}
    by = {(r["run"], r["rule"], r["setting"]): r for r in rows}
    for run in ("digits-fc", "digits-bn-conv"):
        assert by[(run, "first-order", "-")]["grads_per_step"] == 1
        assert by[(run, "rk4", "n = 2 fixed")]["grads_per_step"] == 2
        assert by[(run, "rk4", "n = 16 fixed")]["grads_per_step"] == 16
        # Against the n = 32 reference, finer is better, and the fast rule never costs more than rk4.
        assert by[(run, "rk4", "n = 16 fixed")]["l1_err_median"] < by[(run, "rk4", "n = 2 fixed")]["l1_err_median"]
        assert by[(run, "fast", "tol 1e-4")]["grads_per_step"] <= by[(run, "rk4", "tol 1e-4 (default)")]["grads_per_step"]
    for r in rows:
        assert 0 <= r["estimate_bounds"] <= 1 and 0 <= r["within_1e-4"] <= 1
        assert r["rel_err_p99"] >= r["rel_err_median"] >= 0 and r["l1_err_max"] >= r["l1_err_median"] > 0
        assert r["helped_diff"] == pytest.approx(r["helped"] - r["helped_reference"], abs=1e-12)


def test_precision_choice_rows(smoke):
    rows = smoke[0]["precision_choice"]
    assert {(r["run"], r["precision"]) for r in rows} >= {("digits-bn-conv", "fp32"), ("digits-bn-conv", "fp64")}
    for r in rows:
        positive(r, "steps", "grads_per_step", "max_abs_residual", "l1_err_median", "seconds")
        if r["precision"] == "fp64":
            assert r["grad_rel_diff"] == 0 and r["rounding_l1_median"] == 0
        else:
            assert 0 < r["grad_rel_diff"] < 1e-3 and r["rounding_l1_median"] < r["l1_err_median"]


def test_worker_memory_rows(smoke):
    for r in smoke[0]["worker_memory"]:
        positive(r, "params", "block_steps", "points", "baseline_mib", "peak_mib", "seconds")
        assert r["peak_mib"] >= r["baseline_mib"] and math.isfinite(r["bytes_per_param"])
        assert r["target_bytes_per_param"] == 64
