"""`lca bench`: one run on one machine measures where LCA's time goes and what exactness it keeps.

Five tables, printed as each section finishes and written together to `<out>/bench.json` (one list of row
dicts per section, plus `meta`). Seconds are medians over several repetitions after warm-up, the candidates of one
row timed round-robin so that load on a shared machine hits them alike; on CUDA every timed region ends in
`torch.cuda.synchronize()`. Smoke mode (`--smoke`, for CI) uses tiny sample counts and one torch thread:
it checks that the table is produced, not how fast anything is. On a CPU other jobs share, expect noise.

How to read the table
---------------------
1. "Full-set gradient" -- the cost of one full-training-set loss + gradient, the unit LCA pays at least
   twice per step. "ref" is the published code's way, re-written here in PyTorch (`ReferenceEvaluator`):
   a Python loop over fixed large batches (11k samples for the MNIST-sized nets, 2500 for ResNet-20), one
   path point at a time, plain `module(x)` + `.backward()` accumulating into `p.grad`, NCHW, fp32, the
   gradient copied to the host after every point. (The data stays on the device for both sides, so the
   ratio does not count the reference's per-batch host-to-device feeding: it is a lower bound.) "ours" is
   `pipeline.evaluate.Evaluator` with its defaults for the device; the variant column says which mode
   (`loop`/`vmap`), how many path points share one pass (K; ms/grad is per point) and the precision.
   "ref/ours" is the speed-up. "GFLOP/grad" is counted by `torch.utils.flop_counter.FlopCounterMode` over a
   plain forward + backward (matmuls and convolutions only, scaled from a small batch: exact, since these
   costs are linear in the batch). "TFLOP/s" divides it by the time; "% fp32 peak" / "% tf32 peak" compare
   ours with a large square matrix product timed in the same run (the practical peak, not the data
   sheet's). "max rel diff" = max|g_ours - g_ref| / max|g_ref| at the same point: both sides compute the
   same number (about 1e-6 in fp32, about 1e-3 with TF32).
2. "Conservation residual" -- r_t = L(theta_{t+1}) - L(theta_t) - sum_i LCA_{t,i} with the coarsest rule
   (Simpson, n = 2, no refinement) on a short real trajectory, under each precision. fp64 shows the rule's
   own error; fp32 / tf32 add rounding. Compare with the tolerance (1e-4 by default) and with mean |dL|.
   A precision that is fast but pushes |r| towards the tolerance costs refinements (table 3) instead.
3. "LCA end to end" -- a real run through `compute_lca` on a Dask LocalCluster at the workflow's default
   tolerance: gradient evaluations per step (the floor is 2, plus 1 per block; more means refinement),
   the share of steps within tolerance, and steps per second, both in-process (one Evaluator, the same
   blocks, no Dask) and through Dask (wall time including cluster start-up, so short runs understate it).
4. "Recording overhead" -- the trainer's own loop (`pipeline.train._run_steps`) with the TrajectoryWriter
   and with a writer that drops everything; the slowdown is what recording every step costs training.
   Noise can make it slightly negative on short runs.
5. "Trajectory storage" -- the parameter trajectory [checkpoints, P] float32 in the reference's format
   (h5py gzip level 4, one chunk per iteration) against the store's codec chain
   (`trajectory_store.measure.compare_codecs`), "x smaller" = h5py bytes / store bytes, the store's actual
   bytes on disk, and two bit-exact checks: the codec chain's round trip, and the written store read back
   against the rows the trainer handed to the writer (compared as uint32 bit patterns).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import DataError, LCAError

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20

# Evaluation batch sizes of the shipped workflows (used when the TOML files are not at hand).
OURS_BATCH = {"fc": 60000, "lenet": 10000, "resnet20": 2500}
WORKFLOW_OF_ARCH = {"fc": "fashion-fc", "lenet": "fashion-lenet", "resnet20": "cifar10-resnet20"}
# The reference's evaluation batches: 11k samples for MNIST-sized nets; for ResNet-20 the same batch as
# ours, so batch-statistics BatchNorm gives both sides the same loss and the gradients can be compared.
REF_BATCH = {"fc": 11000, "lenet": 11000, "resnet20": 2500}


@dataclass(frozen=True)
class Plan:
    """Sizes of one bench run: smoke (CI), CPU, or CUDA."""

    samples: dict[str, int]
    warmup: int
    reps: int
    peak_n: int
    digits_steps: int
    digits_chunk: int
    fashion_steps: int          # 0: no fashion-fc LCA run
    fashion_chunk: int
    train_workflow: str         # the training-overhead run
    train_steps: int
    train_reps: int
    workers: int | None         # None: compute_lca's default (one per GPU)
    threads: int | None = None  # torch threads here and per Dask worker; None: leave torch's default


def make_plan(smoke: bool, cuda: bool, fashion: bool) -> Plan:
    if smoke:
        return Plan({"fc": 2048, "lenet": 64, "resnet20": 16}, warmup=0, reps=2, peak_n=2048 if not cuda else 4096,
                    digits_steps=48, digits_chunk=16, fashion_steps=0, fashion_chunk=16,
                    train_workflow="digits-fc", train_steps=128, train_reps=1, workers=1, threads=1)
    if cuda:
        return Plan({"fc": 60000, "lenet": 60000, "resnet20": 50000}, warmup=3, reps=10, peak_n=8192,
                    digits_steps=300, digits_chunk=64, fashion_steps=480 if fashion else 0, fashion_chunk=64,
                    train_workflow="fashion-fc" if fashion else "digits-fc", train_steps=300, train_reps=3,
                    workers=None)
    return Plan({"fc": 60000, "lenet": 4096, "resnet20": 512}, warmup=1, reps=3, peak_n=2048,
                digits_steps=300, digits_chunk=64, fashion_steps=32 if fashion else 0, fashion_chunk=16,
                train_workflow="fashion-fc" if fashion else "digits-fc", train_steps=300, train_reps=3,
                workers=2)


# ---------------------------------------------------------------------------------------------------------
# timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], *, reps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `fn()` over `reps` runs after `warmup` untimed ones, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
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
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
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


# ---------------------------------------------------------------------------------------------------------
# section 1: the full-set gradient


class ReferenceEvaluator:
    """The published TensorFlow code's way of taking a full-set gradient, written in plain PyTorch.

    One path point at a time: the weights are fed from the host, then a Python loop over fixed large
    batches runs `module(x)` and `.backward()`, summing into `p.grad` (fp32), and the gradient is copied
    back to the host. NCHW, no vmap, no channels_last, no TF32. BatchNorm uses batch statistics (its running
    buffers are dropped, exactly as in our evaluator), so both compute the same L(theta).
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int,
                 device: torch.device) -> None:
        from torch.func import replace_all_batch_norm_modules_

        net = copy.deepcopy(model)
        replace_all_batch_norm_modules_(net)
        net.eval()
        self.net = net.to(device, torch.float32)
        self.params = list(self.net.parameters())
        self.device = device
        self.inputs = inputs.to(device, torch.float32)
        self.targets = targets.to(device, torch.long)
        self.batch_size = int(batch_size)
        self.num_samples = int(targets.shape[0])

    def loss_and_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            nn.utils.vector_to_parameters(torch.as_tensor(theta, dtype=torch.float32).to(self.device),
                                          self.params)
        for p in self.params:
            p.grad = None
        total = torch.zeros((), device=self.device)
        for start in range(0, self.num_samples, self.batch_size):
            x = self.inputs[start:start + self.batch_size]
            y = self.targets[start:start + self.batch_size]
            loss = F.cross_entropy(self.net(x), y, reduction="sum")
            loss.backward()
            total += loss.detach()
        grad = torch.cat([p.grad.reshape(-1) for p in self.params]).cpu().numpy()  # type: ignore[union-attr]
        return float(total) / self.num_samples, grad.astype(np.float64) / self.num_samples


