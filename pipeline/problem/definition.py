"""The problem definition: which model, which data and which loss L is, given by reference.

One definition serves the built-in workflows and a researcher's own code. Each part is a
`"package.module:attr"` string plus JSON keyword arguments (the entry-point convention), so the whole
problem is plain JSON: it is stored in a trajectory store's root attribute `problem` and sent to Dask
workers, which rebuild it by importing and calling the factories. The built-in models and data sets are
named entries of the same mechanism (`pipeline.problem.models:fc`, `pipeline.problem.data:digits`).

Stored form (the root attribute `problem`):

    {"model": {"factory": "pkg.mod:attr", "kwargs": {...}},
     "data":  {"factory": "pkg.mod:attr", "kwargs": {...}},
     "loss":  {"kind": "cross-entropy" | "mse" | "token-cross-entropy"}  or  {"factory": ..., "kwargs": ...},
     "fingerprints": {"train": "blake2b:...", ...}}

The fingerprints are content hashes of each split as training saw it; compute refuses to evaluate data
that hashes differently (see `check_fingerprints`), so L can never silently be another data set.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
from torch import nn

from pipeline.errors import ProblemError
from pipeline.problem import losses, refs
from pipeline.problem.splits import Split, to_split

TRAIN = "train"


@dataclass(frozen=True)
class Ref:
    """A factory reference: `factory(**kwargs)` builds the thing."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"factory": self.factory, "kwargs": copy.deepcopy(self.kwargs)}

    @classmethod
    def parse(cls, value: Any, what: str) -> "Ref":
        """From "mod:attr", {"factory": ..., "kwargs": ...} or a Ref."""
        if isinstance(value, Ref):
            return value
        if isinstance(value, str):
            return cls(refs.check_ref(value, f"{what}.factory"))
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"factory", "kwargs"})
            if unknown:
                raise ProblemError(f"{what} has unknown key {unknown[0]!r}; valid keys: factory, kwargs")
            return cls(refs.check_ref(value.get("factory"), f"{what}.factory"),
                       refs.check_kwargs(dict(value.get("kwargs") or {}), f"{what}.kwargs"))
        raise ProblemError(f"{what} must be \"package.module:attr\" or {{factory, kwargs}}, got {type(value).__name__}")

    def __str__(self) -> str:
        return self.factory + (f" {json.dumps(self.kwargs, sort_keys=True)}" if self.kwargs else "")


@dataclass(frozen=True)
class LossSpec:
    """A built-in loss `kind`, or a factory returning `loss(output, targets) -> (summed loss, count)`."""

    kind: str | None = "cross-entropy"
    ref: Ref | None = None

    def to_json(self) -> dict[str, Any]:
        return self.ref.to_json() if self.ref else {"kind": self.kind}

    @classmethod
    def parse(cls, value: Any) -> "LossSpec":
        if isinstance(value, LossSpec):
            return value
        if value is None:
            return cls()
        if isinstance(value, str):
            if value in losses.KINDS:
                return cls(kind=value)
            if ":" in value:
                return cls(kind=None, ref=Ref.parse(value, "loss"))
            return cls._bad_kind(value)
        if isinstance(value, Mapping):
            if "kind" in value:
                if set(value) - {"kind"}:
                    raise ProblemError("loss takes either kind or factory (with kwargs), not both")
                return cls(kind=value["kind"]) if value["kind"] in losses.KINDS else cls._bad_kind(value["kind"])
            return cls(kind=None, ref=Ref.parse(value, "loss"))
        raise ProblemError(f"loss must be a kind ({', '.join(losses.KINDS)}) or a factory, got {type(value).__name__}")

    @staticmethod
    def _bad_kind(kind: Any) -> "LossSpec":
        raise ProblemError(f"loss kind must be one of {', '.join(losses.KINDS)} (or factory = \"module:attr\"); "
                           f"got {kind!r}")

    def build(self) -> Callable[..., Any]:
        if self.ref is None:
            return losses.KINDS[str(self.kind)]
        fn = refs.call(self.ref.factory, self.ref.kwargs, "loss factory")
        if not callable(fn):
            raise ProblemError(f"loss factory {self.ref.factory!r} returned a {type(fn).__name__}, not a callable "
                               f"loss(output, targets) -> (summed loss, count)")
        return fn

    def __str__(self) -> str:
        return str(self.ref) if self.ref else str(self.kind)


