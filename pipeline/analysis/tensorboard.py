"""`lca export tensorboard STORE DIR`: a computed result as the view TensorBoard users already know.

Written per layer (parameter tensor) with the iteration as TensorBoard's step:
- scalars `lca_layer/<layer>` (the layer's LCA on that step; negative helped) and `lca_cumulative/<layer>`;
- scalars `helped_fraction/<layer>` and `helped_fraction/all` (share of moving parameters that helped);
- scalars `loss/train` (L(theta_t) on the full split) and `residual/train`;
- histograms `lca_hist/<layer>`: the layer's per-parameter LCA on a step, every `histogram_every` steps.

Only finished iterations are exported (a partial result warns with the count). Per-parameter rows are read
a bounded group of iterations at a time, so a large model's export does not need its LCA in memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from pipeline.errors import LCAError

HISTOGRAMS_PER_LAYER = 100  # default: about this many histogram steps per layer over the run
READ_BYTES = 256 << 20      # per-parameter LCA read at once for histograms


def _writer(logdir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LCAError("TensorBoard export needs the tensorboard package: pip install 'lca-pipeline[tensorboard]' "
                       "(or pip install tensorboard)") from None
    return SummaryWriter(log_dir=str(logdir))


def export_tensorboard(store: str, logdir: str | Path, *, histogram_every: int | None = None) -> dict[str, Any]:
    """Write STORE's LCA as TensorBoard event files into LOGDIR; returns what was written (counts, tags)."""
    import numpy as np

    from pipeline.analysis import accessor as analysis
    from pipeline.analysis.dataset import open_lca
    from pipeline.errors import IncompleteResultWarning

    if histogram_every is not None and histogram_every < 1:
        raise LCAError(f"--histogram-every must be at least 1, got {histogram_every}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteResultWarning)  # said once below, with what is exported
        ds = open_lca(store)
    acc = analysis.LCAAccessor(ds)
    total = int(ds.sizes["iteration"])
    if acc.missing_iterations("train"):
        ds = acc.completed("train")
        acc = analysis.LCAAccessor(ds)
        warnings.warn(f"{total - ds.sizes['iteration']} of {total} iterations of {store} are not computed yet; "
                      f"exporting the {ds.sizes['iteration']} finished ones", IncompleteResultWarning, stacklevel=2)
    steps = int(ds.sizes["iteration"])
    if steps == 0:
        raise LCAError(f"no completed LCA steps in {store} yet: run `lca compute {store}` first")
    every = histogram_every or max(1, -(-steps // HISTOGRAMS_PER_LAYER))

    import dask

    layer_lca, helped_layer, helped_all, loss, residual = dask.compute(
        ds["lca_layer"], acc.helped_fraction(by="layer"), acc.helped_fraction(), ds["loss"], ds["residual"])
    layers = [str(n) for n in ds["layer"].values]
    its = np.asarray(ds["iteration"].values, dtype=np.int64)
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    writer = _writer(logdir)
    try:
        cum = np.cumsum(layer_lca.values, axis=0)
        for k, it in enumerate(its):
            step = int(it)
            for j, name in enumerate(layers):
                writer.add_scalar(f"lca_layer/{name}", float(layer_lca.values[k, j]), step)
                writer.add_scalar(f"lca_cumulative/{name}", float(cum[k, j]), step)
                h = float(helped_layer.values[k, j])
                if np.isfinite(h):
                    writer.add_scalar(f"helped_fraction/{name}", h, step)
            if np.isfinite(helped_all.values[k]):
                writer.add_scalar("helped_fraction/all", float(helped_all.values[k]), step)
            writer.add_scalar("loss/train", float(loss.values[k]), step)
            writer.add_scalar("residual/train", float(residual.values[k]), step)
        hist_rows = np.flatnonzero(np.arange(steps) % every == 0)
        offs, sizes = ds["layer_offset"].values, ds["layer_size"].values
        group = max(1, READ_BYTES // max(1, 4 * int(ds.sizes["parameter"])))
        for a in range(0, hist_rows.size, group):
            rows = hist_rows[a:a + group]
            block = np.asarray(ds["lca_param"].isel(iteration=rows).values)
            for r, k in enumerate(rows):
                for name, o, n in zip(layers, offs, sizes):
                    writer.add_histogram(f"lca_hist/{name}", block[r, int(o):int(o) + int(n)], int(its[k]))
        writer.flush()
    finally:
        writer.close()
    return {"logdir": str(logdir), "iterations": steps, "iterations_total": total, "layers": layers,
            "histogram_every": every, "histogram_steps": int(hist_rows.size),
            "files": sorted(str(p.relative_to(logdir)) for p in logdir.rglob("events.out.tfevents.*"))}