def count_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...], num_classes: int,
                           batch: int = 32) -> float:
    """Forward + backward FLOPs (matmul/conv, as FlopCounterMode counts them) of the summed loss, per sample."""
    from torch.func import replace_all_batch_norm_modules_
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(model).cpu().float()
    replace_all_batch_norm_modules_(net)
    net.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *input_shape, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y, reduction="sum").backward()
    return counter.get_total_flops() / batch


def _workflow_path(name: str) -> Path:
    for base in (ROOT / "workflows", Path.cwd() / "workflows"):
        if (base / f"{name}.toml").is_file():
            return base / f"{name}.toml"
    raise LCAError(f"workflow {name}.toml not found in {ROOT / 'workflows'} or ./workflows; run the bench from "
                   f"the repository")


def _ours_batch(arch: str) -> int:
    from pipeline.config import load_workflow

    with contextlib.suppress(LCAError):
        return int(load_workflow(_workflow_path(WORKFLOW_OF_ARCH[arch])).lca.eval_batch_size)
    return OURS_BATCH[arch]


def _variants(arch: str, cuda: bool) -> list[tuple[str, dict[str, Any]]]:
    """Our evaluator's settings to time: its defaults first, then the alternatives worth a column."""
    if not cuda:
        return [("default: loop K=1 fp32", {})]
    if arch == "fc":
        return [("loop K=1 (one fused pass) fp32", {"mode": "loop", "points_per_pass": 1}),
                ("default: vmap K=16 fp32", {}),
                ("vmap K=16 tf32", {"precision": "tf32"})]
    return [("default: loop channels_last fp32", {}),
            ("loop channels_last tf32", {"precision": "tf32"})]


