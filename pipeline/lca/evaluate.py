"""The full-split loss L(theta) and its gradient, at many parameter vectors theta.

LCA's whole cost is here: every training step needs at least two full-training-set gradients. The
evaluator therefore keeps the model and the split on its device for the life of a worker, and takes
parameter vectors in batches: small models evaluate several path points in one `torch.func.vmap` pass
(one kernel launch serves K points), convolutional ones loop over points with large data batches,
channels_last and cudnn autotuning. L is the problem's loss (pipeline/problem/losses.py: each batch gives
its summed loss and the count it averages over) over the whole split in a fixed order and a fixed batch
size: the split's exact mean is sum of sums / sum of counts. Loss and gradient sums accumulate in float64
whatever the compute precision.

Any nn.Module: inputs are a tensor or a dict of keyword arguments (Hugging Face batches). BatchNorm uses
batch statistics and never touches running statistics, so L depends on the parameters alone: buffers are
held fixed, never integrated (`replace_all_batch_norm_modules_` drops the running buffers). Dropout is off.
Tied parameters are one layout entry (functional_call keeps them tied); frozen parameters are outside the
layout and hold the values the store recorded; a `torch.compile`d model is evaluated through its original
module (`_orig_mod.` names map to the layout's plain names).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, vmap

from pipeline.errors import LCAError
from pipeline.problem.losses import cross_entropy
from trajectory_store.layout import ParamLayout, canonical_name

Precision = Literal["fp32", "tf32", "fp64"]
Mode = Literal["auto", "vmap", "loop"]


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def set_precision(precision: Precision) -> None:
    """TF32 is process-wide in torch; fp32 and fp64 switch it off so residuals measure the rule, not rounding."""
    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


# Bytes per parameter one path point costs in a vmap pass: the point, its float64 sum, its float32 gradient
# and the per-point parameter copies functional_call makes.
VMAP_BYTES_PER_PARAM = 4 + 8 + 4 + 4


def free_bytes(device: torch.device) -> int:
    """Memory the evaluator may still take on its device."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 32


