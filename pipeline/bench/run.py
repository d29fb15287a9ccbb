"""`lca bench`: one run on one machine measures where LCA's time goes and what exactness it keeps.

Eight tables, printed as each section finishes and written together to `<out>/bench.json` (one list of row
dicts per section, plus `meta`). Seconds are medians over several repetitions after warm-up, the candidates of one
row timed round-robin so that load on a shared machine hits them alike; on CUDA every timed region ends in
`torch.cuda.synchronize()`. Smoke mode (`--smoke`, for CI) uses tiny sample counts and one torch thread:
it checks that the table is produced, not how fast anything is. On a CPU other jobs share, expect noise.

Each section is its own module, named for the question it answers (its docstring says how to read its
table): gradient, precision, end_to_end, recording, storage, accuracy, precision_choice, worker_memory. This module only sequences them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.bench import accuracy, end_to_end, gradient, precision, precision_choice, recording, storage, worker_memory
from pipeline.bench.plan import make_plan
from pipeline.bench.runs import run_workflow, train_store
from pipeline.bench.table import format_table, header, jsonable
from pipeline.bench.timing import device_name, matmul_peak, resolve_device
from pipeline.errors import DataError, LCAError

# Section name (the key in bench.json) -> its module, in the order they run.
SECTIONS = {"gradient": gradient, "precision": precision, "lca": end_to_end, "training": recording,
            "storage": storage, "accuracy": accuracy, "precision_choice": precision_choice,
            "worker_memory": worker_memory}
COLUMNS = {name: module.COLUMNS for name, module in SECTIONS.items()}
TITLES = {name: module.TITLE for name, module in SECTIONS.items()}


def section_table(section: str, rows: list[dict[str, Any]]) -> str:
    """The printed table of one section of bench.json."""
    return format_table(TITLES[section], COLUMNS[section], rows)


def _fashion_available() -> bool:
    from pipeline.config import DataConfig
    from pipeline.problem.data import resolve_data_config, split_size

    try:
        return split_size(resolve_data_config(DataConfig(dataset="fashion-mnist")), "train") > 0
    except (DataError, OSError):
        return False


def run_bench(*, smoke: bool = False, out: str = "bench-out", device: str = "auto",
              only: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every section (or those named in `only`), print each table as it finishes, write
    `<out>/bench.json`, and return the same dict.

    Scratch stores are written under `<out>/scratch` and removed at the end.
    """
    from pipeline.lca.evaluate import set_precision

    unknown = sorted(set(only or ()) - set(SECTIONS))
    if unknown:
        raise LCAError(f"unknown bench section {unknown[0]!r}; sections: {', '.join(SECTIONS)}")

    def want(*names: str) -> bool:
        return only is None or any(n in only for n in names)

    t_start = time.perf_counter()
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if cuda:
        # train() needs this before cuBLAS first runs for deterministic algorithms; set it before section 1.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = True  # both sides autotune (TF's default did too)
    fashion = (not smoke) and _fashion_available()
    plan = make_plan(smoke, cuda, fashion)
    threads_before = torch.get_num_threads()
    if plan.threads and not cuda:
        # Smoke runs on shared 2-core CI machines: one thread keeps OpenMP from spinning against other jobs,
        # which otherwise makes the tiny smoke sizes 10-50x slower and the test's run time unpredictable.
        torch.set_num_threads(plan.threads)
    out_dir = Path(out)
    scratch = out_dir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)

    notes = []
    if smoke:
        notes.append("smoke: tiny sizes and 1 torch thread; timings are dominated by overhead, do not quote them")
    elif not cuda:
        notes.append(f"CPU sizes: LeNet and ResNet-20 on {plan.samples['lenet']} / {plan.samples['resnet20']} "
                     f"synthetic samples (not 60k / 50k); fashion-fc LCA run truncated to {plan.fashion_steps} steps")
    if not smoke and not fashion:
        notes.append("Fashion-MNIST not found in data/fashion-mnist (`make data`): fashion-fc rows skipped")
    peaks: dict[str, float | None] = {"fp32": matmul_peak(dev, "fp32", plan.peak_n, plan.reps), "tf32": None}
    if cuda:
        peaks["tf32"] = matmul_peak(dev, "tf32", plan.peak_n, plan.reps)
    set_precision("fp32")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(dev), "device_name": device_name(dev), "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(), "smoke": smoke,
        "samples": plan.samples, "reps": plan.reps, "warmup": plan.warmup, "peak_n": plan.peak_n,
        "peak_fp32_tflops": peaks["fp32"] / 1e12,  # type: ignore[operator]
        "peak_tf32_tflops": peaks["tf32"] / 1e12 if peaks["tf32"] else None, "notes": notes,
        "section_seconds": {},
    }
    result: dict[str, Any] = {"meta": meta}
    print(header(meta), flush=True)

    clock = [time.perf_counter()]

    def emit(section: str, rows: list[dict[str, Any]]) -> None:
        result[section] = rows
        now = time.perf_counter()
        meta["section_seconds"][section] = now - clock[0]
        clock[0] = now
        print("\n" + section_table(section, rows) + f"\n({now - t_start:.0f} s so far)", flush=True)
        (out_dir / "bench.json").write_text(json.dumps(jsonable(result), indent=1))

    try:
        if want("gradient"):
            emit("gradient", gradient.bench_gradient(plan, dev, peaks))
        runs = [("digits-fc", scratch / "digits-fc.zarr", plan.digits_steps, plan.digits_chunk)]
        if plan.fashion_steps:
            runs.append(("fashion-fc", scratch / "fashion-fc.zarr", plan.fashion_steps, plan.fashion_chunk))
        if want("precision", "lca"):
            for name, store, steps, chunk in runs:
                train_store(run_workflow(name, steps, chunk, dev), store)
        if want("precision"):
            emit("precision", precision.bench_precision(runs[0][1], runs[0][0], dev))
        if want("lca"):
            emit("lca", end_to_end.bench_lca([(name, store) for name, store, _, _ in runs], plan, dev))
        if want("training", "storage"):
            rows, check = recording.bench_training(plan, dev, scratch)
            if want("training"):
                emit("training", rows)
            if want("storage"):
                emit("storage", storage.bench_storage(check))
        if want("accuracy", "precision_choice"):
            accuracy.run_sections(emit, scratch, smoke=smoke, fashion=fashion, device=dev)
        if want("worker_memory"):
            emit("worker_memory", worker_memory.bench_memory(scratch, smoke=smoke))
    finally:
        set_precision("fp32")
        torch.set_num_threads(threads_before)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nwrote {out_dir / 'bench.json'}", flush=True)
    return jsonable(result)