def bench_gradient(plan: Plan, device: torch.device, peaks: dict[str, float | None]) -> list[dict[str, Any]]:
    from pipeline.config import ModelConfig
    from pipeline.lca.evaluate import Evaluator, set_precision
    from pipeline.problem.models import build_model
    from trajectory_store.layout import ParamLayout

    cuda = device.type == "cuda"
    shapes = {"fc": (1, 28, 28), "lenet": (1, 28, 28), "resnet20": (3, 32, 32)}
    labels = {"fc": "FC 784-100-50-10", "lenet": "LeNet", "resnet20": "ResNet-20 (BN)"}
    rows = []
    for arch in ("fc", "lenet", "resnet20"):
        n, shape = plan.samples[arch], shapes[arch]
        torch.manual_seed(0)
        model = build_model(ModelConfig(arch=arch, hidden=[100, 50]), shape, 10)
        layout = ParamLayout.from_model(model)
        gen = torch.Generator().manual_seed(0)
        inputs = torch.randn(n, *shape, generator=gen).to(device)
        targets = torch.randint(0, 10, (n,), generator=gen).to(device)
        theta0 = layout.flatten(model).astype(np.float64)
        rng = np.random.default_rng(0)
        # Distinct nearby path points, so a K-point pass really evaluates K parameter vectors.
        points = theta0[None] + 1e-3 * rng.standard_normal((16, theta0.size)) * np.arange(16)[:, None]
        flop = count_flops_per_sample(model, shape, 10) * n
        ref_batch, ours_batch = min(REF_BATCH[arch], n), _ours_batch(arch)

        set_precision("fp32")
        ref = ReferenceEvaluator(model, inputs, targets, batch_size=ref_batch, device=device)
        _, g_ref = ref.loss_and_grad(points[0])
        cycle = iter(range(10 ** 9))
        fns: dict[str, Callable[[], Any]] = {"ref": lambda: ref.loss_and_grad(points[next(cycle) % 16])}
        evaluators: dict[str, Any] = {}
        diffs: dict[str, float] = {}
        for variant, kw in _variants(arch, cuda):
            ev = Evaluator(model, layout, inputs, targets, batch_size=ours_batch, device=device, **kw)
            evaluators[variant] = ev
            # set_precision is process-wide and set only when an Evaluator is built: assert it per call.
            set_precision(ev.precision)  # type: ignore[arg-type]
            _, g_ours = ev.loss_and_grad(points[:ev.points_per_pass])
            diffs[variant] = float(np.abs(g_ours[0] - g_ref).max() / max(np.abs(g_ref).max(), 1e-30))

            def call(ev: Any = ev) -> None:
                set_precision(ev.precision)
                ev.loss_and_grad(points[:ev.points_per_pass])
                set_precision("fp32")

            fns[variant] = call
        set_precision("fp32")
        times = interleaved_medians(fns, reps=plan.reps, warmup=plan.warmup, device=device)
        ref_s = times["ref"]
        for variant, ev in evaluators.items():
            k = ev.points_per_pass
            ours_s = times[variant] / k
            rows.append({
                "model": labels[arch], "arch": arch, "variant": variant, "samples": n, "params": layout.size,
                "ref_batch": ref_batch, "ours_batch": min(ours_batch, n),
                "batches": f"{ref_batch}/{min(ours_batch, n)}", "points_per_pass": k,
                "mode": ev.mode, "precision": ev.precision,
                "ref_s": ref_s, "ours_s": ours_s, "ratio": ref_s / ours_s, "flop": flop,
                "ref_tflops": flop / ref_s / 1e12, "ours_tflops": flop / ours_s / 1e12,
                "frac_fp32_peak": flop / ours_s / peaks["fp32"] if peaks.get("fp32") else None,
                "frac_tf32_peak": flop / ours_s / peaks["tf32"] if peaks.get("tf32") else None,
                "max_rel_diff": diffs[variant],
            })
        del ref, evaluators, fns
        del inputs, targets
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------------
# a real run: the digits-fc (and fashion-fc) trajectory shared by sections 2, 3


