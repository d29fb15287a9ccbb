"""Issue 8's "done when": models and training loops the project did not write, computed by `lca compute STORE`.

Each run is recorded as a user would record it (Hugging Face's Trainer with the callback, a Lightning
module with the callback, a plain loop of one's own with `TrajectoryWriter`), in a folder of its own that
holds the user's code, and then computed by the `lca` command with no argument but the store: the store's
recorded problem definition is all it needs. The GPT-2 run is checked against a float64 computation
written here, with Hugging Face's own loss, independently of our evaluator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trajectory_store import open_trajectory

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "own_model"
USER_CODE = Path(__file__).resolve().parent / "user_code"
LCA_CMD = Path(sys.executable).with_name("lca")


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _lca(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    return _run([str(LCA_CMD), *args], cwd=cwd, env=env)


def _results(store: Path):
    """The store's LCA through the public xarray view, as float64 numpy arrays."""
    from pipeline import open_lca

    ds = open_lca(str(store))
    return tuple(np.asarray(ds[name].values, np.float64)
                 for name in ("lca_param", "residual", "loss", "loss_after", "splits"))


def _check_conservation(store: Path, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    lca, residual, loss, loss_after, splits = _results(store)
    assert lca.shape[0] == steps and np.isfinite(lca).all()
    gap = np.abs(lca.sum(axis=1) + residual - (loss_after - loss))
    assert gap.max() < 1e-9, f"sum(LCA) + residual != dL, worst {gap.max():.3g} at step {gap.argmax()}"
    assert np.abs(residual).max() < 1e-3
    return lca, loss, loss_after, splits


def _import_user_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _simpson_weights(n: int) -> np.ndarray:
    w = np.ones(n + 1)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w / w.sum()


@pytest.mark.slow
def test_gpt2_trained_by_hf_trainer_then_plain_lca_compute_matches_float64(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "tiny_gpt.py", tmp_path)
    _run([sys.executable, "tiny_gpt.py"], cwd=tmp_path)  # the README's script, as is
    store = tmp_path / "runs" / "tiny_gpt.zarr"
    reader = open_trajectory(str(store))
    assert reader.group["trajectory"].attrs["status"] == "complete"
    problem = reader.attrs["problem"]
    assert problem["loss"] == {"kind": "token-cross-entropy"} and problem["fingerprints"]["train"]
    steps = reader.num_checkpoints - 1
    assert steps == 8

    _lca("compute", "runs/tiny_gpt.zarr", cwd=tmp_path)  # nothing but the store: Dask workers, default settings
    lca, loss, loss_after, splits = _check_conservation(store, steps)

    # Independent float64: the user's model, Hugging Face's own loss (shifted, -100 ignored, token mean), the
    # whole split in one batch, autograd gradients, composite Simpson over the same sub-intervals.
    user = _import_user_module(tmp_path / "tiny_gpt.py")
    data = user.text_splits(os.__file__)["train"]
    assert (data["labels"] == -100).any()
    model = user.make_model().double().eval()
    params = dict(model.named_parameters())
    names = reader.layout.names
    assert "lm_head.weight" not in names and model.lm_head.weight is params["transformer.wte.weight"]

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            for t in reader.layout.tensors:
                params[t.name].copy_(torch.from_numpy(theta[t.offset:t.offset + t.size]).reshape(t.shape))
        model.zero_grad()
        value = model(input_ids=data["input_ids"], labels=data["labels"]).loss
        value.backward()
        return value.item(), np.concatenate([params[n].grad.reshape(-1).numpy() for n in names])

    rows = reader.params(0, steps + 1).astype(np.float64)
    at_checkpoint = [loss_and_grad(row) for row in rows]  # shared by the steps on either side
    for t in range(steps):
        n = int(splits[t])
        delta = rows[t + 1] - rows[t]
        inner = [loss_and_grad(rows[t] + s * delta)[1] for s in np.linspace(0.0, 1.0, n + 1)[1:-1]]
        grads = np.stack([at_checkpoint[t][1], *inner, at_checkpoint[t + 1][1]])
        ref = delta * (_simpson_weights(n) @ grads)
        assert loss[t] == pytest.approx(at_checkpoint[t][0], rel=2e-6), f"L(theta_{t})"
        assert loss_after[t] == pytest.approx(at_checkpoint[t + 1][0], rel=2e-6), f"L(theta_{t + 1})"
        # fp32 gradients (the default; sums in float64) agree to about 1e-7 of the step's largest entry.
        scale = np.abs(ref).max()
        assert np.abs(lca[t] - ref).max() <= 1e-5 * scale, f"step {t}: per-parameter LCA differs from float64"
        assert np.abs(lca[t] - ref).sum() <= 1e-5 * np.abs(ref).sum()


@pytest.mark.slow
def test_lightning_module_with_batchnorm_and_dropout_on_digits(tmp_path: Path, monkeypatch) -> None:
    import lightning.pytorch as pl

    from pipeline import Problem
    from pipeline.callbacks.lightning import TrajectoryCallback

    monkeypatch.syspath_prepend(str(USER_CODE))
    problem = Problem.define(model="digits_lightning:DigitsNet", data="digits_lightning:digits", loss="cross-entropy")
    module = problem.build_model()
    x, y = problem.build_data()["train"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    store = tmp_path / "digits.zarr"
    trainer = pl.Trainer(max_steps=6, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[TrajectoryCallback(str(store), problem=problem)])
    trainer.fit(module, loader)
    reader = open_trajectory(str(store))
    assert reader.num_checkpoints == trainer.global_step + 1 == 7  # 12 micro-batches, one row per optimizer step

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(USER_CODE), os.environ.get("PYTHONPATH", "")])}
    _lca("compute", str(store), "--inline", cwd=tmp_path, env=env)  # in-process: no cluster to start
    _check_conservation(store, 6)
    _lca("report", str(store), "--out", str(tmp_path / "report"), cwd=tmp_path, env=env)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary


@pytest.mark.slow
def test_own_loop_with_an_mse_regression_model(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "own_loop.py", tmp_path)
    _run([sys.executable, "own_loop.py"], cwd=tmp_path)  # the README's script, as is
    store = tmp_path / "runs" / "own_loop.zarr"
    assert open_trajectory(str(store)).num_checkpoints == 9

    _lca("compute", "runs/own_loop.zarr", "--inline", cwd=tmp_path)
    _, loss, _, _ = _check_conservation(store, 8)
    # L(theta_0) is the mean squared error over the whole split, computed here in float64.
    user = _import_user_module(tmp_path / "own_loop.py")
    x, y = user.waves()["train"]
    model = user.make_mlp().double()
    expected = torch.nn.functional.mse_loss(model(x.double()), y.double()).item()
    assert loss[0] == pytest.approx(expected, rel=1e-5)
    _lca("report", "runs/own_loop.zarr", "--out", "report", cwd=tmp_path)
    assert (tmp_path / "report" / "summary.json").exists()


def test_readme_shows_the_examples_verbatim() -> None:
    """The README's "Your own model" code is the code these tests run, line for line."""
    readme = (ROOT / "README.md").read_text()
    for name in ("tiny_gpt.py", "own_loop.py"):
        code = (EXAMPLES / name).read_text()
        assert code in readme, f"README.md does not show examples/own_model/{name} as it is"
        lines = [line for line in code.splitlines() if line.strip()]
        assert len(lines) < 20, f"{name} has {len(lines)} lines of user code"
