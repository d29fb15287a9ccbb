"""The `ds.lca` accessor: the paper's findings, computed from the xarray view without loading it.

`lca_param` (iteration x parameter) can be far larger than memory, so every method either reduces through dask
(one pass over the chunks, small results) or works on the small per-iteration / per-layer variables.
Methods whose results are naturally lazy (`helped_fraction`, `layer_lca`, `cumulative`, `unit_lca`) return
dask-backed xarray objects; the statistics (`distribution`, `synchronisation`, ...) compute and return
small dicts. Sign convention throughout: LCA < 0 means the parameter helped (lowered the loss).

Importing this module (which `import pipeline` does) registers the accessor with xarray.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np
    import xarray as xr

ACCESSOR = "lca"
SPLITS = {"train": "", "heldout": "heldout_"}
# Names before the rename that freed `ds.lca` for the accessor; datasets saved with them still analyse.
OLD_NAMES = {"lca_param": "lca", "lca_layer": "lca_by_layer"}
QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)

# Pooled-distribution histogram: fixed log10|LCA| bins spanning float32's whole range (denormals to max),
# so one pass needs no prior min/max. 100 bins a decade: a bin is 2.3% wide in magnitude.
_E_MIN, _E_MAX, _PER_DECADE = -46, 39, 100
_NB = (_E_MAX - _E_MIN) * _PER_DECADE
_NMOM = 10  # per block: n, mean, M2, M3, M4, min, max, n_negative, n_positive, n_zero


# ----------------------------------------------------------------------------------------------------------
# pure helpers (numpy only; tested directly)


def _combine_moments(blocks: np.ndarray) -> tuple[float, float, float, float, float]:
    """Merge per-block (n, mean, M2, M3, M4) exactly (Pebay 2008), so no block ever needs its neighbours and
    the mean is never subtracted from raw power sums (which would cancel badly for a shifted distribution)."""
    n = mean = m2 = m3 = m4 = 0.0
    for nb, mb, m2b, m3b, m4b in blocks:
        if nb == 0:
            continue
        na, tot = n, n + nb
        d = mb - mean
        m4 = (m4 + m4b + d**4 * na * nb * (na * na - na * nb + nb * nb) / tot**3
              + 6 * d * d * (na * na * m2b + nb * nb * m2) / tot**2 + 4 * d * (na * m3b - nb * m3) / tot)
        m3 = m3 + m3b + d**3 * na * nb * (na - nb) / tot**2 + 3 * d * (na * m2b - nb * m2) / tot
        m2 = m2 + m2b + d * d * na * nb / tot
        mean = mean + d * nb / tot
        n = tot
    return n, mean, m2, m3, m4


def _block_summary(block: np.ndarray) -> np.ndarray:
    """Moments, sign counts and the log-magnitude histogram (counts and summed |x|) of one chunk."""
    import numpy as np

    x = np.asarray(block, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    out = np.zeros(_NMOM + 4 * _NB)
    out[5], out[6] = np.inf, -np.inf
    if x.size:
        mean = x.mean()
        d = x - mean
        d2 = d * d
        neg, pos = int((x < 0).sum()), int((x > 0).sum())
        out[:_NMOM] = (x.size, mean, d2.sum(), (d2 * d).sum(), (d2 * d2).sum(), x.min(), x.max(),
                       neg, pos, x.size - neg - pos)
        nz = x != 0
        a = np.abs(x[nz])
        k = np.clip(((np.log10(a) - _E_MIN) * _PER_DECADE).astype(np.int64), 0, _NB - 1)
        k += _NB * (x[nz] > 0)
        out[_NMOM:_NMOM + 2 * _NB] = np.bincount(k, minlength=2 * _NB)
        out[_NMOM + 2 * _NB:] = np.bincount(k, weights=a, minlength=2 * _NB)
    return out[None, None, :]


def _histogram_quantiles(counts: np.ndarray, n_zero: float, lo: float, hi: float,
                         quantiles: Sequence[float]) -> list[float]:
    """Quantiles of the pooled distribution from the signed log-magnitude histogram, interpolating
    log-linearly inside a bin; exact at 0 (zeros are counted apart) and clipped to the observed min/max."""
    import numpy as np

    neg, pos = counts[:_NB], counts[_NB:]
    edges = 10.0 ** (_E_MIN + np.arange(_NB + 1) / _PER_DECADE)
    # ascending value order: negative bins from the largest magnitude down, the zero mass, positive bins up
    c = np.concatenate([neg[::-1], [n_zero], pos])
    cum = np.cumsum(c)
    n = cum[-1]
    out = []
    for q in quantiles:
        if n == 0:
            out.append(float("nan"))
            continue
        r = min(max(q * n, 0.0), n)
        j = int(np.searchsorted(cum, r, side="left"))
        j = min(j, len(c) - 1)
        while c[j] == 0 and j < len(c) - 1:  # r at an exact bin boundary: move to the next occupied bin
            j += 1
        f = (r - (cum[j] - c[j])) / c[j] if c[j] else 0.0
        if j < _NB:  # negative bin k, values from -edges[k+1] up to -edges[k]
            k = _NB - 1 - j
            v = -edges[k + 1] * (edges[k] / edges[k + 1]) ** f
        elif j == _NB:
            v = 0.0
        else:
            k = j - _NB - 1
            v = edges[k] * (edges[k + 1] / edges[k]) ** f
        out.append(float(min(max(v, lo), hi)))
    return out


def _top_share(counts: np.ndarray, weights: np.ndarray, top: float) -> float:
    """Share of the summed |LCA| carried by the largest `top` fraction of entries (heavy tail: large)."""
    import numpy as np

    c = (counts[:_NB] + counts[_NB:])[::-1]
    w = (weights[:_NB] + weights[_NB:])[::-1]
    total_w, n = w.sum(), c.sum()
    if total_w == 0 or n == 0:
        return float("nan")
    want = top * n
    cum = np.cumsum(c)
    j = int(np.searchsorted(cum, want, side="left"))
    j = min(j, len(c) - 1)
    before = cum[j] - c[j]
    part = w[:j].sum() + (w[j] * (want - before) / c[j] if c[j] else 0.0)
    return float(part / total_w)


def finish_distribution(blocks: np.ndarray, hist: np.ndarray,
                        quantiles: Sequence[float] = QUANTILES) -> dict[str, Any]:
    """Turn the per-block summaries and the summed histogram into the distribution statistics."""
    import numpy as np

    b = np.asarray(blocks, dtype=np.float64).reshape(-1, _NMOM)
    n, mean, m2, m3, m4 = _combine_moments(b[:, :5])
    lo, hi = float(b[:, 5].min()), float(b[:, 6].max())
    n_neg, n_pos, n_zero = b[:, 7].sum(), b[:, 8].sum(), b[:, 9].sum()
    std = float(np.sqrt(m2 / n)) if n else float("nan")
    ok = n > 0 and std > 0
    counts, weights = hist[:2 * _NB], hist[2 * _NB:]
    qs = _histogram_quantiles(counts, n_zero, lo, hi, quantiles)
    return {
        "count": int(n),
        "mean": float(mean) if n else float("nan"),
        "std": std,
        "skew": float(m3 / n / std**3) if ok else float("nan"),
        "excess_kurtosis": float(m4 / n / std**4 - 3.0) if ok else float("nan"),
        "min": lo if n else float("nan"),
        "max": hi if n else float("nan"),
        "fraction_negative": float(n_neg / n) if n else float("nan"),
        "fraction_positive": float(n_pos / n) if n else float("nan"),
        "fraction_zero": float(n_zero / n) if n else float("nan"),
        "quantiles": {float(q): v for q, v in zip(quantiles, qs)},
        "top_1pct_abs_share": _top_share(counts, weights, 0.01),
    }


def local_peaks(helpful: np.ndarray, quantile: float = 0.9, order: int = 1,
                local: int | None = 51) -> np.ndarray:
    """Boolean (iteration, layer) mask of the iterations where each layer helped most, locally.

    t is a peak of a layer when its helpful LCA h = -LCA is strictly above the `order` iterations before it
    and at least the `order` after it (so a plateau counts once, at its start; outside the run counts as
    -inf), h(t) > 0 (the layer helped), and h(t) >= the `quantile` of that layer's h over the `local`
    iterations centred on t (mirrored at the ends; local=None: over the whole run).

    Why local: LCA shrinks by orders of magnitude as training converges, for every layer alike, so a
    whole-run threshold puts all peaks of all layers in the first iterations, and they then "coincide" far
    more than any shuffle predicts without any step-by-step synchronisation. A moving threshold spreads
    peaks over the run and leaves only the timing to compare.
    """
    import numpy as np

    h = np.asarray(helpful, dtype=np.float64)
    if h.ndim == 1:
        h = h[:, None]
    t = h.shape[0]
    pad = np.full((order, h.shape[1]), -np.inf)
    hp = np.concatenate([pad, h, pad])
    peak = np.ones(h.shape, dtype=bool)
    for k in range(1, order + 1):
        peak &= (h > hp[order - k:order - k + t]) & (h >= hp[order + k:order + k + t])
    with np.errstate(invalid="ignore"):
        peak &= (h > 0) & (h >= _threshold(h, quantile, local))
    return peak


def _threshold(h: np.ndarray, quantile: float, local: int | None) -> np.ndarray:
    import numpy as np

    t = h.shape[0]
    if t == 0:
        return np.zeros(h.shape)
    if local is None or local >= t:
        return np.nanquantile(h, quantile, axis=0)[None, :]
    half = max(int(local) // 2, 1)
    padded = np.pad(h, ((half, half), (0, 0)), mode="reflect") if t > half else np.pad(
        h, ((half, half), (0, 0)), mode="edge")
    out = np.empty_like(h)
    for j in range(h.shape[1]):  # one layer at a time keeps the (T, window) view small
        win = np.lib.stride_tricks.sliding_window_view(padded[:, j], 2 * half + 1)
        out[:, j] = np.quantile(win, quantile, axis=1)
    return out


def coincidences(mask: np.ndarray, window: int = 0) -> np.ndarray:
    """Pairs (peak of layer a, peak of layer b), a < b, at most `window` iterations apart.

    Works on (..., iteration, layer) masks so a batch of shuffled draws counts at once. With window 0 this
    is sum over iterations of C(k_t, 2), k_t the layers peaking at t.
    """
    import numpy as np

    m = np.asarray(mask, dtype=np.int64)
    if window <= 0:
        w = m
    else:
        t = m.shape[-2]
        zero = np.zeros(m.shape[:-2] + (1, m.shape[-1]), dtype=np.int64)
        c = np.concatenate([zero, np.cumsum(m, axis=-2)], axis=-2)
        idx = np.arange(t)
        hi, lo = np.minimum(idx + window + 1, t), np.maximum(idx - window, 0)
        w = c[..., hi, :] - c[..., lo, :]
    every = (m.sum(-1) * w.sum(-1)).sum(-1)  # all ordered layer pairs, a == b included
    same = (m * w).sum((-2, -1))
    return (every - same) // 2


def shuffled_coincidences(mask: np.ndarray, window: int = 0, draws: int = 1000, null: str = "shift",
                          seed: int = 0) -> np.ndarray:
    """Coincidence counts after moving each layer's peaks independently at random, `draws` times.

    null="shift": rotate each layer's peak train by its own uniform circular shift; keeps each layer's
    spacing between peaks (the conservative null). null="permute": scatter the peaks to a uniformly random
    set of iterations. Either way the expected count at window 0 is sum_{a<b} n_a n_b / T.
    """
    import numpy as np

    m = np.asarray(mask, dtype=bool)
    t, n_layers = m.shape
    rng = np.random.default_rng(seed)
    batch = max(1, min(draws, (1 << 22) // max(1, t * n_layers)))
    layer = np.arange(n_layers)[None, :, None]
    out = []
    for start in range(0, draws, batch):
        b = min(batch, draws - start)
        if null == "shift":
            idx = (np.arange(t)[None, None, :] - rng.integers(0, t, size=(b, n_layers, 1))) % t
        elif null == "permute":
            idx = rng.permuted(np.broadcast_to(np.arange(t), (b, n_layers, t)), axis=2)
        else:
            raise ValueError(f"null must be 'shift' or 'permute', not {null!r}")
        moved = m.T[layer, idx]  # (b, layer, iteration)
        out.append(coincidences(np.swapaxes(moved, 1, 2), window))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------
# results


@dataclass
class Synchronisation:
    """The peak-synchronisation test (`ds.lca.synchronisation()`): a few numbers and the null draws.

    The repr shows the answer in one line; `null_counts` (one count per draw) stays out of it. Reads like
    the dict it replaces: `s["ratio"]`, `s.keys()`, `s.items()`, `s.to_dict()`.
    """

    by: str
    quantile: float
    order: int
    local: int | None
    window: int
    null: str
    draws: int
    seed: int
    iterations: int
    observed: int
    expected: float
    null_std: float
    expected_uniform: float
    ratio: float
    p_value: float
    peaks: dict[str, int]
    null_counts: Any = field(repr=False)
    warning: str | None = None

    def __repr__(self) -> str:
        head = (f"Synchronisation(observed {self.observed} coinciding peak pairs, chance {self.expected:.3g}, "
                f"ratio {self.ratio:.3g}, p = {self.p_value:.3g}; {len(self.peaks)} {self.by}s over "
                f"{self.iterations} iterations, window {self.window}, {self.draws} {self.null} draws)")
        return head + (f"\n  warning: {self.warning}" if self.warning else "")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def keys(self):
        return self.to_dict().keys()

    def items(self):
        return self.to_dict().items()

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


# ----------------------------------------------------------------------------------------------------------
# the accessor


class LCAAccessor:
    """`ds.lca`: Loss Change Allocation analyses over the Dataset that `pipeline.open_lca` returns.

    Every method takes `split` ("train" or "heldout": the variables with the `heldout_` prefix).
    """

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds

    # -- plumbing ------------------------------------------------------------------------------------------

    def _var(self, name: str, split: str = "train") -> xr.DataArray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, not {split!r}")
        key = SPLITS[split] + name
        if key not in self._ds and name in OLD_NAMES and SPLITS[split] + OLD_NAMES[name] in self._ds:
            key = SPLITS[split] + OLD_NAMES[name]
        if key not in self._ds:
            from pipeline.errors import LCAError

            hint = " (compute it with `lca compute STORE --split train,heldout`)" if split == "heldout" else ""
            raise LCAError(f"the dataset has no `{key}` variable{hint}")
        return self._ds[key]

    def _param(self, split: str, question: str) -> xr.DataArray:
        """Per-parameter LCA, or one line saying that `question` needs it and how to get it.

        Results computed with `--keep unit` or `--keep layer` answer layer and unit questions from their
        own arrays; only questions about individual parameters (the helped fraction, the distribution of
        LCA values) need this, and with `--keep-layers` they are answered over the kept layers only.
        """
        key = SPLITS.get(split, "") + "lca_param"
        if split in SPLITS and key not in self._ds and SPLITS[split] + OLD_NAMES["lca_param"] not in self._ds \
                and self.has_split(split):
            from pipeline.errors import LCAError

            keep = self._ds.attrs.get("keep", "unit")
            raise LCAError(f"{question} needs per-parameter LCA, which this result did not keep (keep={keep}); "
                           f"recompute with `lca compute STORE --keep parameter --recompute`, or "
                           f"--keep-layers GLOB for the layers you need")
        return self._var("lca_param", split)

    def _param_columns(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Each layer's first position in `lca_param` and its width there (0 for a layer not kept):
        with --keep-layers the array holds only some tensors, and `parameter` names their global columns."""
        import numpy as np

        offs = np.asarray(self._ds["layer_offset"].values, dtype=np.int64)
        sizes = np.asarray(self._ds["layer_size"].values, dtype=np.int64)
        cols = np.asarray(self._param(split, "per-parameter analysis")["parameter"].values, dtype=np.int64)
        pos = np.minimum(np.searchsorted(cols, offs), max(cols.size - 1, 0))
        kept = (cols.size > 0) & (cols[pos] == offs) if cols.size else np.zeros(offs.size, bool)
        return np.where(kept, pos, 0), np.where(kept, sizes, 0)

    def has_parameters(self, split: str = "train") -> bool:
        """Whether per-parameter LCA was kept (for every tensor, or for the `--keep-layers` ones)."""
        return any(SPLITS[split] + n in self._ds for n in ("lca_param", OLD_NAMES["lca_param"]))

    def _dask_lca(self, split: str, question: str = "this analysis"):
        import dask.array as da

        data = self._param(split, question).data
        return data if isinstance(data, da.Array) else da.from_array(data, chunks="auto")

    def has_split(self, split: str) -> bool:
        """Whether LCA for `split` is in the dataset (held-out LCA is optional)."""
        return any(SPLITS[split] + n in self._ds for n in ("lca_layer", OLD_NAMES["lca_layer"]))

    def modules(self) -> list[str]:
        """Module names in layer order: the unit of the paper's "layer" (a weight tensor with its bias)."""
        return list(dict.fromkeys(self._ds["layer_module"].values.tolist()))

    def complete_mask(self, split: str = "train") -> xr.DataArray:
        """True for iterations whose LCA is fully computed; blocks still running are NaN and would poison
        every sum, so analyses run on `completed()`.

        From the `complete` coordinate `open_lca` takes from the store's completion record where there is one
        (no pass over the data), else from which rows are finite."""
        coord = SPLITS[split] + "complete"
        key = SPLITS[split] + "residual"
        if coord in self._ds.coords:
            ok = self._ds[coord].astype(bool)
        else:
            ok = self._var("lca_layer", split).notnull().all("layer")
        if key in self._ds:
            ok = ok & self._ds[key].notnull()
        return ok.compute().reset_coords(drop=True).rename("complete")

    def missing_iterations(self, split: str = "train") -> int:
        """How many iterations of `split` are not computed yet (0 for a whole result or a `completed()` one)."""
        coord = SPLITS[split] + "complete"
        key = SPLITS[split] + "residual"
        import numpy as np

        if coord in self._ds.coords:
            ok = np.asarray(self._ds[coord].values, dtype=bool)
            if key in self._ds:
                ok = ok & np.isfinite(np.asarray(self._ds[key].values, dtype=np.float64))
            return int((~ok).sum())
        if key in self._ds:  # cheap: one number per iteration
            return int(np.isnan(np.asarray(self._ds[key].values, dtype=np.float64)).sum())
        return int((~self.complete_mask(split).values).sum())

    def _require_complete(self, split: str, what: str) -> None:
        """Sums over iterations must not skip the NaN rows of a result still being computed."""
        n = self.missing_iterations(split)
        if n:
            from pipeline.errors import IncompleteResultError

            store = self._ds.attrs.get("store", "STORE")
            raise IncompleteResultError(
                f"{what} needs every iteration, but {n} of {self._ds.sizes['iteration']} iterations of {split} LCA "
                f"are not computed yet; finish them with `lca compute {store}`, or analyse the finished part: "
                f"ds.lca.completed().lca.{what}(...)")

    def completed(self, split: str = "train") -> xr.Dataset:
        """The dataset restricted (lazily) to the iterations whose LCA is complete."""
        import numpy as np

        ok = self.complete_mask(split)
        return self._ds.isel(iteration=np.flatnonzero(ok.values))

    # -- finding 1: barely over half of the parameters help -------------------------------------------------

    def _helped_counts(self, split: str) -> xr.Dataset:
        import xarray as xr

        x = self._param(split, "the helped fraction")
        return xr.Dataset({
            "helped": (x < 0).sum("parameter"),
            "moved": ((x != 0) & x.notnull()).sum("parameter"),
        })

    def _helped_counts_by(self, split: str, by: str) -> xr.Dataset:
        """Helped and moved counts per iteration and layer (or module), in model order. Lazy: each layer is
        a contiguous column range, so its counts are two reductions of a slice."""
        import dask.array as da
        import numpy as np
        import xarray as xr

        if by not in ("layer", "module"):
            raise ValueError(f"by must be None, 'layer' or 'module', not {by!r}")
        x = self._var("lca_param", split)
        arr = self._dask_lca(split)
        offs, sizes = self._param_columns(split)
        helped = da.stack([(arr[:, o:o + n] < 0).sum(axis=1) for o, n in zip(offs, sizes)], axis=1)
        moved = da.stack([((arr[:, o:o + n] != 0) & ~da.isnan(arr[:, o:o + n])).sum(axis=1)
                          for o, n in zip(offs, sizes)], axis=1)
        coords = {"iteration": x["iteration"], "layer": self._ds["layer"].values}
        counts = xr.Dataset({"helped": (("iteration", "layer"), helped), "moved": (("iteration", "layer"), moved)},
                            coords=coords)
        if by == "layer":
            return counts
        lm = self._ds["layer_module"].values
        mods = self.modules()
        parts = [counts.isel(layer=np.flatnonzero(lm == m)).sum("layer") for m in mods]
        return xr.concat(parts, dim="module").assign_coords(module=mods).transpose("iteration", "module")

    def helped_fraction(self, split: str = "train", by: str | None = None) -> xr.DataArray:
        """Per iteration, the fraction of the parameters that moved (LCA != 0) whose move lowered the loss.

        The paper's first finding is that this hovers just above 0.5 (50.7%): training is a tug of war in
        which nearly half the parameters make each step worse. `by="layer"` or `"module"` gives it per layer
        (dims iteration, layer|module, in model order): which layers' parameters mostly pull together.
        Lazy (one reduction per iteration); NaN where nothing moved or the iteration is not computed yet.
        """
        c = self._helped_counts(split) if by is None else self._helped_counts_by(split, by)
        return (c.helped / c.moved.where(c.moved > 0)).rename("helped_fraction")

    def helped_fraction_stats(self, split: str = "train", by: str | None = None) -> Any:
        """Mean and spread of the helped fraction over iterations, plus the pooled fraction over all
        (iteration, parameter) entries: the numbers to set against the paper's 50.7%.

        by=None: a dict. by="layer" / "module": an xarray Dataset indexed by layer (module) in model order,
        with the same statistics as variables."""
        self._require_complete(split, "helped_fraction_stats")
        if by is None:
            return _fraction_stats(self._helped_counts(split).compute())
        import xarray as xr

        counts = self._helped_counts_by(split, by).compute()
        dim = counts.helped.dims[1]
        rows = [_fraction_stats(counts.isel({dim: i})) for i in range(counts.sizes[dim])]
        return xr.Dataset({k: (dim, [r[k] for r in rows]) for k in rows[0]} if rows else {},
                          coords={dim: counts[dim].values})

    def distribution(self, split: str = "train", quantiles: Sequence[float] = QUANTILES) -> dict[str, Any]:
        """Moments (population mean, std, skew, excess kurtosis), sign fractions and quantiles of all LCA
        values pooled, in one pass over the chunks.

        Why: the paper finds LCA heavy-tailed around zero (most movement is noise, a few entries carry the
        loss change); kurtosis, the far quantiles and `top_1pct_abs_share` (share of sum |LCA| carried by the
        largest 1% of entries) quantify that. Quantiles come from a log-magnitude histogram with 100 bins per
        decade, so they are approximate to about 1% in magnitude; zeros are exact.
        """
        import dask

        self._require_complete(split, "distribution")
        blocks, hist = _distribution_parts(self._dask_lca(split, "the distribution of LCA values"))
        blocks, hist = dask.compute(blocks, hist)
        return finish_distribution(blocks, hist, quantiles)

    # -- finding 2: some layers hurt ------------------------------------------------------------------------

    def layer_lca(self, split: str = "train", by: str = "layer") -> xr.DataArray:
        """LCA per iteration summed over each layer (parameter tensor, by="layer") or module (weights and
        bias together, by="module"; new dim `module`). Lazy."""
        da_ = self._var("lca_layer", split)
        if by == "layer":
            return da_
        if by != "module":
            raise ValueError(f"by must be 'layer' or 'module', not {by!r}")
        import numpy as np
        import xarray as xr

        lm = self._ds["layer_module"].values
        mods = self.modules()
        parts = [da_.isel(layer=np.flatnonzero(lm == m)).sum("layer", skipna=False) for m in mods]
        out = xr.concat(parts, dim="module").assign_coords(module=mods).rename(da_.name)
        return out.transpose("iteration", "module")

    def layer_totals(self, split: str = "train", by: str = "layer") -> xr.DataArray:
        """Total LCA of each layer (or module) over training: negative layers paid for the loss drop,
        positive ones worked against it overall (the paper: ResNet's first and last layers). Lazy."""
        self._require_complete(split, "layer_totals")
        return self.layer_lca(split, by).sum("iteration", skipna=False).rename("total_lca")

    def hurting(self, split: str = "train", by: str = "layer") -> dict[str, float]:
        """The layers (or modules) whose total LCA is positive, worst first: the paper's second finding."""
        tot = self.layer_totals(split, by).compute()
        dim = tot.dims[0]
        pairs = [(str(n), float(v)) for n, v in zip(tot[dim].values, tot.values) if v > 0]
        return dict(sorted(pairs, key=lambda p: -p[1]))

    def unit_lca(self, split: str = "train") -> xr.DataArray:
        """LCA per iteration summed over each unit (output neuron or channel: the weights feeding it plus its
        bias, all tensors of one module with the same unit index). Dims (iteration, unit) with coords
        `unit_module` and `unit_index`.

        Why: finer than layers, coarser than parameters; shows whether a layer's help comes from a few units
        or all of them, and when. Lazy: one pass, each chunk reduced to (iteration, units) in place.
        """
        import dask.array as da
        import numpy as np
        import xarray as xr

        key = SPLITS.get(split, "") + "lca_unit"
        if key in self._ds:  # written at compute time
            return self._ds[key].rename("unit_lca")
        if not self.has_parameters(split) and self.has_split(split):
            from pipeline.errors import LCAError

            raise LCAError("per-unit LCA was not kept (--keep layer) and neither was per-parameter LCA; recompute "
                           "with `lca compute STORE --keep unit --recompute` for unit questions")
        x = self._var("lca_param", split)
        arr = self._dask_lca(split)
        ids, unit_module, unit_index = self._unit_ids()
        n_units = len(unit_module)
        parts, start = [], 0
        for j, width in enumerate(arr.chunks[1]):
            col = arr.blocks[:, j]
            seg = ids[start:start + width]
            fn = functools.partial(_unit_block, ids=seg, n_units=n_units)
            parts.append(col.map_blocks(fn, chunks=(col.chunks[0], (n_units,)), dtype=np.float64))
            start += width
        total = da.stack(parts).sum(axis=0) if len(parts) > 1 else parts[0]
        return xr.DataArray(
            total, dims=("iteration", "unit"), name="unit_lca",
            coords={"iteration": x["iteration"], "unit": np.arange(n_units),
                    "unit_module": ("unit", unit_module), "unit_index": ("unit", unit_index)})

    def unit_totals(self, split: str = "train") -> xr.DataArray:
        """Total LCA of each unit over training: which neurons/channels paid for learning, which fought it."""
        self._require_complete(split, "unit_totals")
        return self.unit_lca(split).sum("iteration", skipna=False).rename("unit_total")

    def _unit_ids(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import numpy as np

        ds = self._ds
        mods = self.modules()
        mod_of_layer = dict(zip(ds["layer"].values.tolist(), ds["layer_module"].values.tolist()))
        layers, inv = np.unique(ds["param_layer"].values, return_inverse=True)
        layer_mod = np.array([mods.index(mod_of_layer[str(n)]) for n in layers], dtype=np.int64)
        unit = np.asarray(ds["param_unit"].values, dtype=np.int64)
        base = int(unit.max()) + 1 if unit.size else 1
        keys, ids = np.unique(layer_mod[inv] * base + unit, return_inverse=True)
        return ids.ravel(), np.array(mods, dtype=object)[keys // base].astype(str), keys % base

    # -- cumulative view and conservation -------------------------------------------------------------------

    def cumulative(self, split: str = "train", by: str = "layer") -> xr.DataArray:
        """Running total of each layer's LCA: when in training each layer did its share. Lazy."""
        self._require_complete(split, "cumulative")
        return self.layer_lca(split, by).cumsum("iteration", skipna=False).rename("cumulative_lca")

    def reconstruction(self, split: str = "train") -> xr.Dataset:
        """The loss rebuilt from LCA alone, loss[0] + cumsum_t(sum_i LCA_{t,i}), against the true
        L(theta_{t+1}).

        Why: LCA is only an allocation of the loss change if it adds back up to it; the gap is the
        accumulated integration residual. Where iterations are missing, each contiguous run is anchored at
        its own true starting loss. Eager (per-iteration arrays only); summary numbers in attrs.
        """
        import numpy as np
        import xarray as xr

        self._require_complete(split, "reconstruction")
        loss = np.asarray(self._var("loss", split).values, dtype=np.float64)
        after = np.asarray(self._var("loss_after", split).values, dtype=np.float64)
        step = np.asarray(self._var("lca_layer", split).sum("layer", skipna=False).values, dtype=np.float64)
        it = np.asarray(self._ds["iteration"].values)
        recon = np.empty_like(after)
        starts = np.flatnonzero(np.r_[True, np.diff(it) != 1]) if it.size else np.zeros(0, int)
        for a, b in zip(starts, np.r_[starts[1:], it.size].astype(int)):
            recon[a:b] = loss[a] + np.cumsum(step[a:b])
        err = recon - after
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(err) / np.abs(after)
        drop = after[-1] - loss[0] if it.size else np.nan
        attrs = {
            "initial_loss": float(loss[0]) if it.size else float("nan"),
            "final_loss": float(after[-1]) if it.size else float("nan"),
            "final_reconstructed": float(recon[-1]) if it.size else float("nan"),
            "final_error": float(err[-1]) if it.size else float("nan"),
            "final_relative_error": float(rel[-1]) if it.size else float("nan"),
            "max_relative_error": float(np.nanmax(rel)) if it.size else float("nan"),
            "error_over_loss_change": float(abs(err[-1]) / abs(drop)) if it.size and drop else float("nan"),
        }
        coords = {"iteration": self._ds["iteration"]}
        return xr.Dataset({"loss_after": ("iteration", after), "reconstructed": ("iteration", recon),
                           "error": ("iteration", err), "relative_error": ("iteration", rel)},
                          coords=coords, attrs=attrs)

    def residual_stats(self, split: str = "train") -> dict[str, float]:
        """How well each step's LCA sums to its loss change (r_t); the integration's own error budget."""
        import numpy as np

        self._require_complete(split, "residual_stats")
        r = np.asarray(self._var("residual", split).values, dtype=np.float64)
        r = r[np.isfinite(r)]
        change = np.asarray(self._var("loss_change", split).values, dtype=np.float64)
        moved = np.nansum(np.abs(change))
        if not r.size:
            return {k: float("nan") for k in ("mean_abs", "max_abs", "rms", "sum", "relative_to_loss_change")}
        return {"mean_abs": float(np.abs(r).mean()), "max_abs": float(np.abs(r).max()),
                "rms": float(np.sqrt((r * r).mean())), "sum": float(r.sum()),
                "relative_to_loss_change": float(np.abs(r).sum() / moved) if moved else float("nan")}

    # -- finding 3: learning is synchronised across layers ---------------------------------------------------

    def peaks(self, split: str = "train", by: str = "module", quantile: float = 0.9,
              order: int = 1, local: int | None = 51) -> xr.DataArray:
        """Boolean (iteration, layer|module): the iterations where each layer's helpful LCA peaks.

        A peak of a layer is an iteration t where -LCA (its help) is a local maximum over t-order..t+order
        (strictly above the earlier side, at least the later side), positive, and at or above the layer's
        own `quantile` over the `local` iterations around t (see `local_peaks`: a moving threshold, because
        LCA shrinks through training). Defaults to modules so that a weight and its bias, which move on the
        same gradient, do not count as two synchronised layers.
        """
        import xarray as xr

        self._require_complete(split, "peaks")
        per = self.layer_lca(split, by).compute()
        mask = local_peaks(-per.values, quantile=quantile, order=order, local=local)
        return xr.DataArray(mask, dims=per.dims, coords=per.coords, name="peak")

    def synchronisation(self, split: str = "train", by: str = "module", quantile: float = 0.9,
                        order: int = 1, local: int | None = 51, window: int = 0, draws: int = 1000,
                        null: str = "shift", seed: int = 0) -> Synchronisation:
        """Do layers' LCA peaks fall on the same iterations more often than chance? (the paper's third
        finding).

        observed: pairs (peak of layer a, peak of layer b), a < b, at most `window` iterations apart.
        Chance: the same count after moving each layer's peaks independently (`shuffled_coincidences`:
        circular shift by default, or permutation), `draws` times from a seeded generator. Returns a
        `Synchronisation`: observed, expected (mean of the draws), ratio = observed / expected, p_value =
        (1 + #draws >= observed) / (1 + draws), expected_uniform = (2 window + 1) sum_{a<b} n_a n_b / T
        (exact for window 0), per-layer peak counts, and the draws in `null_counts`.

        Warns (`ShortRunWarning`) when the run is shorter than two `local` windows or chance predicts
        fewer than 1 coincidence: then "ratio 0, p 1" says the test had no power, not that layers are
        independent.
        """
        import warnings

        import numpy as np

        from pipeline.errors import ShortRunWarning

        peak = self.peaks(split, by, quantile, order, local)
        mask = peak.values
        t = mask.shape[0]
        observed = int(coincidences(mask, window))
        null_counts = shuffled_coincidences(mask, window, draws, null, seed)
        expected = float(null_counts.mean()) if null_counts.size else float("nan")
        n = mask.sum(0).astype(np.float64)
        pairs = (n.sum() ** 2 - (n * n).sum()) / 2
        dim = peak.dims[1]
        result = Synchronisation(
            by=by, quantile=quantile, order=order, local=local, window=window, null=null, draws=draws, seed=seed,
            iterations=int(t), observed=observed, expected=expected,
            null_std=float(null_counts.std()) if null_counts.size else float("nan"),
            expected_uniform=float((2 * window + 1) * pairs / t) if t else float("nan"),
            ratio=observed / expected if expected > 0 else float("nan"),
            p_value=float((1 + (null_counts >= observed).sum()) / (1 + null_counts.size)),
            peaks={str(k): int(v) for k, v in zip(peak[dim].values, n)},
            null_counts=null_counts,
        )
        reasons = []
        if local is not None and t < 2 * local:
            reasons.append(f"{t} iterations are fewer than two {local}-iteration windows (local={local})")
        if not expected >= 1:
            reasons.append(f"chance predicts only {expected:.2g} coinciding peaks")
        if reasons:
            result.warning = "; ".join(reasons) + ": too short a run for this test, so its ratio and p-value " \
                "say little (use a longer run, or a smaller `local`)"
            warnings.warn(f"synchronisation: {result.warning}", ShortRunWarning, stacklevel=2)
        return result

    # -- LCA in each tensor's own shape ---------------------------------------------------------------------

    def tensor(self, name: str, iteration: int | None = None, split: str = "train") -> xr.DataArray:
        """LCA of one parameter tensor in its own shape: at one `iteration` (its label), or summed over all
        iterations (None; the result must then be complete).

        Why: LCA is stored as one flat vector per step; a researcher thinks in `fc1.weight[out, in]` or
        `conv1.weight[channel, in, kh, kw]`. Dims are `unit` (the unit axis, output neuron or channel) then
        `axis1`, `axis2`, ...; attrs name the layer and the iteration.
        """
        import json

        import numpy as np
        import xarray as xr

        layers = [str(v) for v in self._ds["layer"].values]
        if name not in layers:
            from pipeline.errors import LCAError

            near = ", ".join(layers[:6]) + (" ..." if len(layers) > 6 else "")
            raise LCAError(f"no parameter tensor named {name!r}; the layers are: {near}")
        i = layers.index(name)
        off, size = int(self._ds["layer_offset"].values[i]), int(self._ds["layer_size"].values[i])
        shape = (tuple(json.loads(str(self._ds["layer_shape"].values[i]))) if "layer_shape" in self._ds.coords
                 else (size,))
        pos, kept = self._param_columns(split)
        if kept[i] == 0 and size:
            from pipeline.errors import LCAError

            raise LCAError(f"per-parameter LCA of {name} was not kept (keep={self._ds.attrs.get('keep')}); "
                           f"recompute with --keep parameter or --keep-layers {name}")
        x = self._param(split, "LCA in a tensor's shape").isel(parameter=slice(int(pos[i]), int(pos[i]) + size))
        if iteration is None:
            self._require_complete(split, "tensor")
            flat = np.asarray(x.sum("iteration", skipna=False, dtype=np.float64).values)
        else:
            if iteration not in self._ds["iteration"].values:
                from pipeline.errors import LCAError

                it = self._ds["iteration"].values
                raise LCAError(f"iteration {iteration} is not in the dataset (iterations "
                               f"{int(it.min()) if it.size else '-'}..{int(it.max()) if it.size else '-'})")
            flat = np.asarray(x.sel(iteration=iteration).values)
            if np.isnan(flat).all() and size:
                from pipeline.errors import IncompleteResultError

                raise IncompleteResultError(f"iteration {iteration} of {split} LCA is not computed yet; finish "
                                            f"it with `lca compute {self._ds.attrs.get('store', 'STORE')}`")
        dims = ("unit",) + tuple(f"axis{k}" for k in range(1, len(shape))) if shape else ()
        return xr.DataArray(flat.reshape(shape), dims=dims, name=f"lca {name}",
                            attrs={"layer": name, "iteration": "all (sum)" if iteration is None else int(iteration),
                                   "split": split})

    # -- oscillation and phase lag (pipeline/analysis/oscillation.py) ------------------------------------------

    def oscillation(self, split: str = "train", units: bool = True, store: str | None = None) -> Any:
        """Per layer and per unit: LCA sign-flip rate, lag-1 autocorrelation of the motion, and the phase lag
        between motion and gradient (the paper's explanation of hurting layers). Reads the trajectory of
        `store` (default: the store the dataset came from); see `pipeline.analysis.oscillation`."""
        from pipeline.analysis.oscillation import oscillation

        return oscillation(self._ds, split, units=units, store=store)

    # -- train vs held-out ----------------------------------------------------------------------------------

    def heldout_comparison(self, by: str = "layer") -> xr.Dataset:
        """Train and held-out LCA side by side, on the iterations where both are complete.

        Why: the paper computes LCA on the held-out split too; a layer that helps the training loss but
        hurts the held-out loss is learning something that does not generalise. Returns per-layer totals
        (`train_total`, `heldout_total`), the per-layer correlation over iterations (`correlation`), and in
        attrs the correlation of the per-iteration total LCA (`correlation_total`), the fraction of layers
        whose totals agree in sign, and the number of iterations used.
        """
        import numpy as np
        import xarray as xr

        both = (self.complete_mask("train") & self.complete_mask("heldout")).values
        sub = LCAAccessor(self._ds.isel(iteration=np.flatnonzero(both)))
        tr = sub.layer_lca("train", by).compute()
        ho = sub.layer_lca("heldout", by).compute()
        dim = tr.dims[1]
        corr = [_pearson(tr.values[:, i], ho.values[:, i]) for i in range(tr.shape[1])]
        t_tot, h_tot = tr.sum("iteration"), ho.sum("iteration")
        agree = float((np.sign(t_tot.values) == np.sign(h_tot.values)).mean()) if tr.shape[1] else float("nan")
        return xr.Dataset(
            {"train_total": t_tot, "heldout_total": h_tot, "correlation": (dim, np.array(corr))},
            attrs={"correlation_total": _pearson(tr.values.sum(1), ho.values.sum(1)),
                   "sign_agreement": agree, "iterations": int(both.sum())})

    # -- everything that reads `lca_param`, in one pass -----------------------------------------------------------

    def scan(self, split: str = "train", quantiles: Sequence[float] = QUANTILES,
             iteration_bins: int | None = None) -> dict[str, Any]:
        """Helped fraction, pooled distribution and per-unit LCA from a single read of `lca_param`.

        What the result did not keep comes back as None, with the reason under "missing": the helped
        fraction and the distribution need per-parameter LCA; per-unit LCA is read from `lca_unit`.

        Why: `lca_param` is the one large array; three separate passes would read it three times. `unit_lca` comes
        back summed into at most `iteration_bins` equal groups of consecutive iterations (LCA is additive,
        so a bin is the LCA of that stretch of training), small enough for a heat map.
        """
        import dask

        self._require_complete(split, "scan")
        missing: dict[str, str] = {}
        keep = self._ds.attrs.get("keep", "unit")
        parts: dict[str, Any] = {}
        if self.has_parameters(split):
            parts["counts"] = self._helped_counts(split)
            parts["blocks"], parts["hist"] = _distribution_parts(self._dask_lca(split))
        else:
            why = f"needs per-parameter LCA, which this result did not keep (keep={keep})"
            missing |= {"helped_fraction": why, "distribution": why}
        if SPLITS.get(split, "") + "lca_unit" in self._ds or self.has_parameters(split):
            units = self.unit_lca(split)
            if iteration_bins and units.sizes["iteration"] > iteration_bins:
                k = -(-units.sizes["iteration"] // iteration_bins)
                units = units.coarsen(iteration=k, boundary="pad", coord_func="min").sum()
            parts["units"] = units
        else:
            missing["unit_lca"] = f"per-unit LCA was not kept (keep={keep})"
        parts = dict(zip(parts, dask.compute(*parts.values())))
        counts = parts.get("counts")
        return {
            "helped_fraction": None if counts is None else
            (counts.helped / counts.moved.where(counts.moved > 0)).rename("helped_fraction"),
            "helped_fraction_stats": None if counts is None else _fraction_stats(counts),
            "distribution": None if counts is None else finish_distribution(parts["blocks"], parts["hist"],
                                                                            quantiles),
            "unit_lca": parts.get("units"),
            "missing": missing,
        }


# ----------------------------------------------------------------------------------------------------------
# small private helpers


def _fraction_stats(counts: xr.Dataset) -> dict[str, float]:
    import numpy as np

    helped = np.asarray(counts.helped.values, dtype=np.float64)
    moved = np.asarray(counts.moved.values, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(moved > 0, helped / moved, np.nan)
    f = f[np.isfinite(f)]
    if not f.size:
        return {k: float("nan") for k in ("mean", "std", "median", "min", "max", "pooled")} | {"iterations": 0}
    return {"mean": float(f.mean()), "std": float(f.std()), "median": float(np.median(f)),
            "min": float(f.min()), "max": float(f.max()), "pooled": float(helped.sum() / moved.sum()),
            "iterations": int(f.size)}


def _distribution_parts(arr):
    """Lazy (per-block moments, summed histogram) for `finish_distribution`."""
    import numpy as np

    nb = arr.numblocks
    res = arr.map_blocks(_block_summary, chunks=((1,) * nb[0], (1,) * nb[1], (_NMOM + 4 * _NB,)),
                         new_axis=2, dtype=np.float64)
    return res[..., :_NMOM], res[..., _NMOM:].sum(axis=(0, 1))


def _unit_block(block: np.ndarray, ids: np.ndarray, n_units: int) -> np.ndarray:
    """Sum a chunk's columns into units: contiguous runs of one unit first, then scatter-add the runs."""
    import numpy as np

    out = np.zeros((n_units, block.shape[0]))
    if block.shape[1]:
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        runs = np.add.reduceat(np.asarray(block, dtype=np.float64), starts, axis=1)
        np.add.at(out, ids[starts], runs.T)
    return out.T


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------------------------------------
# registration


def _register() -> None:
    import xarray as xr

    if getattr(xr.Dataset, ACCESSOR, None) is not LCAAccessor:
        xr.register_dataset_accessor(ACCESSOR)(LCAAccessor)


_register()
