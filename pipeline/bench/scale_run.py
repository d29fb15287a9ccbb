"""Section: a 25M-parameter model, recorded and its LCA computed on this machine.

"25M-parameter run" -- a wide MLP (64-4096-4096-2048-10, 25.5M parameters) trained on digits for 16
steps, recorded, and its LCA computed with 2 Dask workers, once keeping per-unit LCA (`keep unit`) and once
keeping per-parameter LCA (`keep parameter`). For each: worker peak RSS above its baseline, per parameter,
against the 64 bytes/parameter target (the baseline is the worker with its model and data loaded and one
full-split gradient taken, measured before the first block, as in the worker memory section), and the size of the result on disk. "x smaller" is the per-parameter result's
size over the per-unit one (the issue asks for at least 50x). Smoke mode runs a tiny version of the same.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.plan import Plan

TITLE = "25M-parameter run: recorded, LCA with 2 workers, worker memory and output size by --keep"
COLUMNS = [
    ("keep", "keep", "s", 1), ("params", "params", ",d", 1), ("steps", "steps", "d", 1),
    ("workers", "workers", "d", 1), ("train s", "train_s", ".1f", 1), ("LCA s", "lca_s", ".1f", 1),
    ("grad evals/step", "points_per_step", ".2f", 1), ("max |r|", "max_abs_residual", ".1e", 1),
    ("baseline MB", "baseline_mb", ".0f", 1), ("peak MB", "peak_mb", ".0f", 1),
    ("B/param above baseline", "bytes_per_param", ".1f", 1), ("target", "target_bytes_per_param", "d", 1),
    ("within", "within_target", "yesno", 1), ("output MB", "output_mb", ".2f", 1),
    ("x smaller", "x_smaller", ".0f", 1),
]
TARGET_BYTES_PER_PARAM = 64


def sizes(plan: Plan) -> dict[str, Any]:
    if plan.smoke:  # the same path at toy size
        return {"hidden": [64, 32, 16], "steps": 4, "chunk": 2, "workers": 0}  # 0: in this process
    return {"hidden": [4096, 4096, 2048], "steps": 16, "chunk": 8, "workers": 2}


def _rss() -> tuple[int, int]:
    """(current, peak) resident set of this process in bytes, from /proc (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def _reset_peak() -> None:
    """Start the peak (VmHWM) afresh from the current RSS, so building the model does not count as LCA."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _baseline(spec: Any) -> int:
    """On a worker: load what every block needs (model, data: the cached evaluator) and take one full-split
    gradient (torch's caches warm), as the memory section does; reset the peak; return the RSS."""
    import gc

    import numpy as np

    from pipeline.lca.worker import _reader, get_evaluator

    ev = get_evaluator(spec, "train")
    ev.loss_and_grad(np.asarray(_reader(spec).params(0, 1)))
    gc.collect()
    _reset_peak()
    return _rss()[0]


def _peak() -> int:
    return _rss()[1]


def _dir_mb(root: Path, names: list[str]) -> float:
    total = 0
    for name in names:
        p = root / name
        if p.exists():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total / 1e6


class _Here:
    """Smoke mode: the worker's task code in this process instead of a cluster (start-up would dominate)."""

    def run(self, fn: Any, *args: Any) -> dict[str, Any]:
        return {"here": fn(*args)}


def _compute_here(store: Path, keep: str):
    """compute_lca with its blocks run in this process (executor="inline"); the split's statistics."""
    from pipeline.lca.compute import compute_lca

    return compute_lca(str(store), executor="inline", keep=keep, threads_per_worker=1, recompute=True,
                       name=f"scale-{keep}", progress=False).splits[0].stats


def bench_scale_run(plan: Plan, device: torch.device, scratch: Path) -> list[dict[str, Any]]:
    import contextlib
    import logging

    from pipeline.bench.runs import run_workflow, train_store
    from pipeline.lca.compute import check_problem, compute_lca, resolve_problem, resolve_settings
    from pipeline.lca.plan import array_names
    from pipeline.lca.worker import TaskSpec
    from trajectory_store import open_trajectory

    size = sizes(plan)
    wf = run_workflow("digits-fc", size["steps"], size["chunk"], device).replace(
        name="digits-wide-mlp", model={"hidden": size["hidden"]}, optimizer={"lr": 0.01})
    store = scratch / "scale-run.zarr"
    t0 = time.perf_counter()
    train_store(wf, store)
    train_s = time.perf_counter() - t0
    reader = open_trajectory(str(store))
    params = reader.layout.size
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if size["workers"]:
            from distributed import Client, LocalCluster

            cluster = stack.enter_context(LocalCluster(
                n_workers=size["workers"], threads_per_worker=1, processes=True, dashboard_address=":0",
                silence_logs=logging.CRITICAL))
            client: Any = stack.enter_context(Client(cluster))
        else:
            cluster, client = None, _Here()
        for keep in ("unit", "parameter"):
            settings = resolve_settings(wf, keep=keep)
            problem, _, stored = resolve_problem(reader, None)
            problem = check_problem(reader, problem, stored, ["train"], settings, recompute=True,
                                    name=f"scale-{keep}")
            spec = TaskSpec(store=str(store), created=str(reader.attrs.get("created", "")),
                            problem=problem.to_json(), settings=settings.to_json(), result="", name="", token="",
                            device=device.type, threads=1, module_roots=tuple(problem.module_roots()))
            base = client.run(_baseline, spec)
            t0 = time.perf_counter()
            if cluster is not None:
                st = compute_lca(str(store), scheduler=cluster.scheduler_address, device=device.type, keep=keep,
                                 threads_per_worker=1, recompute=True, name=f"scale-{keep}",
                                 progress=False).splits[0].stats
            else:
                st = _compute_here(store, keep)
            lca_s = time.perf_counter() - t0
            peak = client.run(_peak)
            above = max(peak[w] - base[w] for w in base)
            result = open_trajectory(str(store)).group[f"lca/scale-{keep}"].attrs["current"]
            names = array_names("train", f"lca/scale-{keep}/{result}")
            out_mb = _dir_mb(store, [names[k] for k in ("lca", "unit", "layer", "loss", "residual", "points",
                                                        "splits", "done")])
            rows.append({
                "keep": keep, "params": int(params), "steps": int(reader.num_steps), "workers": size["workers"],
                "train_s": train_s, "lca_s": lca_s, "points_per_step": st.points_mean,
                "max_abs_residual": st.residual_abs_max, "baseline_mb": max(base.values()) / 1e6,
                "peak_mb": max(peak.values()) / 1e6, "bytes_per_param": above / params,
                "target_bytes_per_param": TARGET_BYTES_PER_PARAM,
                "within_target": above / params <= TARGET_BYTES_PER_PARAM, "output_mb": out_mb,
            })
    rows[0]["x_smaller"] = rows[1]["output_mb"] / rows[0]["output_mb"] if rows[0]["output_mb"] else None
    shutil.rmtree(store, ignore_errors=True)
    return rows
