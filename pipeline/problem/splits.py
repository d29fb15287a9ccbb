"""A data split as LCA evaluates it: all of it in memory, in a fixed order, cut into batches by slicing.

A data factory may return, per split, `(inputs, targets)` tensors (or numpy arrays), a dict of tensors
with a `labels` entry (a Hugging Face batch), or a torch `Dataset` whose items are `(x, y)` pairs or such
dicts. Every form becomes the same `Split`: inputs (a tensor, or a dict of tensors passed to the model as
keyword arguments) and targets (the labels, handed to the loss, never to the model), all with N rows.
Batches are row slices, so the split's content and order never depend on the evaluation batch size.

The fingerprint is a content hash of inputs and targets in that order (names, dtypes, shapes and bytes):
the store records it as training saw the data, and compute refuses data that hashes differently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from pipeline.errors import ProblemError

LABELS = "labels"

Inputs = "torch.Tensor | dict[str, torch.Tensor]"


def _tensor(x: Any, where: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ProblemError(f"{where} must be a tensor or a numpy array, got {type(x).__name__}")


@dataclass
class Split:
    inputs: Any  # torch.Tensor, or dict[str, torch.Tensor] of keyword arguments
    targets: torch.Tensor

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def fields(self) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(self.inputs, dict):
            yield from sorted(self.inputs.items())
        else:
            yield "inputs", self.inputs
        yield "targets", self.targets

    def slice(self, start: int, stop: int) -> tuple[Any, torch.Tensor]:
        return _map(self.inputs, lambda v: v[start:stop]), self.targets[start:stop]

    def take(self, index: torch.Tensor) -> tuple[Any, torch.Tensor]:
        return _map(self.inputs, lambda v: v[index.to(v.device)]), self.targets[index.to(self.targets.device)]

    def to(self, device: torch.device | str, float_dtype: torch.dtype | None = None) -> "Split":
        """On `device`; floating-point inputs cast to `float_dtype` (integer ids and masks keep theirs)."""
        def move(v: torch.Tensor) -> torch.Tensor:
            if float_dtype is not None and v.is_floating_point():
                return v.to(device, float_dtype)
            return v.to(device)

        return Split(_map(self.inputs, move), self.targets.to(device))

    def fingerprint(self) -> str:
        """blake2b over every field's name, dtype, shape and bytes, in evaluation order."""
        h = hashlib.blake2b(digest_size=16)
        for name, v in self.fields():
            h.update(f"{name}|{str(v.dtype)}|{list(v.shape)}|".encode())
            h.update(np.ascontiguousarray(v.detach().cpu().numpy()).tobytes())
        return "blake2b:" + h.hexdigest()

    def describe(self) -> str:
        return ", ".join(f"{name} {str(v.dtype).replace('torch.', '')}{list(v.shape)}" for name, v in self.fields())


def _map(inputs: Any, fn: Any) -> Any:
    return {k: fn(v) for k, v in inputs.items()} if isinstance(inputs, dict) else fn(inputs)


def _from_dict(d: Mapping[str, Any], where: str) -> Split:
    if LABELS not in d:
        raise ProblemError(f"{where} is a dict without a {LABELS!r} entry; give the targets as 'labels' "
                           f"(as Hugging Face batches do) or return (inputs, targets)")
    inputs = {str(k): _tensor(v, f"{where}[{k!r}]") for k, v in d.items() if k != LABELS}
    if not inputs:
        raise ProblemError(f"{where} holds only labels; add the model's inputs")
    return Split(inputs, _tensor(d[LABELS], f"{where}[{LABELS!r}]"))


def _from_dataset(ds: Any, where: str) -> Split:
    from torch.utils.data import default_collate

    n = len(ds)
    if n == 0:
        raise ProblemError(f"{where} is an empty Dataset")
    try:
        batch = default_collate([ds[i] for i in range(n)])
    except Exception as e:
        raise ProblemError(f"{where}: cannot stack the Dataset's items into tensors ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); items must be (x, y) pairs or dicts "
                           f"of equally shaped tensors") from None
    return to_split(batch, where)


def to_split(value: Any, where: str) -> Split:
    """Any accepted form of one split, as a `Split`; anything else is one line saying what is accepted."""
    if isinstance(value, Split):
        split = value
    elif isinstance(value, Mapping):
        split = _from_dict(value, where)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        x, y = value
        inputs = {str(k): _tensor(v, f"{where} inputs[{k!r}]") for k, v in x.items()} \
            if isinstance(x, Mapping) else _tensor(x, f"{where} inputs")
        split = Split(inputs, _tensor(y, f"{where} targets"))
    elif hasattr(value, "__getitem__") and hasattr(value, "__len__") and not isinstance(value, (str, bytes)):
        split = _from_dataset(value, where)
    else:
        raise ProblemError(f"{where} must be (inputs, targets), a dict of tensors with 'labels', or a torch "
                           f"Dataset; got {type(value).__name__}")
    n = len(split)
    for name, v in split.fields():
        if v.dim() == 0 or int(v.shape[0]) != n:
            raise ProblemError(f"{where}: {name} has shape {list(v.shape)} but the targets have {n} rows; "
                               f"every field needs one row per sample")
    if n == 0:
        raise ProblemError(f"{where} is empty")
    return split
