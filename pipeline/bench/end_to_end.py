"""Section 3, LCA end to end at the default tolerance.

"LCA end to end" -- a real run through `compute_lca` on a Dask LocalCluster at the workflow's default
tolerance: gradient evaluations per step (the floor is 2, plus 1 per block; more means refinement),
the share of steps within tolerance, and steps per second, both in-process (one Evaluator, the same
blocks, no Dask) and through Dask (wall time including cluster start-up, so short runs understate it).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.bench.plan import Plan
from pipeline.bench.runs import evaluator_for

TITLE = "3. LCA end to end at the default tolerance (in-process and through Dask)"
# (header, json key, format spec, scale): see pipeline/bench/table.py
COLUMNS = [
    ("run", "run", "s", 1), ("steps", "steps", "d", 1), ("params", "params", ",d", 1),
    ("N samples", "samples", "d", 1), ("device", "device", "s", 1), ("workers", "workers", "d", 1),
    ("tol", "tol", ".0e", 1), ("grad evals/step", "points_per_step", ".3f", 1),
    ("% within tol", "within_tol", ".1f", 100), ("max |r|", "max_abs_residual", ".2e", 1),
    ("in-process steps/s", "in_process_steps_per_s", ".1f", 1), ("Dask s", "dask_s", ".1f", 1),
    ("Dask steps/s", "dask_steps_per_s", ".1f", 1),
]


def bench_lca(runs: Sequence[tuple[str, Path]], plan: Plan, device: torch.device) -> list[dict[str, Any]]:
    from pipeline.lca.compute import compute_lca
    from pipeline.lca.evaluate import set_precision
    from pipeline.lca.integrate import integrate_block

    rows = []
    for run, store in runs:
        # In-process: one evaluator over the same blocks the Dask tasks get, same settings.
        reader, wf, ev = evaluator_for(store, device)
        set_precision(ev.precision)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        points = []
        for a in range(0, reader.num_steps, reader.chunk_steps):
            b = min(reader.num_steps, a + reader.chunk_steps)
            res = integrate_block(ev.loss_and_grad, reader.params(a, b + 1), rule=wf.lca.rule, tol=wf.lca.tol,
                                  max_splits=wf.lca.max_splits, points_per_pass=ev.points_per_pass)
            points.append(res.points)
        inproc_s = time.perf_counter() - t0
        samples = ev.num_samples
        del ev
        if device.type == "cuda":
            torch.cuda.empty_cache()
        summary = compute_lca(str(store), workers=plan.workers, device=device.type, recompute=True,
                              threads_per_worker=plan.threads if device.type == "cpu" else None,
                              progress=False)
        sp = summary.splits[0]
        rows.append({
            "run": run, "steps": int(reader.num_steps), "params": int(reader.layout.size), "samples": samples,
            "device": ",".join(sorted(set(summary.devices))) or device.type, "workers": int(summary.workers),
            "block_steps": int(reader.chunk_steps), "tol": float(summary.settings.tol),
            "points_per_step": float(sp.stats.points_mean),
            "points_per_step_in_process": float(np.concatenate(points).mean()),
            "within_tol": float(sp.stats.within_tol), "max_abs_residual": float(sp.stats.residual_abs_max),
            "in_process_s": inproc_s, "in_process_steps_per_s": reader.num_steps / inproc_s,
            "dask_s": float(summary.seconds), "dask_steps_per_s": reader.num_steps / summary.seconds,
        })
    return rows
