"""Where each parameter tensor lives in the flat vector that the store keeps one row of per checkpoint.

The layout is the only thing that ties a column of `trajectory/params` (and of `lca/<split>`) back to a
named tensor and an output unit, so it is stored as JSON in the root attributes and rebuilt from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor: its name, shape, first column in the flat vector, and unit axis.

    The unit axis is the axis whose index names an output unit (a neuron or a channel): axis 0 for
    Linear/Conv weights ([out, in, ...]), biases and BatchNorm affine parameters; None for scalars.
    """

    name: str
    shape: tuple[int, ...]
    offset: int
    unit_axis: int | None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def module(self) -> str:
        """The owning module's name: weights and bias of one neuron share it, which defines a unit."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""

    @property
    def num_units(self) -> int:
        return self.shape[self.unit_axis] if self.unit_axis is not None else 1

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "offset": self.offset, "unit_axis": self.unit_axis}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), int(d["offset"]),
                   None if d.get("unit_axis") is None else int(d["unit_axis"]))


FROZEN_GROUP = "frozen"  # frozen parameters' values, one array per tensor ("0", "1", ...; attribute `names`)


def canonical_name(name: str) -> str:
    """A parameter's name without `torch.compile`'s `_orig_mod.` wrapper prefix (anywhere in the path), so a
    compiled model and its plain module share one layout."""
    return name.replace("_orig_mod.", "")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) of every parameter that trains, in `named_parameters()` order.

    Tied or shared parameters appear once (named_parameters() removes duplicates, keeping the first name).
    Frozen parameters (requires_grad=False) never move, so they carry no LCA: they are left out of the
    layout and held fixed (the writer stores their values once, in `frozen/`).
    """
    return [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]


def frozen_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(canonical_name(n), p) for n, p in model.named_parameters() if not p.requires_grad]


@dataclass(frozen=True)
class ParamLayout:
    """The ordered trainable tensors of a model's `named_parameters()` (buffers and frozen parameters are
    not integrated and are left out)."""

    tensors: tuple[TensorSpec, ...]

    @classmethod
    def from_named_shapes(cls, named_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> "ParamLayout":
        specs, offset = [], 0
        for name, shape in named_shapes:
            shape = tuple(int(s) for s in shape)
            spec = TensorSpec(name, shape, offset, 0 if len(shape) >= 1 else None)
            specs.append(spec)
            offset += spec.size
        return cls(tuple(specs))

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "ParamLayout":
        return cls.from_named_shapes((n, tuple(p.shape)) for n, p in trainable_parameters(model))

    @property
    def size(self) -> int:
        return self.tensors[-1].offset + self.tensors[-1].size if self.tensors else 0

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def __len__(self) -> int:
        return len(self.tensors)

    def to_json(self) -> list[dict[str, Any]]:
        return [t.to_json() for t in self.tensors]

    @classmethod
    def from_json(cls, items: Iterable[Mapping[str, Any]]) -> "ParamLayout":
        return cls(tuple(TensorSpec.from_json(d) for d in items))

    def first_mismatch(self, other: "ParamLayout") -> str | None:
        """The first difference between two layouts, in words (None when they are the same)."""
        for i, (a, b) in enumerate(zip(self.tensors, other.tensors)):
            if a.name != b.name or a.shape != b.shape:
                return f"tensor {i}: the store has {a.name} {list(a.shape)}, the model has {b.name} {list(b.shape)}"
        if len(self.tensors) != len(other.tensors):
            longer, who = (self, "store") if len(self.tensors) > len(other.tensors) else (other, "model")
            extra = longer.tensors[min(len(self.tensors), len(other.tensors))]
            return (f"tensor {min(len(self.tensors), len(other.tensors))}: only the {who} has "
                    f"{extra.name} {list(extra.shape)} ({len(self.tensors)} tensors in the store, "
                    f"{len(other.tensors)} in the model)")
        return None

    def check_model(self, model: torch.nn.Module) -> None:
        """Fail with one line naming the first tensor where a model's parameters differ from this layout."""
        from .errors import StoreError

        why = self.first_mismatch(ParamLayout.from_model(model))
        if why is not None:
            raise StoreError(f"the model's parameters do not match the store's layout ({why}); use the model "
                             f"the store was written with")

    def flatten(self, model: torch.nn.Module) -> np.ndarray:
        """The model's parameters as one float32 row, in layout order (a copy, safe to hand to a thread)."""
        # By name, over all parameters: one frozen later in training (an intervention) is still recorded.
        params = {canonical_name(n): p for n, p in model.named_parameters()}
        missing = [t.name for t in self.tensors if t.name not in params]
        if missing:
            from .errors import StoreError

            raise StoreError(f"the model has no parameter {missing[0]!r} of the store's layout; record the "
                             f"model the store was created with")
        with torch.no_grad():
            flat = torch.cat([params[t.name].detach().reshape(-1).to("cpu", torch.float32) for t in self.tensors])
        return flat.numpy().copy()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector (or a batch [..., P] of them) shaped as each named tensor."""
        lead = tuple(flat.shape[:-1])
        return {t.name: flat[..., t.offset:t.offset + t.size].reshape(lead + t.shape) for t in self.tensors}

    def layer_of_parameter(self) -> np.ndarray:
        """Index into `tensors` for every column of the flat vector."""
        return np.repeat(np.arange(len(self.tensors), dtype=np.int32), [t.size for t in self.tensors])

    def unit_of_parameter(self) -> np.ndarray:
        """Index along each tensor's unit axis for every column (0 for scalars)."""
        parts = []
        for t in self.tensors:
            if t.unit_axis is None:
                parts.append(np.zeros(t.size, dtype=np.int32))
            else:
                idx = np.indices(t.shape, dtype=np.int32)[t.unit_axis] if t.shape else np.zeros(1, np.int32)
                parts.append(idx.reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)
