"""Oscillation: is a layer going back and forth, and does its motion lag its gradient? (the paper's
explanation of its second finding: with momentum, a parameter keeps moving after the gradient has turned,
so in an oscillating valley part of every swing climbs the loss, and a whole layer can hurt in total).

Per group of parameters (each layer, each unit) from the trajectory and the LCA:
- `lca_flip_rate`: how often the group's LCA (summed over the group) changes sign from step t to t+1,
  over the pairs where both are non-zero; `param_flip_rate` is the same per parameter, pooled.
- `motion_autocorr`: lag-1 autocorrelation of the parameter motion Delta_t = theta_{t+1} - theta_t, each
  parameter centred on its own mean motion (theta_T - theta_0) / T, pooled over the group:
  sum_i sum_t d_{t,i} d_{t+1,i} / sum_i sum_t d_{t,i}^2.
- `motion_reversal_rate`: how often a parameter's motion changes sign (pooled); `path_efficiency`:
  |theta_T - theta_0|_1 / sum_t |Delta_t|_1, 1 for a straight path, near 0 for back and forth.
- `phase_lag`: the phase (radians) by which the motion trails the descent direction -g at the frequency
  where the gradient oscillates most (largest pooled power |G(f)|^2, f > 0), from the pooled
  cross-spectrum sum_i M_i(f) conj(G_i(f)); `lag_steps` = phase / (2 pi f / T), `period_steps` = T / f,
  `coherence` = |sum M conj G| / sqrt(sum |M|^2 sum |G|^2) at that frequency (1: every parameter
  agrees). Positive: the motion comes after the gradient, as momentum predicts. `momentum_lag` (SGD with
  momentum mu only) is the lag the momentum filter alone would give at that frequency,
  arg 1 / (1 - mu e^{-i w}): a measured lag near it means momentum explains the lag.

The gradient: g_{t,i} = LCA_{t,i} / Delta_{t,i}. This is exact, not an estimate: LCA is Delta times the
full-split gradient averaged along the straight path from theta_t to theta_{t+1}, so the quotient is that
path-mean gradient, up to float32 rounding of the stored LCA and the integration rule's error (which
the stored residual bounds). Where Delta_{t,i} = 0 the path-mean gradient is not determined; we use 0 (a
parameter that never moves, e.g. a frozen one, is left out of the phase). Inverting the optimizer from the
trajectory (g = (v_{t+1} - mu v_t), v = -Delta / lr) would give the *minibatch* gradient instead: exact
only with the optimizer's settings and rounding, and not the gradient of L that LCA allocates.

`motion_stats` needs the trajectory only: `lca watch` uses it on a store that is still recording.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

if TYPE_CHECKING:
    import xarray as xr

COLUMNS = 16_384  # parameters processed at once: T x COLUMNS float64 arrays stay a few tens of MB


# ----------------------------------------------------------------------------------------------------------
# accumulation over column blocks (pure numpy; tested on synthetic trajectories)


@dataclass
class _Groups:
    """Sums per group of parameters, added one column block at a time (a group: a layer or a unit)."""
    n: int
    steps: int
    spectra: bool = True
    lca_series: np.ndarray = field(init=False)     # (T, n) summed LCA
    flips: np.ndarray = field(init=False)          # per-parameter LCA sign flips, summed
    pairs: np.ndarray = field(init=False)          # per-parameter step pairs with both LCA non-zero
    rev: np.ndarray = field(init=False)            # motion reversals
    rev_pairs: np.ndarray = field(init=False)
    ac_num: np.ndarray = field(init=False)
    ac_den: np.ndarray = field(init=False)
    net: np.ndarray = field(init=False)
    path: np.ndarray = field(init=False)
    cross: np.ndarray = field(init=False)          # (n, F) complex: sum M conj G
    pow_m: np.ndarray = field(init=False)          # (n, F)
    pow_g: np.ndarray = field(init=False)
    params: np.ndarray = field(init=False)         # parameters that moved at all

    def __post_init__(self) -> None:
        t, n, f = self.steps, self.n, self.steps // 2 + 1
        self.lca_series = np.zeros((t, n))
        for name in ("flips", "pairs", "rev", "rev_pairs", "ac_num", "ac_den", "net", "path", "params"):
            setattr(self, name, np.zeros(n))
        shape = (n, f) if self.spectra else (n, 0)
        self.cross = np.zeros(shape, dtype=np.complex128)
        self.pow_m, self.pow_g = np.zeros(shape), np.zeros(shape)

    def add(self, theta: np.ndarray, lca: np.ndarray | None, ids: np.ndarray) -> None:
        """theta: (T+1, c) checkpoints of c parameters; lca: (T, c) or None; ids: (c,) group of each column."""
        n = self.n
        theta = np.asarray(theta, dtype=np.float64)
        delta = np.diff(theta, axis=0)
        t = delta.shape[0]

        def by_group(v: np.ndarray) -> np.ndarray:
            return np.bincount(ids, weights=v, minlength=n)

        moved = (delta != 0).any(axis=0)
        self.params += by_group(moved.astype(np.float64))
        sd = np.sign(delta)
        self.rev += by_group((sd[1:] * sd[:-1] < 0).sum(0).astype(np.float64))
        self.rev_pairs += by_group((sd[1:] * sd[:-1] != 0).sum(0).astype(np.float64))
        d = delta - (theta[-1] - theta[0]) / max(t, 1)
        self.ac_num += by_group((d[1:] * d[:-1]).sum(0))
        self.ac_den += by_group((d * d).sum(0))
        self.net += by_group(np.abs(theta[-1] - theta[0]))
        self.path += by_group(np.abs(delta).sum(0))
        if lca is None:
            return
        lca = np.asarray(lca, dtype=np.float64)
        self.lca_series += _group_sum(lca, ids, n).T
        sl = np.sign(lca)
        self.flips += by_group((sl[1:] * sl[:-1] < 0).sum(0).astype(np.float64))
        self.pairs += by_group((sl[1:] * sl[:-1] != 0).sum(0).astype(np.float64))
        if not self.spectra:
            return
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(delta != 0, lca / delta, 0.0)
        descent = -g
        descent = descent - descent.mean(0)
        m_f = np.fft.rfft(d * moved, axis=0)           # a parameter that never moved adds nothing
        g_f = np.fft.rfft(descent * moved, axis=0)
        self.cross += _group_sum(m_f * np.conj(g_f), ids, n)
        self.pow_m += _group_sum(np.abs(m_f) ** 2, ids, n)
        self.pow_g += _group_sum(np.abs(g_f) ** 2, ids, n)

    def finish(self, with_lca: bool) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            out = {
                "motion_autocorr": np.where(self.ac_den > 0, self.ac_num / self.ac_den, np.nan),
                "motion_reversal_rate": np.where(self.rev_pairs > 0, self.rev / self.rev_pairs, np.nan),
                "path_efficiency": np.where(self.path > 0, self.net / self.path, np.nan),
                "moving_parameters": self.params.astype(np.int64),
            }
            if not with_lca:
                return out
            s = np.sign(self.lca_series)
            f_n = (s[1:] * s[:-1] < 0).sum(0)
            f_d = (s[1:] * s[:-1] != 0).sum(0)
            out["lca_flip_rate"] = np.where(f_d > 0, f_n / f_d, np.nan)
            out["param_flip_rate"] = np.where(self.pairs > 0, self.flips / self.pairs, np.nan)
            out["param_flip_pairs"] = self.pairs.astype(np.int64)
            out["total_lca"] = self.lca_series.sum(0)
            if self.spectra:
                out.update(_phase(self.cross, self.pow_m, self.pow_g, self.steps))
        return out


def _group_sum(v: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """(R, c) columns summed into n groups -> (n, R): runs of one group first, then scatter-add the runs."""
    out = np.zeros((n, v.shape[0]), dtype=v.dtype)
    if v.shape[1]:
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        np.add.at(out, ids[starts], np.add.reduceat(v, starts, axis=1).T)
    return out


def _phase(cross: np.ndarray, pow_m: np.ndarray, pow_g: np.ndarray, steps: int) -> dict[str, np.ndarray]:
    n = cross.shape[0]
    nan = np.full(n, np.nan)
    if cross.shape[1] < 2:
        return {"phase_lag": nan, "lag_steps": nan.copy(), "period_steps": nan.copy(), "coherence": nan.copy()}
    k = 1 + np.argmax(pow_g[:, 1:], axis=1)  # the gradient's dominant frequency, f > 0
    rows = np.arange(n)
    c = cross[rows, k]
    ok = pow_g[rows, k] > 0
    phase = np.where(ok, -np.angle(c), np.nan)
    omega = 2 * np.pi * k / steps
    with np.errstate(divide="ignore", invalid="ignore"):
        coh = np.where(ok, np.abs(c) / np.sqrt(pow_m[rows, k] * pow_g[rows, k]), np.nan)
    return {"phase_lag": phase, "lag_steps": phase / omega, "period_steps": np.where(ok, steps / k, np.nan),
            "coherence": coh}


def _column_blocks(size: int, step: int = COLUMNS) -> Iterator[slice]:
    for a in range(0, size, step):
        yield slice(a, min(a + step, size))


def oscillation_arrays(theta: Any, lca: Any, layer_ids: np.ndarray, n_layers: int, unit_ids: np.ndarray | None,
                       n_units: int, *, rows: slice | None = None,
                       columns: int = COLUMNS) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Per-layer and per-unit statistics (see the module docstring) of checkpoints `theta` [T+1, P] and
    `lca` [T, P] (either can be a zarr/dask/numpy array; `lca` None: motion only). Reads column blocks, so
    the whole trajectory never sits in memory. `rows`: the steps to use (default: all)."""
    rows = rows or slice(0, int(theta.shape[0]) - 1)
    steps = rows.stop - rows.start
    layers = _Groups(n_layers, steps)
    units = _Groups(n_units, steps) if unit_ids is not None else None
    for cols in _column_blocks(int(theta.shape[1]), columns):
        th = np.asarray(theta[rows.start:rows.stop + 1, cols])
        lc = None if lca is None else np.asarray(lca[rows, cols])
        layers.add(th, lc, layer_ids[cols])
        if units is not None:
            units.add(th, lc, unit_ids[cols])
    return layers.finish(lca is not None), None if units is None else units.finish(lca is not None)


