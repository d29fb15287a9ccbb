"""The paper's training interventions, resolved against a model: optimizer groups, freezing, L2 penalties.

`resolve(workflow, model, steps)` turns the `[interventions]` section (globs over parameter names) into a
`Plan` that names, for every tensor, the settings it trains under; it is checked before the store exists,
so a glob that matches nothing or a unit index past a tensor's units never leaves a half-written store.
The loop then calls three hooks: `optimizer()`, `penalty(model)` added to the minibatch loss, and
`after_step(t, model)` which holds frozen entries at their values (exactly: they are copied back after the
update, so momentum or weight decay cannot move them and their LCA is exactly zero). `record()` is what
the store keeps as the root attribute `interventions`: the resolved settings per tensor and how many
steps each tensor actually moved, so `lca info` shows which parameters moved under which settings.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.config import OptimizerConfig, Workflow
from pipeline.errors import WorkflowError


@dataclass
class _Freeze:
    index: int                    # position in interventions.freeze, for messages and the record
    from_step: int
    mode: str
    units: list[int]              # empty: the whole tensor
    mask: torch.Tensor | None     # bool, same shape as the tensor; None: the whole tensor
    saved: torch.Tensor | None = None


@dataclass
class TensorPlan:
    """Everything that decides how one parameter tensor trains."""
    name: str
    group: int | None                          # index into interventions.groups; None: [optimizer]
    lr: float
    momentum: float | None
    weight_decay: float
    l2: float = 0.0
    freezes: list[_Freeze] = field(default_factory=list)
    steps_moved: int = 0
    steps_moved_frozen: int = 0                # steps it moved although frozen (always 0: a check)
    path_l1: float = 0.0                       # sum over steps of |theta_{t+1} - theta_t|_1

    def settings(self) -> dict[str, Any]:
        return {
            "group": self.group, "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay,
            "l2": self.l2,
            "freeze": [{"rule": f.index, "from_step": f.from_step, "mode": f.mode, "units": f.units or "all"}
                       for f in self.freezes],
            "steps_moved": self.steps_moved, "steps_moved_while_frozen": self.steps_moved_frozen,
            "path_l1": self.path_l1,
        }


def _match(globs: list[str], names: list[str], where: str, source: str) -> list[str]:
    out: list[str] = []
    for g in globs:
        hit = fnmatch.filter(names, g)
        if not hit:
            shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
            raise WorkflowError(f"{source}: {where}.params glob {g!r} matches no parameter; "
                                f"the model's parameters are: {shown}")
        out += [n for n in hit if n not in out]
    return out


def _momentum(opt: OptimizerConfig) -> float | None:
    return opt.momentum if opt.name == "momentum" else None


class Plan:
    """The resolved interventions of one run (see the module docstring)."""

    def __init__(self, workflow: Workflow, model: nn.Module, steps: int, source: str | None = None) -> None:
        src = source or f"workflow {workflow.name!r}"
        iv, opt = workflow.interventions, workflow.optimizer
        self.workflow = workflow
        self.params = dict(model.named_parameters())
        names = list(self.params)
        self.tensors = {n: TensorPlan(n, None, opt.lr, _momentum(opt), opt.weight_decay) for n in names}
        for i, g in enumerate(iv.groups):
            if opt.name != "momentum" and g.momentum is not None:
                raise WorkflowError(f"{src}: interventions.groups[{i}].momentum needs optimizer.name = "
                                    f"'momentum', not {opt.name!r}")
            for n in _match(g.params, names, f"interventions.groups[{i}]", src):
                t = self.tensors[n]
                if t.group is not None:
                    continue  # first matching group wins
                t.group = i
                t.lr = opt.lr if g.lr is None else g.lr
                t.momentum = t.momentum if g.momentum is None else g.momentum
                t.weight_decay = opt.weight_decay if g.weight_decay is None else g.weight_decay
        for i, p in enumerate(iv.penalty):
            for n in _match(p.params, names, f"interventions.penalty[{i}]", src):
                self.tensors[n].l2 += p.l2
        for i, f in enumerate(iv.freeze):
            if f.from_step >= steps:
                raise WorkflowError(f"{src}: interventions.freeze[{i}].from_step = {f.from_step} is beyond the "
                                    f"run's {steps} steps (0..{steps - 1}); lower it")
            for n in _match(f.params, names, f"interventions.freeze[{i}]", src):
                self.tensors[n].freezes.append(_Freeze(i, f.from_step, f.mode, list(f.units),
                                                       self._unit_mask(n, f.units, i, src)))

    def _unit_mask(self, name: str, units: list[int], i: int, src: str) -> torch.Tensor | None:
        if not units:
            return None
        p = self.params[name]
        n_units = p.shape[0] if p.dim() else 1  # the unit axis is 0 for every built-in tensor (ParamLayout)
        bad = [u for u in units if u >= n_units]
        if bad:
            raise WorkflowError(f"{src}: interventions.freeze[{i}].units {bad} are past the {n_units} units "
                                f"of {name!r} (indices 0..{n_units - 1})")
        mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        mask[units] = True
        return mask

    @property
    def active(self) -> bool:
        iv = self.workflow.interventions
        return bool(iv.groups or iv.freeze or iv.penalty)

    # -- the loop's hooks ------------------------------------------------------------------------------------

    def optimizer(self) -> torch.optim.Optimizer:
        """One torch param group per distinct (lr, momentum, weight decay), in parameter order; each keeps its
        rate relative to optimizer.lr as `lr_scale`, which the loop multiplies by the scheduled rate. Without
        interventions this is one group of all parameters: the same optimizer as before."""
        from pipeline.train.loop import make_optimizer

        opt = self.workflow.optimizer
        groups: dict[tuple, list[nn.Parameter]] = {}
        for n, t in self.tensors.items():
            groups.setdefault((t.lr, t.momentum, t.weight_decay), []).append(self.params[n])
        param_groups = []
        for (lr, momentum, wd), ps in groups.items():
            g: dict[str, Any] = {"params": ps, "lr": lr, "weight_decay": wd, "lr_scale": lr / opt.lr}
            if momentum is not None:
                g["momentum"] = momentum
            param_groups.append(g)
        return make_optimizer(opt, param_groups)  # type: ignore[arg-type]  (torch takes groups as dicts)

    def prepare(self) -> None:
        """Before theta_0 is recorded: prune what is pruned from step 0, so the run starts pruned."""
        self._apply(0)

    def penalty(self) -> torch.Tensor | None:
        terms = [0.5 * t.l2 * self.params[n].pow(2).sum() for n, t in self.tensors.items() if t.l2 > 0]
        return torch.stack(terms).sum() if terms else None

    def before_step(self, step: int) -> None:
        """Snapshot the entries that freeze from this step, before the update that would move them."""
        if step > 0:
            self._apply(step)

    def after_step(self, step: int, previous: dict[str, torch.Tensor] | None) -> None:
        """Hold frozen entries; count which tensors moved (for the record)."""
        with torch.no_grad():
            for n, t in self.tensors.items():
                p = self.params[n]
                for f in t.freezes:
                    if step >= f.from_step and f.saved is not None:
                        if f.mask is None:
                            p.copy_(f.saved)
                        else:
                            p[f.mask] = f.saved
                if previous is not None:
                    d = (p - previous[n]).abs()
                    moved = bool((d > 0).any())
                    t.steps_moved += moved
                    t.path_l1 += float(d.sum(dtype=torch.float64))
                    frozen = [f for f in t.freezes if step >= f.from_step]
                    if frozen and moved:
                        if any(f.mask is None for f in frozen):
                            still = torch.ones_like(d, dtype=torch.bool)
                        else:
                            still = torch.stack([f.mask for f in frozen]).any(0)
                        t.steps_moved_frozen += bool((d[still] > 0).any())

    def snapshot(self) -> dict[str, torch.Tensor] | None:
        """theta_t per tensor, to measure the step's motion (only when interventions are active)."""
        if not self.active:
            return None
        return {n: p.detach().clone() for n, p in self.params.items()}

    def _apply(self, step: int) -> None:
        with torch.no_grad():
            for n, t in self.tensors.items():
                p = self.params[n]
                for f in t.freezes:
                    if f.from_step != step or f.saved is not None:
                        continue
                    if f.mode == "prune":
                        if f.mask is None:
                            p.zero_()
                        else:
                            p[f.mask] = 0
                    f.saved = p.detach().clone() if f.mask is None else p.detach()[f.mask].clone()

    # -- the record ------------------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The root attribute `interventions` (JSON): the section as written and the resolved per-tensor plan."""
        import dataclasses

        return {"section": dataclasses.asdict(self.workflow.interventions),
                "tensors": {n: t.settings() for n, t in self.tensors.items()}}


