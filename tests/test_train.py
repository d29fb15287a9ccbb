"""The recorded trajectory: what it holds, that it is reproducible bit for bit, and how training fails."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import Workflow, load_workflow
from pipeline.problem.data import load_split
from pipeline.errors import DivergenceError, WorkflowError
from pipeline.problem.models import build_model
from pipeline.train.loop import learning_rate, minibatches, total_steps, train
from trajectory_store import store_exists
from trajectory_store import StoreError, open_trajectory
from trajectory_store.layout import ParamLayout

ROOT = Path(__file__).resolve().parents[1]


def tiny(steps: int = 12, **sections: dict) -> Workflow:
    """digits-fc cut down to a few steps: the shipped default, so these tests exercise real settings."""
    wf = load_workflow(ROOT / "workflows" / "digits-fc.toml")
    return wf.replace(train={"steps": steps, "batch_size": 32, "chunk_steps": 8, **sections.pop("train", {})},
                      **sections)


def test_records_theta0_and_every_step(tmp_path: Path) -> None:
    wf = tiny(steps=20)
    result = train(wf, str(tmp_path / "run.zarr"), progress=False)
    assert result.steps == 20 and np.isfinite(result.final_loss)
    assert "20 steps" in str(result) and str(tmp_path / "run.zarr") in str(result)

    r = open_trajectory(str(tmp_path / "run.zarr"))
    assert r.num_steps == 20
    params = np.asarray(r.params(0, 21))
    assert params.shape == (21, 12060) and params.dtype == np.float32

    torch.manual_seed(wf.seed)  # theta_0 is exactly the freshly initialised model
    initial = build_model(wf.model, (1, 8, 8), 10)
    np.testing.assert_array_equal(params[0], ParamLayout.from_model(initial).flatten(initial))
    assert not np.array_equal(params[0], params[1])

    loss, lr, idx = np.asarray(r.minibatch_loss), np.asarray(r.lr), np.asarray(r.batch_indices)
    assert loss.shape == (20,) and lr.shape == (20,) and idx.shape == (20, 32)
    assert loss[0] == pytest.approx(np.log(10), rel=0.3) and result.final_loss == loss[-1]
    np.testing.assert_array_equal(lr, wf.optimizer.lr)
    assert idx.min() >= 0 and idx.max() < 1438
    # an epoch is 1438 // 32 = 44 steps, so 20 steps all come from one shuffle: no sample twice
    assert len(np.unique(idx)) == idx.size


def test_minibatch_loss_is_the_loss_at_theta_t(tmp_path: Path) -> None:
    """Replaying step t from the store (theta_t, batch t) gives the recorded loss: the record is sufficient."""
    wf = tiny(steps=5)
    train(wf, str(tmp_path / "run.zarr"), progress=False)
    r = open_trajectory(str(tmp_path / "run.zarr"))
    x, y = load_split(wf.data, "train")
    model = build_model(wf.model, (1, 8, 8), 10)
    layout = ParamLayout.from_model(model)
    for t in (0, 4):
        flat = torch.from_numpy(np.asarray(r.params(t, t + 1))[0])
        out = torch.func.functional_call(model, layout.unflatten(flat), (x[torch.from_numpy(np.asarray(r.batch_indices)[t])],))
        loss = torch.nn.functional.cross_entropy(out, y[torch.from_numpy(np.asarray(r.batch_indices)[t])])
        assert float(loss) == pytest.approx(float(np.asarray(r.minibatch_loss)[t]), rel=1e-5)


def test_same_seed_same_trajectory_bit_for_bit(tmp_path: Path) -> None:
    wf = tiny(steps=15, optimizer={"name": "adam", "lr": 0.01}, schedule={"kind": "cosine", "min_lr": 0.001})
    train(wf, str(tmp_path / "a.zarr"), progress=False)
    train(wf, str(tmp_path / "b.zarr"), progress=False)
    a, b = open_trajectory(str(tmp_path / "a.zarr")), open_trajectory(str(tmp_path / "b.zarr"))
    assert np.asarray(a.params(0, 16)).tobytes() == np.asarray(b.params(0, 16)).tobytes()
    assert np.asarray(a.minibatch_loss).tobytes() == np.asarray(b.minibatch_loss).tobytes()
    np.testing.assert_array_equal(np.asarray(a.batch_indices), np.asarray(b.batch_indices))
    lr = np.asarray(a.lr)
    assert lr[0] == pytest.approx(0.01) and lr[-1] == pytest.approx(0.001) and np.all(np.diff(lr) < 0)

    train(wf.replace(seed=1), str(tmp_path / "c.zarr"), progress=False)
    c = open_trajectory(str(tmp_path / "c.zarr"))
    assert not np.array_equal(np.asarray(a.params(0, 1)), np.asarray(c.params(0, 1)))


def test_store_attributes_let_workers_rebuild_the_run(tmp_path: Path) -> None:
    wf = tiny(steps=3)
    train(wf, str(tmp_path / "run.zarr"), progress=False)
    r = open_trajectory(str(tmp_path / "run.zarr"))
    assert Workflow.from_dict(r.attrs["workflow"]) == wf
    assert r.attrs["dataset"] == {"name": "digits", "path": "", "input_shape": [1, 8, 8], "num_classes": 10,
                                  "train_size": 1438, "heldout_size": 359}
    assert r.attrs["model"]["num_parameters"] == 12060 and r.attrs["model"]["arch"] == "fc"
    assert r.attrs["seed"] == wf.seed


def test_divergence_keeps_the_steps_before_it(tmp_path: Path) -> None:
    wf = tiny(steps=40, optimizer={"name": "sgd", "lr": 1e12})
    store = str(tmp_path / "boom.zarr")
    with pytest.raises(DivergenceError) as info:
        train(wf, store, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "lower optimizer.lr" in msg
    step = int(re.match(r"training diverged at step (\d+): ", msg).group(1))
    assert 0 < step < 40
    r = open_trajectory(store)
    assert r.num_steps == step
    assert np.isfinite(np.asarray(r.params(0, step + 1))).all()
    assert np.isfinite(np.asarray(r.minibatch_loss)[:step]).all()


def test_existing_store_needs_overwrite(tmp_path: Path) -> None:
    store = str(tmp_path / "run.zarr")
    assert not store_exists(store)
    train(tiny(steps=3), store, progress=False)
    assert store_exists(store)
    with pytest.raises(StoreError):
        train(tiny(steps=5), store, progress=False)
    assert open_trajectory(store).num_steps == 3
    train(tiny(steps=5), store, overwrite=True, progress=False)
    assert open_trajectory(store).num_steps == 5


def test_epochs_mode_and_batch_size_limit() -> None:
    wf = tiny(train={"steps": 0, "epochs": 2, "batch_size": 100})
    assert total_steps(wf, 1438) == (28, 14)
    with pytest.raises(WorkflowError, match="exceeds the 1438 training samples"):
        total_steps(tiny(train={"batch_size": 5000}), 1438)


def test_minibatches_reshuffle_each_epoch() -> None:
    batches = minibatches(10, 3, torch.Generator().manual_seed(0))
    epoch1 = torch.cat([next(batches) for _ in range(3)])
    epoch2 = torch.cat([next(batches) for _ in range(3)])
    assert len(set(epoch1.tolist())) == 9 and len(set(epoch2.tolist())) == 9
    assert not torch.equal(epoch1, epoch2)


def test_learning_rate_schedules() -> None:
    wf = tiny()
    opt = wf.optimizer.__class__(lr=0.1)
    step = wf.schedule.__class__(kind="step", step_size=10, gamma=0.5)
    assert [learning_rate(opt, step, t, 30) for t in (0, 9, 10, 29)] == [0.1, 0.1, 0.05, 0.025]
    cosine = wf.schedule.__class__(kind="cosine", min_lr=0.01)
    assert learning_rate(opt, cosine, 0, 11) == pytest.approx(0.1)
    assert learning_rate(opt, cosine, 5, 11) == pytest.approx(0.055)
    assert learning_rate(opt, cosine, 10, 11) == pytest.approx(0.01)


def test_cli_train_end_to_end(tmp_path: Path) -> None:
    wf_path = tmp_path / "tiny.toml"
    wf_path.write_text('[data]\ndataset = "digits"\n[model]\nhidden = [16]\n'
                       '[train]\nsteps = 6\nbatch_size = 16\n')
    store = str(tmp_path / "tiny.zarr")
    result = CliRunner().invoke(main, ["train", str(wf_path), "--store", store])
    assert result.exit_code == 0, result.output
    assert "6 steps" in result.stdout and "7 checkpoints" in result.stdout
    r = open_trajectory(store)
    assert r.num_steps == 6 and r.attrs["workflow"]["name"] == "tiny"

    again = CliRunner().invoke(main, ["train", str(wf_path), "--store", store])
    assert again.exit_code == 1
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert CliRunner().invoke(main, ["train", str(wf_path), "--store", store, "--overwrite"]).exit_code == 0
