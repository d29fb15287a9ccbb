"""Section 1, the full-set gradient: the reference-style loop against our Evaluator.

"Full-set gradient" -- the cost of one full-training-set loss + gradient, the unit LCA pays at least
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
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.bench.plan import Plan
from pipeline.bench.runs import workflow_path
from pipeline.bench.timing import interleaved_medians
from pipeline.errors import LCAError

# Evaluation batch sizes of the shipped workflows (used when the TOML files are not at hand).
OURS_BATCH = {"fc": 60000, "lenet": 10000, "resnet20": 2500}
WORKFLOW_OF_ARCH = {"fc": "fashion-fc", "lenet": "fashion-lenet", "resnet20": "cifar10-resnet20"}
# The reference's evaluation batches: 11k samples for MNIST-sized nets; for ResNet-20 the same batch as
# ours, so batch-statistics BatchNorm gives both sides the same loss and the gradients can be compared.
REF_BATCH = {"fc": 11000, "lenet": 11000, "resnet20": 2500}

TITLE = "1. Full-set gradient: reference-style loop vs our Evaluator (median seconds per gradient)"
# (header, json key, format spec, scale): see pipeline/bench/table.py
COLUMNS = [
    ("model", "model", "s", 1), ("variant (ours)", "variant", "s", 1), ("N samples", "samples", "d", 1),
    ("params", "params", ",d", 1), ("batch ref/ours", "batches", "s", 1),
    ("ref ms/grad", "ref_s", ".3f", 1e3), ("ours ms/grad", "ours_s", ".3f", 1e3), ("ref/ours", "ratio", ".2f", 1),
    ("GFLOP/grad", "flop", ".2f", 1e-9), ("ref TFLOP/s", "ref_tflops", ".3f", 1),
    ("ours TFLOP/s", "ours_tflops", ".3f", 1), ("% fp32 peak", "frac_fp32_peak", ".1f", 100),
    ("% tf32 peak", "frac_tf32_peak", ".1f", 100), ("max rel diff", "max_rel_diff", ".1e", 1),
]


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


def _ours_batch(arch: str) -> int:
    from pipeline.config import load_workflow

    with contextlib.suppress(LCAError):
        return int(load_workflow(workflow_path(WORKFLOW_OF_ARCH[arch])).lca.eval_batch_size)
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