@dataclass(frozen=True)
class Problem:
    """Model, data and loss by reference, plus the fingerprints of the data training saw."""

    model: Ref | None = None
    data: Ref | None = None
    loss: LossSpec = field(default_factory=LossSpec)
    fingerprints: dict[str, str] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def define(cls, *, model: Any = None, data: Any = None, loss: Any = None) -> "Problem":
        """From references: `Problem.define(model="mynets:mlp", data={"factory": "mydata:splits",
        "kwargs": {...}}, loss="mse")`."""
        return cls(Ref.parse(model, "model") if model is not None else None,
                   Ref.parse(data, "data") if data is not None else None, LossSpec.parse(loss))

    @classmethod
    def from_workflow(cls, workflow: Any) -> "Problem":
        """The problem a workflow describes: `[model]`, `[data]`, `[loss]`, factory or shorthand."""
        from pipeline.problem import data as builtin_data
        from pipeline.problem import models as builtin_models

        wf = workflow
        if wf.data.factory:
            data = Ref(wf.data.factory, dict(wf.data.kwargs))
            if wf.data.train_samples:
                data = Ref("pipeline.problem.definition:first_samples",
                           {"factory": wf.data.factory, "kwargs": dict(wf.data.kwargs),
                            "train_samples": wf.data.train_samples})
        else:
            data = Ref(*builtin_data.factory_of(wf.data))
        loss = LossSpec(kind=None, ref=Ref(wf.loss.factory, dict(wf.loss.kwargs))) if wf.loss.factory \
            else LossSpec(kind=wf.loss.kind)
        if wf.model.factory:
            model = Ref(wf.model.factory, dict(wf.model.kwargs))
        else:
            if wf.data.factory:  # a built-in architecture on the user's data: shapes from the data itself
                split = cls(None, data).build_split(TRAIN)
                if not isinstance(split.inputs, torch.Tensor):
                    raise ProblemError(f"model.arch = {wf.model.arch!r} takes one input tensor, but the data "
                                       f"factory gives named inputs; use a model factory")
                shape, classes = tuple(split.inputs.shape[1:]), int(split.targets.max()) + 1
            else:
                shape, classes = builtin_data.shape_and_classes(wf.data)
            model = Ref(*builtin_models.factory_of(wf.model, shape, classes))
        return cls(model, data, loss)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model.to_json() if self.model else None,
                               "data": self.data.to_json() if self.data else None,
                               "loss": self.loss.to_json()}
        out["fingerprints"] = dict(self.fingerprints)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Problem":
        if not isinstance(d, Mapping):
            raise ProblemError(f"a problem definition must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"model", "data", "loss", "fingerprints"})
        if unknown:
            raise ProblemError(f"problem definition has unknown key {unknown[0]!r}; valid keys: model, data, "
                               f"loss, fingerprints")
        fps = d.get("fingerprints") or {}
        if not isinstance(fps, Mapping) or not all(isinstance(v, str) for v in fps.values()):
            raise ProblemError(f"problem fingerprints must map split names to strings, got {fps!r}")
        return cls(Ref.parse(d["model"], "model") if d.get("model") else None,
                   Ref.parse(d["data"], "data") if d.get("data") else None,
                   LossSpec.parse(d.get("loss")), {str(k): str(v) for k, v in fps.items()})

    def replace(self, **changes: Any) -> "Problem":
        return replace(self, **changes)

    # ---- building -------------------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """A fresh model from the factory (its weights are replaced by the trajectory's during LCA)."""
        if self.model is None:
            raise ProblemError("the problem names no model; give model = \"module:attr\" (or --workflow FILE)")
        model = refs.call(self.model.factory, self.model.kwargs, "model factory")
        if not isinstance(model, nn.Module):
            raise ProblemError(f"model factory {self.model.factory!r} returned a {type(model).__name__}, not a "
                               f"torch.nn.Module")
        return model

    def build_data(self) -> Mapping[str, Any]:
        if self.data is None:
            raise ProblemError("the problem names no data; give data = \"module:attr\" (or --workflow FILE)")
        splits = refs.call(self.data.factory, self.data.kwargs, "data factory")
        if not isinstance(splits, Mapping):
            raise ProblemError(f"data factory {self.data.factory!r} returned a {type(splits).__name__}; return "
                               f"a dict {{split name: (inputs, targets) or a Dataset}}")
        if TRAIN not in splits:
            raise ProblemError(f"data factory {self.data.factory!r} returned splits {sorted(splits)} without "
                               f"{TRAIN!r}; LCA needs the training split (the data the model was trained on)")
        return splits

    def build_split(self, name: str, splits: Mapping[str, Any] | None = None) -> Split:
        splits = self.build_data() if splits is None else splits
        if name not in splits:
            raise ProblemError(f"data factory {self.data.factory if self.data else '?'!r} has no split {name!r} "
                               f"(it has {', '.join(sorted(splits))}); compute only those splits")
        return to_split(splits[name], f"split {name!r} of {self.data.factory if self.data else 'the data'}")

    def build_loss(self) -> Callable[..., Any]:
        return self.loss.build()

    # ---- provenance --------------------------------------------------------------------------------

    def with_fingerprints(self, names: tuple[str, ...] | None = None) -> "Problem":
        """This problem with the fingerprints of its splits (all of them unless `names`), built here."""
        splits = self.build_data()
        names = tuple(splits) if names is None else names
        return replace(self, fingerprints={n: self.build_split(n, splits).fingerprint() for n in names if n in splits})

    def writer_attrs(self) -> dict[str, Any]:
        """`TrajectoryWriter.create(..., attrs=problem.writer_attrs())` (or `problem=problem`): records the
        definition and the data's fingerprints, so `lca compute STORE` needs nothing more."""
        return {"problem": (self if self.fingerprints or self.data is None else self.with_fingerprints()).to_json()}

    def module_roots(self) -> list[str]:
        """Folders the factories were imported from (not installed packages), for workers to import them."""
        roots = []
        for ref in (self.model, self.data, self.loss.ref):
            if ref is not None:
                root = refs.module_root(ref.factory)
                if root and root not in roots:
                    roots.append(root)
        return roots

    def describe(self) -> list[str]:
        lines = [f"model       {self.model or '(not recorded)'}",
                 f"data        {self.data or '(not recorded)'}",
                 f"loss        {self.loss}"]
        for name, fp in sorted(self.fingerprints.items()):
            lines.append(f"fingerprint {name}: {fp}")
        if not self.fingerprints:
            lines.append("fingerprint (none recorded: the data cannot be checked)")
        return lines


def check_fingerprint(expected: str | None, actual: str, split: str, problem: Problem, store: str) -> None:
    """One line naming both fingerprints when the data to evaluate is not the data training saw."""
    if expected and expected != actual:
        raise ProblemError(
            f"the {split} data to evaluate ({problem.data}) has fingerprint {actual}, but {store} was trained "
            f"on data with fingerprint {expected}; L would be another data set's loss: use the data the run "
            f"was trained on")


def first_samples(factory: str, kwargs: dict[str, Any], train_samples: int) -> dict[str, Any]:
    """Data factory wrapper for `data.train_samples` on a user's factory: the first N training samples."""
    from pipeline.problem.splits import _map

    splits = dict(refs.call(factory, kwargs, "data factory"))
    if TRAIN in splits:
        s = to_split(splits[TRAIN], f"split {TRAIN!r} of {factory}")
        n = min(int(train_samples), len(s))
        splits[TRAIN] = Split(_map(s.inputs, lambda v: v[:n]), s.targets[:n])
    return splits


def check_loss_value(value: Any, what: str, finite: bool = True) -> tuple[torch.Tensor, float]:
    """The loss contract, checked on one batch: (a finite scalar sum, a positive count)."""
    if not (isinstance(value, tuple) and len(value) == 2):
        raise ProblemError(f"{what} returned a {type(value).__name__}; a loss must return (summed loss, count), "
                           f"e.g. (F.mse_loss(pred, y, reduction='sum'), y.numel())")
    total, count = value
    if not isinstance(total, torch.Tensor) or total.numel() != 1:
        shape = list(total.shape) if isinstance(total, torch.Tensor) else type(total).__name__
        raise ProblemError(f"{what} returned a summed loss of shape {shape}; it must be a scalar tensor "
                           f"(reduce with reduction='sum')")
    c = float(count.detach() if isinstance(count, torch.Tensor) else count)
    if finite and not math.isfinite(float(total.detach())):
        raise ProblemError(f"{what} returned a non-finite loss ({float(total)}) at the first checkpoint; check "
                           f"the model, the data and the loss")
    if finite and not (math.isfinite(c) and c > 0):
        raise ProblemError(f"{what} returned count {c}; the count it averages over must be positive")
    return total, c