def _run_workflow(name: str, steps: int, chunk: int, device: torch.device):
    from pipeline.config import load_workflow

    train_device = "cuda" if device.type == "cuda" else "cpu"
    return load_workflow(_workflow_path(name)).replace(
        train={"steps": steps, "epochs": 0, "chunk_steps": chunk, "device": train_device})


def _train_store(wf, store: Path) -> None:
    from pipeline.train.loop import train

    if store.exists():
        shutil.rmtree(store)
    train(wf, str(store), overwrite=True, progress=False)


def _evaluator_for(store: Path, device: torch.device, precision: str | None = None):
    """The evaluator a worker would build for `store` (the workflow's precision unless one is given)."""
    from pipeline.config import Workflow
    from pipeline.problem.data import load_split
    from pipeline.lca.evaluate import Evaluator
    from pipeline.problem.models import build_model
    from trajectory_store import open_trajectory

    reader = open_trajectory(str(store))
    wf = Workflow.from_dict(reader.workflow, f"workflow stored in {store}")
    x, y = load_split(wf.data, "train")
    torch.manual_seed(wf.seed)
    model = build_model(wf.model, tuple(x.shape[1:]), int(reader.attrs.get("dataset", {}).get("num_classes", 10)))
    ev = Evaluator(model, reader.layout, x, y, batch_size=wf.lca.eval_batch_size, device=device,
                   precision=precision or wf.lca.precision)  # type: ignore[arg-type]
    return reader, wf, ev


