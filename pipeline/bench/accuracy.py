"""Bench section "Accuracy": what each rule and setting costs and how exact it is, per parameter.

How to read the accuracy table
------------------------------
For every step of a real trajectory the full-split gradient is taken, in float64, at all 33 points k/32 of
the step's path; Simpson's rule with n = 32 on those points is the reference (per-parameter LCA converges
like 1/n, so n = 32 is about 10x tighter than the rules measured). Each row is one rule and setting of
`pipeline.lca.integrate.integrate_block` run on the same steps, its gradients served from those 33 points
(exactly the points it would evaluate, bit for bit), so a row costs no gradient of its own:

- "grads/step": new full-split gradients per step in a continuous run (the start gradient is the previous
  step's end, so it is not counted);
- "rel err med / p99": |LCA_i - ref_i| / |ref_i| over every (step, parameter) with ref_i != 0;
- "L1 err med / max": per step, sum_i |LCA_i - ref_i| / sum_i |ref_i|: the error of a layer or unit sum,
  or of a ranking, is of this order;
- "est med": the stored estimate `lca/error` (same normalisation as L1); "est bounds": the share of steps
  where the estimate is at least the true L1 error (target: at least 90%);
- "helped": the mean over steps of the fraction of moving parameters with LCA < 0, and "d helped" its
  difference to the reference's (the paper's first statistic);
- "max |r|" and "% |r|<=1e-4": the conservation residual the rule leaves (float64 gradients here, so
  this is the rule's own error, not rounding).

"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from pipeline.lca.integrate import integrate_block, simpson_weights

TITLE = "Accuracy per parameter: rules against float64 Simpson n = 32 (same steps, same gradients)"
COLUMNS = [
    ("run", "run", "s", 1), ("rule", "rule", "s", 1), ("setting", "setting", "s", 1),
    ("steps", "steps", "d", 1), ("grads/step", "grads_per_step", ".3f", 1),
    ("rel err med", "rel_err_median", ".2e", 1), ("rel err p99", "rel_err_p99", ".2e", 1),
    ("L1 err med", "l1_err_median", ".2e", 1), ("L1 err max", "l1_err_max", ".2e", 1),
    ("est med", "estimate_median", ".2e", 1), ("est bounds %", "estimate_bounds", ".1f", 100),
    ("helped %", "helped", ".2f", 100), ("d helped", "helped_diff", "+.1e", 1),
    ("max |r|", "max_abs_residual", ".1e", 1), ("% |r|<=1e-4", "within_1e-4", ".1f", 100),
]
REF_N = 32

# (rule, label, integrate_block keyword arguments)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("first-order", "-", {}),
    ("fast", "tol 1e-3 (paper)", {"tol": 1e-3}),
    ("fast", "tol 1e-4", {"tol": 1e-4}),
    ("fast", "tol 1e-3, rtol 1e-2", {"tol": 1e-3, "rtol": 1e-2}),
    ("rk4", "n = 2 fixed", {"tol": 1.0, "max_splits": 2}),
    ("rk4", "tol 1e-3 (paper)", {"tol": 1e-3}),
    ("rk4", "tol 1e-4 (default)", {"tol": 1e-4}),
    ("rk4", "tol 1e-4, rtol 1e-2", {"tol": 1e-4, "rtol": 1e-2}),
    ("rk4", "tol 1e-4, rtol 3e-3", {"tol": 1e-4, "rtol": 3e-3}),
    ("rk4", "n = 8 fixed", {"tol": 0.0, "max_splits": 8}),
    ("rk4", "n = 16 fixed", {"tol": 0.0, "max_splits": 16}),
]


@dataclass
class Case:
    """One trajectory to measure on: the model (for shapes), its evaluation data and checkpoints."""

    run: str
    model: nn.Module
    layout: Any
    inputs: torch.Tensor
    targets: torch.Tensor
    rows: np.ndarray          # float32 [T + 1, P]
    batch_size: int
    reference: np.ndarray | None = field(default=None, repr=False)  # float64 [T, P], filled by measure


# ---------------------------------------------------------------------------------------------------------
# trajectories


def case_from_workflow(run: str, name: str, steps: int, scratch: Path, *, samples: int = 0) -> Case:
    """A shipped workflow cut to `steps` (and its training split to `samples`), trained by our trainer."""
    from pipeline.bench.runs import evaluator_for, run_workflow, train_store

    wf = run_workflow(name, steps, min(64, steps), torch.device("cpu"))
    if samples:
        wf = wf.replace(data={"train_samples": samples}, lca={"eval_batch_size": samples})
    store = scratch / f"accuracy-{run}.zarr"
    train_store(wf, store)
    reader, wf, ev = evaluator_for(store, torch.device("cpu"), "fp64")
    rows = np.asarray(reader.params(0, reader.num_checkpoints))
    model = _model_of(wf, ev)
    return Case(run, model, reader.layout, ev.inputs.float().cpu(), ev.targets.cpu(), rows, ev.batch_size)


def _model_of(wf, ev) -> nn.Module:
    from pipeline.problem.models import build_model

    torch.manual_seed(wf.seed)
    return build_model(wf.model, tuple(ev.inputs.shape[1:]), int(ev.targets.max()) + 1)


def small_conv(batch_norm: bool) -> nn.Module:
    """A small conv net for 8x8 digits, with or without BatchNorm (batch statistics in L)."""
    def bn(c: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(c)] if batch_norm else []

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), *bn(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), *bn(16), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def case_trained_here(run: str, model: nn.Module, steps: int, *, samples: int = 0, lr: float = 0.05,
                      seed: int = 0) -> Case:
    """A model our workflows do not name, trained by a plain SGD-momentum loop on digits (minibatch 64)."""
    from pipeline.config import DataConfig
    from pipeline.problem.data import load_split
    from trajectory_store.layout import ParamLayout

    x, y = load_split(DataConfig(dataset="digits", train_samples=samples), "train")
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if x.dim() == 2:
        x = x.view(-1, 1, 8, 8)
    torch.manual_seed(seed)
    layout = ParamLayout.from_model(model)
    initial = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    rows = [layout.flatten(model)]
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        rows.append(layout.flatten(model))
    with torch.no_grad():  # hand back the model at theta_0 (only its shapes matter to the evaluator)
        for p, p0 in zip(model.parameters(), initial):
            p.copy_(p0)
    return Case(run, model, layout, x, y, np.stack(rows).astype(np.float32), len(y))


# ---------------------------------------------------------------------------------------------------------
# measuring


def _key(theta: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(theta).tobytes(), digest_size=16).digest()


def _points(a: np.ndarray, b: np.ndarray, n: int) -> list[np.ndarray]:
    """The path points k/n as the integrator forms them (so a lookup by value finds them exactly)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    out = []
    for k in range(n + 1):
        s = k / n
        out.append(a64 if s == 0.0 else b64 if s == 1.0 else a64 + s * (b64 - a64))
    return out


