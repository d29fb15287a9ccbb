"""Section 4, what recording costs training.

"Recording overhead" -- the trainer's own loop (`pipeline.train._run_steps`) with the TrajectoryWriter
and with a writer that drops everything; the slowdown is what recording every step costs training.
Noise can make it slightly negative on short runs.
"""

from __future__ import annotations

import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.bench.plan import Plan
from pipeline.bench.runs import run_workflow
from pipeline.bench.timing import sync

TITLE = "4. Recording overhead: the trainer's loop with and without the TrajectoryWriter"
# (header, json key, format spec, scale): see pipeline/bench/table.py
COLUMNS = [
    ("run", "run", "s", 1), ("steps", "steps", "d", 1), ("params", "params", ",d", 1),
    ("batch", "batch_size", "d", 1), ("device", "device", "s", 1),
    ("s without writer", "without_s", ".3f", 1), ("s with writer", "with_s", ".3f", 1),
    ("ms/step without", "without_ms_per_step", ".3f", 1), ("ms/step with", "with_ms_per_step", ".3f", 1),
    ("slowdown %", "slowdown_pct", ".1f", 1),
]


class _NullWriter:
    """Takes what the trainer records and keeps nothing: training without a trajectory."""

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def save_state(self, state: Any) -> None:
        pass


class _TeeWriter:
    """Forwards to a real writer and keeps each recorded row, to check the store bit for bit afterwards."""

    def __init__(self, writer: Any, layout: Any) -> None:
        self.writer, self.layout, self.rows = writer, layout, []

    def record(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        self.rows.append(self.layout.flatten(model))
        self.writer.record(model, *args, **kwargs)

    def flush(self) -> None:
        self.writer.flush()

    def save_state(self, state: Any) -> None:
        self.writer.save_state(state)


def bench_training(plan: Plan, device: torch.device, scratch: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Times the trainer's loop with and without the writer; returns the rows and the recorded store's check."""
    from pipeline.train import loop as train_mod
    from pipeline.problem.data import dataset_spec, load_split, resolve_data_config
    from pipeline.problem.models import build_model, model_spec
    from pipeline.problem.losses import cross_entropy
    from pipeline.problem.splits import Split
    from trajectory_store import TrajectoryWriter, open_trajectory
    from trajectory_store.layout import ParamLayout

    wf = run_workflow(plan.train_workflow, plan.train_steps, 64, device)
    data_cfg = resolve_data_config(wf.data)
    x, y = load_split(data_cfg, "train")
    spec = dataset_spec(data_cfg, sizes=(len(y), len(y)))
    shape, classes = tuple(spec["input_shape"]), int(spec["num_classes"])
    x, y = x.to(device), y.to(device)
    steps, bs = plan.train_steps, wf.train.batch_size
    store = scratch / f"train-{wf.name}.zarr"

    def one(kind: str) -> tuple[float, Any]:
        torch.manual_seed(wf.seed)
        model = build_model(wf.model, shape, classes).to(device)
        opt = train_mod.make_optimizer(wf.optimizer, list(model.parameters()))
        batches = train_mod.minibatches(len(y), bs, torch.Generator().manual_seed(wf.seed))
        attrs = {"workflow": wf.replace(data={"path": data_cfg.path}).to_dict(),
                 "model": model_spec(wf.model, model, shape, classes), "dataset": spec, "seed": wf.seed}
        tee = None
        if store.exists():  # removing the last run's store is not part of recording this one
            shutil.rmtree(store)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)  # as train() runs it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sync(device)
                t0 = time.perf_counter()
                if kind == "without":
                    train_mod._run_steps(wf, model, opt, _NullWriter(), Split(x, y), cross_entropy, batches, steps,
                                         False)
                else:
                    with TrajectoryWriter.create(str(store), model, steps=steps, batch_size=bs, attrs=attrs,
                                                 overwrite=True, chunk_steps=wf.train.chunk_steps) as writer:
                        target: Any = writer
                        if kind == "tee":
                            tee = _TeeWriter(writer, ParamLayout.from_model(model))
                            tee.rows.append(tee.layout.flatten(model))  # theta_0, as create() recorded it
                            target = tee
                        train_mod._run_steps(wf, model, opt, target, Split(x, y), cross_entropy, batches, steps,
                                             False)
                        writer.flush()
                sync(device)
                seconds = time.perf_counter() - t0
        finally:
            torch.use_deterministic_algorithms(deterministic)
        return seconds, tee

    one("without")  # warm-up: allocator, kernels, imports
    times: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(plan.train_reps):
        for kind in ("without", "with"):
            times[kind].append(one(kind)[0])
    t_without, t_with = statistics.median(times["without"]), statistics.median(times["with"])
    params = int(ParamLayout.from_model(build_model(wf.model, shape, classes)).size)
    rows = [{
        "run": wf.name, "steps": steps, "params": params, "batch_size": bs, "device": device.type,
        "without_s": t_without, "with_s": t_with, "without_ms_per_step": 1e3 * t_without / steps,
        "with_ms_per_step": 1e3 * t_with / steps, "slowdown_pct": 100.0 * (t_with / t_without - 1.0),
    }]

    # One more, untimed, run that keeps what it hands the writer, to check the store bit for bit.
    _, tee = one("tee")
    reader = open_trajectory(str(store))
    back = np.asarray(reader.params(0, reader.num_checkpoints), dtype=np.float32)
    kept = np.stack(tee.rows).astype(np.float32)
    exact = back.shape == kept.shape and bool(np.array_equal(back.view(np.uint32), kept.view(np.uint32)))
    check = {"run": wf.name, "store": store, "params": back, "store_exact": exact,
             "chunk_steps": int(reader.chunk_steps)}
    return rows, check
