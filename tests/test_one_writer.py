"""One writer per result, a store that cannot be swapped under a compute, workers that cannot see the store,
no live workers, and thread counts: each with real `lca` processes, as a second client or a signal would be."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.lca.compute import compute_lca
from pipeline.lca.plan import array_names
from pipeline.lca.results import default_name

from .conftest import LCA, ROOT, small_digits_workflow

pytestmark = pytest.mark.timeout(300)

# ~33 gradient evaluations per step, each over many small batches, in blocks of 8 steps: slow enough to act
# while it runs (another `lca` process needs seconds just to start on a loaded machine).
SLOW = ["--tol", "1e-12", "--block-steps", "8", "--eval-batch-size", "64", "--threads-per-worker", "1",
        "--workers", "1"]
SLOW_NAME = default_name({"rule": "rk4", "tol": 1e-12, "precision": "fp32", "max_splits": 32,
                          "eval_batch_size": 64})


def start(*args, cwd=ROOT, **kw):
    return subprocess.Popen(LCA + list(args), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate(timeout=60)


def done_blocks(store, name):
    root = zarr.open_group(store, mode="r")
    version = root[f"lca/{name}"].attrs.get("current")
    return int(np.asarray(root[array_names("train", f"lca/{name}/{version}")["done"]][:]).sum())


def wait_until(predicate, proc, timeout=200):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if predicate():
                return
        except (KeyError, FileNotFoundError, ValueError, TypeError):
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.1)
    raise AssertionError("timed out")


def claim(store, name):
    return zarr.open_group(store, mode="r")[f"lca/{name}"].attrs.get("claim")


def one_error_line(returncode, stderr):
    assert returncode not in (0, None)
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("LCA:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_a_second_compute_is_refused_while_the_first_lives_and_takes_over_once_it_died(store_copy):
    store = store_copy()
    first = start("compute", store, *SLOW)
    try:
        wait_until(lambda: claim(store, SLOW_NAME), first)
        # The same settings: refused, naming the owner.
        same = subprocess.run(LCA + ["compute", store, *SLOW], cwd=ROOT, capture_output=True, text=True, timeout=120)
        line = one_error_line(same.returncode, same.stderr)
        assert f"pid {first.pid}" in line and "same settings" in line
        # Other settings into the same result, even with --recompute: refused while the first one lives.
        other = subprocess.run(LCA + ["compute", store, "--name", SLOW_NAME, "--rule", "first-order", "--recompute",
                                      "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert "under other settings" in one_error_line(other.returncode, other.stderr)
        assert first.poll() is None
        wait_until(lambda: done_blocks(store, SLOW_NAME) >= 1, first)
    finally:
        stop(first)  # SIGKILL, client and workers: the claim stays behind, its owner dead
    assert claim(store, SLOW_NAME)["pid"] == first.pid
    # On this host a dead owner is certain: the next compute takes over and finishes.
    redo = subprocess.run(LCA + ["compute", store, "--name", SLOW_NAME, "--rule", "first-order", "--recompute",
                                 "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert redo.returncode == 0, redo.stderr
    assert f"took over the claim of pid {first.pid}" in redo.stdout
    assert claim(store, SLOW_NAME) is None
    root = zarr.open_group(store, mode="r")
    assert root[f"lca/{SLOW_NAME}/{root[f'lca/{SLOW_NAME}'].attrs['current']}"].attrs["settings"]["rule"] == "first-order"


def test_a_claim_without_heartbeat_from_another_host_needs_unlock(store_copy):
    store = store_copy()
    compute_lca(store, workers=1, rule="first-order", name="r", progress=False)
    root = zarr.open_group(store, mode="r+")
    stale = {"token": "x" * 32, "pid": 4242, "host": "elsewhere.example", "started": "2026-01-01T00:00:00",
             "heartbeat": time.time() - 3600, "lease_s": 60, "settings": {}}
    root["lca/r"].attrs["claim"] = stale
    result = subprocess.run(LCA + ["compute", store, "--name", "r", "--rule", "first-order", "--workers", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = one_error_line(result.returncode, result.stderr)
    assert "elsewhere.example" in line and f"lca unlock {store} --result r" in line
    unlock = subprocess.run(LCA + ["unlock", store], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert unlock.returncode == 0 and "released the claim of pid 4242 on elsewhere.example" in unlock.stdout
    assert claim(store, "r") is None


def test_tasks_stop_writing_once_their_claim_is_gone(store_copy):
    store = store_copy()
    first = start("compute", store, *SLOW)
    try:
        wait_until(lambda: done_blocks(store, SLOW_NAME) >= 1, first)
        # Somebody forces the claim away (as `lca unlock --force` before another compute would).
        forced = subprocess.run(LCA + ["unlock", store, "--force"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert forced.returncode == 0, forced.stderr
        at_unlock = done_blocks(store, SLOW_NAME)
        out, err = first.communicate(timeout=200)
    finally:
        stop(first)
    line = one_error_line(first.returncode, err)
    assert "no longer claimed by this compute" in line or "lost its claim" in line
    # At most the block already past its last check when the claim went may still land.
    assert done_blocks(store, SLOW_NAME) <= at_unlock + 1 < 6


def test_a_store_retrained_under_a_running_compute_gets_nothing_written(store_copy, tmp_path):
    from pipeline.train.loop import train

    store = store_copy()
    first = start("compute", store, *SLOW)
    try:
        wait_until(lambda: done_blocks(store, SLOW_NAME) >= 1, first)
        # `lca train --overwrite` of the same path, in another process, while the compute runs.
        train(small_digits_workflow().replace(seed=1), store, overwrite=True, progress=False)
        out, err = first.communicate(timeout=200)
    finally:
        stop(first)
    line = one_error_line(first.returncode, err)
    assert f"the store at {store} was replaced or removed while this compute ran" in line
    assert not (Path(store) / "lca").exists(), sorted(p.name for p in Path(store).iterdir())


def test_relative_store_path_reaches_workers_elsewhere_as_the_same_store(store_copy, tmp_path):
    """`make lca SCHEDULER=...` passes a relative path: a worker running in another folder, beside a store of
    the same name, must compute the client's store and leave its own alone."""
    dask = str(Path(sys.executable).parent / "dask")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    client_dir, worker_dir = tmp_path / "client", tmp_path / "worker"
    client_dir.mkdir(), worker_dir.mkdir()
    real = Path(store_copy("client/runs.zarr"))
    decoy = Path(store_copy("worker/runs.zarr"))
    scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
                              cwd=worker_dir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = subprocess.run(LCA + ["compute", "runs.zarr", "--scheduler", address, "--rule", "first-order"],
                                cwd=client_dir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr
        assert str(real) in result.stdout
    finally:
        for p in (worker, scheduler):
            p.terminate()
            p.wait(timeout=30)
    assert (real / "lca").exists() and not (decoy / "lca").exists()


def test_a_worker_that_cannot_see_the_store_fails_with_one_line(store_copy, tmp_path):
    store = Path(store_copy())
    # /proc/self/fd/N is the folder only in the process holding descriptor N: the client, not its workers.
    fd = os.open(store.parent, os.O_RDONLY)
    try:
        path = f"/proc/self/fd/{fd}/{store.name}"
        result = subprocess.run(LCA + ["compute", path, "--workers", "1", "--rule", "first-order"], cwd=ROOT,
                                capture_output=True, text=True, timeout=240, pass_fds=(fd,))
    finally:
        os.close(fd)
    line = one_error_line(result.returncode, result.stderr)
    assert f"cannot open the store {path}" in line and "worker tcp://" in line
    assert zarr.open_group(str(store), mode="r")["lca"]  # planned, but no block done
    assert done_blocks(str(store), default_name({"rule": "first-order", "tol": 1e-4, "precision": "fp32",
                                                 "max_splits": 32, "eval_batch_size": 2048})) == 0


def test_no_live_worker_stops_the_client_with_one_line(store_copy):
    dask = str(Path(sys.executable).parent / "dask")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        store = store_copy()
        t0 = time.time()
        result = subprocess.run(LCA + ["compute", store, "--scheduler", f"tcp://127.0.0.1:{port}",
                                       "--worker-timeout", "3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        line = one_error_line(result.returncode, result.stderr)
        assert "no live Dask worker for 3 s" in line and "--worker-timeout" in line
        assert time.time() - t0 < 60
    finally:
        scheduler.terminate()
        scheduler.wait(timeout=30)
    bad = subprocess.run(LCA + ["compute", store, "--worker-timeout", "0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert "--worker-timeout must be a positive number" in one_error_line(bad.returncode, bad.stderr)


def test_threads_per_worker_are_part_of_the_result(store_copy):
    store = store_copy()
    full = compute_lca(store, workers=1, threads_per_worker=1, progress=False)
    assert full.threads == [1]
    root = zarr.open_group(store, mode="r+")
    path = f"lca/{full.name}/{root[f'lca/{full.name}'].attrs['current']}"
    assert root[path].attrs["threads"] == 1
    expected = np.asarray(root[f"{path}/train"][:])
    # An interrupted compute: block 1 not done. Resumed with another worker count and no thread count: the
    # stored count is used, not the default for 2 workers on this machine, so no second bit pattern mixes in.
    root[f"{path}/blocks_done"][1] = 0
    resumed = compute_lca(store, workers=2, progress=False)
    assert resumed.splits[0].blocks_computed == 1 and resumed.threads == [1]
    np.testing.assert_array_equal(np.asarray(zarr.open_group(store, mode="r")[f"{path}/train"][:]), expected)
    # An explicit other count is a different setting: refused unless recomputed or named apart.
    result = subprocess.run(LCA + ["compute", store, "--threads-per-worker", "2", "--workers", "1"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert "threads=1" in one_error_line(result.returncode, result.stderr)