def points_that_fit(size: int, batch: int, activation_bytes: int, free: int, *, cap: int = 16,
                    share: float = 0.5) -> int:
    """Path points per vmap pass: as many as fit in `share` of the free memory, at most `cap`.

    A point costs VMAP_BYTES_PER_PARAM per parameter plus its activations (forward outputs, kept for the
    backward pass, about 3x for their gradients): small models get all 16, a model whose points would
    not fit gets fewer, down to one.
    """
    per_point = size * VMAP_BYTES_PER_PARAM + 3 * batch * activation_bytes
    return max(1, min(int(cap), int(share * free // max(1, per_point))))


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
        inputs: "torch.Tensor | dict[str, torch.Tensor]",
        targets: torch.Tensor,
        *,
        batch_size: int,
        loss: "Callable[[Any, torch.Tensor], tuple[torch.Tensor, Any]] | None" = None,
        frozen: "dict[str, np.ndarray] | None" = None,
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
        self.numpy_dtype = np.float64 if precision == "fp64" else np.float32  # path points arrive in it
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

        while isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        net = copy.deepcopy(model)
        replace_all_batch_norm_modules_(net)
        net.eval()  # dropout off; BatchNorm without running stats still normalises by batch statistics
        self.frozen = set_frozen(net, frozen or {})
        layout.check_model(net)  # before gradients are switched off: the layout is the trainable parameters
        net.to(self.device, self.dtype)
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        # Layout names are canonical; the module's own names may carry `_orig_mod.` (compiled submodules).
        actual = {canonical_name(n): n for n, _ in net.named_parameters()}
        self._names = [(t.name, actual[t.name]) for t in layout.tensors]
        self.loss_fn = loss or cross_entropy

        if isinstance(inputs, dict):
            self.inputs: Any = {k: _to(v, self.device, self.dtype, False) for k, v in inputs.items()}
        else:
            self.inputs = _to(inputs, self.device, self.dtype, self.channels_last)
        # Targets keep their dtype (class indices, token ids, regression values); losses cast as they need.
        self.targets = targets.to(self.device)
        if self.targets.is_floating_point():
            self.targets = self.targets.to(self.dtype)
        self.num_samples = int(self.targets.shape[0])
        if self.num_samples == 0:
            raise ValueError("the evaluation split is empty")
        self.count: float | None = None  # what the split's loss averages over, set by the first pass
        self._vmapped = vmap(grad_and_value(self._batch_loss, has_aux=True), in_dims=(0, None, None))

    def _batch_loss(self, flat: torch.Tensor, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(summed loss, count) of one data batch: sums over batches give the split's total and count."""
        views = self.layout.unflatten(flat)
        params = {actual: views[name] for name, actual in self._names}
        if self.channels_last:
            params = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v)
                      for k, v in params.items()}
        if isinstance(x, dict):
            output = functional_call(self.net, params, (), x)
        else:
            output = functional_call(self.net, params, (x,))
        value = self.loss_fn(output, y)
        if not (isinstance(value, tuple) and len(value) == 2):
            raise LCAError(f"the loss returned a {type(value).__name__}; it must return (summed loss, count)")
        total, count = value
        if not isinstance(total, torch.Tensor) or total.numel() != 1:
            raise LCAError(f"the loss returned a summed loss of shape "
                           f"{list(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__}; "
                           f"it must be a scalar (reduction='sum')")
        return total.reshape(()), torch.as_tensor(count, dtype=torch.float64, device=total.device)

    def _batches(self):
        for start in range(0, self.num_samples, self.batch_size):
            stop = start + self.batch_size
            x = {k: v[start:stop] for k, v in self.inputs.items()} if isinstance(self.inputs, dict) \
                else self.inputs[start:stop]
            yield x, self.targets[start:stop]

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
            del chunk
            losses.append(loss)
            grads.append(grad)
        assert self.count is not None
        loss = torch.cat(losses)[:count] / self.count
        grad = torch.cat(grads)[:count] / self.count
        out = loss.cpu().numpy()
        if not np.isfinite(out).all():
            raise LCAError(f"the loss over the split is not finite ({out[~np.isfinite(out)][0]}) at a point of "
                           f"the path; check the loss and the data")
        return out, grad.cpu().numpy()

    def _set_count(self, total: torch.Tensor) -> None:
        """The loss's count is a property of the data, not of the parameters: taken once, checked positive."""
        c = float(total)
        if self.count is None:
            if not (np.isfinite(c) and c > 0):
                raise LCAError(f"the loss counts {c} items over the split; the count must be positive")
            self.count = c

    def _vmap_pass(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, p = chunk.shape
        grad = torch.zeros(k, p, dtype=torch.float64, device=self.device)
        loss = torch.zeros(k, dtype=torch.float64, device=self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for x, y in self._batches():
            g, (value, count) = self._vmapped(chunk, x, y)
            grad += g
            loss += value
            total += count[0]
        self._set_count(total)
        return loss, grad

    def _loop_pass(self, chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, p = chunk.shape
        grad = torch.zeros(k, p, dtype=torch.float64, device=self.device)
        loss = torch.zeros(k, dtype=torch.float64, device=self.device)
        for i in range(k):
            flat = chunk[i].clone().requires_grad_(True)
            total = torch.zeros((), dtype=torch.float64, device=self.device)
            for x, y in self._batches():
                value, n = self._batch_loss(flat, x, y)
                (g,) = torch.autograd.grad(value, flat)
                grad[i] += g
                loss[i] += value.detach()
                total += n
            self._set_count(total)
        return loss, grad


def _to(x: torch.Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Floating inputs in the compute dtype; integer ones (token ids, masks) as they are."""
    x = x.to(device, dtype) if x.is_floating_point() else x.to(device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def set_frozen(net: nn.Module, frozen: dict[str, np.ndarray]) -> list[str]:
    """Freeze the parameters the store recorded as frozen, at the values training had; returns their names.

    A factory builds every parameter trainable and freshly initialised; the store knows which ones training
    froze (requires_grad=False) and what they held."""
    params = {canonical_name(n): p for n, p in net.named_parameters()}
    for name, value in frozen.items():
        p = params.get(name)
        if p is None or tuple(p.shape) != tuple(value.shape):
            what = "has no such parameter" if p is None else f"has shape {list(p.shape)}"
            raise LCAError(f"the store holds frozen parameter {name} {list(value.shape)} but the model {what}; "
                           f"use the model the store was written with")
        p.requires_grad_(False)
        with torch.no_grad():
            p.copy_(torch.as_tensor(value))
    return sorted(frozen)
