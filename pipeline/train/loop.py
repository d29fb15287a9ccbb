"""The training loop that records a trajectory: theta_0, then every step's parameters, loss, rate and batch.

Deliberately plain (one loop, whole data set in memory, no DataLoader): LCA is only as trustworthy as the
record of what training did, so everything that decides the trajectory is visible here and seeded from
`workflow.seed`. Two runs of the same workflow on the same CPU produce bit-identical stores.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from trajectory_store import StoreError, TrainingState, TrajectoryWriter, open_trajectory, store_exists

from pipeline.config import (OptimizerConfig, ScheduleConfig, Workflow, describe_differences,
                             workflow_differences)
from pipeline.errors import DivergenceError, Interrupted, WorkflowError
from pipeline.problem.data import dataset_spec, resolve_data_config, split_size
from pipeline.problem.definition import Problem, check_loss_value
from pipeline.problem.models import count_parameters, model_spec
from pipeline.problem.splits import Split


@dataclass(frozen=True)
class TrainResult:
    store: str
    workflow: str
    steps: int
    num_parameters: int
    final_loss: float
    seconds: float
    device: str
    resumed_from: int = 0  # steps already recorded by an interrupted run that this call continued

    def __str__(self) -> str:
        resumed = f" (continued after step {self.resumed_from})" if self.resumed_from else ""
        return (f"trained {self.workflow!r} for {self.steps} steps{resumed} ({self.num_parameters:,} parameters, "
                f"{self.device}) in {self.seconds:.1f} s; final minibatch loss {self.final_loss:.4f}; "
                f"{self.steps + 1} checkpoints in {self.store}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WorkflowError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def total_steps(workflow: Workflow, num_samples: int) -> tuple[int, int]:
    """(steps, steps per epoch). An epoch is num_samples // batch_size full batches; the remainder of each
    shuffle is dropped so that every step sees exactly batch_size samples."""
    t = workflow.train
    if t.batch_size > num_samples:
        what = workflow.data.factory or workflow.data.dataset
        raise WorkflowError(f"train.batch_size = {t.batch_size} exceeds the {num_samples} training samples of "
                            f"{what!r}; lower it")
    per_epoch = num_samples // t.batch_size
    return (t.steps if t.steps > 0 else t.epochs * per_epoch), per_epoch


def minibatches(num_samples: int, batch_size: int, generator: torch.Generator,
                start: int = 0) -> Iterator[torch.Tensor]:
    """Endless minibatch indices: a fresh permutation per epoch, so `steps` runs continue across epochs.

    `start` skips that many batches by replaying the generator (one permutation per epoch skipped), so a
    resumed run draws exactly the batches the uninterrupted run would have.
    """
    per_epoch = num_samples // batch_size
    for _ in range(start // per_epoch):
        torch.randperm(num_samples, generator=generator)
    first = start % per_epoch
    while True:
        perm = torch.randperm(num_samples, generator=generator)
        for i in range(first, per_epoch):
            yield perm[i * batch_size:(i + 1) * batch_size]
        first = 0


def make_optimizer(cfg: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "momentum":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)
    raise WorkflowError(f"optimizer.name must be one of sgd, momentum, adam; got {cfg.name!r}")


def learning_rate(opt: OptimizerConfig, sched: ScheduleConfig, step: int, steps: int) -> float:
    """The rate used by step `step` (0-based) of `steps`; recorded with the step, so LCA never recomputes it."""
    if sched.kind == "constant":
        return opt.lr
    if sched.kind == "step":
        return opt.lr * sched.gamma ** (step // max(1, sched.step_size))
    if sched.kind == "cosine":  # opt.lr at step 0, sched.min_lr at the last step
        frac = step / max(1, steps - 1)
        return sched.min_lr + (opt.lr - sched.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise WorkflowError(f"schedule.kind must be one of constant, step, cosine; got {sched.kind!r}")


def _check_workflow(workflow: Workflow) -> None:
    opt = workflow.optimizer
    if opt.name == "adam" and len(opt.betas) != 2:
        raise WorkflowError(f"optimizer.betas must be two numbers, got {opt.betas}")


def recorded_workflow(workflow: Workflow) -> Workflow:
    """The workflow as a store records it: data paths made absolute, so any process finds the same files."""
    return workflow.replace(data={"path": resolve_data_config(workflow.data).path})


def resume_point(workflow: Workflow, store: str) -> TrainingState | None:
    """Where `train` continues an unfinished store from, or None when there is no store yet.

    Refuses (one line) a complete store, a store being recorded right now, one recorded by another
    workflow, and one that stopped because training diverged (continuing would diverge again).
    """
    if not store_exists(store):
        return None
    reader = open_trajectory(store, mode="r")
    planned = reader.planned_steps
    of = f" of {planned}" if planned is not None else ""
    if reader.status == "complete":
        raise StoreError(f"store {store} already exists and holds a complete run ({reader.num_steps}{of} "
                         f"steps); pass --overwrite to replace it")
    if reader.status == "recording" and reader.writer_alive is not False:
        who = reader.writer_info
        where = f"process {who.get('pid')} on {who.get('host')}" if who else "another process"
        raise StoreError(f"store {store} is being recorded by {where} ({reader.num_steps}{of} steps so far); "
                         f"wait for it, or stop it and run this command again to continue it")
    if not reader.workflow:
        raise StoreError(f"store {store} was recorded by a user's own loop, not by `lca train`; pass --overwrite "
                         f"to replace it")
    diffs = workflow_differences(reader.workflow, recorded_workflow(workflow).to_dict())
    if diffs:
        raise StoreError(f"store {store} holds an unfinished run of another workflow (differs in "
                         f"{describe_differences(diffs)}); pass --overwrite to retrain it from scratch")
    if (reader.stopped or "").startswith("DivergenceError"):
        raise DivergenceError(f"the run in {store} stopped because training diverged ({reader.stopped}); "
                              f"continuing would diverge again: change the workflow and retrain with --overwrite")
    state = reader.training_state()
    if state is None or state.steps_done + 1 > reader.num_checkpoints:
        if reader.num_checkpoints < 1:
            return TrainingState(-1)  # not even theta_0 was committed: start afresh in the same place
        state = TrainingState(0)      # nothing saved yet: continue from theta_0 with fresh buffers
    return state


def capture_state(steps_done: int, optimizer: torch.optim.Optimizer, device: torch.device) -> TrainingState:
    """The optimizer's buffers and the random generators after `steps_done` steps, as plain arrays."""
    arrays: dict[str, np.ndarray] = {"rng.cpu": torch.get_rng_state().numpy()}
    if device.type == "cuda":
        arrays["rng.cuda"] = torch.cuda.get_rng_state(device).numpy()
    scalars: dict[str, dict[str, object]] = {}
    for idx, entries in optimizer.state_dict()["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                arrays[f"optimizer.{idx}.{key}"] = value.detach().to("cpu").numpy()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return TrainingState(steps_done, arrays, {"optimizer": scalars})


def restore_state(state: TrainingState, model: nn.Module, optimizer: torch.optim.Optimizer, row: np.ndarray,
                  device: torch.device) -> None:
    """Put the model at checkpoint `row` and the optimizer and generators where `capture_state` found them."""
    from trajectory_store import ParamLayout

    with torch.no_grad():
        values = ParamLayout.from_model(model).unflatten(torch.from_numpy(np.array(row, dtype=np.float32)))
        for name, p in model.named_parameters():
            if name in values:  # frozen parameters are outside the layout, and as initialised
                p.copy_(values[name])
    per_param: dict[int, dict[str, object]] = {}
    for name, arr in state.arrays.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            per_param.setdefault(int(idx), {})[key] = torch.from_numpy(np.array(arr, copy=True))
    for idx, entries in state.meta.get("optimizer", {}).items():
        per_param.setdefault(int(idx), {}).update(entries)
    if per_param:
        optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
    if "rng.cpu" in state.arrays:
        torch.set_rng_state(torch.from_numpy(np.array(state.arrays["rng.cpu"], copy=True)))
    if "rng.cuda" in state.arrays and device.type == "cuda":
        torch.cuda.set_rng_state(torch.from_numpy(np.array(state.arrays["rng.cuda"], copy=True)), device)


@contextlib.contextmanager
def _stop_requests() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop after its current step, so the saved state matches
    a checkpoint exactly; a second one interrupts at once (the last chunk's state is then the one kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    asked = threading.Event()

    def handler(signum: int, frame: object) -> None:
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked.is_set
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def train(workflow: Workflow, store: str, *, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train `workflow` and record its whole trajectory in the Zarr store at `store` (path or fsspec URL).

    On a non-finite loss or parameters the offending step is not recorded; every step before it is flushed,
    so the store stays readable, and DivergenceError names the step.
    """
    _check_workflow(workflow)
    start = time.perf_counter()
    device = pick_device(workflow.train.device)
    resume = None if overwrite else resume_point(workflow, store)
    if resume is not None and resume.steps_done < 0:
        resume, overwrite = None, True
    data_cfg = resolve_data_config(workflow.data)
    workflow = workflow.replace(data={"path": data_cfg.path})  # absolute, so workers find the files
    problem = Problem.from_workflow(workflow)
    splits = problem.build_data()
    data = problem.build_split("train", splits)
    # What training saw, hashed in evaluation order: compute refuses to integrate any other data.
    fingerprints = {"train": data.fingerprint()}
    if "heldout" in splits and "heldout" in workflow.lca.splits:
        fingerprints["heldout"] = problem.build_split("heldout", splits).fingerprint()
    problem = problem.replace(fingerprints=fingerprints)
    steps, _ = total_steps(workflow, len(data))
    batch_size = workflow.train.batch_size

    with _reproducible(workflow.seed, device):
        model = problem.build_model().to(device)
        if workflow.data.factory:
            spec: dict[str, Any] = {"factory": workflow.data.factory, "train_size": len(data)}
        else:
            spec = dataset_spec(data_cfg, sizes=(len(data), split_size(data_cfg, "heldout")))
        if workflow.model.factory:
            mspec: dict[str, Any] = {"factory": workflow.model.factory, "class": type(model).__name__,
                                     "num_parameters": count_parameters(model)}
        else:
            mspec = model_spec(workflow.model, model, tuple(spec["input_shape"]), int(spec["num_classes"]))
        attrs = {
            "workflow": workflow.to_dict(),
            "problem": problem.to_json(),
            "model": mspec,
            "dataset": spec,
            "seed": workflow.seed,
        }
        data = data.to(device)
        first = resume.steps_done if resume is not None else 0
        batches = minibatches(len(data), batch_size, torch.Generator().manual_seed(workflow.seed), start=first)
        optimizer = make_optimizer(workflow.optimizer, [p for p in model.parameters() if p.requires_grad])
        if resume is not None:
            row = open_trajectory(store, mode="r").params(first, first + 1)[0]
            restore_state(resume, model, optimizer, row, device)
            writer = TrajectoryWriter.reopen(store, steps_done=first)
        else:
            writer = TrajectoryWriter.create(store, model, steps=steps, batch_size=batch_size, attrs=attrs,
                                             overwrite=overwrite, chunk_steps=workflow.train.chunk_steps)
        with writer, _cpu_threads(model, device), _stop_requests() as stop_asked:
            loss_value = _run_steps(workflow, model, optimizer, writer, data, problem.build_loss(), batches,
                                    steps, progress, first=first, stop_asked=stop_asked, store=store)
            writer.flush()
    return TrainResult(store=store, workflow=workflow.name, steps=steps, num_parameters=count_parameters(model),
                       final_loss=loss_value, seconds=time.perf_counter() - start, device=str(device),
                       resumed_from=first)


@contextlib.contextmanager
def _reproducible(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for model initialisation without disturbing the caller's RNG; on CUDA also ask for
    deterministic kernels (the CPU kernels used here already are, for a fixed thread count)."""
    cuda = device.type == "cuda"
    if cuda:  # cuBLAS is only deterministic with a fixed workspace, read when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with torch.random.fork_rng(devices=[device.index or 0] if cuda else []):
        torch.manual_seed(seed)
        if not cuda:
            yield
            return
        saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(saved[0])
            torch.backends.cudnn.benchmark = saved[1]


SMALL_MODEL = 200_000  # parameters; below this a CPU step is too small to split across threads


@contextlib.contextmanager
def _cpu_threads(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Train small models on one CPU thread: their steps gain nothing from intra-op threads, and on shared
    cores spinning OpenMP threads made a 300-step digits run 10-40x slower in our measurements."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or count_parameters(model) >= SMALL_MODEL or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run_steps(workflow: Workflow, model: nn.Module, optimizer: torch.optim.Optimizer, writer: TrajectoryWriter,
               data: Split, loss_fn: Callable[..., Any], batches: Iterator[torch.Tensor], steps: int,
               progress: bool, *, first: int = 0, stop_asked: Callable[[], bool] = lambda: False,
               store: str = "") -> float:
    """The loop itself, from step `first`; returns the last minibatch loss (the problem's loss: summed
    loss / count).

    The training state goes to the store at every chunk boundary (the writer commits it with that chunk),
    and at a requested stop, so a rerun continues bit for bit from the last one kept.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    chunk = workflow.train.chunk_steps
    bar = tqdm(total=steps, initial=first, unit="step", desc=workflow.name, leave=False,
               disable=not progress or not sys.stderr.isatty())
    loss_value = float("nan")
    try:
        for t in range(first, steps):
            if stop_asked():
                writer.save_state(capture_state(t, optimizer, device))
                raise Interrupted(f"training stopped after step {t} of {steps}; the {t} steps and the training "
                                  f"state are saved in {store}: run the same command again to continue")
            lr = learning_rate(workflow.optimizer, workflow.schedule, t, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = next(batches)
            xb, yb = data.take(idx)
            value = loss_fn(model(**xb) if isinstance(xb, dict) else model(xb), yb)
            if t == 0:
                check_loss_value(value, f"loss {workflow.loss.factory or workflow.loss.kind}", finite=False)
            loss = value[0] / value[1]
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                _diverged(writer, t, f"loss is {loss_value}", workflow.optimizer.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not bool(torch.stack([p.isfinite().all() for p in params]).all()):
                _diverged(writer, t, "parameters are not finite after the update", workflow.optimizer.lr)
            writer.record(model, loss=loss_value, lr=lr, batch_indices=idx.numpy())
            if (t + 1) % chunk == 0 and t + 1 < steps:
                writer.save_state(capture_state(t + 1, optimizer, device))
            bar.update()
            if t % 10 == 0 or t == steps - 1:
                bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
    finally:
        bar.close()
    return loss_value


def _diverged(writer: TrajectoryWriter, step: int, why: str, lr: float) -> None:
    writer.flush()
    raise DivergenceError(
        f"training diverged at step {step}: {why}; lower optimizer.lr (now {lr:g}) or add a schedule "
        f"(the store keeps the {step} steps before it)")
