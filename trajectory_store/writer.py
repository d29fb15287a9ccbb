"""Recording a training trajectory into a store without making training wait for storage.

The trainer's thread only copies the parameters (one flat float32 row) and puts it on a bounded queue; a
background thread gathers rows into a chunk of `chunk_steps` checkpoints, compresses and writes it, then
commits. The commit is the `checkpoints` attribute of the `trajectory` group: it is rewritten (atomically,
as a whole file) only after the params rows and the per-step entries it covers are on disk, so a run killed
at any instant leaves a store whose count can be trusted. The bounded queue is the back-pressure: a trainer
faster than the disk blocks on `record` rather than growing memory without limit.

Durability is against a killed process (SIGKILL, OOM), not power loss: nothing is fsynced, which would cost
more than it protects for a run that can be retrained. A kill can leave `*.partial` temp files beside chunks;
they are never read.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import platform
import queue
import shutil
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import numcodecs
import numpy as np
import torch
import zarr

from .chunking import MAX_CHUNK_STEPS, param_chunk_for
from .codecs import params_codecs, small_codecs
from .errors import StoreError
from .layout import FROZEN_GROUP, ParamLayout, frozen_parameters
from .location import Location, StorePathLike, check_creatable, describe_oserror, locate
from .state import TrainingState, write_state

FORMAT_VERSION = 1
STEP_CHUNK = 4096  # per-step arrays are tiny; long chunks keep the file count down
RESERVED_ATTRS = ("format_version", "layout", "versions", "created")
# Every committed chunk is written (and so checksummed), even one that equals the fill value; params' fill
# is NaN so that a chunk file lost later reads as obviously missing, not as plausible zeros.
_ZARR_CONFIG = {"write_empty_chunks": True}


@dataclass
class _Step:
    row: np.ndarray
    loss: float
    lr: float
    indices: np.ndarray | None


@dataclass
class _Flush:
    done: threading.Event


class _Close:
    pass


def writer_process() -> dict[str, Any]:
    """Who is recording: lets a later command tell a live writer from one that was killed."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _copy(x: Any, dtype: type) -> np.ndarray:
    """A private numpy copy, taken now: the caller may change its tensor as soon as we return."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy()
    return np.array(x, dtype=dtype, copy=True)


def _json_attrs(attrs: dict[str, Any] | None) -> dict[str, Any]:
    if not attrs:
        return {}
    bad = [k for k in attrs if k in RESERVED_ATTRS]
    if bad:
        raise StoreError(f"attrs may not set {bad}: the store writes them itself")
    try:
        return json.loads(json.dumps(attrs, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"store attrs must be plain JSON (no NaN, no objects): {e}") from e


_open_writers: "weakref.WeakSet[TrajectoryWriter]" = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    # The writer thread is a daemon (a forgotten writer must not hang interpreter exit), so rows still
    # queued at exit are committed here instead of being dropped.
    for w in list(_open_writers):
        try:
            w.close()
        except Exception:  # noqa: BLE001 - nothing sensible to do at exit
            pass


class TrajectoryWriter:
    """Appends checkpoints theta_1..theta_T (theta_0 is taken by `create`) to a new trajectory store.

    Use as a context manager: leaving the block commits everything recorded; an exception inside it
    still commits what was recorded before it, closes, and propagates.
    """

    def __init__(self, *, loc: Location, root: zarr.Group, layout: ParamLayout, chunk_steps: int,
                 queue_size: int, batch_size: int | None, flush_seconds: float | None) -> None:
        # Use `create`; this only wires up an already created store.
        self._loc = loc
        self._root = root
        self._traj = root["trajectory"]
        self._layout = layout
        self._P = layout.size
        self._chunk_steps = chunk_steps
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        # zarr keeps `write_empty_chunks` per handle, not in the metadata: without it a chunk that "equals"
        # the NaN fill (any NaN payload) is skipped and reads back as the canonical NaN, not bit-exact.
        self._params = self._traj["params"].with_config(_ZARR_CONFIG)
        self._loss = self._traj["minibatch_loss"].with_config(_ZARR_CONFIG)
        self._lr = self._traj["lr"].with_config(_ZARR_CONFIG)
        self._indices = self._traj["batch_indices"].with_config(_ZARR_CONFIG) \
            if "batch_indices" in self._traj else None
        # Writer-thread state: rows [buf_start, buf_start + buf_n) are buffered, rows < committed are on disk.
        self._buf = np.empty((chunk_steps, self._P), dtype=np.float32)
        self._buf_start = 0
        self._buf_n = 0
        self._committed = 0
        self._pending: list[_Step] = []  # steps whose rows are buffered but not committed, in order
        self._last_commit = time.monotonic()
        # Caller-side state.
        self._recorded = 0
        self._closed = False
        self._error: BaseException | None = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name=f"trajectory-writer:{loc.name}", daemon=True)
        self._thread.start()
        _open_writers.add(self)

    # ---- creating ----------------------------------------------------------------------------------

    @classmethod
    def create(cls, path_or_url: StorePathLike, model: torch.nn.Module | ParamLayout, *,
               initial: np.ndarray | None = None, steps: int | None = None, batch_size: int | None = None,
               attrs: dict[str, Any] | None = None, overwrite: bool = False, chunk_steps: int = 64,
               queue_size: int = 8, storage_options: dict[str, Any] | None = None,
               flush_seconds: float | None = 60.0, problem: Any = None) -> "TrajectoryWriter":
        """Create the store and take theta_0.

        `model` is an nn.Module (layout and theta_0 from its parameters), or a ParamLayout for loops
        without a module, in which case `initial` is theta_0 as a flat float32 row [P]. `steps`, when
        known, preallocates the arrays; `batch_size`, when known, fixes the width of `batch_indices`
        (otherwise it is created at the first step that passes indices and widened as needed).
        `flush_seconds` bounds how long a recorded step may sit in memory before being committed.
        `problem` records what L is (model, data and loss by reference, and the data's fingerprints) in the
        root attribute `problem`, so `lca compute STORE` needs nothing more: a `pipeline.Problem` (its
        `writer_attrs()` fingerprints the data) or its JSON dict. Frozen parameters (requires_grad=False)
        are outside the layout; their values are stored once, in `frozen/`, and held fixed by LCA.
        """
        frozen: dict[str, np.ndarray] = {}
        if isinstance(model, torch.nn.Module):
            frozen = {n: p.detach().to("cpu").numpy().copy() for n, p in frozen_parameters(model)}
            if initial is not None:
                raise StoreError("pass `initial` only with a ParamLayout; a model's theta_0 is its parameters")
            layout = ParamLayout.from_model(model)
            row0 = layout.flatten(model)
        elif isinstance(model, ParamLayout):
            if initial is None:
                raise StoreError("a ParamLayout needs `initial=` (theta_0 as a flat row) to create a store")
            layout = model
            row0 = _copy(initial, np.float32).reshape(-1)
        else:
            raise StoreError(f"expected an nn.Module or a ParamLayout, got {type(model).__name__}")
        if layout.size == 0:
            raise StoreError("the model has no parameters to record")
        if row0.shape != (layout.size,):
            raise StoreError(f"theta_0 has {row0.size} values but the layout has {layout.size} parameters")
        if not 1 <= int(chunk_steps) <= MAX_CHUNK_STEPS:
            raise StoreError(f"chunk_steps must be in [1, {MAX_CHUNK_STEPS}], got {chunk_steps}")
        if steps is not None and int(steps) < 0:
            raise StoreError(f"steps must not be negative, got {steps}")
        if batch_size is not None and int(batch_size) < 1:
            raise StoreError(f"batch_size must be at least 1, got {batch_size}")
        if int(queue_size) < 1:
            raise StoreError(f"queue_size must be at least 1, got {queue_size}")
        attrs = dict(attrs or {})
        if problem is not None:
            if hasattr(problem, "writer_attrs"):
                attrs.update(problem.writer_attrs())
            elif isinstance(problem, dict):
                attrs["problem"] = problem
            else:
                raise StoreError(f"problem must be a pipeline.Problem or its JSON dict, got {type(problem).__name__}")
        user_attrs = _json_attrs(attrs)

        loc = locate(path_or_url, storage_options)
        check_creatable(loc, overwrite)
        root_attrs: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "workflow": None, **user_attrs, "layout": layout.to_json(),
            "versions": library_versions(), "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        }
        fresh = loc.local is not None and not loc.local.exists()
        try:
            root = _create_arrays(loc, layout, root_attrs, steps=steps, batch_size=batch_size,
                                  chunk_steps=int(chunk_steps), overwrite=overwrite, frozen=frozen)
        except StoreError:
            if fresh and loc.local is not None:  # a full disk or a failed write: leave nothing half-created
                shutil.rmtree(loc.local, ignore_errors=True)
            raise
        w = cls(loc=loc, root=root, layout=layout, chunk_steps=int(chunk_steps), queue_size=int(queue_size),
                batch_size=batch_size, flush_seconds=flush_seconds)
        w._put(_Step(row0, math.nan, math.nan, None))
        return w

    @classmethod
    def reopen(cls, path_or_url: StorePathLike, *, steps_done: int, queue_size: int = 8,
               storage_options: dict[str, Any] | None = None,
               flush_seconds: float | None = 60.0) -> "TrajectoryWriter":
        """Continue recording an unfinished store after its first `steps_done` steps.

        Checkpoints after theta_{steps_done} are dropped from the commit (they are rewritten as training
        continues); the caller restores the matching training state (`TrajectoryReader.training_state`).
        """
        from .reader import open_trajectory  # the reader imports this module

        reader = open_trajectory(path_or_url, storage_options=storage_options)
        n = int(steps_done) + 1
        if not 1 <= n <= reader.num_checkpoints:
            raise StoreError(f"cannot continue {reader.path} after step {steps_done}: it has "
                             f"{reader.num_checkpoints} committed checkpoints")
        traj = reader.group["trajectory"]
        width = traj["batch_indices"].shape[1] if "batch_indices" in traj else None
        chunk = reader.chunk_steps
        start = (n // chunk) * chunk
        rows = reader.params(start, n) if n > start else None
        traj.update_attributes({"checkpoints": n, "status": "recording", "stopped": None,
                                "writer": writer_process()})
        w = cls(loc=locate(path_or_url, storage_options), root=reader.group, layout=reader.layout,
                chunk_steps=chunk, queue_size=int(queue_size), batch_size=width, flush_seconds=flush_seconds)
        if rows is not None:
            w._buf[:n - start] = rows
        w._buf_start, w._buf_n, w._committed, w._recorded = start, n - start, n, int(steps_done)
        return w

    # ---- the trainer's side ---------------------------------------------------------------------------

    @property
    def layout(self) -> ParamLayout:
        return self._layout

    @property
    def path(self) -> str:
        return self._loc.name

    @property
    def group(self) -> zarr.Group:
        """The root group; for adding attributes, not for touching `trajectory/` while recording."""
        return self._root

    @property
    def steps_recorded(self) -> int:
        """Steps handed to `record` so far (not necessarily committed yet; see `flush`)."""
        return self._recorded

    def record(self, model: torch.nn.Module, *, loss: float = math.nan, lr: float = math.nan,
               batch_indices: Any = None) -> None:
        """Take theta_{t+1} after optimizer step t; copies on this thread, writes on the writer thread."""
        self.record_flat(self._layout.flatten(model), loss=loss, lr=lr, batch_indices=batch_indices, _owned=True)

    def record_flat(self, row: Any, *, loss: float = math.nan, lr: float = math.nan,
                    batch_indices: Any = None, _owned: bool = False) -> None:
        """Like `record`, for a flat row [P] in layout order (cast to float32, copied)."""
        self._check_open()
        arr = row if _owned else _copy(row, np.float32)
        arr = arr.reshape(-1) if arr.ndim != 1 else arr
        if arr.shape != (self._P,):
            raise StoreError(f"a checkpoint row has {arr.size} values but the store's layout has {self._P}")
        idx = None
        if batch_indices is not None:
            idx = _copy(batch_indices, np.int64).reshape(-1)
        self._put(_Step(arr, float(loss), float(lr), idx))
        self._recorded += 1

    def save_state(self, state: TrainingState) -> None:
        """Keep the state that continues the run after `state.steps_done` steps (see trajectory_store.state).

        Stored by the writer thread once the checkpoints up to theta_{steps_done} are committed; the arrays
        are copied now, so the trainer may go on changing its buffers.
        """
        self._check_open()
        if state.steps_done != self._recorded:
            raise StoreError(f"a training state after {state.steps_done} steps, but {self._recorded} steps "
                             f"are recorded; save it right after recording that step")
        self._put(state.copy())

    def flush(self, timeout: float | None = None) -> None:
        """Block until every step recorded so far is committed (e.g. before giving up on a diverged run)."""
        self._check_open()
        done = threading.Event()
        self._put(_Flush(done))
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.1):
            self._raise_if_failed()
            if not self._thread.is_alive():
                raise StoreError(f"the writer thread for {self.path} stopped unexpectedly")
            if deadline is not None and time.monotonic() > deadline:
                raise StoreError(f"flushing {self.path} took longer than {timeout} s")
        self._raise_if_failed()

    def close(self, *, status: str = "complete", stopped: str | None = None) -> None:
        """Commit everything, trim the arrays to what was recorded, and stop the writer thread.

        `status` is "complete" or "interrupted"; `stopped` says why an interrupted run stopped (one line).
        """
        if self._closed:
            return
        self._closed = True
        _open_writers.discard(self)
        if self._thread.is_alive():
            self._queue.put(_Close())
            self._thread.join()
        if self._error is None:
            try:
                self._finish(status, stopped)
            except Exception as e:  # noqa: BLE001 - reported as the store's error, with the cause
                self._error = e
        self._raise_if_failed()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is None:
            self.close()
            return
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        try:
            self.close(status="interrupted", stopped=f"{type(exc).__name__}: {first}" if first else type(exc).__name__)
        except StoreError as store_error:
            # Keep the training error as the one raised; the storage failure rides along as a note.
            exc.add_note(f"also: {store_error}")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the writer for {self.path} is closed")
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e = self._error
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""  # one line; the cause is chained
            raise StoreError(f"writing {self.path} failed: {type(e).__name__}: {first}") from e

    def _put(self, item: Any) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise StoreError(f"the writer thread for {self.path} stopped unexpectedly") from None

    # ---- the writer thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = None
            if self._flush_seconds is not None and self._pending_rows():
                timeout = max(0.0, self._last_commit + self._flush_seconds - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = _Flush(threading.Event())
            if isinstance(item, _Close):
                self._guarded(self._commit)
                return
            if isinstance(item, _Flush):
                self._guarded(self._commit)
                item.done.set()
            elif isinstance(item, TrainingState):
                self._guarded(self._store_state, item)
            elif self._error is None:
                self._guarded(self._add, item)

    def _guarded(self, fn: Any, *args: Any) -> None:
        # After the first failure nothing more is written (rows after a gap would be garbage), but the
        # thread keeps draining the queue so the trainer is never stuck on a full one.
        if self._error is not None:
            return
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - surfaced on the trainer's thread
            self._error = e

    def _pending_rows(self) -> bool:
        return self._buf_start + self._buf_n > self._committed

    def _add(self, step: _Step) -> None:
        self._buf[self._buf_n] = step.row
        self._buf_n += 1
        if self._buf_start + self._buf_n > 1:  # theta_0 has no step
            self._pending.append(step)
        if self._buf_n == self._chunk_steps:
            self._commit()

    def _commit(self) -> None:
        end = self._buf_start + self._buf_n
        if end > self._committed:
            start = self._committed
            self._ensure_rows(end)
            # From the buffer's first row, so a full chunk is one whole-chunk write with nothing to read back.
            self._params[self._buf_start:end] = self._buf[:self._buf_n]
            if self._pending:
                s0, s1 = max(start - 1, 0), end - 1
                assert s1 - s0 == len(self._pending)
                self._loss[s0:s1] = np.array([s.loss for s in self._pending], dtype=np.float64)
                self._lr[s0:s1] = np.array([s.lr for s in self._pending], dtype=np.float64)
                self._write_indices(s0, s1)
            self._traj.update_attributes({"checkpoints": end})
            self._committed = end
            self._pending = []
        self._last_commit = time.monotonic()
        if self._buf_n == self._chunk_steps:
            self._buf_start += self._chunk_steps
            self._buf_n = 0

    def _store_state(self, state: TrainingState) -> None:
        self._commit()  # the state is only useful beside the checkpoint it continues from
        write_state(self._root, self._traj, state, _ZARR_CONFIG)

    def _ensure_rows(self, rows: int) -> None:
        have = self._params.shape[0]
        if rows <= have:
            return
        grow = -(-rows // self._chunk_steps) * self._chunk_steps
        self._params.resize((grow, self._P))
        self._loss.resize((grow - 1,))
        self._lr.resize((grow - 1,))
        if self._indices is not None:
            self._indices.resize((grow - 1, self._indices.shape[1]))

    def _write_indices(self, s0: int, s1: int) -> None:
        given = [s.indices for s in self._pending]
        if all(i is None for i in given):
            return  # rows of a store's batch_indices default to -1 (fill), which is what "none" means
        width = max(len(i) for i in given if i is not None)
        if self._indices is None:
            self._indices = _create_indices(self._traj, self._params.shape[0] - 1,
                                            max(width, self._batch_size or 0), self._chunk_steps)
        elif width > self._indices.shape[1]:
            self._indices.resize((self._indices.shape[0], width))
        block = np.full((s1 - s0, self._indices.shape[1]), -1, dtype=np.int64)
        for r, i in enumerate(given):
            if i is not None:
                block[r, :len(i)] = i
        self._indices[s0:s1] = block

    def _finish(self, status: str, stopped: str | None = None) -> None:
        n = self._committed
        self._params.resize((n, self._P))
        for a in (self._loss, self._lr):
            a.resize((max(n - 1, 0),))
        if self._indices is not None:
            self._indices.resize((max(n - 1, 0), self._indices.shape[1]))
        self._traj.update_attributes({"checkpoints": n, "status": status, "stopped": stopped})


def _create_indices(traj: zarr.Group, rows: int, width: int, chunk_steps: int) -> zarr.Array:
    return traj.create_array("batch_indices", shape=(rows, width), chunks=(chunk_steps, width), dtype="int64",
                             fill_value=-1, config=_ZARR_CONFIG, dimension_names=("step", "sample"),
                             **small_codecs())


def _create_arrays(loc: Location, layout: ParamLayout, root_attrs: dict[str, Any], *, steps: int | None,
                   batch_size: int | None, chunk_steps: int, overwrite: bool,
                   frozen: dict[str, np.ndarray] | None = None) -> zarr.Group:
    """The empty store: root attributes, `trajectory/` with zero committed checkpoints."""
    P = layout.size
    rows = (int(steps) + 1) if steps is not None else chunk_steps
    try:
        store = loc.open_store(read_only=False)
        root = zarr.create_group(store, overwrite=overwrite, attributes=root_attrs, zarr_format=3)
        traj = root.create_group("trajectory", attributes={
            "checkpoints": 0, "status": "recording", "chunk_steps": chunk_steps,
            "planned_steps": None if steps is None else int(steps), "writer": writer_process()})
        traj.create_array("params", shape=(rows, P), chunks=(chunk_steps, param_chunk_for(P, chunk_steps)),
                          dtype="float32", fill_value=math.nan, config=_ZARR_CONFIG, **params_codecs(),
                          dimension_names=("checkpoint", "parameter"))
        for name in ("minibatch_loss", "lr"):
            traj.create_array(name, shape=(rows - 1,), chunks=(STEP_CHUNK,), dtype="float64",
                              fill_value=math.nan, config=_ZARR_CONFIG, dimension_names=("step",),
                              **small_codecs())
        if batch_size is not None:
            _create_indices(traj, rows - 1, int(batch_size), chunk_steps)
        if frozen:
            group = root.create_group(FROZEN_GROUP, attributes={"names": list(frozen)})
            for i, value in enumerate(frozen.values()):
                arr = group.create_array(str(i), shape=value.shape, dtype=value.dtype, config=_ZARR_CONFIG,
                                         **small_codecs())
                arr[...] = value
    except OSError as e:
        raise StoreError(f"cannot create store at {loc.name}: {describe_oserror(e)}") from e
    except zarr.errors.ContainsGroupError as e:  # a concurrent creator won the race
        raise StoreError(f"store {loc.name} already exists; pass --overwrite to replace it") from e
    return root
