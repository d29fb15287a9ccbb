"""A trainer killed with SIGKILL mid-run leaves a readable store whose commit count matches its contents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from trajectory_store import open_trajectory

P = 3000

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from trajectory_store import ParamLayout, TrajectoryWriter

    P = @P@

    def row(step):
        # A deterministic function of the step, with awkward bit patterns mixed in.
        r = (np.linspace(-1, 1, P) + step * 1e-3).astype(np.float32)
        r[step % P] = -0.0
        r[(7 * step) % P] = np.nan
        return r

    layout = ParamLayout.from_named_shapes([("a.weight", (50, 40)), ("a.bias", (50,)), ("b.weight", (950,))])
    assert layout.size == P
    w = TrajectoryWriter.create(sys.argv[1], layout, initial=row(0), chunk_steps=8, flush_seconds=None@KW@)
    step = 0
    while True:  # until killed: no sleep, so the kill lands inside writes as often as not
        step += 1
        w.record_flat(row(step), loss=float(step), lr=step / 1000, batch_indices=np.arange(step, step + step % 4 + 1))
        if step % 5 == 0:
            w.flush()
            print(step, flush=True)
""")


def expected_row(step: int) -> np.ndarray:
    r = (np.linspace(-1, 1, P) + step * 1e-3).astype(np.float32)
    r[step % P] = -0.0
    r[(7 * step) % P] = np.nan
    return r


@pytest.mark.slow
@pytest.mark.parametrize("extra_sleep, writer", [
    (0.0, ""), (0.037, ""),
    # two compression threads, rows staged in a file in the store (max_buffer_bytes below one chunk)
    (0.0, ", threads=2, max_buffer_bytes=1"),
])
def test_sigkill_leaves_a_consistent_store(tmp_path: Path, extra_sleep: float, writer: str) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("@P@", str(P)).replace("@KW@", writer))
    store = tmp_path / "run.zarr"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    flushed = 0
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while flushed < 25:
            line = proc.stdout.readline()
            assert line, f"child exited early: {proc.stderr.read() if proc.stderr else ''}"
            flushed = int(line)
            assert time.monotonic() < deadline
        time.sleep(extra_sleep)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    r = open_trajectory(store, mode="r")
    n = r.num_checkpoints
    assert n >= flushed + 1, "a flushed step was lost"
    assert r.status == "recording"
    params = r.params()
    for step in range(n):
        assert np.array_equal(params[step].view(np.uint32), expected_row(step).view(np.uint32)), step
    steps = np.arange(1, n)
    assert np.array_equal(r.minibatch_loss, steps.astype(np.float64))
    assert np.array_equal(r.lr, steps / 1000)
    bi = r.batch_indices
    assert bi is not None and bi.shape[0] == n - 1
    for t, s in enumerate(steps):
        k = s % 4 + 1
        assert list(bi[t, :k]) == list(range(s, s + k)) and (bi[t, k:] == -1).all()
