"""The LCA phase end to end: conservation, exactness, determinism, and every fault the issue names."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline import open_lca
from pipeline.lca.compute import compute_lca
from pipeline.errors import LCAError
from trajectory_store import open_trajectory

from .conftest import LCA, ROOT

pytestmark = pytest.mark.timeout(300)


def result_path(store, name=None):
    from pipeline.lca.results import select_result

    return select_result(zarr.open_group(store, mode="r"), name, store).path


def arrays(store, split="train", name=None):
    from pipeline.lca.plan import array_names

    root = zarr.open_group(store, mode="r")
    return {k: np.asarray(root[v][:]) for k, v in array_names(split, result_path(store, name)).items()}


def done_flags(store, split="train", name=None):
    return arrays(store, split, name)["done"]


def assert_same(a, b):
    for key in ("lca", "loss", "residual", "points", "splits", "done", "crc"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)


@pytest.fixture(scope="module")
def reference(digits_store, tmp_path_factory):
    """The uninterrupted run every other run must reproduce bit for bit (1 worker, 1 thread)."""
    import shutil

    dest = tmp_path_factory.mktemp("ref") / "ref.zarr"
    shutil.copytree(digits_store, dest)
    summary = compute_lca(str(dest), workers=1, threads_per_worker=1, progress=False)
    return str(dest), summary


def test_conservation_at_the_default_tolerance(reference):
    store, summary = reference
    ds = open_lca(store)
    tol = ds.attrs["tol"]
    residual = ds["residual"].values
    assert np.all(np.isfinite(residual))
    assert np.abs(residual).max() <= tol
    total = ds["lca_param"].sum("parameter", dtype=np.float64).values
    np.testing.assert_allclose(total + residual, ds["loss_change"].values, rtol=0, atol=1e-12)
    assert ds.attrs["blocks_done"] == ds.attrs["blocks_total"] == 3
    # Two new evaluations per step plus one per block at n = 2; refinement only where needed.
    assert 2.0 < ds["points"].mean() < 2.5
    assert summary.splits[0].stats.within_tol == 1.0


def test_per_parameter_agreement_with_plain_float64_autograd(reference):
    """A few steps recomputed with nothing but autograd on the whole split, in float64."""
    from pipeline.config import Workflow
    from pipeline.problem.data import load_split
    from pipeline.problem.models import build_model

    store, _ = reference
    reader = open_trajectory(store)
    wf = Workflow.from_dict(reader.workflow)
    x, y = load_split(wf.data, "train")
    model = build_model(wf.model, tuple(x.shape[1:]), 10).double()
    params = list(model.parameters())

    def full_grad(theta):
        torch.nn.utils.vector_to_parameters(torch.as_tensor(theta), params)
        loss = torch.nn.functional.cross_entropy(model(x.double()), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).numpy()

    lca = arrays(store)["lca"]
    splits = arrays(store)["splits"]
    rows = reader.params(0, reader.num_checkpoints).astype(np.float64)
    for t in (0, 17, 40):
        n = int(splits[t])
        weights = np.array([1.0] + [4.0 if k % 2 else 2.0 for k in range(1, n)] + [1.0]) / (3.0 * n)
        a, b = rows[t], rows[t + 1]
        expected = (b - a) * sum(w * full_grad(a + (k / n) * (b - a)) for k, w in enumerate(weights))
        np.testing.assert_allclose(lca[t], expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


def test_same_bits_with_two_workers_and_other_block_sizes(reference, store_copy):
    ref, _ = reference
    two = store_copy("two.zarr")
    compute_lca(two, workers=2, threads_per_worker=1, progress=False)
    assert_same(arrays(two), arrays(ref))
    for block in (8, 24):
        other = store_copy(f"block{block}.zarr")
        compute_lca(other, workers=1, threads_per_worker=1, block_steps=block, progress=False)
        a, b = arrays(other), arrays(ref)
        for key in ("lca", "loss", "residual"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"block {block}: {key}")
        # Only the bookkeeping of who paid for a block's first start gradient differs.
        assert np.array_equal(a["splits"], b["splits"])


def test_first_order_rule_leaves_a_far_larger_residual(reference, store_copy):
    ref, _ = reference
    first = store_copy()
    compute_lca(first, workers=1, rule="first-order", progress=False)
    r1 = np.abs(arrays(first)["residual"]).mean()
    r4 = np.abs(arrays(ref)["residual"]).mean()
    assert r1 > 20 * r4


def test_heldout_split_and_rerun_skips_finished_blocks(store_copy):
    store = store_copy()
    compute_lca(store, workers=1, splits=["train", "heldout"], progress=False)
    again = compute_lca(store, workers=1, splits=["train", "heldout"], progress=False)
    assert [s.blocks_computed for s in again.splits] == [0, 0]
    ds = open_lca(store)
    assert {"heldout_lca_param", "heldout_lca_layer", "heldout_residual"} <= set(ds.data_vars)
    assert np.all(np.abs(ds["heldout_residual"].values) <= ds.attrs["tol"])
    # A changed setting under the same name must not silently mix with earlier results.
    name = again.name
    with pytest.raises(LCAError, match="--recompute"):
        compute_lca(store, workers=1, rule="first-order", name=name, progress=False)
    redone = compute_lca(store, workers=1, rule="first-order", name=name, recompute=True, splits=["train"],
                         progress=False)
    assert redone.splits[0].blocks_computed == 3
    assert open_lca(store, result=name).attrs["rule"] == "first-order"


def test_open_lca_view(reference):
    store, _ = reference
    ds = open_lca(store)
    assert dict(ds.sizes) == {"iteration": 48, "parameter": 64 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10,
                              "layer": 6, "unit": 100 + 50 + 10}
    assert ds["lca_param"].chunks is not None  # lazy
    by_layer = ds["lca_layer"].sum("layer").values
    np.testing.assert_allclose(by_layer, ds["lca_param"].sum("parameter", dtype=np.float64).values, rtol=1e-9)
    first = ds.sel(iteration=slice(0, 9))
    assert first.sizes["iteration"] == 10
    assert set(ds["param_layer"].values[:10]) == {ds["layer"].values[0]}
    np.testing.assert_allclose(ds["loss_after"].values[:-1], ds["loss"].values[1:])


def test_info_command(reference):
    store, _ = reference
    out = subprocess.run(LCA + ["info", store], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "48 (49 checkpoints)" in out and "3/3 blocks done" in out and "within tol" in out


# --- faults and bad input -------------------------------------------------------------------------


def wait_for_blocks(store, count, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if done_flags(store).sum() >= count:
                return
        except (KeyError, FileNotFoundError, ValueError, LCAError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("blocks did not finish in time")


SLOW = ["--tol", "1e-12", "--max-splits", "32", "--threads-per-worker", "1"]  # ~33 evaluations per step


@pytest.fixture(scope="module")
def slow_reference(digits_store, tmp_path_factory):
    import shutil

    dest = tmp_path_factory.mktemp("slowref") / "ref.zarr"
    shutil.copytree(digits_store, dest)
    compute_lca(str(dest), workers=1, threads_per_worker=1, tol=1e-12, max_splits=32, block_steps=8,
                progress=False)
    return arrays(str(dest))


def children(pid):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_killed_worker_process_run_still_completes_identically(slow_reference, store_copy):
    store = store_copy()
    proc = subprocess.Popen(LCA + ["compute", store, "--workers", "2", *SLOW, "--block-steps", "8"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_blocks(store, 1, proc)
    workers = [p for p in children(proc.pid) if "spawn" in " ".join(p.cmdline()) or "fork" in " ".join(p.cmdline())]
    assert workers, [p.cmdline() for p in children(proc.pid)]
    os.kill(workers[-1].pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert_same(arrays(store), slow_reference)


def test_interrupted_client_resumes_to_the_same_result(slow_reference, store_copy):
    store = store_copy()
    cmd = LCA + ["compute", store, "--workers", "1", *SLOW, "--block-steps", "8"]
    # A shell's background jobs inherit SIGINT as ignored; give the client a terminal's default disposition.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_blocks(store, 1, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    done = done_flags(store)
    assert 1 <= done.sum() < done.size
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({done.size - done.sum()} computed now" in rerun.stdout
    assert_same(arrays(store), slow_reference)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_multi_process_cluster_through_scheduler_address(reference, store_copy, tmp_path):
    dask = str(Path(sys.executable).parent / "dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        worker = subprocess.Popen([dask, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                   "--no-dashboard", "--local-directory", str(tmp_path / "w")],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        store = store_copy()
        result = subprocess.run(LCA + ["compute", store, "--scheduler", address, "--threads-per-worker", "1"],
                                cwd=ROOT, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr
        assert "2 worker(s)" in result.stdout or "worker(s)" in result.stdout
        assert_same(arrays(store), arrays(reference[0]))
    finally:
        for p in (worker, scheduler):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)


def run_cli(*args):
    return subprocess.run(LCA + list(args), cwd=ROOT, capture_output=True, text=True, timeout=120)


def one_error_line(result):
    """Apart from the progress bar, stderr holds exactly one line: `error: ...`, and no traceback."""
    assert result.returncode != 0
    lines = [l for l in result.stderr.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("LCA:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unreachable_scheduler_fails_fast(store_copy):
    store = store_copy()
    t0 = time.time()
    line = one_error_line(run_cli("compute", store, "--scheduler", f"tcp://127.0.0.1:{free_port()}"))
    assert "cannot reach the Dask scheduler" in line
    assert time.time() - t0 < 60


def test_bad_worker_count_and_missing_cuda(store_copy):
    store = store_copy()
    assert "--workers must be at least 1" in one_error_line(run_cli("compute", store, "--workers", "0"))
    if not torch.cuda.is_available():
        assert "CUDA is not available" in one_error_line(run_cli("compute", store, "--device", "cuda"))
    assert not (Path(store) / "lca").exists() or not done_flags(store).any()


def test_not_a_store_and_too_few_checkpoints(tmp_path):
    line = one_error_line(run_cli("compute", str(tmp_path / "nothing.zarr")))
    assert "nothing.zarr" in line
    from trajectory_store import TrajectoryWriter

    model = torch.nn.Linear(3, 2)
    with TrajectoryWriter.create(str(tmp_path / "one.zarr"), model, attrs={"workflow": None}):
        pass
    line = one_error_line(run_cli("compute", str(tmp_path / "one.zarr")))
    assert "at least two" in line


def test_non_finite_parameters_name_the_step_and_write_nothing_for_that_block(store_copy):
    store = store_copy()
    root = zarr.open_group(store, mode="r+")
    params = root["trajectory/params"]
    row = np.asarray(params[21])
    row[5] = np.nan
    params[21] = row
    line = one_error_line(run_cli("compute", store, "--workers", "1"))
    assert "non-finite parameters at step t=21" in line
    done = done_flags(store)
    assert done[1] == 0  # the block holding step 21 (steps 16..31) wrote nothing
    assert np.isnan(arrays(store)["lca"][16:32]).all()