# ----------------------------------------------------------------------------------------------------------
# on a store


@dataclass
class OscillationResult:
    """`ds.lca.oscillation()`: per-layer and per-unit Datasets, and one run-level score."""
    layers: "xr.Dataset"
    units: "xr.Dataset | None"
    score: float          # pooled per-parameter LCA sign-flip rate: the README's "oscillation score"
    iterations: int
    first_iteration: int

    def oscillating(self, max_autocorr: float = 0.0, min_flip_rate: float = 0.5) -> list[str]:
        """Layers whose consecutive moves undo each other (motion lag-1 autocorrelation below
        `max_autocorr`) or whose LCA changes sign on at least `min_flip_rate` of steps."""
        ly = self.layers
        flag = ly["motion_autocorr"] < max_autocorr
        if "lca_flip_rate" in ly:
            flag = flag | (ly["lca_flip_rate"] >= min_flip_rate)
        return [str(n) for n in ly["layer"].values[np.asarray(flag.values)]]

    def to_dict(self) -> dict[str, Any]:
        def table(ds: "xr.Dataset", dim: str) -> dict[str, dict[str, float]]:
            return {k: {str(n): float(v) for n, v in zip(ds[dim].values, ds[k].values)} for k in ds.data_vars}

        return {"score": self.score, "iterations": self.iterations, "first_iteration": self.first_iteration,
                "layers": table(self.layers, "layer"), "oscillating_layers": self.oscillating()}