def _helped(lca: np.ndarray) -> float:
    moved = lca != 0
    return float((lca < 0).sum() / max(1, moved.sum()))


@dataclass
class _Tally:
    points: list[int] = field(default_factory=list)
    rel: list[np.ndarray] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    est: list[float] = field(default_factory=list)
    helped: list[float] = field(default_factory=list)
    residual: list[float] = field(default_factory=list)

    def add(self, lca: np.ndarray, ref: np.ndarray, points: int, estimate: float, residual: float) -> None:
        err = np.abs(lca.astype(np.float64) - ref)
        nz = ref != 0
        self.rel.append((err[nz] / np.abs(ref[nz])).astype(np.float32))
        self.l1.append(float(err.sum() / max(np.abs(ref).sum(), 1e-300)))
        self.points.append(points)
        self.est.append(estimate)
        self.helped.append(_helped(lca))
        self.residual.append(residual)


def measure(case: Case, configs: list[tuple[str, str, dict[str, Any]]] = CONFIGS,
            progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The accuracy rows of one case; fills `case.reference` for the precision section."""
    from pipeline.lca.evaluate import Evaluator

    ev = Evaluator(case.model, case.layout, case.inputs, case.targets, batch_size=case.batch_size,
                   precision="fp64", mode="loop")
    steps = len(case.rows) - 1
    weights = simpson_weights(REF_N)
    tallies = {i: _Tally() for i in range(len(configs))}
    ref_tally = _Tally()
    case.reference = np.empty((steps, case.layout.size), np.float64)
    for t in range(steps):
        a, b = case.rows[t], case.rows[t + 1]
        pts = _points(a, b, REF_N)
        cache: dict[bytes, tuple[float, np.ndarray]] = {}
        mean = np.zeros(case.layout.size)
        for p, w in zip(pts, weights):
            loss, grad = ev.loss_and_grad(p[None])
            cache[_key(p)] = (float(loss[0]), grad[0])
            mean += w * grad[0]
        ref = (b.astype(np.float64) - a.astype(np.float64)) * mean
        case.reference[t] = ref
        ref_tally.helped.append(_helped(ref))

        def served(thetas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            hits = [cache[_key(th)] for th in np.asarray(thetas, np.float64)]
            return np.array([h[0] for h in hits]), np.stack([h[1] for h in hits])

        for i, (rule, _, kw) in enumerate(configs):
            kw = {"max_splits": REF_N, **kw}
            res = integrate_block(served, case.rows[t:t + 2], rule=rule, points_per_pass=1, **kw)
            tallies[i].add(res.lca[0], ref, int(res.points[0]) - 1, float(res.error[0]), float(res.residual[0]))
        if progress and (t + 1) % max(1, steps // 4) == 0:
            progress(f"  accuracy {case.run}: {t + 1}/{steps} steps")
    ref_helped = float(np.mean(ref_tally.helped))
    rows = []
    for i, (rule, label, _) in enumerate(configs):
        tl = tallies[i]
        rel = np.concatenate(tl.rel)
        l1, est, r = np.array(tl.l1), np.array(tl.est), np.abs(np.array(tl.residual))
        helped = float(np.mean(tl.helped))
        rows.append({
            "run": case.run, "rule": rule, "setting": label, "steps": steps, "params": case.layout.size,
            "grads_per_step": float(np.mean(tl.points)),
            "rel_err_median": float(np.median(rel)), "rel_err_p99": float(np.quantile(rel, 0.99)),
            "l1_err_median": float(np.median(l1)), "l1_err_max": float(l1.max()),
            "estimate_median": float(np.median(est)), "estimate_bounds": float((est >= l1).mean()),
            "helped": helped, "helped_reference": ref_helped, "helped_diff": helped - ref_helped,
            "max_abs_residual": float(r.max()), "within_1e-4": float((r <= 1e-4).mean()),
            "within_1e-3": float((r <= 1e-3).mean()),
        })
    return rows


# ---------------------------------------------------------------------------------------------------------
# the sections


def cases(scratch: Path, *, smoke: bool, fashion: bool) -> list[Case]:
    if smoke:
        return [case_from_workflow("digits-fc", "digits-fc", 3, scratch),
                case_trained_here("digits-bn-conv", small_conv(True), 2, samples=128)]
    out = [case_from_workflow("digits-fc", "digits-fc", 300, scratch)]
    if fashion:
        out.append(case_from_workflow("fashion-fc (first 2000 images)", "fashion-fc", 64, scratch,
                                      samples=2000))
    out.append(case_trained_here("digits-bn-conv", small_conv(True), 100))
    out.append(case_trained_here("digits-conv", small_conv(False), 100))
    return out


def run_sections(emit: Callable[[str, list[dict[str, Any]]], None], scratch: Path, *, smoke: bool,
                 fashion: bool, device: torch.device) -> None:
    """Emit "accuracy", then "precision_choice" (which reuses each case's float64 reference)."""
    from pipeline.bench import precision_choice

    scratch.mkdir(parents=True, exist_ok=True)
    all_cases = cases(scratch, smoke=smoke, fashion=fashion)
    rows: list[dict[str, Any]] = []
    for case in all_cases:
        rows += measure(case, progress=None if smoke else print)
    emit("accuracy", rows)
    precisions = ("fp32", "fp64") + (("tf32",) if device.type == "cuda" else ())
    rows = []
    for case in all_cases:
        if case.run != "digits-fc" or smoke:  # fp32 = fp64 on digits-fc is known; the conv nets are the question
            rows += precision_choice.measure_precision(case, device=device, precisions=precisions)
    emit("precision_choice", rows)
