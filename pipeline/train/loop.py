"""The training loop that records a trajectory: theta_0, then every step's parameters, loss, rate and batch.

Deliberately plain (one loop, whole data set in memory, no DataLoader): LCA is only as trustworthy as the
record of what training did, so everything that decides the trajectory is visible here and seeded from
`workflow.seed`. Two runs of the same workflow on the same CPU produce bit-identical stores.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator

from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from trajectory_store import TrajectoryWriter

from pipeline.config import OptimizerConfig, ScheduleConfig, Workflow
from pipeline.errors import DivergenceError, WorkflowError
from pipeline.problem.data import dataset_spec, resolve_data_config, split_size
from pipeline.problem.definition import Problem, check_loss_value
from pipeline.problem.models import count_parameters, model_spec
from pipeline.problem.splits import Split
from pipeline.train.interventions import Plan, resolve


@dataclass(frozen=True)
class TrainResult:
    store: str
    workflow: str
    steps: int
    num_parameters: int
    final_loss: float
    seconds: float
    device: str

    def __str__(self) -> str:
        return (f"trained {self.workflow!r} for {self.steps} steps ({self.num_parameters:,} parameters, "
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


def minibatches(num_samples: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless minibatch indices: a fresh permutation per epoch, so `steps` runs continue across epochs."""
    while True:
        perm = torch.randperm(num_samples, generator=generator)
        for i in range(num_samples // batch_size):
            yield perm[i * batch_size:(i + 1) * batch_size]


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


def train(workflow: Workflow, store: str, *, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train `workflow` and record its whole trajectory in the Zarr store at `store` (path or fsspec URL).

    On a non-finite loss or parameters the offending step is not recorded; every step before it is flushed,
    so the store stays readable, and DivergenceError names the step.
    """
    _check_workflow(workflow)
    start = time.perf_counter()
    device = pick_device(workflow.train.device)
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
        batches = minibatches(len(data), batch_size, torch.Generator().manual_seed(workflow.seed))
        plan = resolve(workflow, model, steps)  # before the store exists: a bad glob writes nothing
        plan.prepare()
        optimizer = plan.optimizer()
        with TrajectoryWriter.create(store, model, steps=steps, batch_size=batch_size, attrs=attrs,
                                     overwrite=overwrite, chunk_steps=workflow.train.chunk_steps) as writer, \
                _cpu_threads(model, device):
            try:
                loss_value = _run_steps(workflow, model, optimizer, writer, data, problem.build_loss(), batches,
                                        steps, progress, plan)
            finally:
                if plan.active:
                    writer.group.attrs["interventions"] = plan.record()
            writer.flush()
    return TrainResult(store=store, workflow=workflow.name, steps=steps, num_parameters=count_parameters(model),
                       final_loss=loss_value, seconds=time.perf_counter() - start, device=str(device))


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
               progress: bool, plan: Plan | None = None) -> float:
    """The loop itself; returns the last minibatch loss (the problem's loss: summed loss / count).
    `plan`: the resolved interventions (none by default)."""
    plan = plan or resolve(workflow, model, steps)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=steps, unit="step", desc=workflow.name, leave=False,
               disable=not progress or not sys.stderr.isatty())
    loss_value = float("nan")
    try:
        for t in range(steps):
            lr = learning_rate(workflow.optimizer, workflow.schedule, t, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            idx = next(batches)
            before = plan.snapshot()  # theta_t as recorded, to count what moved
            plan.before_step(t)       # freezes (and prunes) that start at this step
            xb, yb = data.take(idx)
            value = loss_fn(model(**xb) if isinstance(xb, dict) else model(xb), yb)
            if t == 0:
                check_loss_value(value, f"loss {workflow.loss.factory or workflow.loss.kind}", finite=False)
            loss = value[0] / value[1]
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                _diverged(writer, t, f"loss is {loss_value}", workflow.optimizer.lr)
            penalty = plan.penalty()
            optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty).backward()
            optimizer.step()
            plan.after_step(t, before)
            if not bool(torch.stack([p.isfinite().all() for p in params]).all()):
                _diverged(writer, t, "parameters are not finite after the update", workflow.optimizer.lr)
            writer.record(model, loss=loss_value, lr=lr, batch_indices=idx.numpy())
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
