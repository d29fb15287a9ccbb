"""Interventions as workflow settings: validated like every key, and visible in what the store recorded."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Workflow, load_workflow
from pipeline.errors import WorkflowError
from pipeline.train.loop import train
from trajectory_store import open_trajectory, store_exists

from .conftest import LCA, ROOT


def tiny(steps: int = 12, **interventions) -> Workflow:
    wf = load_workflow(ROOT / "workflows" / "digits-fc.toml")
    return wf.replace(train={"steps": steps, "batch_size": 32, "chunk_steps": 8}, interventions=interventions)


def _write(tmp_path: Path, extra: str, steps: int = 12) -> Path:
    base = (ROOT / "workflows" / "digits-fc.toml").read_text()
    base = base.replace("steps = 300", f"steps = {steps}")
    p = tmp_path / "wf.toml"
    p.write_text(base + "\n" + extra)
    return p


@pytest.mark.parametrize("extra, message", [
    ("[[interventions.groups]]\nparams = ['layers.2.*']\nlr = -0.1\n", "interventions.groups[0].lr must not be negative"),
    ("[[interventions.groups]]\nparams = ['layers.2.*']\nmomentum = -0.5\n", "momentum must not be negative"),
    ("[[interventions.groups]]\nparams = ['layers.2.*']\nweight_decay = -1e-4\n", "weight_decay must not be negative"),
    ("[[interventions.penalty]]\nparams = ['layers.2.*']\nl2 = -1.0\n", "interventions.penalty[0].l2 must not be negative"),
    ("[[interventions.freeze]]\nparams = ['layers.2.*']\nfrom_step = 12\n", "from_step = 12 is beyond the run's 12 steps"),
    ("[[interventions.freeze]]\nparams = []\n", "must list at least one parameter-name glob"),
    ("[[interventions.freeze]]\nparams = ['layers.2.*']\nmode = 'drop'\n", "mode must be one of freeze, prune"),
    ("[[interventions.freeze]]\nparams = ['layers.2.*']\nfrom_stpe = 3\n", "unknown key 'from_stpe' in [interventions.freeze[0]]"),
    ("[interventions]\nfreeze = 3\n", "must be an array of tables ([[interventions.freeze]])"),
])
def test_bad_settings_are_one_line_errors_at_load(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(WorkflowError) as e:
        load_workflow(_write(tmp_path, extra))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_glob_matching_nothing_fails_before_the_store_exists(tmp_path: Path) -> None:
    """Names are known only once the model exists: the check runs at train start, through the CLI too."""
    wf = _write(tmp_path, "[[interventions.freeze]]\nparams = ['fc.*']\n")
    store = tmp_path / "run.zarr"
    proc = subprocess.run([*LCA, "train", str(wf), "--store", str(store)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "interventions.freeze[0].params glob 'fc.*' matches no parameter" in err and "layers.0.weight" in err
    assert not store_exists(str(store)) and not store.exists()


def test_unit_index_past_the_tensor_and_epoch_runs(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match=r"units \[10\] are past the 10 units of 'layers.2.weight'"):
        train(tiny(freeze=[{"params": ["layers.2.weight"], "units": [10]}]), str(tmp_path / "a.zarr"),
              progress=False)
    # with epochs the run's length is known only from the data: checked at train start
    wf = tiny().replace(train={"steps": 0, "epochs": 1},
                        interventions={"freeze": [{"params": ["layers.2.*"], "from_step": 44}]})
    with pytest.raises(WorkflowError, match="from_step = 44 is beyond the run's 44 steps"):
        train(wf, str(tmp_path / "b.zarr"), progress=False)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_freeze_holds_tensors_and_units_exactly(tmp_path: Path) -> None:
    wf = tiny(steps=12, freeze=[{"params": ["layers.2.*"], "from_step": 5},
                                {"params": ["layers.1.weight", "layers.1.bias"], "units": [0, 7], "from_step": 0}])
    train(wf, str(tmp_path / "f.zarr"), progress=False)
    r = open_trajectory(str(tmp_path / "f.zarr"))
    theta = np.asarray(r.params())
    lay = {t.name: t for t in r.layout.tensors}

    def cols(name: str, units: list[int] | None = None) -> np.ndarray:
        t = lay[name]
        c = np.arange(t.offset, t.offset + t.size).reshape(t.shape)
        return (c if units is None else c[units]).ravel()

    last = np.r_[cols("layers.2.weight"), cols("layers.2.bias")]
    assert np.all(theta[6:, last] == theta[5, last])           # frozen from step 5: theta_5 onwards
    assert np.any(theta[5, last] != theta[0, last])            # ... but it moved before
    held = np.r_[cols("layers.1.weight", [0, 7]), cols("layers.1.bias", [0, 7])]
    assert np.all(theta[:, held] == theta[0, held])
    free = np.r_[cols("layers.1.weight", [1, 2]), cols("layers.1.bias", [1])]
    assert np.all(np.any(theta[1:, free] != theta[:-1, free], axis=1))

    rec = r.attrs["interventions"]["tensors"]
    assert rec["layers.2.weight"]["steps_moved"] == 5 and rec["layers.2.weight"]["freeze"][0]["from_step"] == 5
    assert rec["layers.1.weight"]["freeze"][0]["units"] == [0, 7]
    assert rec["layers.0.weight"]["steps_moved"] == 12 and rec["layers.0.weight"]["freeze"] == []
    assert all(t["steps_moved_while_frozen"] == 0 for t in rec.values())

    info = subprocess.run([*LCA, "info", str(tmp_path / "f.zarr")], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    line = next(x for x in info.stdout.splitlines() if x.strip().startswith("layers.2.weight"))
    assert "all from 5" in line and line.split()[-1] == "5"


def test_prune_zeroes_units_from_the_start(tmp_path: Path) -> None:
    wf = tiny(steps=6, freeze=[{"params": ["layers.0.*"], "units": [3], "mode": "prune"}])
    train(wf, str(tmp_path / "p.zarr"), progress=False)
    r = open_trajectory(str(tmp_path / "p.zarr"))
    w = r.layout.tensors[0]
    theta = np.asarray(r.params())
    row = w.offset + 3 * w.shape[1] + np.arange(w.shape[1])
    assert np.all(theta[:, row] == 0) and np.any(theta[0, w.offset:w.offset + w.shape[1]] != 0)


def test_groups_and_penalty_follow_an_independent_replay(tmp_path: Path) -> None:
    """Step by step, the recorded trajectory is what plain torch does with the resolved settings: last
    layer at its own rate and momentum, weight decay on layer 1, an L2 penalty on layer 0 (float64 replay)."""
    wf = tiny(steps=6, groups=[{"params": ["layers.2.*"], "lr": 0.01, "momentum": 0.5},
                               {"params": ["layers.1.weight"], "weight_decay": 1e-2}],
              penalty=[{"params": ["layers.0.weight"], "l2": 0.1}])
    train(wf, str(tmp_path / "g.zarr"), progress=False)
    r = open_trajectory(str(tmp_path / "g.zarr"))
    theta = np.asarray(r.params(), dtype=np.float64)
    idx = np.asarray(r.batch_indices)
    from pipeline.problem.data import load_split, resolve_data_config

    x, y = load_split(resolve_data_config(wf.data), "train")
    x, y = x.double(), y
    names = [t.name for t in r.layout.tensors]
    lr = {n: 0.02 for n in names} | {"layers.2.weight": 0.01, "layers.2.bias": 0.01}
    mom = {n: 0.9 for n in names} | {"layers.2.weight": 0.5, "layers.2.bias": 0.5}
    wd = {n: 0.0 for n in names} | {"layers.1.weight": 1e-2}
    l2 = {n: 0.0 for n in names} | {"layers.0.weight": 0.1}
    p = {t.name: torch.tensor(theta[0, t.offset:t.offset + t.size].reshape(t.shape), requires_grad=True)
         for t in r.layout.tensors}
    buf: dict[str, torch.Tensor] = {}
    for t in range(6):
        xb, yb = x[idx[t]].flatten(1), y[idx[t]]
        h = torch.relu(xb @ p["layers.0.weight"].T + p["layers.0.bias"])
        h = torch.relu(h @ p["layers.1.weight"].T + p["layers.1.bias"])
        loss = torch.nn.functional.cross_entropy(h @ p["layers.2.weight"].T + p["layers.2.bias"], yb)
        loss = loss + sum(0.5 * l2[n] * (p[n] ** 2).sum() for n in names)
        grads = torch.autograd.grad(loss, [p[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, grads):
                g = g + wd[n] * p[n]
                buf[n] = g.clone() if n not in buf else mom[n] * buf[n] + g
                p[n] -= lr[n] * buf[n]
        for spec in r.layout.tensors:
            got = theta[t + 1, spec.offset:spec.offset + spec.size]
            np.testing.assert_allclose(got, p[spec.name].detach().numpy().ravel(), rtol=0, atol=2e-5,
                                       err_msg=f"{spec.name} at step {t}")
    rec = r.attrs["interventions"]["tensors"]
    assert rec["layers.2.bias"]["lr"] == 0.01 and rec["layers.2.bias"]["momentum"] == 0.5
    assert rec["layers.1.weight"]["weight_decay"] == 1e-2 and rec["layers.0.weight"]["l2"] == 0.1
    assert rec["layers.0.bias"]["group"] is None and rec["layers.2.weight"]["group"] == 0


def test_no_interventions_is_bit_identical_to_the_plain_optimizer(tmp_path: Path) -> None:
    """An empty [interventions] changes nothing: same optimizer, same trajectory, no attribute."""
    from pipeline.problem.models import build_model
    from pipeline.train.loop import make_optimizer

    wf = tiny(steps=4)
    train(wf, str(tmp_path / "n.zarr"), progress=False)
    r = open_trajectory(str(tmp_path / "n.zarr"))
    assert "interventions" not in r.attrs
    from pipeline.problem.data import load_split, resolve_data_config

    x, y = load_split(resolve_data_config(wf.data), "train")
    torch.manual_seed(wf.seed)
    model = build_model(wf.model, (1, 8, 8), 10)
    opt = make_optimizer(wf.optimizer, list(model.parameters()))
    idx = np.asarray(r.batch_indices)
    torch.set_num_threads(1)
    for t in range(4):
        loss = torch.nn.functional.cross_entropy(model(x[idx[t]]), y[idx[t]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = np.concatenate([q.detach().numpy().ravel() for q in model.parameters()])
    np.testing.assert_array_equal(np.asarray(r.params(4, 5))[0], flat)