def _lca_name(ds: "xr.Dataset", split: str) -> str:
    prefix = "" if split == "train" else "heldout_"
    for name in (f"{prefix}lca_param", f"{prefix}lca"):
        if name in ds and "parameter" in ds[name].dims:
            return name
    from pipeline.errors import LCAError

    raise LCAError(f"the dataset has no per-parameter {prefix}LCA; compute it with `lca compute STORE`")


def _contiguous(iterations: np.ndarray) -> slice:
    """The longest run of consecutive iterations (oscillation needs neighbouring steps)."""
    if iterations.size == 0:
        return slice(0, 0)
    breaks = np.flatnonzero(np.diff(iterations) != 1) + 1
    starts, stops = np.r_[0, breaks], np.r_[breaks, iterations.size]
    j = int(np.argmax(stops - starts))
    return slice(int(iterations[starts[j]]), int(iterations[stops[j] - 1]) + 1)


def oscillation(ds: "xr.Dataset", split: str = "train", units: bool = True,
                store: str | None = None) -> OscillationResult:
    """`ds.lca.oscillation()`; the trajectory is read from `store` (default: the store `ds` came from)."""
    import xarray as xr
    from trajectory_store import open_trajectory

    from pipeline.errors import LCAError

    path = store or ds.attrs.get("store")
    if not path:
        raise LCAError("oscillation needs the trajectory: pass store=PATH (the dataset does not name its store)")
    reader = open_trajectory(path)
    name = _lca_name(ds, split)
    lca_all = ds[name]
    # only complete iterations (a block still being computed is NaN)
    by_layer = [v for v in (f"{'' if split == 'train' else 'heldout_'}{n}" for n in ("lca_layer", "lca_by_layer"))
                if v in ds]
    its = np.asarray(ds["iteration"].values)
    if by_layer:
        ok = np.asarray(ds[by_layer[0]].notnull().all("layer").values)
        its = its[ok]
    rows = _contiguous(its)
    if rows.stop - rows.start < 3:
        raise LCAError(f"oscillation needs at least 3 consecutive computed steps; {path} has "
                       f"{rows.stop - rows.start}: compute more with `lca compute {path}`")
    if rows.stop > reader.num_steps:
        raise LCAError(f"{path}: LCA covers step {rows.stop - 1} but the trajectory has {reader.num_steps} steps")
    layout = reader.layout
    layer_ids = np.asarray(layout.layer_of_parameter(), dtype=np.int64)
    unit_ids, unit_module, unit_index = _unit_ids(layout) if units else (None, [], [])
    # positions of those iterations in ds (ds may itself be a subset)
    pos = np.searchsorted(np.asarray(ds["iteration"].values), np.arange(rows.start, rows.stop))
    lca_arr = lca_all.data
    lca_rows = _RowView(lca_arr, int(pos[0]), rows.start)
    ly, un = oscillation_arrays(reader.params_array, lca_rows, layer_ids, len(layout), unit_ids,
                                len(unit_module), rows=rows)
    layers = xr.Dataset({k: ("layer", v) for k, v in ly.items()},
                        coords={"layer": [t.name for t in layout.tensors],
                                "layer_module": ("layer", [t.module for t in layout.tensors])})
    unit_ds = None
    if un is not None:
        unit_ds = xr.Dataset({k: ("unit", v) for k, v in un.items()},
                             coords={"unit": np.arange(len(unit_module)),
                                     "unit_module": ("unit", list(unit_module)),
                                     "unit_index": ("unit", list(unit_index))})
    mom = _momentum_per_layer(reader, layout)
    if mom is not None and "period_steps" in layers:
        # The lag a heavy-ball momentum filter v_t = g_t + mu v_{t-1} puts between a sinusoidal gradient and
        # the motion at the same frequency: arg 1 / (1 - mu e^{-i w}). Measured lag near it: momentum explains it.
        w = 2 * np.pi / layers["period_steps"].values
        layers["momentum_lag"] = ("layer", np.arctan2(mom * np.sin(w), 1 - mom * np.cos(w)))
    return OscillationResult(layers, unit_ds, _pooled_flip(ly), rows.stop - rows.start, rows.start)


