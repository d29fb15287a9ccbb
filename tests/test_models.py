"""Architectures: exact sizes, stable names, output unit on axis 0 (what per-unit LCA relies on)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import WorkflowError
from pipeline.problem.models import build_model, count_parameters, model_spec
from trajectory_store.layout import ParamLayout


def fc_count(widths: list[int]) -> int:
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def test_fc_digits_and_fashion_counts_and_names() -> None:
    digits = build_model(ModelConfig(arch="fc", hidden=[100, 50]), (1, 8, 8), 10)
    assert count_parameters(digits) == fc_count([64, 100, 50, 10]) == 12060
    fashion = build_model(ModelConfig(arch="fc", hidden=[100, 50]), (1, 28, 28), 10)
    assert count_parameters(fashion) == fc_count([784, 100, 50, 10]) == 84060
    assert [n for n, _ in fashion.named_parameters()] == [
        "layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias", "layers.2.weight", "layers.2.bias"]
    assert [tuple(p.shape) for p in fashion.parameters()] == [(100, 784), (100,), (50, 100), (50,), (10, 50), (10,)]
    deep = build_model(ModelConfig(arch="fc", hidden=[7, 6, 5]), (2, 3, 3), 4)
    assert count_parameters(deep) == fc_count([18, 7, 6, 5, 4])


def test_lenet_count_and_names() -> None:
    model = build_model(ModelConfig(arch="lenet"), (1, 28, 28), 10)
    # 'same' 5x5 convs, two 2x2 pools: 28 -> 14 -> 7, so fc1 sees 40*7*7 = 1960 inputs
    expected = (20 * 1 * 25 + 20) + (40 * 20 * 25 + 40) + (1960 * 400 + 400) + (400 * 10 + 10)
    assert count_parameters(model) == expected == 808970
    assert [n for n, _ in model.named_parameters()] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias",
        "fc2.weight", "fc2.bias"]


def test_resnet20_size_and_structure() -> None:
    model = build_model(ModelConfig(arch="resnet20"), (3, 32, 32), 10)
    n = count_parameters(model)
    assert n == 269722 and 0.26e6 < n < 0.28e6  # "0.27M" in He et al. (option-A shortcuts have no weights)
    names = [name for name, _ in model.named_parameters()]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and sum(isinstance(m, nn.Linear) for m in model.modules()) == 1  # 20 weight layers
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"] and names[-2:] == ["fc.weight", "fc.bias"]
    assert "stage3.2.bn2.bias" in names and not any("shortcut" in name for name in names)
    assert all(m.bias is None for m in convs)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("arch,shape", [("fc", (1, 8, 8)), ("fc", (1, 28, 28)), ("lenet", (1, 28, 28)),
                                        ("lenet", (3, 32, 32)), ("resnet20", (3, 32, 32)),
                                        ("resnet20", (1, 28, 28))])
def test_output_shape(arch: str, shape: tuple[int, ...]) -> None:
    model = build_model(ModelConfig(arch=arch), shape, 10)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("arch,shape", [("fc", (1, 8, 8)), ("lenet", (1, 28, 28)), ("resnet20", (3, 32, 32))])
def test_output_unit_is_axis_zero(arch: str, shape: tuple[int, ...]) -> None:
    """Every weight's axis 0, and its bias / BN affine, index the module's output units (the layout's
    unit_axis), so a unit's LCA is a sum over one index of the module's tensors."""
    model = build_model(ModelConfig(arch=arch), shape, 10)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            units = module.out_features
        elif isinstance(module, nn.Conv2d):
            units = module.out_channels
        elif isinstance(module, nn.BatchNorm2d):
            units = module.num_features
        else:
            continue
        for p in module.parameters(recurse=False):
            assert p.shape[0] == units, f"{name}: axis 0 of {tuple(p.shape)} is not its {units} units"
    layout = ParamLayout.from_model(model)
    assert all(t.unit_axis == 0 for t in layout.tensors)
    assert layout.size == count_parameters(model)


def test_same_seed_same_initialisation() -> None:
    def make() -> nn.Module:
        torch.manual_seed(3)
        return build_model(ModelConfig(arch="lenet"), (1, 28, 28), 10)

    a, b = make(), make()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(not m.bias.detach().any() for m in a.modules() if isinstance(m, nn.Linear))  # He init, zero bias


def test_model_spec_is_json_ready() -> None:
    import json

    model = build_model(ModelConfig(arch="resnet20"), (3, 32, 32), 10)
    spec = model_spec(ModelConfig(arch="resnet20"), model, (3, 32, 32), 10)
    assert spec["num_parameters"] == 269722 and spec["batchnorm"] is True and spec["arch"] == "resnet20"
    json.dumps(spec)


def test_conv_nets_need_images() -> None:
    with pytest.raises(WorkflowError, match="needs images"):
        build_model(ModelConfig(arch="lenet"), (64,), 10)
    with pytest.raises(WorkflowError, match="at least 4x4"):
        build_model(ModelConfig(arch="lenet"), (1, 2, 2), 10)
