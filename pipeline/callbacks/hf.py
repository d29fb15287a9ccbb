"""A Hugging Face `TrainerCallback` that records the trajectory of `Trainer.train` for LCA.

    from pipeline.callbacks.hf import TrajectoryCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[TrajectoryCallback("runs/gpt2.zarr", problem=p)])

`on_step_end` fires once per optimizer step (micro-batches of gradient accumulation fire `on_substep_end`),
after the scheduler has moved on, so the step's learning rate is read just before the optimizer steps. The
Trainer hands callbacks no loss, so the model's own per-micro-batch loss is taken by a forward hook.
The Trainer has no exception event either: a store whose training crashed is marked "interrupted" when the
process exits (or when `train()` is called again on the same callback).
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    import transformers
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from pipeline.errors import LCAError

    raise LCAError("pipeline.callbacks.hf needs transformers: pip install 'lca-pipeline[hf]'") from e

import torch

from pipeline.callbacks.recorder import StepRecorder
from trajectory_store.location import StorePathLike


class TrajectoryCallback(TrainerCallback):
    """Records theta_0 at train start, then theta after every optimizer step, its loss and learning rate.

    `problem` (a `pipeline.problem.Problem`) is stored with the trajectory so that `lca compute STORE`
    needs nothing more; without it, compute needs `--workflow`. Only the world-zero process records.
    """

    def __init__(self, store: StorePathLike, *, problem: Any = None, overwrite: bool = False,
                 chunk_steps: int = 64, storage_options: dict[str, Any] | None = None) -> None:
        self.recorder = StepRecorder(store, problem=problem, overwrite=overwrite, chunk_steps=chunk_steps,
                                     storage_options=storage_options)
        self._hook: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or model is None:
            return
        self._remove_hook()
        self.recorder.start(model, steps=state.max_steps - state.global_step,
                            source=f"transformers {transformers.__version__}")
        self._hook = model.register_forward_hook(self._take_loss, with_kwargs=True)

    def _take_loss(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) \
                and output[0].dim() == 0:
            loss = output[0]
        if loss is not None:
            # With `num_items_in_batch` the model divides by the whole optimizer step's token count, so
            # each micro-batch's loss is its share of the step's loss.
            self.recorder.micro_batch_loss(loss, part_of_step=kwargs.get("num_items_in_batch") is not None)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> None:
        if self.recorder.recording and optimizer is not None:
            self.recorder.learning_rate(optimizer)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: torch.nn.Module | None = None, **kwargs: Any) -> None:
        if self.recorder.recording and model is not None:
            self.recorder.step(model)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._remove_hook()
        self.recorder.finish("complete")

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