def _momentum_per_layer(reader: Any, layout: Any) -> np.ndarray | None:
    """Each tensor's heavy-ball momentum from the stored workflow and interventions; None if not SGD-momentum."""
    wf = reader.workflow or {}
    opt = wf.get("optimizer", {})
    if opt.get("name") != "momentum" or opt.get("nesterov"):
        return None
    per = (reader.attrs.get("interventions") or {}).get("tensors", {})
    return np.array([float(per.get(t.name, {}).get("momentum", opt.get("momentum", 0.0)) or 0.0)
                     for t in layout.tensors])


def _pooled_flip(ly: dict[str, np.ndarray]) -> float:
    """The share of (parameter, consecutive step pair) with non-zero LCA on which the LCA flips sign."""
    rate, w = ly.get("param_flip_rate"), ly.get("param_flip_pairs")
    if rate is None or w is None:
        return float("nan")
    w = w.astype(np.float64)
    ok = np.isfinite(rate) & (w > 0)
    return float((rate[ok] * w[ok]).sum() / w[ok].sum()) if ok.any() else float("nan")


class _RowView:
    """lca[rows, cols] for the store's iteration numbers, on an array that holds iterations from `offset`."""

    def __init__(self, arr: Any, pos0: int, it0: int) -> None:
        self.arr, self.shift = arr, pos0 - it0
        self.shape = arr.shape

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        return np.asarray(self.arr[rows.start + self.shift:rows.stop + self.shift, cols])


