"""What both framework callbacks share: one store, theta_0 at train start, one row per optimizer step.

A callback sees training as a stream of events (micro-batch ends, optimizer steps, train end, a crash);
this class turns them into the writer's calls, so the Lightning and Hugging Face adapters only translate
their framework's event names. Micro-batch losses are gathered until the optimizer steps, so gradient
accumulation records one checkpoint per optimizer step whose loss is the mean over its micro-batches.
"""

from __future__ import annotations

import atexit
import math
import threading
import weakref
from typing import Any

import torch

from trajectory_store import TrajectoryWriter
from trajectory_store.location import StorePathLike

_live: "weakref.WeakSet[StepRecorder]" = weakref.WeakSet()


def _close_on_exit() -> None:
    # A recording still open at exit never reached its framework's train-end event: the script died (an
    # uncaught exception; Hugging Face's Trainer has no exception event for callbacks) or stopped mid-fit.
    for rec in list(_live):
        try:
            rec.finish("interrupted")
        except Exception:  # noqa: BLE001 - nothing sensible to do at exit
            pass


_exit_hook_registered = False


def _register_exit_hook() -> None:
    """Run `_close_on_exit` while the process can still write.

    Plain `atexit` is too late: by then concurrent.futures has shut its thread pools down (its own exit
    hook runs at threading shutdown), and zarr cannot schedule a write. Threading-shutdown hooks run in
    reverse order of registration, so one registered after the first store was created runs before
    that pool shutdown. (`threading._register_atexit` is what concurrent.futures itself uses.)
    """
    global _exit_hook_registered
    if _exit_hook_registered:
        return
    register = getattr(threading, "_register_atexit", None)
    (register or atexit.register)(_close_on_exit)
    _exit_hook_registered = True


class StepRecorder:
    """The state of one recording: created lazily at train start, closed at train end or on a crash."""

    def __init__(self, store: StorePathLike, *, problem: Any = None, overwrite: bool = False,
                 chunk_steps: int = 64, storage_options: dict[str, Any] | None = None,
                 attrs: dict[str, Any] | None = None) -> None:
        self.store = store
        self.problem = problem
        self.overwrite = overwrite
        self.chunk_steps = chunk_steps
        self.storage_options = storage_options
        self.attrs = dict(attrs or {})
        self.writer: TrajectoryWriter | None = None
        self._losses: list[float] = []
        self._loss_is_part = False
        self._lr = math.nan

    @property
    def recording(self) -> bool:
        return self.writer is not None

    def start(self, model: torch.nn.Module, *, steps: int | None = None, source: str) -> None:
        """Create the store and take theta_0 from `model` as it is before the first optimizer step."""
        if self.writer is not None:  # a second fit() on the same callback: the first one never ended
            self.finish("interrupted")
        # The writer records the problem with its data's fingerprints, taken here as training sees the data.
        self.writer = TrajectoryWriter.create(
            self.store, model, steps=steps if steps and steps > 0 else None,
            attrs={"recorded_by": source, **self.attrs}, problem=self.problem, overwrite=self.overwrite,
            chunk_steps=self.chunk_steps, storage_options=self.storage_options)
        self._losses, self._lr = [], math.nan
        _live.add(self)
        _register_exit_hook()

    def micro_batch_loss(self, loss: Any, *, part_of_step: bool = False) -> None:
        """One micro-batch's loss; `part_of_step` means it is already that micro-batch's share of the step's
        loss (Hugging Face with `num_items_in_batch`), so the shares add up instead of being averaged."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                return
            loss = loss.detach().item()
        self._losses.append(float(loss))
        self._loss_is_part = part_of_step

    def learning_rate(self, optimizer: torch.optim.Optimizer) -> None:
        """The rate the coming optimizer step uses (the first parameter group's, as `lca train` records)."""
        self._lr = float(optimizer.param_groups[0]["lr"])

    def step(self, model: torch.nn.Module) -> None:
        """theta_{t+1}, after optimizer step t, with the step's minibatch loss and learning rate."""
        if self.writer is None:
            return
        if self._losses:
            loss = sum(self._losses) if self._loss_is_part else sum(self._losses) / len(self._losses)
        else:
            loss = math.nan
        self.writer.record(model, loss=loss, lr=self._lr)
        self._losses, self._lr = [], math.nan

    def finish(self, status: str = "complete") -> None:
        """Commit everything and mark the store; "interrupted" tells readers the run did not end normally."""
        writer, self.writer = self.writer, None
        _live.discard(self)
        if writer is not None:
            writer.close(status=status)
