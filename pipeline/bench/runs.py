"""The real runs the bench measures: shipped workflows cut to the plan's length, trained into scratch
stores, and the evaluator a worker would build for them (shared by the precision and end-to-end sections)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline.errors import LCAError

ROOT = Path(__file__).resolve().parents[2]


def workflow_path(name: str) -> Path:
    for base in (ROOT / "workflows", Path.cwd() / "workflows"):
        if (base / f"{name}.toml").is_file():
            return base / f"{name}.toml"
    raise LCAError(f"workflow {name}.toml not found in {ROOT / 'workflows'} or ./workflows; run the bench from "
                   f"the repository")


def run_workflow(name: str, steps: int, chunk: int, device: torch.device):
    from pipeline.config import load_workflow

    train_device = "cuda" if device.type == "cuda" else "cpu"
    return load_workflow(workflow_path(name)).replace(
        train={"steps": steps, "epochs": 0, "chunk_steps": chunk, "device": train_device})


def train_store(wf, store: Path) -> None:
    from pipeline.train.loop import train

    if store.exists():
        shutil.rmtree(store)
    train(wf, str(store), overwrite=True, progress=False)


def evaluator_for(store: Path, device: torch.device, precision: str | None = None):
    """The evaluator a worker would build for `store` (the workflow's precision unless one is given)."""
    from pipeline.config import Workflow
    from pipeline.problem.data import load_split
    from pipeline.lca.evaluate import Evaluator
    from pipeline.problem.models import build_model
    from trajectory_store import open_trajectory

    reader = open_trajectory(str(store))
    wf = Workflow.from_dict(reader.workflow, f"workflow stored in {store}")
    x, y = load_split(wf.data, "train")
    torch.manual_seed(wf.seed)
    model = build_model(wf.model, tuple(x.shape[1:]), int(reader.attrs.get("dataset", {}).get("num_classes", 10)))
    ev = Evaluator(model, reader.layout, x, y, batch_size=wf.lca.eval_batch_size, device=device,
                   precision=precision or wf.lca.precision)  # type: ignore[arg-type]
    return reader, wf, ev
