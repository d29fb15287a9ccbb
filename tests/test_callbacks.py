"""The Lightning and Hugging Face recording callbacks: one checkpoint per optimizer step, its loss and rate.

The trajectory a callback records is checked against training replayed by hand (plain SGD, no dropout), so
a checkpoint taken per micro-batch, or an off-by-one in the learning rate, cannot pass.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trajectory_store import open_trajectory

ROOT = Path(__file__).resolve().parents[1]


def _trajectory(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    r = open_trajectory(str(path))
    n = r.num_checkpoints
    traj = r.group["trajectory"]
    return (r.params(0, n), np.asarray(traj["minibatch_loss"][: n - 1]), np.asarray(traj["lr"][: n - 1]),
            traj.attrs["status"])


# ---- Lightning -------------------------------------------------------------------------------------------

def _lightning_module(fail_at: int | None = None):
    import lightning.pytorch as pl

    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if fail_at is not None and self.global_step == fail_at:
                raise RuntimeError("boom")
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.5)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Plain()


def _lightning_fit(module, store: Path, *, accumulate: int, batches: int = 10, batch: int = 4, **cb_kwargs):
    import lightning.pytorch as pl

    from pipeline.callbacks.lightning import TrajectoryCallback

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batches * batch, 4, generator=g), torch.randint(0, 3, (batches * batch,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         callbacks=[TrajectoryCallback(str(store), **cb_kwargs)])
    theta0 = torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()
    trainer.fit(module, loader)
    return trainer, theta0, x, y


def test_lightning_records_once_per_optimizer_step_with_accumulation(tmp_path: Path) -> None:
    module = _lightning_module()
    store = tmp_path / "l.zarr"
    trainer, theta0, x, y = _lightning_fit(module, store, accumulate=3)
    params, loss, lr, status = _trajectory(store)

    # 10 micro-batches, 3 per step: 3 full steps and the epoch's leftover micro-batch, which Lightning steps on.
    assert trainer.global_step == 4
    assert params.shape[0] == trainer.global_step + 1
    assert status == "complete"
    np.testing.assert_array_equal(params[0], theta0.numpy())
    np.testing.assert_array_equal(params[-1], torch.cat([p.detach().reshape(-1) for p in module.parameters()]))
    np.testing.assert_allclose(lr, [0.5, 0.25, 0.125, 0.0625])

    # Replay the three full steps by hand: plain SGD on the mean of three micro-batch losses at theta_t.
    replay = _lightning_module()
    names = [n for n, _ in replay.named_parameters()]
    for t in range(3):
        start = 0
        with torch.no_grad():
            for p in replay.parameters():
                p.copy_(torch.from_numpy(params[t][start:start + p.numel()]).reshape(p.shape))
                start += p.numel()
        replay.zero_grad()
        micro = [nn.functional.cross_entropy(replay(x[i * 4:(i + 1) * 4]), y[i * 4:(i + 1) * 4])
                 for i in range(3 * t, 3 * t + 3)]
        mean = torch.stack(micro).mean()
        mean.backward()
        assert loss[t] == pytest.approx(mean.item(), rel=1e-6)
        expected = torch.cat([(p - lr[t] * p.grad).detach().reshape(-1) for p in replay.parameters()])
        np.testing.assert_allclose(params[t + 1], expected.numpy(), rtol=0, atol=2e-6, err_msg=f"step {t} {names}")


def test_lightning_marks_the_store_interrupted_on_an_exception(tmp_path: Path) -> None:
    store = tmp_path / "l.zarr"
    with pytest.raises(RuntimeError, match="boom"):
        _lightning_fit(_lightning_module(fail_at=2), store, accumulate=1)
    params, loss, _, status = _trajectory(store)
    assert status == "interrupted"
    assert params.shape[0] == 3 and np.isfinite(loss).all()  # theta_0 and the two steps that finished


def test_lightning_refuses_an_existing_store_in_one_line(tmp_path: Path) -> None:
    from trajectory_store.errors import StoreError

    store = tmp_path / "l.zarr"
    _lightning_fit(_lightning_module(), store, accumulate=1, batches=2)
    with pytest.raises(StoreError, match="already exists") as info:
        _lightning_fit(_lightning_module(), store, accumulate=1, batches=2)
    assert "\n" not in str(info.value)
    _lightning_fit(_lightning_module(), store, accumulate=1, batches=3, overwrite=True)
    assert _trajectory(store)[0].shape[0] == 4


def test_lightning_frozen_parameters_stay_out_of_the_layout(tmp_path: Path) -> None:
    module = _lightning_module()
    module.net[0].requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    store = tmp_path / "l.zarr"
    _lightning_fit(module, store, accumulate=1, batches=3)
    reader = open_trajectory(str(store))
    assert reader.layout.names == ["net.2.weight", "net.2.bias"]
    assert reader.params(0, reader.num_checkpoints).shape == (4, 8 * 3 + 3)
    assert set(reader.frozen()) == set(frozen)
    for name, value in frozen.items():
        np.testing.assert_array_equal(reader.frozen()[name], value.numpy())


# ---- Hugging Face ----------------------------------------------------------------------------------------

def _tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def _hf_args(out: Path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=2, num_train_epochs=1, report_to=[],
                use_cpu=True, save_strategy="no", logging_steps=1, learning_rate=1e-2, disable_tqdm=True,
                lr_scheduler_type="linear", seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def test_hf_records_once_per_optimizer_step_with_accumulation(tmp_path: Path) -> None:
    from transformers import Trainer

    from pipeline.callbacks.hf import TrajectoryCallback

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (20, 16), generator=g)
    data = [{"input_ids": ids[i], "labels": ids[i]} for i in range(20)]
    model = _tiny_gpt2()
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    store = tmp_path / "h.zarr"
    trainer = Trainer(model=model, args=_hf_args(tmp_path / "out", gradient_accumulation_steps=3),
                      train_dataset=data, callbacks=[TrajectoryCallback(str(store))])
    trainer.train()
    params, loss, lr, status = _trajectory(store)

    # 10 micro-batches of 2, 3 per optimizer step: 4 steps (the last has one micro-batch).
    assert trainer.state.global_step == 4
    assert params.shape[0] == trainer.state.global_step + 1
    assert status == "complete"
    np.testing.assert_array_equal(params[0], theta0.numpy())
    np.testing.assert_array_equal(params[-1], torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    # Hugging Face's own per-step log (logging_steps=1) is the reference for the step's loss and rate.
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    np.testing.assert_allclose(loss, [h["loss"] for h in logs], rtol=1e-6)
    np.testing.assert_allclose(lr, [h["learning_rate"] for h in logs], rtol=1e-12)
    assert lr[0] == pytest.approx(1e-2) and (np.diff(lr) < 0).all()
    # Tied embeddings are one parameter: the layout has wte but no lm_head.
    names = open_trajectory(str(store)).layout.names
    assert "transformer.wte.weight" in names and not any(n.startswith("lm_head") for n in names)


def test_hf_crash_leaves_an_interrupted_store_in_a_real_process(tmp_path: Path) -> None:
    """The Trainer has no exception event: the store must still say "interrupted" when the script dies."""
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from transformers import Trainer, TrainerCallback
        from pipeline.callbacks.hf import TrajectoryCallback
        from test_callbacks import _hf_args, _tiny_gpt2

        class Boom(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 3:
                    raise RuntimeError("boom at step 3")

        ids = torch.randint(0, 64, (12, 16))
        data = [{{"input_ids": ids[i], "labels": ids[i]}} for i in range(12)]
        trainer = Trainer(model=_tiny_gpt2(), args=_hf_args({str(tmp_path / 'out')!r}), train_dataset=data,
                          callbacks=[TrajectoryCallback({str(tmp_path / 'h.zarr')!r}), Boom()])
        trainer.train()
    """))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "boom at step 3" in proc.stderr
    params, loss, lr, status = _trajectory(tmp_path / "h.zarr")
    assert status == "interrupted"
    assert params.shape[0] == 4 and np.isfinite(loss).all() and np.isfinite(lr).all()


