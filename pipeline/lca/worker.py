"""Task code that runs inside Dask worker processes.

A worker builds the model and loads the whole evaluation split onto its device once, keeps it in a
per-process cache, and from then on each task streams only parameter rows from the store. That is what
makes many small tasks cheap: the data set never travels over the network, only a store path does.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from pipeline.errors import LCAError

_LOCK = threading.Lock()
_EVALUATORS: dict[tuple, Any] = {}
_READERS: dict[tuple, Any] = {}


@dataclass(frozen=True)
class TaskSpec:
    """What a block task needs besides the block: all JSON-able, so it travels cheaply to any worker."""

    store: str
    created: str  # the store's creation stamp: a store retrained at the same path is a different store
    problem: dict[str, Any]  # Problem JSON; its fingerprints are those of the data the client checked
    settings: dict[str, Any]
    device: str = "auto"
    threads: int | None = None
    module_roots: tuple[str, ...] = ()  # folders the client imported the factories from


def _worker_ordinal() -> int:
    """This worker's index in the pool (LocalCluster names workers 0..n-1), used to spread GPUs round-robin."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    if isinstance(name, int):
        return name
    digits = "".join(ch for ch in str(name).rsplit("-", 1)[-1] if ch.isdigit())
    return int(digits) if digits else 0


def resolve_device(preference: str) -> torch.device:
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LCAError("--device cuda was asked for but this worker has no CUDA device; use --device auto or cpu")
    return torch.device("cuda", _worker_ordinal() % torch.cuda.device_count())


def _reader(spec: TaskSpec):
    """One open store per worker process: its layout and attributes are read once, not per task."""
    from trajectory_store import open_trajectory

    with _LOCK:
        if (spec.store, spec.created) not in _READERS:
            _READERS[(spec.store, spec.created)] = open_trajectory(spec.store)
        return _READERS[(spec.store, spec.created)]


def get_evaluator(spec: TaskSpec, split: str):
    """The worker's cached evaluator; only what changes L (store, problem, split, precision, batch size) keys it.

    The problem is rebuilt here from its JSON; the data's fingerprint is checked again against the one the
    client checked, so a worker that sees other files (another machine, another version) fails, one line.
    """
    from pipeline.lca.evaluate import Evaluator
    from pipeline.problem.definition import Problem, check_fingerprint
    from pipeline.problem.refs import add_module_roots

    _limit_heap_caching()
    if spec.threads and torch.get_num_threads() != spec.threads:
        torch.set_num_threads(spec.threads)
    device = resolve_device(spec.device)
    key = (spec.store, spec.created, json.dumps(spec.problem, sort_keys=True), split,
           spec.settings["precision"], spec.settings["eval_batch_size"], str(device))
    reader = _reader(spec)
    with _LOCK:
        if key not in _EVALUATORS:
            add_module_roots(list(spec.module_roots))
            problem = Problem.from_json(spec.problem)
            data = problem.build_split(split)
            check_fingerprint(problem.fingerprints.get(split), data.fingerprint(), split, problem,
                              f"the client's check of {spec.store}")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(reader.attrs.get("seed", 0) or 0))  # weights are replaced; buffers fixed
                model = problem.build_model()
            _EVALUATORS[key] = Evaluator(
                model, reader.layout, data.inputs, data.targets, batch_size=spec.settings["eval_batch_size"],
                device=device, precision=spec.settings["precision"], loss=problem.build_loss(),
                frozen=reader.frozen(),
            )
        return _EVALUATORS[key]


def release(spec: TaskSpec) -> None:
    """Drop this store's evaluators and reader: the in-process executor must not keep a split in memory
    after `compute_lca` returns (a Dask worker keeps them for the next task instead)."""
    with _LOCK:
        for key in [k for k in _EVALUATORS if k[:2] == (spec.store, spec.created)]:
            del _EVALUATORS[key]
        _READERS.pop((spec.store, spec.created), None)


# Checkpoint rows read per store access: at least READ_ROWS (so each trajectory chunk is decoded once per
# group of rows, not once per row) and as many as fit READ_BYTES (a small model reads its block at once),
# rounded down to a divisor of the store's chunk length so no read decodes two chunks.
READ_ROWS = 2
READ_BYTES = 8 << 20
# Chunks zarr decodes or encodes at once in a worker: each holds up to ~8 MiB decoded and its compressed
# bytes, a constant a large model does not notice but a 1M-parameter one does (zarr's default is 10).
ZARR_CONCURRENCY = 2


def read_group(num_params: int, count: int, chunk_steps: int) -> int:
    want = max(READ_ROWS, READ_BYTES // max(1, 4 * num_params))
    want = min(want, count, chunk_steps)
    return max(g for g in range(1, want + 1) if chunk_steps % g == 0)


def _limit_heap_caching() -> None:
    """Make glibc return large freed blocks to the system at once.

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which P-sized arrays come
    from the heap and stay resident when freed: measured on a 4M-parameter model, 100 bytes per parameter
    of freed memory kept by one gradient evaluation. A fixed threshold turns that adaptation off.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks over 1 MiB are mmapped, returned on free
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def run_block(spec: TaskSpec, split: str, index: int, start: int, stop: int, steps: int) -> dict[str, Any]:
    """Compute and write one block; returns small statistics for the client's summary.

    Checkpoints stream through the integrator (`RowStream`) and finished LCA rows stream out to the store
    (`BlockWriter`), so the task's memory does not grow with the block's length.
    """
    from pipeline.lca.integrate import RowStream, integrate_block
    from pipeline.lca.plan import Block, BlockWriter

    t0 = time.perf_counter()
    reader = _reader(spec)
    if stop + 1 > reader.num_checkpoints:  # the run was extended since this worker opened it
        reader.refresh()
    evaluator = get_evaluator(spec, split)
    size = reader.layout.size

    def read(i: int, j: int) -> np.ndarray:
        with zarr.config.set({"async.concurrency": ZARR_CONCURRENCY}):
            rows = reader.params(start + i, start + j)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = start + i + int(np.argmin(finite))
            raise LCAError(f"non-finite parameters at step t={bad} (checkpoint theta_{bad}) in {spec.store}; "
                           f"LCA is undefined there: retrain with a lower learning rate or truncate the run")
        return rows

    count = stop - start + 1
    block = Block(split, index, start, stop)
    writer = BlockWriter(reader.group, block, steps, concurrency=ZARR_CONCURRENCY)
    s = spec.settings
    try:
        result = integrate_block(
            evaluator.loss_and_grad,
            RowStream(read, count, group=read_group(size, count, reader.chunk_steps), offset=start),
            rule=s["rule"], tol=s["tol"], rtol=s.get("rtol", 0.0), max_splits=s["max_splits"],
            points_per_pass=evaluator.points_per_pass, point_dtype=evaluator.numpy_dtype, on_row=writer.row)
    except BaseException:
        writer.abort()
        raise
    writer.finish(result)
    return {
        "split": split, "index": index, "steps": stop - start, "points": int(result.points.sum()),
        "seconds": time.perf_counter() - t0, "device": str(evaluator.device), "pid": os.getpid(),
    }