def bench_precision(store: Path, run: str, device: torch.device) -> list[dict[str, Any]]:
    from pipeline.lca.evaluate import set_precision
    from pipeline.lca.integrate import integrate_block

    rows = []
    for precision in ("fp32", "fp64") + (("tf32",) if device.type == "cuda" else ()):
        reader, wf, ev = _evaluator_for(store, device, precision)
        set_precision(precision)  # type: ignore[arg-type]
        params = reader.params(0, reader.num_checkpoints)
        t0 = time.perf_counter()
        res = integrate_block(ev.loss_and_grad, params, rule="rk4", tol=wf.lca.tol, max_splits=2,
                              points_per_pass=ev.points_per_pass)
        seconds = time.perf_counter() - t0
        r = np.abs(res.residual)
        rows.append({
            "run": run, "precision": precision, "steps": int(reader.num_steps), "splits": 2,
            "mean_abs_loss_change": float(np.abs(np.diff(res.loss)).mean()),
            "mean_abs_residual": float(r.mean()), "max_abs_residual": float(r.max()),
            "tol": float(wf.lca.tol), "within_tol": float((r <= wf.lca.tol).mean()), "seconds": seconds,
        })
        del ev
    set_precision("fp32")
    return rows


def bench_lca(runs: Sequence[tuple[str, Path]], plan: Plan, device: torch.device) -> list[dict[str, Any]]:
    from pipeline.lca.compute import compute_lca
    from pipeline.lca.evaluate import set_precision
    from pipeline.lca.integrate import integrate_block

    rows = []
    for run, store in runs:
        # In-process: one evaluator over the same blocks the Dask tasks get, same settings.
        reader, wf, ev = _evaluator_for(store, device)
        set_precision(ev.precision)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        points = []
        for a in range(0, reader.num_steps, reader.chunk_steps):
            b = min(reader.num_steps, a + reader.chunk_steps)
            res = integrate_block(ev.loss_and_grad, reader.params(a, b + 1), rule=wf.lca.rule, tol=wf.lca.tol,
                                  max_splits=wf.lca.max_splits, points_per_pass=ev.points_per_pass)
            points.append(res.points)
        inproc_s = time.perf_counter() - t0
        samples = ev.num_samples
        del ev
        if device.type == "cuda":
            torch.cuda.empty_cache()
        summary = compute_lca(str(store), workers=plan.workers, device=device.type, recompute=True,
                              threads_per_worker=plan.threads if device.type == "cpu" else None,
                              progress=False)
        sp = summary.splits[0]
        rows.append({
            "run": run, "steps": int(reader.num_steps), "params": int(reader.layout.size), "samples": samples,
            "device": ",".join(sorted(set(summary.devices))) or device.type, "workers": int(summary.workers),
            "block_steps": int(reader.chunk_steps), "tol": float(summary.settings.tol),
            "points_per_step": float(sp.stats.points_mean),
            "points_per_step_in_process": float(np.concatenate(points).mean()),
            "within_tol": float(sp.stats.within_tol), "max_abs_residual": float(sp.stats.residual_abs_max),
            "in_process_s": inproc_s, "in_process_steps_per_s": reader.num_steps / inproc_s,
            "dask_s": float(summary.seconds), "dask_steps_per_s": reader.num_steps / summary.seconds,
        })
    return rows


# ---------------------------------------------------------------------------------------------------------
# section 4: what recording costs training; section 5: what the record costs on disk


class _NullWriter:
    """Takes what the trainer records and keeps nothing: training without a trajectory."""

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
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


