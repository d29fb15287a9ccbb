"""Workflows: declarative experiment definitions in TOML, validated into frozen dataclasses.

Every section is a dataclass whose fields are the only valid keys; a field's `metadata["choices"]` lists
the valid values. Validation is strict because a typo in a sweep (`lr_shedule = ...`) that silently falls
back to a default wastes a GPU-day. The validated workflow is stored, as JSON, in every trajectory store so
that LCA workers rebuild exactly the model and data the run used.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import WorkflowError

DATASETS = ("digits", "fashion-mnist", "cifar10", "synthetic")
ARCHS = ("fc", "lenet", "resnet20")
OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "step", "cosine")
RULES = ("rk4", "fast", "first-order")
SPLITS = ("train", "heldout")
PRECISIONS = ("fp32", "tf32", "fp64")
LOSSES = ("cross-entropy", "mse", "token-cross-entropy")


def _choice(default: Any, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _choice("digits", DATASETS)
    # Where the files are; "" means the default: $LCA_DATA_DIR or ./data (fashion-mnist), $LCA_CIFAR10 (cifar10).
    path: str = ""
    # 0: the whole training split. N > 0: only its first N samples, for both training and the full-split
    # loss that LCA integrates (a CPU-sized run of a model whose full split needs a GPU).
    train_samples: int = 0
    # Only for dataset = "synthetic" (timing runs): sample count, input shape and class count.
    synthetic_samples: int = 1024
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 28, 28])
    synthetic_classes: int = 10
    # Your own data instead of `dataset`: "package.module:attr" returning {split: (inputs, targets) or a
    # torch Dataset}, called with `kwargs` (see pipeline/problem/). Only train_samples applies to it too.
    factory: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = _choice("fc", ARCHS)
    hidden: list[int] = field(default_factory=lambda: [100, 50])  # fc only: hidden layer widths
    # Your own model instead of `arch`: "package.module:attr" returning an nn.Module, called with `kwargs`.
    factory: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossConfig:
    """What L averages: a built-in `kind`, or `factory` ("package.module:attr" called with `kwargs`,
    returning `loss(output, targets) -> (summed loss, count)`)."""

    kind: str = _choice("cross-entropy", LOSSES)
    factory: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = _choice("momentum", OPTIMIZERS)
    lr: float = 0.05
    momentum: float = 0.9          # "momentum" only
    nesterov: bool = False         # "momentum" only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # "adam" only
    weight_decay: float = 0.0


@dataclass(frozen=True)
class ScheduleConfig:
    kind: str = _choice("constant", SCHEDULES)
    step_size: int = 1000          # "step": multiply the rate by gamma every step_size optimizer steps
    gamma: float = 0.1
    min_lr: float = 0.0            # "cosine": the rate at the last step


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64
    steps: int = 0                 # exactly one of steps and epochs is positive
    epochs: int = 0
    device: str = _choice("cpu", ("cpu", "cuda", "auto"))
    chunk_steps: int = 64          # checkpoints per store chunk; also the LCA block size


@dataclass(frozen=True)
class LCAConfig:
    rule: str = _choice("rk4", RULES)
    tol: float = 1e-4              # absolute bound on |residual| per step before refining (reference: 1e-3)
    # Bound on the estimated per-parameter error of a step, sum_i |error_i| / sum_i |LCA_i| (the embedded
    # coarser rule's difference); refinement goes on until both tol and rtol hold. 0: no such bound.
    rtol: float = 0.0
    max_splits: int = 32           # the finest composite-Simpson subdivision (2, 4, 8, 16 or 32)
    splits: list[str] = field(default_factory=lambda: ["train"])
    eval_batch_size: int = 4096    # fixed: with BatchNorm the full-set loss depends on it
    precision: str = _choice("fp32", PRECISIONS)


@dataclass(frozen=True)
class Workflow:
    name: str = "unnamed"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lca: LCAConfig = field(default_factory=LCAConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "workflow") -> "Workflow":
        _check_exclusive(raw, source)
        wf = _build(cls, raw, source, "")
        _check_semantics(wf, source)
        return wf

    def replace(self, **sections: Any) -> "Workflow":
        """A copy with some fields changed, e.g. `wf.replace(train={"steps": 10})`, validated again."""
        d = self.to_dict()
        for key, value in sections.items():
            if isinstance(value, Mapping):
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return Workflow.from_dict(d, f"workflow {self.name!r}")


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow TOML file; every problem is a one-line WorkflowError."""
    p = Path(path)
    if not p.is_file():
        known = sorted(x.name for x in Path("workflows").glob("*.toml")) if Path("workflows").is_dir() else []
        hint = f"; known workflows: {', '.join('workflows/' + k for k in known)}" if known else ""
        raise WorkflowError(f"workflow file {str(p)!r} does not exist{hint}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise WorkflowError(f"{p}: not valid TOML ({e}); fix the syntax at that line") from None
    raw.setdefault("name", p.stem)
    return Workflow.from_dict(raw, str(p))


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is dict:  # factory kwargs: a table of JSON values, stored in the store and sent to workers
        if not isinstance(value, Mapping):
            raise WorkflowError(f"{where} must be a table, e.g. {{ hidden = 64 }}; got {value!r}")
        try:
            return json.loads(json.dumps(dict(value), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise WorkflowError(f"{where} must hold only JSON values (no dates, NaN or inf): {e}") from None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise WorkflowError(f"{where} must be a list of {_type_name(item_tp)[3:]}s, got {value!r}")
        return [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise WorkflowError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, raw: Any, source: str, section: str) -> Any:
    label = f"[{section}]" if section else "the top level"
    if not isinstance(raw, Mapping):
        raise WorkflowError(f"{source}: {label} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise WorkflowError(
            f"{source}: unknown key {unknown[0]!r} in {label}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        tp, where = hints[name], f"{source}: {section + '.' if section else ''}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, source, name)
            continue
        value = _convert(value, tp, where)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise WorkflowError(f"{where} must be one of {', '.join(choices)}; got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


# Keys that the shorthand and the factory form of a section each own: giving both is ambiguous.
_SHORTHAND = {"model": ("arch", "hidden"), "data": ("dataset", "path", "synthetic_samples", "synthetic_shape",
                                                   "synthetic_classes"), "loss": ("kind",)}


def _check_exclusive(raw: Mapping[str, Any], source: str) -> None:
    for section, shorthand in _SHORTHAND.items():
        table = raw.get(section)
        if not isinstance(table, Mapping):
            continue
        # A key at its default does not count: `Workflow.to_dict()` writes every key, and must round-trip.
        cls = {"model": ModelConfig, "data": DataConfig, "loss": LossConfig}[section]
        defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                    for f in dataclasses.fields(cls)}
        both = [k for k in shorthand if k in table and table[k] != defaults[k]]
        if table.get("factory") and both:
            raise WorkflowError(f"{source}: [{section}] sets both factory and {both[0]}; keep one of them")
        if table.get("kwargs") and not table.get("factory"):
            raise WorkflowError(f"{source}: [{section}] has kwargs but no factory; add factory = \"module:attr\"")


def _check_semantics(wf: Workflow, source: str) -> None:
    def bad(msg: str) -> None:
        raise WorkflowError(f"{source}: {msg}")

    t, lca, opt = wf.train, wf.lca, wf.optimizer
    if (t.steps > 0) == (t.epochs > 0):
        bad("set exactly one of train.steps and train.epochs to a positive number")
    if t.steps < 0 or t.epochs < 0:
        bad("train.steps and train.epochs must not be negative")
    if t.batch_size < 1:
        bad(f"train.batch_size must be at least 1, got {t.batch_size}")
    if t.chunk_steps < 1:
        bad(f"train.chunk_steps must be at least 1, got {t.chunk_steps}")
    if not opt.lr > 0:
        bad(f"optimizer.lr must be positive, got {opt.lr}")
    if wf.data.train_samples < 0:
        bad(f"data.train_samples must be 0 (all) or positive, got {wf.data.train_samples}")
    if lca.max_splits not in (2, 4, 8, 16, 32):
        bad(f"lca.max_splits must be one of 2, 4, 8, 16, 32; got {lca.max_splits}")
    if not 0 < lca.tol < float("inf"):
        bad(f"lca.tol must be a positive finite number, got {lca.tol}")
    if not 0 <= lca.rtol < float("inf"):
        bad(f"lca.rtol must be 0 (no per-parameter target) or a positive finite number, got {lca.rtol}")
    if lca.eval_batch_size < 1:
        bad(f"lca.eval_batch_size must be at least 1, got {lca.eval_batch_size}")
    if not lca.splits or any(s not in SPLITS for s in lca.splits):
        bad(f"lca.splits must be a non-empty list drawn from {', '.join(SPLITS)}; got {lca.splits!r}")
    from pipeline.problem.refs import check_ref
    from pipeline.errors import ProblemError

    for section in ("model", "data", "loss"):
        ref = getattr(wf, section).factory
        if ref:
            try:
                check_ref(ref, f"{section}.factory")
            except ProblemError as e:
                bad(str(e))
    if wf.model.arch == "fc" and any(h < 1 for h in wf.model.hidden):
        bad(f"model.hidden widths must be positive, got {wf.model.hidden}")
