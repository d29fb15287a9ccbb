"""The full-split loss L(theta) and its gradient, at many parameter vectors theta.

LCA's whole cost is here: every training step needs at least two full-training-set gradients. The
evaluator therefore keeps the model and the split on its device for the life of a worker, and takes
parameter vectors in batches: small models evaluate several path points in one `torch.func.vmap` pass
(one kernel launch serves K points), convolutional ones loop over points with large data batches,
channels_last and cudnn autotuning. L is the mean cross-entropy over the split in a fixed order and a
fixed batch size; loss and gradient sums accumulate in float64 whatever the compute precision.

BatchNorm uses batch statistics and never touches running statistics, so L depends on the parameters
alone (buffers are not integrated): `replace_all_batch_norm_modules_` drops the running buffers.
"""

from __future__ import annotations

import copy
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, vmap

from trajectory_store.layout import ParamLayout

Precision = Literal["fp32", "tf32", "fp64"]
Mode = Literal["auto", "vmap", "loop"]


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def set_precision(precision: Precision) -> None:
    """TF32 is process-wide in torch; fp32 and fp64 switch it off so residuals measure the rule, not rounding."""
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


class Evaluator:
    """Full-split loss and gradient of one model on one split, resident on one device.

    Results are bit-reproducible on CPU for a fixed torch thread count (mode "loop").
    `loss_and_grad(thetas)` takes K flat parameter vectors [K, P] (any float dtype; float64 keeps path
    points exact before the cast to the compute dtype) and returns the mean loss [K] and its gradient
    [K, P], both float64 numpy arrays.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParamLayout,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        mode: Mode = "auto",
        points_per_pass: int | None = None,
        channels_last: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.layout = layout
        self.precision = precision
        self.dtype = torch.float64 if precision == "fp64" else torch.float32
        self.batch_size = int(batch_size)
        conv = has_conv(model)
        cuda = self.device.type == "cuda"
        # vmap fuses K points into one wide GEMM whose tiling makes a point's last bits depend on its
        # position in the pass. On CPU we evaluate points one by one, so results are bit-identical
        # whatever the block size or worker count; on CUDA (never bit-reproducible anyway) small
        # models take the vmap speed-up.
        self.mode = ("vmap" if cuda and not conv else "loop") if mode == "auto" else mode
        self.points_per_pass = int(points_per_pass or (16 if self.mode == "vmap" else 1))
        # channels_last pays on CPU too (measured: LeNet 1.09x, ResNet-20 1.12x with 2 threads).
        self.channels_last = conv if channels_last is None else channels_last
        set_precision(precision)
        if cuda and conv:
            torch.backends.cudnn.benchmark = True

        net = copy.deepcopy(model)
        replace_all_batch_norm_modules_(net)
        net.eval()  # dropout off; BatchNorm without running stats still normalises by batch statistics
        net.to(self.device, self.dtype)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        layout.check_model(net)

        x = inputs.to(self.device, self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        self.inputs = x
        self.targets = targets.to(self.device, torch.long)
        self.num_samples = int(self.targets.shape[0])
        if self.num_samples == 0:
            raise ValueError("the evaluation split is empty")
        self._vmapped = vmap(grad_and_value(self._batch_loss), in_dims=(0, None, None))

    def _batch_loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed (not mean) cross-entropy of one data batch: sums over batches give the split's total."""
        params = self.layout.unflatten(flat)
        if self.channels_last:
            params = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v)
                      for k, v in params.items()}
        return F.cross_entropy(functional_call(self.net, params, (x,)), y, reduction="sum")

    def _batches(self):
        for start in range(0, self.num_samples, self.batch_size):
            yield self.inputs[start:start + self.batch_size], self.targets[start:start + self.batch_size]

    def loss_and_grad(self, thetas: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        set_precision(self.precision)  # process-wide in torch: another evaluator may have changed it
        thetas = torch.as_tensor(thetas)
        if thetas.dim() == 1:
            thetas = thetas[None]
        count = thetas.shape[0]
        if self.mode == "vmap" and count % self.points_per_pass:
            # Every pass gets the same width (padded with repeats), so kernels chosen by shape stay the same.
            pad = self.points_per_pass - count % self.points_per_pass
            thetas = torch.cat([thetas, thetas[-1:].expand(pad, -1)])
        losses, grads = [], []
        for start in range(0, thetas.shape[0], self.points_per_pass):
            chunk = thetas[start:start + self.points_per_pass].to(self.device, self.dtype)
            loss, grad = self._vmap_pass(chunk) if self.mode == "vmap" else self._loop_pass(chunk)
            losses.append(loss)
            grads.append(grad)
        loss = torch.cat(losses)[:count] / self.num_samples
        grad = torch.cat(grads)[:count] / self.num_samples
        return loss.cpu().numpy(), grad.cpu().numpy()

    def _vmap_pass(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, p = chunk.shape
        grad = torch.zeros(k, p, dtype=torch.float64, device=self.device)
        loss = torch.zeros(k, dtype=torch.float64, device=self.device)
        for x, y in self._batches():
            g, value = self._vmapped(chunk, x, y)
            grad += g
            loss += value
        return loss, grad

    def _loop_pass(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, p = chunk.shape
        grad = torch.zeros(k, p, dtype=torch.float64, device=self.device)
        loss = torch.zeros(k, dtype=torch.float64, device=self.device)
        for i in range(k):
            flat = chunk[i].clone().requires_grad_(True)
            for x, y in self._batches():
                value = self._batch_loss(flat, x, y)
                (g,) = torch.autograd.grad(value, flat)
                grad[i] += g
                loss[i] += value.detach()
        return loss, grad