def _imported_top_modules(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_each_callback_module_imports_only_its_own_framework() -> None:
    """The two extras are independent: no module on the Lightning path names transformers, and back."""
    shared = _imported_top_modules(ROOT / "pipeline" / "callbacks" / "recorder.py")
    lightning_side = _imported_top_modules(ROOT / "pipeline" / "callbacks" / "lightning.py") | shared
    hf_side = _imported_top_modules(ROOT / "pipeline" / "callbacks" / "hf.py") | shared
    assert "lightning" in lightning_side and "transformers" not in lightning_side
    assert "transformers" in hf_side and not {"lightning", "pytorch_lightning"} & hf_side


_HIDE = """
import sys
from importlib.machinery import PathFinder

class Hiding(PathFinder):  # as if {hidden} were not installed: no module, no package metadata
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == {hidden!r} else PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, context=None, **kw):
        return (d for d in PathFinder.find_distributions(context, **kw) if d.metadata["Name"] != {hidden!r})

sys.meta_path = [Hiding if f is PathFinder else f for f in sys.meta_path]
from pipeline.errors import LCAError
import pipeline.callbacks.hf
assert {hidden!r} not in sys.modules
try:
    import pipeline.callbacks.lightning
except LCAError as e:
    print(e)
"""


def test_hf_callback_works_without_lightning_and_the_other_says_what_to_install() -> None:
    out = subprocess.run([sys.executable, "-c", _HIDE.format(hidden="lightning")], check=True, timeout=300,
                         cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert out == "pipeline.callbacks.lightning needs Lightning: pip install 'lca-pipeline[lightning]'"
