"""Section: what recording costs training at 1M and 10M parameters.

"Recording overhead at scale" -- a wide MLP (784 inputs, two hidden layers, 10 classes) trained with
momentum SGD on synthetic data of MNIST's shapes, timed without a writer and with the TrajectoryWriter at 1
and 2 compression threads, and at 1 writer thread with training cut to one torch thread (overhead always
against training at torch's default thread count without a writer). A run's time includes closing the writer (everything committed), so the
overhead per step is the whole cost of recording, not only the trainer's share. "max wait" is the longest
single `record` call: the trainer blocks only when the writer's queue is full, so this is how long training
ever waited for storage. The row marked default uses `default_writer_threads()` for this machine.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.bench.plan import Plan

TITLE = "Recording overhead at scale: wide MLP on synthetic MNIST-shaped data, without and with the writer"
COLUMNS = [
    ("params", "params", ",d", 1), ("steps", "steps", "d", 1), ("chunk", "chunk_steps", "d", 1),
    ("batch", "batch_size", "d", 1), ("torch threads", "torch_threads", "d", 1),
    ("writer threads", "writer_threads", "s", 1), ("MB/row", "row_mb", ".1f", 1),
    ("ms/step without", "without_ms_per_step", ".1f", 1), ("ms/step with", "with_ms_per_step", ".1f", 1),
    ("overhead %", "overhead_pct", ".1f", 1), ("max wait ms", "max_record_ms", ".0f", 1),
    ("store MB", "store_mb", ".1f", 1),
]


def sizes(plan: Plan) -> list[tuple[tuple[int, int], int, int]]:
    """(hidden widths, steps, chunk_steps) per row: about 1M and 10M parameters (tiny in smoke mode)."""
    if plan.smoke:
        return [((32, 16), 16, 8)]
    return [((1024, 256), 64, 16), ((2048, 4096), 32, 16)]


def wide_mlp(hidden: tuple[int, int], inputs: int = 784, classes: int = 10) -> nn.Module:
    a, b = hidden
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU(),
                         nn.Linear(b, classes))


def _train(hidden: tuple[int, int], steps: int, batch: int, store: Path | None, chunk: int,
           writer_threads: int | None) -> tuple[float, float]:
    """Seconds for `steps` steps (writer closed at the end), and the longest `record` call."""
    from trajectory_store import TrajectoryWriter

    torch.manual_seed(0)
    model = wide_mlp(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch * 4, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch * 4,), generator=g)
    if store is not None and store.exists():
        shutil.rmtree(store)
    longest = 0.0
    t0 = time.perf_counter()
    writer = TrajectoryWriter.create(str(store), model, steps=steps, chunk_steps=chunk, threads=writer_threads,
                                     flush_seconds=None) if store is not None else None
    for step in range(steps):
        i = (step % 4) * batch
        loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if writer is not None:
            r0 = time.perf_counter()
            writer.record(model, loss=loss.item(), lr=0.01)
            longest = max(longest, time.perf_counter() - r0)
    if writer is not None:
        writer.close()
    return time.perf_counter() - t0, longest


def _store_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def bench_recording_scale(plan: Plan, device: torch.device, scratch: Path) -> list[dict[str, Any]]:
    from trajectory_store.writer import default_writer_threads

    rows = []
    batch = 128
    default = default_writer_threads()
    for hidden, steps, chunk in sizes(plan):
        params = sum(p.numel() for p in wide_mlp(hidden).parameters())
        store = scratch / f"recording-{params}.zarr"
        # (writer threads, torch threads): None is the default. "1/t1" gives training one core and the writer
        # the other, the split a 2-core machine would use if the default oversubscribed it.
        variants = {"none": (None, None), "1": (1, None), "2": (2, None), "1/t1": (1, 1)}
        _train(hidden, min(steps, 4), batch, store, chunk, 1)  # warm-up: kernels, allocator, zarr, codecs
        times: dict[str, list[float]] = {k: [] for k in variants}
        waits: dict[str, float] = {k: 0.0 for k in variants}
        mb: dict[str, float] = {}
        torch_default = torch.get_num_threads()
        for _ in range(max(1, plan.train_reps - 1)):  # round-robin, so load changes hit every variant alike
            for key, (threads, torch_threads) in variants.items():
                torch.set_num_threads(torch_threads or torch_default)
                try:
                    seconds, wait = _train(hidden, steps, batch, None if key == "none" else store, chunk, threads)
                finally:
                    torch.set_num_threads(torch_default)
                times[key].append(seconds)
                waits[key] = max(waits[key], wait)
                if key != "none":
                    mb[key] = _store_mb(store)
        base = statistics.median(times["none"])
        for key in ("1", "2", "1/t1"):
            writer_threads, torch_threads = variants[key]
            t = statistics.median(times[key])
            rows.append({
                "params": int(params), "steps": steps, "chunk_steps": chunk, "batch_size": batch,
                "torch_threads": torch_threads or torch_default,
                "writer_threads": f"{writer_threads}" + (" (default)" if writer_threads == default
                                                         and torch_threads is None else ""),
                "row_mb": params * 4 / 1e6, "without_ms_per_step": 1e3 * base / steps,
                "with_ms_per_step": 1e3 * t / steps, "overhead_pct": 100.0 * (t / base - 1.0),
                "max_record_ms": 1e3 * waits[key], "store_mb": mb[key],
            })
        shutil.rmtree(store, ignore_errors=True)
    return rows
