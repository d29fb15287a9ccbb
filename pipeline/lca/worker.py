"""Task code that runs inside Dask worker processes.

A worker builds the model and loads the whole evaluation split onto its device once, keeps it in a
per-process cache, and from then on each task streams only parameter rows from the store. That is what
makes many small tasks cheap: the data set never travels over the network, only a store path does.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    result: str   # the version group the tasks write (see pipeline/lca/results.py)
    name: str     # the result's name: its claim is in `lca/<name>` (see pipeline/lca/claims.py)
    token: str    # this compute's claim token
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


def _reducer(spec: TaskSpec, layout: Any):
    """The column-to-unit map of a store is built once per worker process (it is O(P) to build)."""
    from pipeline.lca.outputs import Reducer

    with _LOCK:
        key = ("reducer", spec.store, spec.created)
        if key not in _READERS:
            _READERS[key] = Reducer(layout)
        return _READERS[key]


def _where() -> str:
    try:
        from distributed import get_worker

        return f"worker {get_worker().address} on {socket.gethostname()}"
    except (ImportError, ValueError):
        return f"this process on {socket.gethostname()}"


def _open(spec: TaskSpec):
    """The store as this worker sees it; a worker that cannot see it fails the run with one line."""
    from trajectory_store import StoreError

    try:
        return _reader(spec)
    except StoreError as e:
        raise LCAError(f"{_where()} cannot open the store {spec.store} ({e}); every worker must see the store "
                       f"at the same path (a shared file system) or the store must be a URL") from None


def get_evaluator(spec: TaskSpec, split: str):
    """The worker's cached evaluator; only what changes L (store, problem, split, precision, batch size) keys it.

    The problem is rebuilt here from its JSON; the data's fingerprint is checked again against the one the
    client checked, so a worker that sees other files (another machine, another version) fails, one line.
    """
    from pipeline.lca.evaluate import Evaluator
    from pipeline.problem.definition import Problem, check_fingerprint
    from pipeline.problem.refs import add_module_roots

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


def run_block(spec: TaskSpec, split: str, index: int, start: int, stop: int, steps: int) -> dict[str, Any]:
    """Compute and write one block; returns small statistics for the client's summary."""
    from pipeline.lca.integrate import integrate_block
    from pipeline.lca.plan import Block, Settings, write_block

    from pipeline.lca.claims import Guard

    t0 = time.perf_counter()
    reader = _open(spec)
    guard = Guard(spec.store, spec.created, spec.name, spec.token)
    guard(reader.group)  # before reading rows: a retrained store's rows belong to another trajectory
    if stop + 1 > reader.num_checkpoints:  # the run was extended since this worker opened it
        reader.refresh()
    rows = reader.params(start, stop + 1)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        bad = start + int(np.argmin(finite))
        raise LCAError(f"non-finite parameters at step t={bad} (checkpoint theta_{bad}) in {spec.store}; "
                       f"LCA is undefined there: retrain with a lower learning rate or truncate the run")
    evaluator = get_evaluator(spec, split)
    s = spec.settings
    result = integrate_block(evaluator.loss_and_grad, rows, rule=s["rule"], tol=s["tol"],
                             max_splits=s["max_splits"], points_per_pass=evaluator.points_per_pass)
    settings = Settings(**{**s, "keep_layers": tuple(s.get("keep_layers", ()))})
    write_block(reader.group, spec.result, Block(split, index, start, stop), result, steps, reader.layout, settings,
                _reducer(spec, reader.layout), guard=lambda: guard(reader.group))
    return {
        "split": split, "index": index, "steps": stop - start, "points": int(result.points.sum()),
        "seconds": time.perf_counter() - t0, "device": str(evaluator.device), "pid": os.getpid(),
        "threads": torch.get_num_threads(),
    }
