"""Timing on a shared machine: medians after warm-up, candidates round-robin, CUDA synchronised; the
practical matmul peak; which device this is."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.errors import LCAError


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], *, reps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn()` over `reps` runs after `warmup` untimed ones, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Like `median_seconds` for several functions timed round-robin, so that a load change on a shared
    machine hits every candidate alike instead of whichever happened to be running."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: float(statistics.median(v)) for k, v in times.items()}


def matmul_peak(device: torch.device, precision: str, n: int, reps: int) -> float:
    """Achieved FLOP/s of an n x n fp32 matrix product (TF32 allowed only for precision 'tf32')."""
    from pipeline.lca.evaluate import set_precision

    set_precision(precision)  # type: ignore[arg-type]
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    out = torch.empty(n, n, device=device)
    try:
        t = median_seconds(lambda: torch.matmul(a, b, out=out), reps=reps, warmup=2, device=device)
    finally:
        set_precision("fp32")
        del a, b, out
    return 2.0 * n ** 3 / t


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    return platform.processor() or platform.machine() or "cpu"


def resolve_device(device: str) -> torch.device:
    if device not in ("auto", "cpu", "cuda"):
        raise LCAError(f"--device must be auto, cpu or cuda; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise LCAError("--device cuda was asked for but CUDA is not available here; use --device auto or cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device, 0) if device == "cuda" else torch.device("cpu")