def resolve(workflow: Workflow, model: nn.Module, steps: int, source: str | None = None) -> Plan:
    """Check the interventions against `model`'s parameters and a run of `steps` steps; see `Plan`."""
    return Plan(workflow, model, steps, source)


def describe(record: dict[str, Any] | None) -> list[str]:
    """Lines for `lca info`: which tensors trained under which settings, and how many steps each moved."""
    if not record:
        return []
    tensors = record.get("tensors", {})
    section = record.get("section", {})
    if not any(section.get(k) for k in ("groups", "freeze", "penalty")):
        return []
    lines = ["interventions (settings per tensor; moved = steps on which any of its entries changed)"]
    width = max(len(n) for n in tensors) if tensors else 10
    lines.append(f"  {'tensor':<{width}}  {'lr':>8} {'mom':>5} {'wd':>8} {'l2':>8}  {'frozen':<18} moved")
    for n, t in tensors.items():
        frz = ", ".join(f"{'units ' + str(len(f['units'])) if isinstance(f['units'], list) else 'all'}"
                        f"{' pruned' if f['mode'] == 'prune' else ''} from {f['from_step']}" for f in t["freeze"])
        mom = "-" if t["momentum"] is None else f"{t['momentum']:g}"
        lines.append(f"  {n:<{width}}  {t['lr']:>8g} {mom:>5} {t['weight_decay']:>8g} {t['l2']:>8g}  "
                     f"{frz or '-':<18} {t['steps_moved']}"
                     + (f" (moved while frozen: {t['steps_moved_while_frozen']})"
                        if t["steps_moved_while_frozen"] else ""))
    return lines