def _unit_ids(layout: Any) -> tuple[np.ndarray, list[str], list[int]]:
    """A unit: one module's tensors at one index of the unit axis (weights feeding a neuron plus its bias)."""
    mods = list(dict.fromkeys(t.module for t in layout.tensors))
    layer_mod = np.array([mods.index(t.module) for t in layout.tensors], dtype=np.int64)
    unit = np.asarray(layout.unit_of_parameter(), dtype=np.int64)
    base = int(unit.max()) + 1 if unit.size else 1
    keys, ids = np.unique(layer_mod[np.asarray(layout.layer_of_parameter())] * base + unit, return_inverse=True)
    return ids.ravel().astype(np.int64), [mods[k // base] for k in keys], [int(k % base) for k in keys]


# ----------------------------------------------------------------------------------------------------------
# watching a run that is still recording


def motion_stats(store: str, window: int = 50) -> tuple[Any, "xr.Dataset"]:
    """Motion-only oscillation per layer over the last `window` committed steps of `store` (readable while
    it records): (reader, Dataset with motion_autocorr, motion_reversal_rate, path_efficiency)."""
    import xarray as xr
    from trajectory_store import open_trajectory

    reader = open_trajectory(store)
    t = reader.num_steps
    rows = slice(max(0, t - window), t)
    layout = reader.layout
    ly, _ = oscillation_arrays(reader.params_array, None, np.asarray(layout.layer_of_parameter(), dtype=np.int64),
                               len(layout), None, 0, rows=rows)
    ds = xr.Dataset({k: ("layer", v) for k, v in ly.items()}, coords={"layer": [x.name for x in layout.tensors]},
                    attrs={"first_step": rows.start, "steps": rows.stop - rows.start, "status": reader.status})
    return reader, ds


def flag_layers(stats: "xr.Dataset", max_autocorr: float = 0.0, min_reversal: float = 0.5) -> list[str]:
    """Layers whose recent motion oscillates: consecutive moves anti-correlated (lag-1 autocorrelation below
    `max_autocorr`) or reversing direction on at least `min_reversal` of steps."""
    flag = (stats["motion_autocorr"] < max_autocorr) | (stats["motion_reversal_rate"] >= min_reversal)
    return [str(n) for n in stats["layer"].values[np.asarray(flag.values)]]


def watch(store: str, *, window: int = 50, interval: float = 10.0, timeout: float = 600.0,
          max_autocorr: float = 0.0, min_reversal: float = 0.5, echo: Any = print) -> list[str]:
    """Poll `store` until it stops recording or `timeout` seconds pass, printing the motion statistics of
    the last `window` steps per layer and the oscillating layers; returns the layers flagged last."""
    import time

    deadline = time.monotonic() + timeout
    seen = -1
    flagged: list[str] = []
    while True:
        reader, stats = motion_stats(store, window)
        if reader.num_steps != seen and stats.attrs["steps"] >= 3:
            seen = reader.num_steps
            flagged = flag_layers(stats, max_autocorr, min_reversal)
            echo(format_watch(stats, flagged, reader.num_steps))
        if reader.status != "recording" or time.monotonic() + interval > deadline:
            if stats.attrs["steps"] < 3:
                echo(f"{store}: only {reader.num_steps} steps recorded; nothing to measure yet")
            return flagged
        time.sleep(interval)


def format_watch(stats: "xr.Dataset", flagged: list[str], steps: int) -> str:
    a = stats.attrs
    width = max(len(str(n)) for n in stats["layer"].values)
    lines = [f"steps {a['first_step']}..{a['first_step'] + a['steps'] - 1} of {steps} ({a['status']}): "
             f"{len(flagged)} oscillating layer(s)" + (f": {', '.join(flagged)}" if flagged else ""),
             f"  {'layer':<{width}}  autocorr  reversals  efficiency"]
    for i, n in enumerate(stats["layer"].values):
        mark = "  <- oscillating" if str(n) in flagged else ""
        lines.append(f"  {str(n):<{width}}  {float(stats['motion_autocorr'][i]):8.3f}  "
                     f"{float(stats['motion_reversal_rate'][i]):9.3f}  {float(stats['path_efficiency'][i]):10.3f}{mark}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# the report's figure


def report_oscillation(ds: "xr.Dataset", out: Any, name: str = "oscillation.png") -> dict[str, Any] | None:
    """For `lca report`: the oscillation summary, and its figure written to out/name. None (and no figure)
    when the dataset's trajectory cannot be read: a dataset built in memory, or a store moved away."""
    from pathlib import Path

    from trajectory_store import StoreError

    from pipeline.errors import LCAError

    try:
        res = oscillation(ds, units=False)
    except (LCAError, StoreError):
        return None
    plot_oscillation(res, Path(out) / name)
    return res.to_dict() | {"figure": name}


def plot_oscillation(res: OscillationResult, path: Any) -> None:
    """Per layer: LCA sign-flip rate, lag-1 autocorrelation of the motion, phase lag of motion behind the
    gradient (in steps), and the layer's total LCA for reference (hurting layers in red)."""
    from matplotlib.figure import Figure  # object API: no pyplot state, no backend switch

    ly = res.layers
    names = [str(n) for n in ly["layer"].values]
    y = np.arange(len(names))
    total = ly["total_lca"].values
    colors = np.where(total > 0, "#d73027", "#1a9850")
    panels = [("lca_flip_rate", "LCA sign flips per step"), ("motion_autocorr", "lag-1 autocorrelation of motion"),
              ("lag_steps", "motion behind gradient (steps)"), ("total_lca", "total LCA (> 0 hurt)")]
    fig = Figure(figsize=(14, max(3.5, 0.16 * len(names) + 1.5)), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        ax.barh(y, ly[key].values, color=colors)
        ax.axvline(0, color="k", lw=0.6)
        ax.set_title(title, fontsize=9)
        if key == "total_lca":
            lim = float(np.nanmax(np.abs(total))) if np.isfinite(total).any() else 1.0
            ax.set_xscale("symlog", linthresh=max(lim * 1e-3, 1e-12))
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names, fontsize=6 if len(names) > 20 else 8)
    axes[0].invert_yaxis()
    fig.suptitle(f"oscillation over steps {res.first_iteration}..{res.first_iteration + res.iterations - 1}: "
                 f"score {res.score:.3f} (share of consecutive steps a parameter's LCA flips sign)", fontsize=10)
    fig.savefig(path, dpi=110)
