"""The `lca` command. Each subcommand is a thin wrapper over one public function of the pipeline.

User-facing failures (`pipeline.errors.USER_ERRORS`) print as one line `error: ...` and exit 1; imports of
heavy modules happen inside the commands so `lca --help` stays instant.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from pipeline.errors import USER_ERRORS


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """Warnings meant for the person at the terminal print as one line `warning: ...`, like errors do."""
    click.echo(f"warning: {message}", err=True)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: finished blocks are kept; run the same command again to resume", err=True)
            sys.exit(130)

    return wrapper


def _default_store(workflow: str) -> str:
    return str(Path("runs") / f"{Path(workflow).stem}.zarr")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lca-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


@click.group()
@click.version_option(_version(), "--version", prog_name="lca", message="%(prog)s %(version)s")
def main() -> None:
    """Loss Change Allocation: record a training trajectory, allocate every loss change to parameters."""
    # Factories named "mynets:make_mlp" import from the current directory, as under `python -m`.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


@main.command()
@click.argument("name", type=click.Choice(["fashion-mnist"]))
@click.option("--dest", default="data/fashion-mnist", show_default=True, help="Folder for the IDX files.")
@_user_errors
def data(name: str, dest: str) -> None:
    """Fetch a data set that cannot be downloaded at run time (Debian's dataset-fashion-mnist)."""
    from pipeline.problem.data import fetch_fashion_mnist

    path = fetch_fashion_mnist(Path(dest))
    click.echo(f"fashion-mnist ready in {path}")


@main.command()
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--store", default=None, help="Store path or fsspec URL [default: runs/<workflow>.zarr].")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@_user_errors
def train(workflow: str, store: str | None, overwrite: bool) -> None:
    """Train WORKFLOW and record its trajectory to a Zarr store."""
    from pipeline.config import load_workflow
    from pipeline.train import train as run_train

    result = run_train(load_workflow(workflow), store or _default_store(workflow), overwrite=overwrite)
    click.echo(str(result))


def _compute_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--workers", type=int, default=None,
                     help="Local worker processes [default: one per GPU, else one per CPU core, at most 4]."),
        click.option("--dashboard-address", default=None,
                     help="Where the local cluster's Dask dashboard listens: PORT or HOST:PORT "
                          "[default: 127.0.0.1 on a free port; the link is printed]."),
        click.option("--scheduler", default=None, help="Address of a running Dask scheduler, e.g. tcp://host:8786."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True),
        click.option("--split", "splits", default=None, help="Comma-separated splits: train,heldout [default: workflow's]."),
        click.option("--rule", type=click.Choice(["rk4", "first-order"]), default=None, help="[default: workflow's]"),
        click.option("--tol", type=float, default=None, help="Absolute |residual| bound per step [default: workflow's]."),
        click.option("--max-splits", type=int, default=None, help="Finest Simpson subdivision [default: workflow's]."),
        click.option("--precision", type=click.Choice(["fp32", "tf32", "fp64"]), default=None,
                     help="[default: workflow's]"),
        click.option("--eval-batch-size", type=int, default=None,
                     help="Evaluation batch size (part of L with BatchNorm) [default: workflow's]."),
        click.option("--threads-per-worker", type=int, default=None, help="Torch threads per CPU worker."),
        click.option("--block-steps", type=int, default=None,
                     help="Steps per task and output chunk [default: the trajectory's chunk]."),
        click.option("--keep", type=click.Choice(["parameter", "unit", "layer"]), default=None,
                     help="Finest LCA to store: per-layer always, per-unit unless 'layer', per-parameter only "
                          "for 'parameter' [default: workflow's, else parameter]."),
        click.option("--keep-layers", default=None, metavar="GLOBS",
                     help="Comma-separated globs over tensor/module names (e.g. 'fc3.*'): store per-parameter "
                          "LCA for these layers only."),
        click.option("--name", default=None,
                     help="Name of the result [default: made of its settings, e.g. rk4-tol1e-07-fp32-n16-eb4096]."),
        click.option("--recompute", is_flag=True,
                     help="Compute the result afresh; it replaces the old one only once complete."),
        click.option("--takeover", is_flag=True,
                     help="Take over the claim of a compute that stopped renewing it (another host, presumed dead)."),
        click.option("--worker-timeout", type=float, default=120.0, show_default=True,
                     help="Seconds with no live Dask worker before the compute stops."),
        click.option("--inline", "executor", flag_value="inline", default="dask",
                     help="Run every block in this process: no Dask cluster, the same numbers."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _compute(store: str, **kw: Any) -> None:
    from pipeline.lca.compute import compute_lca

    if kw.get("splits"):
        kw["splits"] = [s.strip() for s in kw["splits"].split(",") if s.strip()]
    if kw.get("keep_layers") is not None:
        kw["keep_layers"] = [g.strip() for g in kw["keep_layers"].split(",") if g.strip()]
    summary = compute_lca(store, **kw)
    click.echo(str(summary))


@main.command()
@click.argument("store")
@click.option("--workflow", "workflow_file", default=None, type=click.Path(dir_okay=False),
              help="Workflow whose [model], [data], [loss] (and [lca]) describe a store that records none.")
@click.option("--model", default=None, help="Model factory \"module:attr\" (overrides the store's / workflow's).")
@click.option("--data", default=None, help="Data factory \"module:attr\" (overrides the store's / workflow's).")
@click.option("--loss", default=None, help="Loss kind (cross-entropy, mse, token-cross-entropy) or factory.")
@_compute_options
@_user_errors
def compute(store: str, workflow_file: str | None, **kw: Any) -> None:
    """Compute LCA for every step recorded in STORE, on a Dask worker pool; rerunning resumes.

    A store that records its problem (our trainer, the callbacks, or a writer given `problem=`) needs
    nothing more; a store from any other loop needs --workflow FILE or --model/--data (and --loss).
    """
    if workflow_file:
        from pipeline.config import load_workflow

        kw["workflow"] = load_workflow(workflow_file)
    _compute(store, **kw)


@main.command()
@click.argument("workflow", type=click.Path(dir_okay=False))
@click.option("--store", default=None, help="Store path or URL [default: runs/<workflow>.zarr].")
@_compute_options
@_user_errors
def run(workflow: str, store: str | None, **kw: Any) -> None:
    """Train WORKFLOW if its store does not exist yet, then compute LCA (what `make lca` runs)."""
    from pipeline.config import load_workflow
    from trajectory_store import store_exists

    from pipeline.train import train as run_train

    store = store or _default_store(workflow)
    wf = load_workflow(workflow)
    if not store_exists(store):
        click.echo(str(run_train(wf, store)))
    else:
        click.echo(f"using the trajectory already in {store} (delete it or `lca train --overwrite` to retrain)")
    _compute(store, **kw)


@main.command()
@click.argument("store")
@click.option("--verify", is_flag=True,
              help="Read every finished block back against its checksums, however large the result.")
@_user_errors
def info(store: str, verify: bool) -> None:
    """Summarise a store: steps, parameters, every LCA result with its settings, completion and residuals."""
    from pipeline.analysis.dataset import describe

    click.echo(describe(store, verify=True if verify else None))


@main.command()
@click.argument("store")
@click.option("--result", default=None, help="Only this result [default: every result of the store].")
@click.option("--force", is_flag=True, help="Release a claim even though its owner looks alive.")
@_user_errors
def unlock(store: str, result: str | None, force: bool) -> None:
    """Release the claims of computes that died, so that a new compute may write STORE's results."""
    from pipeline.lca.claims import unlock as release
    from trajectory_store import open_trajectory

    released = release(open_trajectory(store).group, store, result, force=force)
    click.echo("\n".join(released) if released else f"no stale claim in {store}")


@main.command()
@click.argument("store")
@click.option("--out", default=None, help="Output folder [default: reports/<store name>].")
@click.option("--format", "formats", default="png,svg", show_default=True,
              help="Figure formats, comma-separated: PNG always, plus svg and/or pdf.")
@click.option("--result", default=None, help="Which LCA result (`lca info` lists them) [default: the latest].")
@_user_errors
def report(store: str, out: str | None, formats: str, result: str | None) -> None:
    """Write the paper's figures, summary.json and index.html (one self-contained page) for STORE."""
    from pipeline.analysis.report import parse_formats, write_report

    formats_ = parse_formats(formats)  # a bad format fails before any work
    out = out or str(Path("reports") / Path(store.rstrip("/")).stem)
    write_report(store, out, formats=formats_, result=result)


@main.group()
def export() -> None:
    """Write a computed result in another tool's format."""


@export.command("tensorboard")
@click.argument("store")
@click.argument("logdir")
@click.option("--histogram-every", type=int, default=None,
              help="Steps between per-layer LCA histograms [default: about 100 per layer over the run].")
@_user_errors
def export_tensorboard_cmd(store: str, logdir: str, histogram_every: int | None) -> None:
    """Per-layer LCA and helped fraction as TensorBoard scalars, per-layer LCA histograms: `tensorboard --logdir LOGDIR`."""
    from pipeline.analysis.tensorboard import export_tensorboard

    done = export_tensorboard(store, logdir, histogram_every=histogram_every)
    click.echo(f"wrote {done['iterations']} iterations x {len(done['layers'])} layers (histograms every "
               f"{done['histogram_every']} steps) to {done['logdir']}; view with: tensorboard --logdir {done['logdir']}")


@main.command()
@click.argument("store")
@click.option("--window", type=int, default=50, show_default=True, help="Steps to measure: the last WINDOW recorded.")
@click.option("--interval", type=float, default=10.0, show_default=True, help="Seconds between polls.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Stop after this many seconds even if the run is still recording.")
@click.option("--max-autocorr", type=float, default=0.0, show_default=True,
              help="Flag a layer whose motion's lag-1 autocorrelation is below this.")
@click.option("--min-reversal", type=float, default=0.5, show_default=True,
              help="Flag a layer whose parameters reverse direction on at least this share of steps.")
@_user_errors
def watch(store: str, window: int, interval: float, timeout: float, max_autocorr: float, min_reversal: float) -> None:
    """Watch a run while it records: per-layer motion oscillation from the trajectory alone (no LCA needed),
    flagging oscillating layers; stops when the run stops recording or after --timeout seconds."""
    from pipeline.analysis.oscillation import watch as run_watch
    from pipeline.errors import LCAError

    if window < 3 or interval <= 0 or timeout < 0:
        raise LCAError("--window must be at least 3, --interval positive and --timeout not negative")
    run_watch(store, window=window, interval=interval, timeout=timeout, max_autocorr=max_autocorr,
              min_reversal=min_reversal, echo=click.echo)


@main.command()
@click.argument("store")
@click.option("--out", required=True, help="Store for the retrained run (path or fsspec URL).")
@click.option("--select", type=click.Choice(["hurting", "negligible"]), default="hurting", show_default=True,
              help="Units whose total LCA is most positive, or closest to zero.")
@click.option("--top", type=int, default=10, show_default=True, help="How many units.")
@click.option("--modules", multiple=True, help="Choose units only in modules matching this glob (repeatable).")
@click.option("--layers", multiple=True,
              help="Freeze whole tensors matching this glob instead of ranked units (repeatable).")
@click.option("--mode", type=click.Choice(["freeze", "prune"]), default="freeze", show_default=True)
@click.option("--from-step", type=int, default=0, show_default=True, help="Step from which they stop moving.")
@click.option("--workflow-out", default=None, help="Also write the derived workflow TOML here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out store.")
@click.option("--compute/--no-compute", default=False, help="Compute LCA of the retrained run too.")
@click.option("--workers", type=int, default=None, help="Workers for --compute.")
@_user_errors
def guide(store: str, out: str, select: str, top: int, modules: tuple[str, ...], layers: tuple[str, ...], mode: str,
          from_step: int, workflow_out: str | None, overwrite: bool, compute: bool, workers: int | None) -> None:
    """Freeze or prune the units STORE's LCA ranks (or whole --layers) and retrain STORE's workflow from the
    same seed and minibatch order into --out; compare the two with `lca compare STORE OUT`."""
    from pipeline.analysis.guide import guide as run_guide

    res = run_guide(store, out, select=select, top=top, modules=list(modules), layers=list(layers), mode=mode,
                    from_step=from_step, workflow_out=workflow_out, overwrite=overwrite)
    click.echo(f"{mode} {res['chosen']}")
    click.echo(str(res["train"]))
    if compute:
        _compute(out, workers=workers)


@main.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("--label", "labels", multiple=True, help="A name per store, in order (repeatable).")
@click.option("--out", required=True, help="Folder for comparison.png, comparison.md and comparison.json.")
@_user_errors
def compare(stores: tuple[str, ...], labels: tuple[str, ...], out: str) -> None:
    """Runs side by side: loss curves, LCA per layer, hurting layers and oscillation score."""
    from pipeline.analysis.compare import compare_runs

    compare_runs(list(stores), out, list(labels) or None)


@main.command()
@click.option("--smoke", is_flag=True, help="Small sizes, for CI: checks the table, not the speed.")
@click.option("--out", default="bench-out", show_default=True, help="Folder for bench.json and scratch stores.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@_user_errors
def bench(smoke: bool, out: str, device: str) -> None:
    """Print the performance table: engine vs reference-style evaluator, FLOPs, residuals, store size."""
    from pipeline.bench.run import run_bench

    run_bench(smoke=smoke, out=out, device=device)


if __name__ == "__main__":
    main()
