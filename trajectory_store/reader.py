"""Reading a trajectory store: the committed checkpoints only, whatever state the writer was left in.

The `checkpoints` attribute is the only source of truth for how much of `trajectory/` is valid; the arrays
may be longer (preallocated, or grown ahead of a commit that never happened). Everything here is sliced to
that count, and every failure is a StoreError that names the store.
"""

from __future__ import annotations

import contextlib
import operator
import os
import socket
from typing import Any, Iterator

import numpy as np
import zarr

from .errors import StoreError
from .layout import FROZEN_GROUP, ParamLayout
from .location import StorePathLike, describe_oserror, has_metadata, locate
from .state import TrainingState, read_state
from .writer import FORMAT_VERSION


class TrajectoryReader:
    """A committed trajectory: theta_0..theta_T plus per-step loss, learning rate and minibatch indices."""

    def __init__(self, group: zarr.Group, path: str) -> None:
        # Use `open_trajectory`; this trusts that `group` was validated there.
        self._group = group
        self._path = path
        with damaged_metadata(path):
            self._traj = group["trajectory"]
            self._params = self._traj["params"]
        self._layout = _layout(group.attrs.get("layout"), path)
        self._checkpoints = _checkpoints(self._traj, path)
        self._check_shapes()

    def _check_shapes(self) -> None:
        if self._params.ndim != 2 or self._params.shape[1] != self._layout.size:
            raise StoreError(f"{self._path}: trajectory/params has shape {self._params.shape}, "
                             f"but the layout describes {self._layout.size} parameters")
        if self._params.shape[0] < self._checkpoints:
            raise StoreError(f"{self._path}: {self._checkpoints} checkpoints are committed but trajectory/params "
                             f"has only {self._params.shape[0]} rows; the store is damaged")

    def refresh(self) -> None:
        """Re-read the commit count, to follow a store that is still being written."""
        with damaged_metadata(self._path):
            self._traj = self._group["trajectory"]  # a lookup reads the metadata from the store again
            self._params = self._traj["params"]
        self._checkpoints = _checkpoints(self._traj, self._path)
        self._check_shapes()

    # ---- what the store is ------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def group(self) -> zarr.Group:
        """The root group, writable unless opened with mode="r" (the LCA phase adds `lca/` to it)."""
        return self._group

    @property
    def layout(self) -> ParamLayout:
        return self._layout

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    @property
    def problem(self) -> dict[str, Any] | None:
        """The recorded problem definition (model, data, loss, fingerprints), or None."""
        p = self._group.attrs.get("problem")
        return dict(p) if isinstance(p, dict) else None

    def frozen(self) -> dict[str, np.ndarray]:
        """Values of the frozen (requires_grad=False) parameters, held fixed during LCA; {} if none."""
        if FROZEN_GROUP not in self._group:
            return {}
        group = self._group[FROZEN_GROUP]
        names = list(group.attrs.get("names", []))
        try:
            return {str(name): np.asarray(group[str(i)][...]) for i, name in enumerate(names)}
        except (KeyError, OSError, ValueError) as e:
            raise StoreError(f"{self._path}: {FROZEN_GROUP}/ is damaged ({e}); retrain the run") from None

    @property
    def workflow(self) -> dict[str, Any] | None:
        wf = self._group.attrs.get("workflow")
        return dict(wf) if isinstance(wf, dict) else None

    @property
    def status(self) -> str:
        """'complete', 'interrupted' (an exception ended the recording) or 'recording' (still open, or killed)."""
        return str(self._traj.attrs.get("status", "recording"))

    @property
    def planned_steps(self) -> int | None:
        """The steps the run was meant to take, when the writer was told (None for open-ended loops)."""
        n = self._traj.attrs.get("planned_steps")
        return int(n) if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None

    @property
    def stopped(self) -> str | None:
        """Why an interrupted recording stopped (one line), when it was recorded."""
        why = self._traj.attrs.get("stopped")
        return str(why) if why else None

    @property
    def writer_alive(self) -> bool | None:
        """For a store still marked "recording": is its writer process alive? None when it cannot be told
        (another host, or no record of the writer)."""
        info = self._traj.attrs.get("writer")
        if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
            return None
        if info.get("host") != socket.gethostname():
            return None
        pid = info["pid"]
        if pid == os.getpid():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @property
    def writer_info(self) -> dict[str, Any]:
        info = self._traj.attrs.get("writer")
        return dict(info) if isinstance(info, dict) else {}

    def training_state(self) -> TrainingState | None:
        """The last training state the writer stored (to continue the run), or None."""
        return read_state(self._group, self._traj, self._path)

    @property
    def num_checkpoints(self) -> int:
        return self._checkpoints

    @property
    def num_steps(self) -> int:
        return max(self._checkpoints - 1, 0)

    @property
    def num_params(self) -> int:
        return self._layout.size

    @property
    def chunk_steps(self) -> int:
        return int(self._params.chunks[0])

    @property
    def param_chunk(self) -> int:
        return int(self._params.chunks[1])

    @property
    def params_array(self) -> zarr.Array:
        """The raw zarr array (for dask); rows at or past `num_checkpoints` are not part of the trajectory."""
        return self._params

    # ---- the data -----------------------------------------------------------------------------------

    def params(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Checkpoints theta_start..theta_{stop-1} as float32 [stop-start, P], bit for bit as recorded."""
        n = self._checkpoints
        try:
            start = operator.index(start)
            stop = n if stop is None else operator.index(stop)
        except TypeError as e:
            raise StoreError(f"checkpoint bounds must be integers, got start={start!r} stop={stop!r}") from e
        if not 0 <= start <= stop <= n:
            raise StoreError(f"checkpoint range [{start}, {stop}) is outside [0, {n}], the checkpoints "
                             f"committed in {self._path}")
        return self._read(self._params, slice(start, stop), "trajectory/params")

    @property
    def minibatch_loss(self) -> np.ndarray:
        return self._read(self._traj["minibatch_loss"], slice(0, self.num_steps), "trajectory/minibatch_loss")

    @property
    def lr(self) -> np.ndarray:
        return self._read(self._traj["lr"], slice(0, self.num_steps), "trajectory/lr")

    @property
    def batch_indices(self) -> np.ndarray | None:
        """int64 [T, B], -1 where a step used fewer than B samples (or passed none); None if no step did."""
        if "batch_indices" not in self._traj:
            return None
        return self._read(self._traj["batch_indices"], slice(0, self.num_steps), "trajectory/batch_indices")

    def _read(self, arr: zarr.Array, rows: slice, name: str) -> np.ndarray:
        if rows.stop > arr.shape[0]:
            raise StoreError(f"{self._path}: {name} has {arr.shape[0]} rows, fewer than the {rows.stop} "
                             f"committed; the store is damaged")
        try:
            data = np.asarray(arr[rows])
        except OSError as e:
            raise StoreError(f"cannot read {name} of {self._path}: {describe_oserror(e)}") from e
        except (ValueError, RuntimeError) as e:  # crc32c mismatch, truncated or undecodable chunk
            raise StoreError(f"cannot read {name} rows [{rows.start}, {rows.stop}) of {self._path}: "
                             f"{e}") from e
        if data.dtype.kind == "f" and np.isnan(data).any():
            # Committed rows are never the NaN fill, so NaN there is either a recorded NaN or a lost chunk.
            missing = missing_chunks(arr, rows)
            if missing:
                raise StoreError(f"{self._path} is damaged: {len(missing)} chunk(s) of {name} are missing "
                                 f"({', '.join(missing[:3])}), inside the committed rows [{rows.start}, "
                                 f"{rows.stop}); restore the store from a copy or retrain it")
        return data

    def __repr__(self) -> str:
        return (f"<TrajectoryReader {self._path}: {self.num_steps} steps, {self.num_params} parameters, "
                f"{len(self._layout)} tensors, {self.status}>")


def missing_chunks(arr: zarr.Array, rows: slice) -> list[str]:
    """Keys of the chunks holding `rows` (all columns) that are absent from the store."""
    from zarr.core.sync import sync

    step = arr.chunks[0]
    first, last = rows.start // step, (max(rows.stop, rows.start + 1) - 1) // step
    col_chunks = [range(-(-n // c)) for n, c in zip(arr.shape[1:], arr.chunks[1:])]
    keys = []
    for r in range(first, last + 1):
        for rest in (np.ndindex(*[len(c) for c in col_chunks]) if col_chunks else [()]):
            key = arr.metadata.encode_chunk_key((r, *rest))
            if not sync(arr.store_path.store.exists(f"{arr.store_path.path}/{key}")):
                keys.append(key)
    return keys


@contextlib.contextmanager
def damaged_metadata(path: str, what: str = "its Zarr metadata") -> Iterator[None]:
    """Turn what zarr raises on unreadable metadata (bad JSON, wrong fields, a missing node) into one line."""
    try:
        yield
    except StoreError:
        raise
    except OSError as e:
        raise StoreError(f"cannot read {path}: {describe_oserror(e)}") from e
    except (ValueError, TypeError, KeyError, AttributeError, zarr.errors.BaseZarrError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise StoreError(f"{path} is damaged: {what} cannot be read ({type(e).__name__}: {first}); restore "
                         f"the store from a copy or retrain it") from e


def _layout(raw: Any, path: str) -> ParamLayout:
    try:
        if not isinstance(raw, list) or not raw:
            raise TypeError(f"expected a non-empty list of tensors, got {type(raw).__name__}")
        layout = ParamLayout.from_json(raw)
        offset = 0
        for t in layout.tensors:
            if t.offset != offset or any(d < 0 for d in t.shape):
                raise ValueError(f"tensor {t.name!r} has offset {t.offset} and shape {list(t.shape)}")
            offset += t.size
        return layout
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise StoreError(f"{path} is damaged: its root attribute `layout` is not a parameter layout ({e}); "
                         f"restore the store from a copy or retrain it") from None


def _checkpoints(traj: zarr.Group, path: str) -> int:
    n = traj.attrs.get("checkpoints")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise StoreError(f"{path}: trajectory attribute `checkpoints` is missing or invalid ({n!r})")
    return n


def open_trajectory(path_or_url: StorePathLike, *, mode: str = "r+",
                    storage_options: dict[str, Any] | None = None) -> TrajectoryReader:
    """Open a store written by TrajectoryWriter; mode "r+" (default) lets the caller add groups to it."""
    if mode not in ("r", "r+"):
        raise StoreError(f"open_trajectory mode must be 'r' or 'r+', got {mode!r}")
    loc = locate(path_or_url, storage_options)
    if loc.local is not None:
        if not loc.local.exists():
            raise StoreError(f"no trajectory store at {loc.name}")
        if not loc.local.is_dir():
            raise StoreError(f"{loc.name} is not a trajectory store (it is a file, not a Zarr folder)")
    store = loc.open_store(read_only=(mode == "r"))
    if not has_metadata(loc, store):
        raise StoreError(f"{loc.name} is not a trajectory store (no Zarr metadata there)")
    try:
        node = zarr.open(store, mode=mode, zarr_format=3)
    except OSError as e:
        raise StoreError(f"cannot open {loc.name}: {describe_oserror(e)}") from e
    except (ValueError, KeyError, TypeError, zarr.errors.NodeTypeValidationError) as e:
        raise StoreError(f"{loc.name} is not a readable Zarr v3 store: {e}") from e
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{loc.name} is not a trajectory store (it holds a bare Zarr array)")
    version = node.attrs.get("format_version")
    if version is None or "layout" not in node.attrs:
        raise StoreError(f"{loc.name} is not a trajectory store (no format_version/layout attributes)")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise StoreError(f"{loc.name} has trajectory format_version {version}; this version reads {FORMAT_VERSION}")
    try:
        traj = node["trajectory"]
        traj["params"]
    except KeyError as e:
        raise StoreError(f"{loc.name} is not a trajectory store (no trajectory/params)") from e
    except Exception as e:  # noqa: BLE001 - narrowed and worded by damaged_metadata
        with damaged_metadata(loc.name):
            raise e
    if not isinstance(traj, zarr.Group) or not isinstance(traj["params"], zarr.Array):
        raise StoreError(f"{loc.name} is damaged: trajectory/params is not an array in a group; restore the "
                         f"store from a copy or retrain it")
    return TrajectoryReader(node, loc.name)
