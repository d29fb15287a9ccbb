"""The training state a run needs to continue after an interruption, kept in the store beside the trajectory.

A trajectory alone cannot be continued: the next step also depends on the optimizer's buffers (momentum,
Adam moments), the random generators and the position in the minibatch order. The trainer hands that state
to the writer at chunk boundaries (and when it stops cleanly); the writer stores it as plain arrays plus
JSON (never pickle) in one of two slots, `train_state/a` and `train_state/b`, and only then points the
`train_state` attribute of `trajectory/` at it. A kill while a slot is written leaves the pointer on the
other, complete slot, so the state read back is always whole and always matches a committed checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import zarr

from .codecs import small_codecs
from .errors import StoreError

GROUP = "train_state"
POINTER = "train_state"  # attribute of trajectory/: {"slot": "a"|"b", "steps_done": k}
SLOTS = ("a", "b")


@dataclass
class TrainingState:
    """What continuing after `steps_done` optimizer steps needs: named arrays (bit-exact) and JSON."""

    steps_done: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> "TrainingState":
        """A private copy: the trainer keeps changing its buffers while the writer thread stores these."""
        return TrainingState(int(self.steps_done), {k: np.array(v, copy=True) for k, v in self.arrays.items()},
                             json.loads(json.dumps(self.meta, allow_nan=False)))


def write_state(root: zarr.Group, traj: zarr.Group, state: TrainingState, config: Mapping[str, Any]) -> None:
    """Store `state` in the slot the pointer does not name, then move the pointer to it."""
    current = traj.attrs.get(POINTER)
    slot = SLOTS[1] if isinstance(current, dict) and current.get("slot") == SLOTS[0] else SLOTS[0]
    group = root.require_group(GROUP).create_group(slot, overwrite=True)
    shapes = {}
    for name, arr in state.arrays.items():
        flat = np.ascontiguousarray(arr).reshape(-1)
        shapes[name] = list(arr.shape)
        a = group.create_array(name, shape=flat.shape, chunks=(max(1, flat.size),), dtype=flat.dtype,
                               config=dict(config), **small_codecs())
        a[...] = flat
    group.attrs.update({"steps_done": state.steps_done, "shapes": shapes, "meta": state.meta})
    traj.update_attributes({POINTER: {"slot": slot, "steps_done": state.steps_done}})


def read_state(root: zarr.Group, traj: zarr.Group, path: str) -> TrainingState | None:
    """The last state the writer completed, or None when the run stored none (or an older store)."""
    pointer = traj.attrs.get(POINTER)
    if pointer is None:
        return None
    try:
        slot, steps_done = pointer["slot"], int(pointer["steps_done"])
        group = root[f"{GROUP}/{slot}"]
        attrs = dict(group.attrs)
        shapes, meta = dict(attrs["shapes"]), dict(attrs["meta"])
        if int(attrs["steps_done"]) != steps_done:
            raise ValueError(f"slot {slot} holds step {attrs['steps_done']}, the pointer says {steps_done}")
        arrays = {name: np.asarray(group[name][:]).reshape(tuple(shape)) for name, shape in shapes.items()}
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        raise StoreError(f"{path}: the saved training state is damaged ({type(e).__name__}: {e}); retrain "
                         f"with --overwrite") from None
    return TrainingState(steps_done, arrays, meta)
