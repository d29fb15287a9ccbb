"""Ctrl-C and killed workers around the local cluster, in real processes (issue 9, item 10).

A terminal's Ctrl-C goes to the whole process group: the client and every Dask worker process. Whatever
moment it lands (the cluster starting, blocks running), the user sees one line and exit 130, never a
KeyboardInterrupt traceback from a worker; a worker killed while it starts is one line and exit 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from pipeline.lca.plan import read_done

ROOT = Path(__file__).resolve().parents[1]
LCA = [sys.executable, "-m", "pipeline.cli"]
SLOW = ["--tol", "1e-12", "--max-splits", "32", "--threads-per-worker", "1", "--block-steps", "8"]

pytestmark = pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signals only")


def start(store: str, workers: int) -> subprocess.Popen:
    """`lca compute` in its own process group, with SIGINT at its default as under a terminal."""
    return subprocess.Popen(LCA + ["compute", store, "--workers", str(workers), *SLOW], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def worker_processes(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, (what, proc.communicate())
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {what}")


def blocks_done(store: str) -> int:
    try:
        return int(read_done(zarr.open_group(store, mode="r"), "train").sum())
    except Exception:  # noqa: BLE001 - not created yet, or being created
        return 0


def messages(err: str) -> list[str]:
    """stderr without the progress bar's redraws."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("LCA:")]


@pytest.mark.parametrize("moment", ["cluster starting", "blocks running"])
def test_ctrl_c_to_the_process_group_is_one_line(store_copy, moment: str) -> None:
    store = store_copy()
    proc = start(store, workers=2)
    if moment == "cluster starting":
        wait_until(lambda: worker_processes(proc.pid), proc, "the first worker process")
    else:
        wait_until(lambda: blocks_done(store) >= 1, proc, "a finished block")
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert messages(err) == ["interrupted: finished blocks are kept; run the same command again to resume"], err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    with pytest.raises(ProcessLookupError):  # the whole group is gone: no worker left behind
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)


def test_worker_killed_while_it_starts_is_one_line(store_copy) -> None:
    store = store_copy()
    proc = start(store, workers=2)
    wait_until(lambda: worker_processes(proc.pid), proc, "the first worker process")
    os.kill(worker_processes(proc.pid)[0], signal.SIGKILL)  # still importing: it never reports to its nanny
    out, err = proc.communicate(timeout=300)
    assert "Traceback" not in err, err
    assert proc.returncode == 1, (out, err)
    lines = messages(err)
    assert len(lines) == 1 and lines[0].startswith("error: the local Dask workers failed to start"), err
    assert blocks_done(store) == 0
