"""Bench section "Worker memory": peak RSS of one LCA task per parameter, at 1M, 4M and 25M parameters.

What is measured is the worker's own code path (`pipeline.lca.worker.run_block`: rows streamed from the
store, the integrator, rows streamed back into the store), in a fresh subprocess per model so that one
size's allocations cannot hide another's. The baseline is the process's resident set once the model and
the evaluation data sit on the device and one full-split gradient has been taken (torch's own caches are
warm): that is the cost of evaluating L at all, which no integrator can avoid. The figure reported is

    (peak RSS during the task - baseline RSS) / P        bytes per parameter,

the peak read from VmHWM after resetting it at the baseline (`/proc/self/clear_refs`); where that reset
is not allowed, ru_maxrss over the whole process, a conservative number (column `peak_reset`). The target, stated in
docs/ARCHITECTURE.md, is at most 64 bytes per parameter at any block length; the section measures two
block lengths per size to show that the figure does not grow with the block.

Models: FC 64-H-H-10 on synthetic 8x8 data of digits' shape (the cost per parameter is what matters,
the data only has to have real shapes), trained for a few steps by the project's own trainer so the
store is a real trajectory store.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIZES = {"1M": 1_000_000, "4M": 4_000_000, "25M": 25_000_000}
TARGET_BYTES_PER_PARAM = 64

TITLE = "Worker memory: peak RSS of one block task above the baseline (model + data + one gradient), per parameter"
# (header, json key, format spec, scale): see pipeline/bench/table.py
COLUMNS = [
    ("size", "size", "s", 1), ("model", "model", "s", 1), ("params", "params", ",d", 1),
    ("block steps", "block_steps", "d", 1), ("gradients", "points", "d", 1),
    ("baseline MiB", "baseline_mib", ".0f", 1), ("peak MiB", "peak_mib", ".0f", 1),
    ("bytes/param", "bytes_per_param", ".1f", 1), ("target", "target_bytes_per_param", "d", 1),
    ("within", "within_target", "yesno", 1), ("seconds", "seconds", ".1f", 1),
]


def hidden_for(params: int, inputs: int = 64, classes: int = 10) -> int:
    """H with (inputs + 1) H + (H + 1) H + (H + 1) classes ~= params, for FC inputs-H-H-classes."""
    a, b, c = 1.0, inputs + 2.0 + classes, classes - params
    return max(1, int(round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))))


def workflow_dict(hidden: int, steps: int, chunk_steps: int, samples: int) -> dict[str, Any]:
    return {
        "name": f"memory-fc-{hidden}", "seed": 0,
        "data": {"dataset": "synthetic", "synthetic_samples": samples, "synthetic_shape": [1, 8, 8],
                 "synthetic_classes": 10},
        "model": {"arch": "fc", "hidden": [hidden, hidden]},
        "optimizer": {"name": "sgd", "lr": 0.01},
        "train": {"batch_size": 32, "steps": steps, "chunk_steps": chunk_steps},
        "lca": {"eval_batch_size": samples, "precision": "fp32"},
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    """Peak resident set since the last `_reset_peak()` (VmHWM), or since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _reset_peak() -> bool:
    """Start the peak over from the current resident set (Linux >= 4.0: `5 > /proc/self/clear_refs`), so
    the setup's own transients (opening the store, building the model) do not count as the task's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(store: str, block_steps: int, threads: int) -> dict[str, Any]:
    """Runs in the subprocess: baseline, then one real block task; returns the measurement."""
    import gc

    import numpy as np
    import torch

    from pipeline.config import Workflow
    from pipeline.lca.compute import resolve_settings
    from pipeline.lca.plan import plan_split
    from pipeline.lca.worker import TaskSpec, _reader, get_evaluator, run_block

    torch.set_num_threads(threads)
    reader = _reader(TaskSpec(store=store, created="", workflow={}, settings={}))
    wf = Workflow.from_dict(reader.workflow, store)
    settings = resolve_settings(wf)
    plan = plan_split(reader.group, "train", steps=reader.num_steps, size=reader.layout.size, block=block_steps,
                      param_chunk=reader.param_chunk, settings=settings, recompute=True)
    spec = TaskSpec(store=store, created="", workflow=wf.to_dict(), settings=settings.to_json(), device="cpu",
                    threads=threads)
    ev = get_evaluator(spec, "train")
    ev.loss_and_grad(np.asarray(reader.params(0, 1)))  # warm: torch's allocator and autograd caches
    gc.collect()
    peak_reset = _reset_peak()
    baseline = _rss_bytes()
    block = plan.blocks[0]
    t0 = time.perf_counter()
    stats = run_block(spec, "train", block.index, block.start, block.stop, reader.num_steps)
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes()
    size = reader.layout.size
    return {"params": size, "block_steps": block.stop - block.start, "points": stats["points"],
            "baseline_mib": baseline / 2**20, "peak_mib": peak / 2**20,
            "bytes_per_param": (peak - baseline) / size, "seconds": seconds, "peak_reset": peak_reset}


def measure(label: str, params: int, scratch: Path, *, blocks: tuple[int, ...], samples: int,
            threads: int = 1) -> list[dict[str, Any]]:
    """Record a short trajectory of an FC net with about `params` parameters, then measure each block length
    in its own subprocess."""
    from pipeline.config import Workflow
    from pipeline.train.loop import train

    steps = max(blocks)
    hidden = hidden_for(params)
    store = scratch / f"memory-{label}.zarr"
    wf = Workflow.from_dict(workflow_dict(hidden, steps, steps, samples), "memory bench")
    train(wf, str(store), overwrite=True, progress=False)
    rows = []
    for block in blocks:
        cmd = [sys.executable, "-m", "pipeline.bench.worker_memory", str(store), str(block), str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"memory bench child for {label} failed: {tail}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update({"model": f"FC 64-{hidden}-{hidden}-10", "size": label,
                    "target_bytes_per_param": TARGET_BYTES_PER_PARAM,
                    "within_target": bool(row["bytes_per_param"] <= TARGET_BYTES_PER_PARAM)})
        rows.append(row)
    import shutil

    shutil.rmtree(store, ignore_errors=True)
    return rows


def bench_memory(scratch: Path, *, smoke: bool = False) -> list[dict[str, Any]]:
    """The section's rows: 1M, 4M and 25M parameters (smoke: 1M only), two block lengths each."""
    scratch.mkdir(parents=True, exist_ok=True)
    if smoke:  # CI: the code path and the table, at a size where constants still dominate
        return measure("300k", 300_000, scratch, blocks=(2,), samples=32)
    rows = []
    for label, params in SIZES.items():
        blocks = (2, 8) if params >= 10_000_000 else (2, 16)
        rows += measure(label, params, scratch, blocks=blocks, samples=256)
    return rows


if __name__ == "__main__":
    store_arg, block_arg, threads_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(child(store_arg, block_arg, threads_arg)))