def _store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def bench_training(plan: Plan, device: torch.device, scratch: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Times the trainer's loop with and without the writer; returns the rows and the recorded store's check."""
    from pipeline.train import loop as train_mod
    from pipeline.problem.data import dataset_spec, load_split, resolve_data_config
    from pipeline.problem.models import build_model, model_spec
    from trajectory_store import TrajectoryWriter, open_trajectory
    from trajectory_store.layout import ParamLayout

    wf = _run_workflow(plan.train_workflow, plan.train_steps, 64, device)
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
                _sync(device)
                t0 = time.perf_counter()
                if kind == "without":
                    train_mod._run_steps(wf, model, opt, _NullWriter(), x, y, batches, steps, False)
                else:
                    with TrajectoryWriter.create(str(store), model, steps=steps, batch_size=bs, attrs=attrs,
                                                 overwrite=True, chunk_steps=wf.train.chunk_steps) as writer:
                        target: Any = writer
                        if kind == "tee":
                            tee = _TeeWriter(writer, ParamLayout.from_model(model))
                            tee.rows.append(tee.layout.flatten(model))  # theta_0, as create() recorded it
                            target = tee
                        train_mod._run_steps(wf, model, opt, target, x, y, batches, steps, False)
                        writer.flush()
                _sync(device)
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


def bench_storage(check: dict[str, Any]) -> list[dict[str, Any]]:
    from trajectory_store.codecs import params_codecs
    from trajectory_store.measure import candidate_chains, compare_codecs

    params = check["params"]
    codec_rows = compare_codecs(params, chunk_steps=check["chunk_steps"])
    # compare_codecs quotes every ratio against its first row, the reference's h5py gzip(4).
    h5 = next((r for r in codec_rows if "h5py gzip(4)" in r["codec"]), codec_rows[0])
    store_chain = params_codecs()
    names = {name for name, chain in candidate_chains().items() if chain == store_chain}
    ours = next((r for r in codec_rows if r["codec"] in names), None) or \
        next((r for r in codec_rows if "store" in r["codec"] or "params_codecs" in r["codec"]), None)
    if ours is None:
        raise LCAError("trajectory_store.measure.compare_codecs has no row for the store's chain "
                       "(codecs.params_codecs); the storage table needs it")
    on_disk = _store_bytes(Path(check["store"]) / "trajectory" / "params")
    return [{
        "run": check["run"], "checkpoints": int(params.shape[0]), "params": int(params.shape[1]),
        "raw_bytes": int(params.nbytes), "h5py_gzip_bytes": int(h5["bytes"]), "store_bytes": int(ours["bytes"]),
        "store_on_disk_bytes": int(on_disk), "x_smaller": h5["bytes"] / ours["bytes"],
        "codec": ours["codec"], "chain_exact": bool(ours["exact"]), "h5py_exact": bool(h5["exact"]),
        "store_exact": bool(check["store_exact"]),
        "encode_mb_s": float(ours["encode_mb_s"]), "decode_mb_s": float(ours["decode_mb_s"]),
    }]


# ---------------------------------------------------------------------------------------------------------
# tables


def _num(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if spec == "yesno":
        return "yes" if v else "NO"
    if spec == "s":
        return str(v)
    return format(v, spec)


# Each column: (header, json key, format spec, scale). The test checks that every header is printed.
COLUMNS: dict[str, list[tuple[str, str, str, float]]] = {
    "gradient": [
        ("model", "model", "s", 1), ("variant (ours)", "variant", "s", 1), ("N samples", "samples", "d", 1),
        ("params", "params", ",d", 1), ("batch ref/ours", "batches", "s", 1),
        ("ref ms/grad", "ref_s", ".3f", 1e3), ("ours ms/grad", "ours_s", ".3f", 1e3), ("ref/ours", "ratio", ".2f", 1),
        ("GFLOP/grad", "flop", ".2f", 1e-9), ("ref TFLOP/s", "ref_tflops", ".3f", 1),
        ("ours TFLOP/s", "ours_tflops", ".3f", 1), ("% fp32 peak", "frac_fp32_peak", ".1f", 100),
        ("% tf32 peak", "frac_tf32_peak", ".1f", 100), ("max rel diff", "max_rel_diff", ".1e", 1),
    ],
    "precision": [
        ("run", "run", "s", 1), ("precision", "precision", "s", 1), ("steps", "steps", "d", 1),
        ("Simpson n", "splits", "d", 1), ("mean |dL|", "mean_abs_loss_change", ".3e", 1),
        ("mean |r|", "mean_abs_residual", ".3e", 1), ("max |r|", "max_abs_residual", ".3e", 1),
        ("% within tol", "within_tol", ".1f", 100), ("seconds", "seconds", ".2f", 1),
    ],
    "lca": [
        ("run", "run", "s", 1), ("steps", "steps", "d", 1), ("params", "params", ",d", 1),
        ("N samples", "samples", "d", 1), ("device", "device", "s", 1), ("workers", "workers", "d", 1),
        ("tol", "tol", ".0e", 1), ("grad evals/step", "points_per_step", ".3f", 1),
        ("% within tol", "within_tol", ".1f", 100), ("max |r|", "max_abs_residual", ".2e", 1),
        ("in-process steps/s", "in_process_steps_per_s", ".1f", 1), ("Dask s", "dask_s", ".1f", 1),
        ("Dask steps/s", "dask_steps_per_s", ".1f", 1),
    ],
    "training": [
        ("run", "run", "s", 1), ("steps", "steps", "d", 1), ("params", "params", ",d", 1),
        ("batch", "batch_size", "d", 1), ("device", "device", "s", 1),
        ("s without writer", "without_s", ".3f", 1), ("s with writer", "with_s", ".3f", 1),
        ("ms/step without", "without_ms_per_step", ".3f", 1), ("ms/step with", "with_ms_per_step", ".3f", 1),
        ("slowdown %", "slowdown_pct", ".1f", 1),
    ],
    "storage": [
        ("run", "run", "s", 1), ("checkpoints", "checkpoints", "d", 1), ("params", "params", ",d", 1),
        ("raw MiB", "raw_bytes", ".2f", 1 / MiB), ("h5py gzip(4) MiB", "h5py_gzip_bytes", ".2f", 1 / MiB),
        ("store MiB", "store_bytes", ".2f", 1 / MiB), ("x smaller", "x_smaller", ".2f", 1),
        ("on-disk MiB", "store_on_disk_bytes", ".2f", 1 / MiB), ("bit-exact chain", "chain_exact", "yesno", 1),
        ("bit-exact store", "store_exact", "yesno", 1),
    ],
}

TITLES = {
    "gradient": "1. Full-set gradient: reference-style loop vs our Evaluator (median seconds per gradient)",
    "precision": "2. Conservation residual at Simpson n = 2 under each precision (no refinement)",
    "lca": "3. LCA end to end at the default tolerance (in-process and through Dask)",
    "training": "4. Recording overhead: the trainer's loop with and without the TrajectoryWriter",
    "storage": "5. Trajectory storage: the store's codec chain vs h5py gzip (the reference's format)",
}


def format_table(section: str, rows: Iterable[dict[str, Any]]) -> str:
    cols = COLUMNS[section]
    cells = [[h for h, _, _, _ in cols]]
    for r in rows:
        line = []
        for _, key, spec, scale in cols:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and scale != 1 and v is not None:
                v = v * scale
                if spec.endswith("d"):
                    v = int(round(v))
            line.append(_num(v, spec))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    text_cols = {i for i, (_, _, spec, _) in enumerate(cols) if spec == "s"}

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in text_cols else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [TITLES[section], fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in cells[1:]]
    return "\n".join(lines)


def _header(meta: dict[str, Any]) -> str:
    peak = f"peak fp32 matmul ({meta['peak_n']}^2): {meta['peak_fp32_tflops']:.3f} TFLOP/s"
    if meta.get("peak_tf32_tflops"):
        peak += f"; tf32: {meta['peak_tf32_tflops']:.3f} TFLOP/s"
    return "\n".join([
        f"LCA bench ({'smoke: tiny sizes, checks the table not the speed' if meta['smoke'] else 'full'})"
        f"  {meta['date']}",
        f"device: {meta['device_name']} [{meta['device']}]; torch {meta['torch']}; "
        f"{meta['threads']} torch threads; python {meta['python']}",
        peak,
        *([f"note: {n}" for n in meta["notes"]]),
    ])


def _fashion_available() -> bool:
    from pipeline.config import DataConfig
    from pipeline.problem.data import resolve_data_config, split_size

    try:
        return split_size(resolve_data_config(DataConfig(dataset="fashion-mnist")), "train") > 0
    except (DataError, OSError):
        return False


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def run_bench(*, smoke: bool = False, out: str = "bench-out", device: str = "auto") -> dict[str, Any]:
    """Run every section, print its table as it finishes, write `<out>/bench.json`, and return the same dict.

    Scratch stores are written under `<out>/scratch` and removed at the end.
    """
    from pipeline.lca.evaluate import set_precision

    t_start = time.perf_counter()
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if cuda:
        # train() needs this before cuBLAS first runs for deterministic algorithms; set it before section 1.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = True  # both sides autotune (TF's default did too)
    fashion = (not smoke) and _fashion_available()
    plan = make_plan(smoke, cuda, fashion)
    threads_before = torch.get_num_threads()
    if plan.threads and not cuda:
        # Smoke runs on shared 2-core CI machines: one thread keeps OpenMP from spinning against other jobs,
        # which otherwise makes the tiny smoke sizes 10-50x slower and the test's run time unpredictable.
        torch.set_num_threads(plan.threads)
    out_dir = Path(out)
    scratch = out_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)

    notes = []
    if smoke:
        notes.append("smoke: tiny sizes and 1 torch thread; timings are dominated by overhead, do not quote them")
    elif not cuda:
        notes.append(f"CPU sizes: LeNet and ResNet-20 on {plan.samples['lenet']} / {plan.samples['resnet20']} "
                     f"synthetic samples (not 60k / 50k); fashion-fc LCA run truncated to {plan.fashion_steps} steps")
    if not smoke and not fashion:
        notes.append("Fashion-MNIST not found in data/fashion-mnist (`make data`): fashion-fc rows skipped")
    peaks: dict[str, float | None] = {"fp32": matmul_peak(dev, "fp32", plan.peak_n, plan.reps), "tf32": None}
    if cuda:
        peaks["tf32"] = matmul_peak(dev, "tf32", plan.peak_n, plan.reps)
    set_precision("fp32")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "smoke": smoke,
        "samples": plan.samples, "reps": plan.reps, "warmup": plan.warmup, "peak_n": plan.peak_n,
        "peak_fp32_tflops": peaks["fp32"] / 1e12,  # type: ignore[operator]
        "peak_tf32_tflops": peaks["tf32"] / 1e12 if peaks["tf32"] else None, "notes": notes,
        "section_seconds": {},
    }
    result: dict[str, Any] = {"meta": meta}
    print(_header(meta), flush=True)

    clock = [time.perf_counter()]

    def emit(section: str, rows: list[dict[str, Any]]) -> None:
        result[section] = rows
        now = time.perf_counter()
        meta["section_seconds"][section] = now - clock[0]
        clock[0] = now
        print("\n" + format_table(section, rows) + f"\n({now - t_start:.0f} s so far)", flush=True)
        (out_dir / "bench.json").write_text(json.dumps(_jsonable(result), indent=1))

    try:
        emit("gradient", bench_gradient(plan, dev, peaks))
        runs = [("digits-fc", scratch / "digits-fc.zarr", plan.digits_steps, plan.digits_chunk)]
        if plan.fashion_steps:
            runs.append(("fashion-fc", scratch / "fashion-fc.zarr", plan.fashion_steps, plan.fashion_chunk))
        for name, store, steps, chunk in runs:
            _train_store(_run_workflow(name, steps, chunk, dev), store)
        emit("precision", bench_precision(runs[0][1], runs[0][0], dev))
        emit("lca", bench_lca([(name, store) for name, store, _, _ in runs], plan, dev))
        rows, check = bench_training(plan, dev, scratch)
        emit("training", rows)
        emit("storage", bench_storage(check))
    finally:
        set_precision("fp32")
        torch.set_num_threads(threads_before)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nwrote {out_dir / 'bench.json'}", flush=True)
    return _jsonable(result)


if __name__ == "__main__":  # `python -m pipeline.bench [--smoke] ...`; Dask's worker processes never get here
    from pipeline.cli import main

    main(["bench", *sys.argv[1:]])
