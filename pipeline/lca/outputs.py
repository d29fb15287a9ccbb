"""Which LCA a result keeps, and the per-unit and per-layer sums that it always keeps.

Per-parameter LCA is T x P float32, as large as the trajectory itself: 1 TB for a 25M-parameter model over
10k steps. Most questions (which layer hurt, which neuron paid for learning, when) need only its sums over
a unit (an output neuron or channel: the weights feeding it plus its bias) or over a layer (one parameter
tensor). So the sums are taken on the worker, from each step's row while it is in memory, and stored as
their own small arrays; the per-parameter array becomes a choice (`keep`), optionally for a few layers only.

The sums are float64 sums of the stored float32 values (the same values the residual is computed from), so
a unit's or layer's LCA is what summing the per-parameter array would give, to float64 rounding, and the
conservation residual holds for them as it does for the parameters. Each row is reduced on its own, in a
fixed order, so results are bit-identical whatever the block size.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.errors import LCAError

KEEPS = ("parameter", "unit", "layer")
# Columns reduced at a time: bounds the float64 temporaries of one row of a huge model.
_REDUCE_COLUMNS = 1 << 20


def match_layers(names: Sequence[str], modules: Sequence[str], globs: Sequence[str]) -> list[int]:
    """Indices of the tensors whose name, or whose module's name, matches any glob (`fc3`, `fc3.*`, `*.bias`).

    A glob that matches nothing is a typo that would silently keep nothing: refuse it, listing the names.
    """
    chosen = set()
    for g in globs:
        hit = [i for i, (n, m) in enumerate(zip(names, modules)) if fnmatch.fnmatchcase(n, g)
               or (m and fnmatch.fnmatchcase(m, g))]
        if not hit:
            shown = ", ".join(list(names)[:12]) + (" ..." if len(names) > 12 else "")
            raise LCAError(f"--keep-layers glob {g!r} matches no parameter tensor; the tensors are: {shown}")
        chosen.update(hit)
    return sorted(chosen)


@dataclass(frozen=True)
class UnitMap:
    """Every column's unit: units are (module, index along the unit axis), numbered in model order.

    The definition is the accessor's: all tensors of one module with the same unit index form a unit
    (a Linear row and its bias entry; a conv filter, its bias and its BatchNorm scale and shift are two
    units, one per module). Scalars are unit 0 of their module.
    """

    module: np.ndarray       # [U] module name of each unit
    index: np.ndarray        # [U] index along the unit axis
    run_starts: np.ndarray   # [R] first column of each run of consecutive columns of one unit
    run_unit: np.ndarray     # [R] the unit of each run

    @property
    def size(self) -> int:
        return int(self.module.size)

    @classmethod
    def from_layout(cls, layout) -> "UnitMap":
        mods = list(dict.fromkeys(t.module for t in layout.tensors))
        width = {m: 1 for m in mods}
        for t in layout.tensors:
            width[t.module] = max(width[t.module], t.num_units)
        first = np.cumsum([0] + [width[m] for m in mods])
        base = dict(zip(mods, first[:-1].tolist()))
        starts, units = [], []
        for t in layout.tensors:
            if t.unit_axis is None or not t.shape:
                ids = np.zeros(t.size, np.int64)
            else:
                ids = np.indices(t.shape, dtype=np.int64)[t.unit_axis].reshape(-1) if t.unit_axis else \
                    np.repeat(np.arange(t.shape[0], dtype=np.int64), t.size // max(t.shape[0], 1))
            ids = ids + base[t.module]
            change = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
            starts.append(change + t.offset)
            units.append(ids[change])
        present = np.zeros(int(first[-1]), bool)
        run_unit = np.concatenate(units) if units else np.zeros(0, np.int64)
        present[run_unit] = True
        # A module whose tensors have fewer units than its widest one (rare) leaves gaps: drop them.
        keep = np.flatnonzero(present)
        renumber = np.full(present.size, -1, np.int64)
        renumber[keep] = np.arange(keep.size)
        module = np.repeat(np.array(mods, dtype=object), [width[m] for m in mods])[keep]
        index = (np.arange(present.size) - np.repeat(first[:-1], [width[m] for m in mods]))[keep]
        return cls(module.astype(str), index.astype(np.int64),
                   np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64),
                   renumber[run_unit])

    def of_columns(self, size: int) -> np.ndarray:
        """Unit of every column [P] (for a view built from the per-parameter array)."""
        lengths = np.diff(np.r_[self.run_starts, size])
        return np.repeat(self.run_unit, lengths)


@dataclass(frozen=True)
class OutputSpec:
    """What one result stores: always per-layer; per-unit unless keep="layer"; per-parameter for every
    tensor when keep="parameter" without globs, else for the tensors the `keep_layers` globs match."""

    keep: str
    keep_layers: tuple[str, ...]
    kept: tuple[int, ...]          # tensor indices whose per-parameter LCA is stored, in layout order
    offsets: tuple[int, ...]       # every tensor's first column, and P at the end
    names: tuple[str, ...]

    @classmethod
    def build(cls, layout, keep: str = "parameter", keep_layers: Sequence[str] = ()) -> "OutputSpec":
        if keep not in KEEPS:
            raise LCAError(f"--keep must be one of {', '.join(KEEPS)}, got {keep!r}")
        globs = tuple(keep_layers)
        if globs:
            kept = match_layers(layout.names, [t.module for t in layout.tensors], globs)
        else:
            kept = list(range(len(layout.tensors))) if keep == "parameter" else []
        offsets = tuple(t.offset for t in layout.tensors) + (layout.size,)
        return cls(keep, globs, tuple(kept), offsets, tuple(layout.names))

    @property
    def units(self) -> bool:
        return self.keep != "layer"

    @property
    def parameters(self) -> bool:
        return bool(self.kept)

    @property
    def all_parameters(self) -> bool:
        return len(self.kept) == len(self.names)

    @property
    def kept_names(self) -> list[str]:
        return [self.names[i] for i in self.kept]

    @property
    def kept_ranges(self) -> list[tuple[int, int]]:
        """Column ranges of the stored per-parameter array, merged where tensors are adjacent."""
        out: list[tuple[int, int]] = []
        for i in self.kept:
            a, b = self.offsets[i], self.offsets[i + 1]
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return out

    @property
    def kept_size(self) -> int:
        return sum(b - a for a, b in self.kept_ranges)

    def kept_columns(self) -> np.ndarray:
        """Global column index of every column of the stored per-parameter array."""
        parts = [np.arange(a, b, dtype=np.int64) for a, b in self.kept_ranges]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def select(self, rows: np.ndarray) -> np.ndarray:
        """The kept columns of rows [..., P]: a view when one range covers them, else a copy."""
        ranges = self.kept_ranges
        if len(ranges) == 1:
            return rows[..., ranges[0][0]:ranges[0][1]]
        return np.concatenate([rows[..., a:b] for a, b in ranges], axis=-1)

    def to_json(self) -> dict:
        return {"keep": self.keep, "keep_layers": list(self.keep_layers), "kept_layers": self.kept_names}


class Reducer:
    """Per-unit and per-layer float64 sums of float32 LCA rows, one row at a time, in a fixed order.

    A row is summed in runs of consecutive columns of one unit (a run never crosses a tensor), a slice of
    at most ~1M columns at a time so the float64 temporaries stay small; units add their runs, layers add
    the runs of their tensor.
    """

    def __init__(self, layout) -> None:
        self.size = layout.size
        self.units = UnitMap.from_layout(layout)
        starts = self.units.run_starts
        self._layer_runs = np.searchsorted(starts, [t.offset for t in layout.tensors])
        slices, r0 = [], 0
        while r0 < starts.size:
            c0 = int(starts[r0])
            r1 = max(int(np.searchsorted(starts, c0 + _REDUCE_COLUMNS, side="left")), r0 + 1)
            slices.append((c0, r0, r1))
            r0 = r1
        self._slices = slices

    def __call__(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(units [U], layers [L]) float64 sums of one float32 row [P]."""
        starts = self.units.run_starts
        runs = np.empty(starts.size, np.float64)
        for c0, r0, r1 in self._slices:
            c1 = int(starts[r1]) if r1 < starts.size else self.size
            runs[r0:r1] = np.add.reduceat(row[c0:c1], starts[r0:r1] - c0, dtype=np.float64)
        units = np.bincount(self.units.run_unit, weights=runs, minlength=self.units.size)
        return units, np.add.reduceat(runs, self._layer_runs)
