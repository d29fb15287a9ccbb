"""Task code that runs inside Dask worker processes.

A worker builds the model and loads the whole evaluation split onto its device once, keeps it in a
per-process cache, and from then on each task streams only parameter rows from the store. That is what
makes many small tasks cheap: the data set never travels over the network, only a store path does.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import LCAError

_LOCK = threading.Lock()
_EVALUATORS: dict[tuple, Any] = {}
_THREADS_SET: list[int] = []


@dataclass(frozen=True)
class TaskSpec:
    """What a block task needs besides the block: all JSON-able, so it travels cheaply to any worker."""

    store: str
    workflow: dict[str, Any]
    settings: dict[str, Any]
    device: str = "auto"
    threads: int | None = None


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


def get_evaluator(spec: TaskSpec, split: str):
    """The worker's cached evaluator for (store, split, settings, device); built on first use."""
    from .config import Workflow
    from .data import load_split
    from .evaluate import Evaluator
    from .models import build_model
    from trajectory_store import open_trajectory

    if spec.threads and spec.threads not in _THREADS_SET:
        torch.set_num_threads(spec.threads)
        _THREADS_SET.append(spec.threads)
    device = resolve_device(spec.device)
    key = (spec.store, split, tuple(sorted(spec.settings.items())), str(device))
    with _LOCK:
        if key not in _EVALUATORS:
            wf = Workflow.from_dict(spec.workflow, f"workflow stored in {spec.store}")
            inputs, targets = load_split(wf.data, split)
            num_classes = int(open_trajectory(spec.store).attrs.get("dataset", {}).get("num_classes", 0)) \
                or int(targets.max()) + 1
            torch.manual_seed(wf.seed)  # the weights are replaced by the trajectory's; this only fixes shapes
            model = build_model(wf.model, tuple(inputs.shape[1:]), num_classes)
            _EVALUATORS[key] = Evaluator(
                model, open_trajectory(spec.store).layout, inputs, targets,
                batch_size=spec.settings["eval_batch_size"], device=device,
                precision=spec.settings["precision"],
            )
        return _EVALUATORS[key]


def run_block(spec: TaskSpec, split: str, index: int, start: int, stop: int, steps: int) -> dict[str, Any]:
    """Compute and write one block; returns small statistics for the client's summary."""
    from trajectory_store import open_trajectory

    from .integrate import integrate_block
    from .plan import Block, write_block

    t0 = time.perf_counter()
    reader = open_trajectory(spec.store)
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
    write_block(reader.group, Block(split, index, start, stop), result, steps)
    return {
        "split": split, "index": index, "steps": stop - start, "points": int(result.points.sum()),
        "seconds": time.perf_counter() - t0, "device": str(evaluator.device), "pid": os.getpid(),
    }
