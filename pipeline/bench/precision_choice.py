"""Bench section "Precision choice": the pipeline in fp32 / fp64 (tf32 on a GPU) against float64 n = 32.

How to read the table
---------------------
The same reference, against the real pipeline (the worker's evaluator, default rule and tol) computed in
fp32 and in fp64 (tf32 too on a GPU): "grad rel diff" is max |g - g64| / max |g64| at theta_0; "rounding
L1" is sum |LCA_fp32 - LCA_fp64| / sum |ref| per step (median), the share of the per-parameter error that
precision, not the rule, causes; the other columns as in the accuracy section. A precision whose rounding L1 is well below the rule's
L1 error and whose residuals stay well inside tol costs nothing in accuracy.

The default precision follows from this table: see the README ("Accuracy and cost").
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pipeline.bench.accuracy import REF_N, Case, _helped
from pipeline.lca.integrate import integrate_block

TITLE = "Precision choice: the pipeline's rule (rk4, default tol) in each precision against float64 n = 32"
COLUMNS = [
    ("run", "run", "s", 1), ("precision", "precision", "s", 1), ("steps", "steps", "d", 1),
    ("grad rel diff", "grad_rel_diff", ".1e", 1), ("grads/step", "grads_per_step", ".3f", 1),
    ("mean |r|", "mean_abs_residual", ".2e", 1), ("max |r|", "max_abs_residual", ".2e", 1),
    ("% within tol", "within_tol", ".1f", 100), ("L1 err med", "l1_err_median", ".2e", 1),
    ("rounding L1 med", "rounding_l1_median", ".2e", 1), ("helped %", "helped", ".2f", 100),
    ("seconds", "seconds", ".1f", 1),
]


def measure_precision(case: Case, *, device: torch.device, tol: float = 1e-4,
                      precisions: tuple[str, ...] = ("fp32", "fp64")) -> list[dict[str, Any]]:
    """The real evaluator in each precision, default rule, against `case.reference` (run `measure` first)."""
    from pipeline.lca.evaluate import Evaluator, set_precision

    assert case.reference is not None, "measure(case) first: it computes the reference"
    ref = case.reference
    ref_l1 = np.abs(ref).sum(axis=1)
    g64 = None
    lcas: dict[str, np.ndarray] = {}
    rows = []
    for precision in precisions:
        ev = Evaluator(case.model, case.layout, case.inputs, case.targets, batch_size=case.batch_size,
                       device=device, precision=precision)  # type: ignore[arg-type]
        set_precision(precision)  # type: ignore[arg-type]
        _, g = ev.loss_and_grad(case.rows[:1].astype(ev.numpy_dtype))
        if precision == "fp64":
            g64 = g[0]
        t0 = time.perf_counter()
        res = integrate_block(ev.loss_and_grad, case.rows, rule="rk4", tol=tol, max_splits=REF_N,
                              points_per_pass=ev.points_per_pass, point_dtype=ev.numpy_dtype)
        seconds = time.perf_counter() - t0
        lcas[precision] = res.lca
        r = np.abs(res.residual)
        l1 = np.abs(res.lca.astype(np.float64) - ref).sum(axis=1) / np.maximum(ref_l1, 1e-300)
        rows.append({
            "run": case.run, "precision": precision, "steps": len(r), "grad0": g[0],
            "grads_per_step": float((res.points.sum() - 1) / len(r)),
            "mean_abs_residual": float(r.mean()), "max_abs_residual": float(r.max()),
            "within_tol": float((r <= tol).mean()), "tol": tol, "l1_err_median": float(np.median(l1)),
            "helped": float(np.mean([_helped(row) for row in res.lca])), "seconds": seconds,
        })
    set_precision("fp32")
    for row in rows:
        g = row.pop("grad0")
        if g64 is not None:
            row["grad_rel_diff"] = float(np.abs(g - g64).max() / max(np.abs(g64).max(), 1e-300))
        if "fp64" in lcas:
            diff = np.abs(lcas[row["precision"]].astype(np.float64) - lcas["fp64"]).sum(axis=1)
            row["rounding_l1_median"] = float(np.median(diff / np.maximum(ref_l1, 1e-300)))
    return rows


