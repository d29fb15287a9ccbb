"""Section 2, the conservation residual under each precision.

"Conservation residual" -- r_t = L(theta_{t+1}) - L(theta_t) - sum_i LCA_{t,i} with the coarsest rule
(Simpson, n = 2, no refinement) on a short real trajectory, under each precision. fp64 shows the rule's
own error; fp32 / tf32 add rounding. Compare with the tolerance (1e-4 by default) and with mean |dL|.
A precision that is fast but pushes |r| towards the tolerance costs refinements (table 3) instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench.runs import evaluator_for

TITLE = "2. Conservation residual at Simpson n = 2 under each precision (no refinement)"
# (header, json key, format spec, scale): see pipeline/bench/table.py
COLUMNS = [
    ("run", "run", "s", 1), ("precision", "precision", "s", 1), ("steps", "steps", "d", 1),
    ("Simpson n", "splits", "d", 1), ("mean |dL|", "mean_abs_loss_change", ".3e", 1),
    ("mean |r|", "mean_abs_residual", ".3e", 1), ("max |r|", "max_abs_residual", ".3e", 1),
    ("% within tol", "within_tol", ".1f", 100), ("seconds", "seconds", ".2f", 1),
]


def bench_precision(store: Path, run: str, device: torch.device) -> list[dict[str, Any]]:
    from pipeline.lca.evaluate import set_precision
    from pipeline.lca.integrate import integrate_block

    rows = []
    for precision in ("fp32", "fp64") + (("tf32",) if device.type == "cuda" else ()):
        reader, wf, ev = evaluator_for(store, device, precision)
        set_precision(precision)  # type: ignore[arg-type]
        params = reader.params(0, reader.num_checkpoints)
        t0 = time.perf_counter()
        res = integrate_block(ev.loss_and_grad, params, rule="rk4", tol=wf.lca.tol, max_splits=2,
                              points_per_pass=ev.points_per_pass)
        seconds = time.perf_counter() - t0
        r = np.abs(res.residual)
        rows.append({
            "run": run, "precision": precision, "steps": int(reader.num_steps), "splits": 2,
            "mean_abs_loss_change": float(np.abs(np.diff(res.loss)).mean()),
            "mean_abs_residual": float(r.mean()), "max_abs_residual": float(r.max()),
            "tol": float(wf.lca.tol), "within_tol": float((r <= wf.lca.tol).mean()), "seconds": seconds,
        })
        del ev
    set_precision("fp32")
    return rows
