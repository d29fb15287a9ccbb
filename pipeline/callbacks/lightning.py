"""A Lightning `Callback` that records the trajectory of `trainer.fit` for LCA.

    from pipeline.callbacks.lightning import TrajectoryCallback
    trainer = L.Trainer(callbacks=[TrajectoryCallback("runs/mine.zarr", problem=problem)])

Lightning's `global_step` counts optimizer steps, so a checkpoint is taken on the micro-batch whose end
finds it advanced: with `accumulate_grad_batches=k` that is once per k micro-batches (and once more for an
epoch's leftover micro-batches, which Lightning also steps on).
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from pipeline.errors import LCAError

    raise LCAError("pipeline.callbacks.lightning needs Lightning: pip install 'lca-pipeline[lightning]'") from e

from pipeline.callbacks.recorder import StepRecorder
from trajectory_store.location import StorePathLike


class TrajectoryCallback(pl.Callback):
    """Records theta_0 at train start, then theta after every optimizer step, its loss and learning rate.

    `problem` (a `pipeline.problem.Problem`) is stored with the trajectory so that `lca compute STORE`
    needs nothing more; without it, compute needs `--workflow`. Only the global-zero process records.
    """

    def __init__(self, store: StorePathLike, *, problem: Any = None, overwrite: bool = False,
                 chunk_steps: int = 64, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.recorder = StepRecorder(store, problem=problem, overwrite=overwrite, chunk_steps=chunk_steps,
                                     storage_options=storage_options)
        self._global_step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        steps = trainer.estimated_stepping_batches
        steps = int(steps) if steps != float("inf") else None
        if trainer.max_steps and trainer.max_steps > 0:
            steps = trainer.max_steps if steps is None else min(steps, trainer.max_steps)
        self._global_step = trainer.global_step
        self.recorder.start(pl_module, steps=steps, source=f"lightning {pl.__version__}")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        if self.recorder.recording:
            self.recorder.learning_rate(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.recorder.recording:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            # Automatic optimisation hands callbacks the loss already divided by accumulate_grad_batches.
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self.recorder.micro_batch_loss(loss * scale)
        if trainer.global_step > self._global_step:
            self._global_step = trainer.global_step
            self.recorder.step(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.finish("complete")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.recorder.finish("interrupted")
