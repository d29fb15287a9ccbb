"""The paper's three architectures, small enough to read in one sitting.

Parameter names are part of the store format: LCA is reported per named tensor (a "layer") and per output
unit, so names are short and stable (`layers.0.weight`, `conv1.weight`, `stage2.0.bn1.bias`) and every
Linear/Conv weight keeps PyTorch's [out, in, ...] order, putting the output unit on axis 0 (the unit axis
that `trajectory_store.ParamLayout` assumes). No dropout: the LCA loss must be a function of the
parameters alone. Weights use He-normal initialisation, as the reference implementation did.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import WorkflowError


def _he_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class FC(nn.Module):
    """Flatten, then Linear+ReLU per hidden width, then a Linear classifier: `layers.<i>.weight|bias`."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class LeNet(nn.Module):
    """The paper's "slightly modified LeNet": two 5x5 'same' convs (20, 40 channels) each followed by
    2x2 max-pooling, then FC 400 and the classifier."""

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=2)
        self.conv2 = nn.Conv2d(20, 40, 5, padding=2)
        self.fc1 = nn.Linear(40 * (height // 4) * (width // 4), 400)
        self.fc2 = nn.Linear(400, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN with a parameter-free shortcut ("option A": subsample and zero-pad channels), so the
    only parameters in a block are the convs and BatchNorm affines."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride, self.pad = stride, planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): a 3x3 stem, three stages of three basic blocks with
    16/32/64 channels (stride 2 entering stages 2 and 3), global average pooling, a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def fc(input_shape: list[int], num_classes: int, hidden: list[int] = (100, 50)) -> nn.Module:
    """Model factory "pipeline.problem.models:fc": FC with ReLU, He-initialised."""
    model = FC(math.prod(int(s) for s in input_shape), [int(h) for h in hidden], int(num_classes))
    _he_init(model)
    return model


def _image_shape(arch: str, input_shape: list[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise WorkflowError(f"model.arch = {arch!r} needs images [C, H, W], got input shape {list(shape)}")
    return shape  # type: ignore[return-value]


def lenet(input_shape: list[int], num_classes: int) -> nn.Module:
    """Model factory "pipeline.problem.models:lenet": the paper's LeNet, He-initialised."""
    c, h, w = _image_shape("lenet", input_shape)
    if h < 4 or w < 4:
        raise WorkflowError(f"model.arch = 'lenet' needs images of at least 4x4, got {[c, h, w]}")
    model = LeNet(c, h, w, int(num_classes))
    _he_init(model)
    return model


def resnet20(input_shape: list[int], num_classes: int) -> nn.Module:
    """Model factory "pipeline.problem.models:resnet20": CIFAR ResNet-20 with BatchNorm, He-initialised."""
    c, _, _ = _image_shape("resnet20", input_shape)
    model = ResNet20(c, int(num_classes))
    _he_init(model)
    return model


def factory_of(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> tuple[str, dict[str, Any]]:
    """The built-in model of a workflow's `arch` shorthand, as a reference and JSON kwargs."""
    if cfg.arch not in ("fc", "lenet", "resnet20"):
        raise WorkflowError(f"model.arch must be one of fc, lenet, resnet20; got {cfg.arch!r}")
    kwargs: dict[str, Any] = {"input_shape": [int(s) for s in input_shape], "num_classes": int(num_classes)}
    if cfg.arch == "fc":
        kwargs["hidden"] = [int(h) for h in cfg.hidden]
    return f"pipeline.problem.models:{cfg.arch}", kwargs


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A freshly initialised model; the caller seeds torch first so initialisation is reproducible."""
    ref, kwargs = factory_of(cfg, input_shape, num_classes)
    return {"fc": fc, "lenet": lenet, "resnet20": resnet20}[cfg.arch](**kwargs)


def model_spec(cfg: ModelConfig, model: nn.Module, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """What the store records about the model: enough to rebuild it and to sanity-check the layout."""
    return {
        "arch": cfg.arch,
        "hidden": list(cfg.hidden) if cfg.arch == "fc" else [],
        "class": type(model).__name__,
        "input_shape": [int(s) for s in input_shape],
        "num_classes": int(num_classes),
        "num_parameters": count_parameters(model),
        "batchnorm": any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
    }


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters: those LCA allocates to (frozen ones are held fixed, outside the layout)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
