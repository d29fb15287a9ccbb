"""Running an LCA plan: on a Dask cluster (a fresh LocalCluster, or an existing one at a scheduler address),
or inline, in the calling process.

The client resolves what L is (the problem: from the store, a workflow, or model=/data=/loss=), checks it
against the store (data fingerprints, parameter layout, loss) before anything is written, plans
(pipeline/lca/plan.py), and runs one task per pending block. As in rechunker, the plan is plain data and
the executors are interchangeable: the Dask executor submits the tasks to workers, the inline executor
runs the very same task function here, one block after another (no cluster: notebooks, debuggers, small
runs), with the same numbers. A dead worker's blocks are simply rerun elsewhere by Dask; an interrupted
client leaves finished blocks marked done, so running the same command again resumes.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence


from pipeline.config import Workflow
from pipeline.errors import LCAError, ProblemError
from pipeline.lca.claims import Claim, Guard, acquire
from pipeline.lca.plan import (Settings, SplitStats, describe_damage, ensure_result_group, finish_result,
                               plan_result, result_meta, split_stats, stored_threads)
from pipeline.lca.results import GROUP, default_name, list_results, result_attrs, valid_version, validate_name
from pipeline.lca.worker import TaskSpec, release, run_block
from pipeline.problem.definition import LossSpec, Problem, Ref, check_fingerprint
from trajectory_store.location import check_inside, locate

EXECUTORS = ("dask", "inline")

CONNECT_TIMEOUT_S = 10
LOOPBACK = "127.0.0.1"
MAX_CPU_WORKERS = 4  # without GPUs: one worker per CPU core, at most this many (`--workers` help, README)


def default_workers(cuda: bool) -> int:
    """One worker per GPU; without GPUs one per CPU core, at most MAX_CPU_WORKERS (each holds the data)."""
    import torch

    return torch.cuda.device_count() if cuda else min(MAX_CPU_WORKERS, os.cpu_count() or 1)


def dashboard_bind(address: str | None) -> str:
    """`--dashboard-address` as what LocalCluster binds: loopback on a free port unless asked otherwise.

    "PORT" means loopback on that port; "HOST:PORT" binds that host (":PORT" or "0.0.0.0:PORT" every
    interface, which the user must ask for by name: the dashboard shows code and data paths).
    """
    if address is None or address == "":
        return f"{LOOPBACK}:0"
    host, sep, port = str(address).rpartition(":")
    if not sep:
        host = LOOPBACK
    if not port.isdigit() or not 0 <= int(port) <= 65535 or any(c.isspace() for c in host):
        raise LCAError(f"--dashboard-address must be PORT, HOST:PORT or :PORT (all interfaces), got {address!r}; "
                       f"for example 127.0.0.1:8787")
    return f"{host}:{int(port)}"


WORKER_TIMEOUT_S = 120.0  # how long a compute waits with no live worker before it gives up


def absolute_store(store: str) -> str:
    """A local path made absolute (symlinks kept, as the user named them); a URL unchanged."""
    if "://" in store:
        return store
    return os.path.abspath(os.path.expanduser(store))


@dataclass
class SplitSummary:
    split: str
    steps: int
    blocks_computed: int  # by this call; the rest were done before
    stats: SplitStats     # over every finished block


@dataclass
class ComputeSummary:
    store: str
    settings: Settings
    name: str = ""
    splits: list[SplitSummary] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0
    devices: list[str] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)  # torch threads the workers ran with (distinct values)
    dashboard: str | None = None

    def __str__(self) -> str:
        s = self.settings
        kept = f", keep {s.keep}" + (f" + {','.join(s.keep_layers)}" if s.keep_layers else "")
        lines = [f"LCA result {self.name!r} ({s.rule}, tol {s.tol:g}, max splits {s.max_splits}, {s.precision}{kept}) "
                 f"for {self.store}"]
        for sp in self.splits:
            st = sp.stats
            steps_per_s = sp.steps * sp.blocks_computed / max(st.blocks_total, 1) / self.seconds \
                if self.seconds > 0 and sp.blocks_computed else float("nan")
            lines.append(
                f"  {sp.split}: {sp.steps} steps in {st.blocks_total} blocks ({sp.blocks_computed} computed now, "
                f"{steps_per_s:.1f} steps/s); |residual| max {st.residual_abs_max:.2e} mean "
                f"{st.residual_abs_mean:.2e}; {100 * st.within_tol:.1f}% within tol; "
                f"{st.points_mean:.3f} gradient evaluations per step")
        if self.workers:
            threads = f" x {'/'.join(map(str, self.threads))} thread(s)" if self.threads else ""
            lines.append(f"  {self.workers} worker(s){threads} on {', '.join(sorted(set(self.devices))) or 'n/a'}, "
                         f"{self.seconds:.1f} s" + (f"; dashboard was at {self.dashboard}" if self.dashboard else ""))
        lines.append(f"dataset: pipeline.open_lca({self.store!r}, result={self.name!r})  "
                     f"(summary: lca info {self.store})")
        return "\n".join(lines)


def resolve_settings(wf: Workflow, **overrides: Any) -> Settings:
    """The workflow's LCA settings with command-line overrides, validated by the workflow schema."""
    changes = {k: v for k, v in overrides.items() if v is not None}
    lca = wf.replace(lca=changes).lca if changes else wf.lca
    return Settings(lca.rule, lca.tol, lca.max_splits, lca.precision, lca.eval_batch_size, lca.keep,
                    tuple(lca.keep_layers))


@contextlib.contextmanager
def _client(workers: int, scheduler: str | None, dashboard_address: str | None = None) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as e:
            raise LCAError(f"cannot reach the Dask scheduler at {scheduler} within {CONNECT_TIMEOUT_S} s "
                           f"({type(e).__name__}); start it with `dask scheduler` or drop --scheduler") from None
        try:
            yield client
        finally:
            client.close()
        return
    # After a failed run, multiprocessing's resource tracker may report the nannies' semaphores as "leaked"
    # while it cleans them up itself; that noise would bury the one-line error. The tracker process reads
    # its warning filters from the environment, so the filter has to go there.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
    # Every listener (scheduler, nannies, workers, dashboard) on loopback: a store path or a task is nobody
    # else's business on a shared machine. The dashboard's port is random unless asked for (two runs on one
    # machine must not fight over 8787).
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host=LOOPBACK,
                      dashboard_address=dashboard_bind(dashboard_address),
                      silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
        yield client


def compute_lca(
    store: str,
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    device: str = "auto",
    splits: Sequence[str] | None = None,
    rule: str | None = None,
    tol: float | None = None,
    max_splits: int | None = None,
    precision: str | None = None,
    eval_batch_size: int | None = None,
    threads_per_worker: int | None = None,
    keep: str | None = None,
    keep_layers: Sequence[str] | None = None,
    recompute: bool = False,
    name: str | None = None,
    takeover: bool = False,
    worker_timeout: float = WORKER_TIMEOUT_S,
    block_steps: int | None = None,
    workflow: Workflow | None = None,
    model: Any = None,
    data: Any = None,
    loss: Any = None,
    executor: str = "dask",
    progress: bool = True,
    dashboard_address: str | None = None,
) -> ComputeSummary:
    """Compute LCA for every recorded step of `store` and write it into the store's `lca/` group.

    What L is comes from the store (its `problem`, or the workflow our trainer recorded). A store written
    by anyone's loop without one needs `workflow=` (a workflow whose `[model]`, `[data]`, `[loss]` describe
    it) or the shortcuts `model=`, `data=` ("package.module:attr" or {"factory", "kwargs"}) and `loss=`
    (a kind or a factory); these also override single parts of a recorded problem. Data whose fingerprint
    differs from the store's, a model whose parameters differ from its layout, or another loss is refused
    before anything is written. `executor="inline"` runs every block in this process instead of on a Dask
    cluster (same numbers; `workers` and `scheduler` do not apply). The result is stored under `name` (by
    default a name made of its settings), beside results computed under other settings. Blocks already done
    under the same settings are skipped; with `recompute` the result is computed afresh and replaces the old
    one only once it is complete.
    A local cluster listens on loopback only; its dashboard link is printed (with `progress`) and kept in
    the summary; `dashboard_address` ("PORT", "HOST:PORT") fixes where it listens. Steps that end outside
    the tolerance even at `max_splits` give a `ToleranceWarning` with their share. With no live worker for
    `worker_timeout` seconds the compute stops with one line.
    `keep` ("parameter", "unit" or "layer") is the finest LCA stored; per-layer sums are always stored, per-unit
    sums unless keep="layer". `keep_layers` (globs over tensor or module names) stores per-parameter LCA for
    the matching layers only.
    """
    import torch
    from trajectory_store import open_trajectory

    if executor not in EXECUTORS:
        raise LCAError(f"executor must be one of {', '.join(EXECUTORS)}; got {executor!r}")
    if workers is not None and workers < 1:
        raise LCAError(f"--workers must be at least 1, got {workers}")
    if threads_per_worker is not None and threads_per_worker < 1:
        raise LCAError(f"--threads-per-worker must be at least 1, got {threads_per_worker}")
    if block_steps is not None and block_steps < 1:
        raise LCAError(f"block_steps must be at least 1, got {block_steps}")
    if dashboard_address is not None and scheduler:
        raise LCAError("--dashboard-address sets up the local cluster's dashboard; with --scheduler the dashboard "
                       "is the running scheduler's own (its link is printed): drop one of the two")
    dashboard_bind(dashboard_address)  # a bad address fails before anything starts
    if device == "cuda" and not scheduler and not torch.cuda.is_available():
        raise LCAError("--device cuda was asked for but CUDA is not available here; use --device auto or cpu")
    if executor == "inline" and scheduler:
        raise LCAError("--scheduler runs on a Dask cluster; drop it or --inline")

    if worker_timeout <= 0 or worker_timeout != worker_timeout:
        raise LCAError(f"--worker-timeout must be a positive number of seconds, got {worker_timeout}")
    # Workers run elsewhere, in other working directories: they must get the path the client means.
    store = absolute_store(store)
    reader = open_trajectory(store)
    created = str(reader.attrs.get("created", ""))
    if reader.num_checkpoints < 2:
        raise LCAError(f"{store} holds {reader.num_checkpoints} checkpoint(s); LCA needs at least two "
                       f"(a run of at least one recorded step)")
    problem, settings_workflow, stored = resolve_problem(reader, workflow, model=model, data=data, loss=loss)
    # `splits` goes through the workflow schema too, so a bad split name is the same one-line error.
    settings = resolve_settings(settings_workflow, rule=rule, tol=tol, max_splits=max_splits, precision=precision,
                                eval_batch_size=eval_batch_size, splits=list(splits) if splits else None,
                                keep=keep, keep_layers=list(keep_layers) if keep_layers is not None else None)
    split_names = list(splits) if splits else list(settings_workflow.lca.splits)
    name = validate_name(name or default_name(settings.to_json()))
    # Everything that could make L the wrong function is checked here, before anything is written.
    problem = check_problem(reader, problem, stored, split_names, settings, recompute=recompute, name=name)

    block = block_steps or reader.chunk_steps
    from pipeline.lca.outputs import OutputSpec

    OutputSpec.build(reader.layout, settings.keep, settings.keep_layers)  # a bad keep or glob: before any write
    # Whatever the store holds, results are written (and old versions deleted) only inside its folder.
    check_inside(locate(store), GROUP)
    unguarded = _unguarded_main() if executor == "dask" and not scheduler else None
    if unguarded:
        executor = "inline"
    ensure_result_group(reader.group, name)
    claim, note = acquire(reader.group, name, store, settings.to_json(), takeover=takeover)
    with claim:
        if note and progress:
            print(f"note: {note}", flush=True)
        cuda_here = torch.cuda.is_available() and device != "cpu"
        n = 1 if executor == "inline" else workers or default_workers(cuda_here)
        # Torch's CPU kernels sum in an order that depends on the thread count, so the count is part of what
        # must match for results to be mixed: a resume keeps the stored count unless one is given.
        threads = threads_per_worker or stored_threads(reader.group, name, settings, recompute) \
            or (torch.get_num_threads() if executor == "inline" else 1 if scheduler
                else max(1, (os.cpu_count() or 1) // n))
        plan = plan_result(reader.group, name, split_names, steps=reader.num_steps, layout=reader.layout,
                           block=block, settings=settings, recompute=recompute,
                           extra={"threads": threads})
        for s in split_names:  # what L was, beside the results: `lca info` shows it, a resume checks it
            result_meta(reader.group, s, plan.path).attrs["problem"] = problem.to_json()
        for p in plan.splits:
            if p.damaged and progress:
                print(f"note: recomputing {describe_damage(p.split, p.damaged, p.block, p.steps)}", flush=True)
        summary = ComputeSummary(store, settings, name)
        pending = plan.pending
        t0 = time.perf_counter()
        if pending:
            if unguarded:
                print(f"note: {unguarded} has no `if __name__ == \"__main__\":` guard, so Dask worker processes "
                      f"(which re-import it) cannot start; computing in this process instead (put the script's "
                      f"code under that guard to use workers)", file=sys.stderr, flush=True)
            spec = TaskSpec(store=store, created=created, problem=problem.to_json(), settings=settings.to_json(),
                            result=plan.path, name=name, token=claim.token, device=device, threads=threads,
                            module_roots=tuple(problem.module_roots()))
            claim.start_heartbeat()
            if executor == "inline":
                summary.workers = 1
                results = _run_inline(spec, pending, reader.num_steps, progress, claim)
            else:
                with _client(n, scheduler, dashboard_address) as client:
                    with contextlib.suppress(Exception):  # bokeh is a dependency, but a scheduler may run without it
                        summary.dashboard = client.dashboard_link \
                            if scheduler or importlib.util.find_spec("bokeh") else None
                    summary.workers = len(client.scheduler_info().get("workers", {})) or n
                    results = _run(client, spec, pending, reader.num_steps, progress, summary.dashboard,
                                   worker_timeout, claim)
            summary.devices = [r["device"] for r in results]
            summary.threads = sorted({int(r["threads"]) for r in results})
        Guard(store, created, name, claim.token)(reader.group)
        with claim.lock:
            finish_result(reader.group, plan)
        summary.seconds = time.perf_counter() - t0
        computed = {p.split: sum(1 for b in pending if b.split == p.split) for p in plan.splits}
        summary.splits = [SplitSummary(p.split, p.steps, computed[p.split],
                                       split_stats(reader.group, plan.path, p.split, p.settings.tol))
                          for p in plan.splits]
    _warn_unreached_tolerance(summary)
    return summary


def _warn_unreached_tolerance(summary: ComputeSummary) -> None:
    """A tolerance below what the rule and precision can reach costs max_splits' gradients on every step
    and still fails: say so, with the share that made it, instead of passing silently."""
    import warnings

    from pipeline.errors import ToleranceWarning

    s = summary.settings
    for sp in summary.splits:
        st = sp.stats
        if st.steps_done and st.within_tol < 1.0:
            warnings.warn(
                f"only {100 * st.within_tol:.1f}% of {st.steps_done} {sp.split} steps reached |residual| <= tol "
                f"{s.tol:g} (rule {s.rule}, max splits {s.max_splits}, {s.precision}; {st.points_mean:.1f} gradient "
                f"evaluations per step); the others are stored with larger residuals: raise --tol, raise "
                f"--max-splits or use --precision fp64", ToleranceWarning, stacklevel=3)


def resolve_problem(reader: Any, workflow: Workflow | None, *, model: Any = None, data: Any = None,
                    loss: Any = None) -> tuple[Problem, Workflow, Problem | None]:
    """(the problem to evaluate, the workflow whose LCA settings apply, the problem the store records).

    The store's own record comes first; a workflow replaces it, and model=/data=/loss= replace single parts.
    A store that records neither (a user's loop) falls back to the problem of an earlier compute of it.
    """
    store = reader.path
    stored = Problem.from_json(reader.problem) if reader.problem else None
    stored_wf = Workflow.from_dict(reader.workflow, f"workflow stored in {store}") if reader.workflow else None
    if workflow is not None:
        problem, settings_wf = Problem.from_workflow(workflow), workflow
    elif stored is not None:
        problem, settings_wf = stored.replace(fingerprints={}), stored_wf or _settings_only()
    elif stored_wf is not None:
        problem, settings_wf = Problem.from_workflow(stored_wf), stored_wf
    else:
        earlier = _earlier_problem(reader)
        problem, settings_wf = (earlier or Problem()).replace(fingerprints={}), _settings_only()
    if model is not None:
        problem = problem.replace(model=Ref.parse(model, "model"))
    if data is not None:
        problem = problem.replace(data=Ref.parse(data, "data"))
    if loss is not None:
        problem = problem.replace(loss=LossSpec.parse(loss))
    if problem.model is None or problem.data is None:
        missing = "model" if problem.model is None else "data"
        raise ProblemError(f"{store} records no problem definition, so its {missing} is unknown; pass "
                           f"--workflow FILE (a workflow with [model] and [data]) or --model/--data "
                           f"\"module:attr\" (compute_lca(..., workflow=..., model=..., data=..., loss=...))")
    return problem, settings_wf, stored


def _settings_only() -> Workflow:
    """The default LCA settings, for stores that record no workflow (a valid workflow needs a length)."""
    from pipeline.config import TrainConfig

    return dataclasses.replace(Workflow(name="user loop"), train=TrainConfig(steps=1))


def _earlier_problem(reader: Any) -> Problem | None:
    """The problem recorded beside the most recently started result that has one (any name)."""
    for ref in reversed(list_results(reader.group)):
        for split in ("train", "heldout"):
            meta = result_meta(reader.group, split, ref.path)
            if meta is not None and isinstance(meta.attrs.get("problem"), dict):
                return Problem.from_json(meta.attrs["problem"])
    return None


def _resumed_version(reader: Any, name: str) -> str | None:
    """The version group of result `name` that a compute without --recompute would resume, if any."""
    current = result_attrs(reader.group, name).get("current")
    path = f"{GROUP}/{name}/{current}"
    return path if valid_version(current) and path in reader.group else None


def check_problem(reader: Any, problem: Problem, stored: Problem | None, split_names: list[str],
                  settings: Settings, *, recompute: bool, name: str) -> Problem:
    """Build the problem here once and compare it with the store; returns it with the evaluated data's
    fingerprints (which workers check again). Each mismatch is one line naming both sides."""
    import torch

    from trajectory_store.layout import ParamLayout

    from pipeline.lca.evaluate import Evaluator, set_frozen

    store = reader.path
    if stored is not None and stored.loss != problem.loss:
        raise ProblemError(f"{store} was trained with loss {stored.loss}, but this compute would evaluate loss "
                           f"{problem.loss}; LCA must allocate the loss training minimised: drop the loss override")
    splits = problem.build_data()
    fingerprints, evaluated = {}, {}
    resumed = _resumed_version(reader, name)
    for split_name in split_names:
        split = problem.build_split(split_name, splits)
        fingerprints[split_name] = split.fingerprint()
        check_fingerprint(stored.fingerprints.get(split_name) if stored else None, fingerprints[split_name],
                          split_name, problem, store)
        meta = result_meta(reader.group, split_name, resumed) if resumed else None
        earlier = meta.attrs.get("problem") if meta is not None else None
        earlier_fp = (earlier.get("fingerprints") or {}).get(split_name) if isinstance(earlier, dict) else None
        if earlier_fp and earlier_fp != fingerprints[split_name] and not recompute:
            raise ProblemError(f"the {split_name} LCA {name!r} already in {store} was computed on data with "
                               f"fingerprint {earlier_fp}, not {fingerprints[split_name]} ({problem.data}); pass "
                               f"--recompute to replace it, or --name NEW to keep both")
        evaluated[split_name] = split
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(reader.attrs.get("seed", 0) or 0))
        net = problem.build_model()
    set_frozen(net, reader.frozen())
    why = reader.layout.first_mismatch(ParamLayout.from_model(net))
    if why is not None:
        raise ProblemError(f"the model from {problem.model} does not match {store}'s parameter layout (first mismatch: {why}); "
                           f"use the model the run was trained with")
    # The loss contract, on the first evaluation batch at theta_0: a finite scalar sum and a positive count.
    first = evaluated[split_names[0]]
    x, y = first.slice(0, settings.eval_batch_size)
    probe = Evaluator(net, reader.layout, x, y, batch_size=settings.eval_batch_size, device="cpu",
                      precision="fp32", mode="loop", loss=problem.build_loss(), frozen=reader.frozen())
    from pipeline.problem.definition import check_loss_value

    with torch.no_grad():
        value = probe._batch_loss(torch.as_tensor(reader.params(0, 1)[0]), probe.inputs, probe.targets)
    check_loss_value(value, f"loss {problem.loss}")
    if "train" in evaluated and not (stored and stored.fingerprints.get("train")):
        _replay_first_step(reader, problem, evaluated["train"], net)
    return problem.replace(fingerprints=fingerprints)


REPLAY_RTOL = 1e-3


def _replay_first_step(reader: Any, problem: Problem, split: Any, net: Any) -> None:
    """For a store without a data fingerprint: recompute the first step's recorded minibatch loss from its
    recorded sample indices. Another data set (other samples, another scaling), model or loss gives another
    number; refuse then. Skipped when the store lacks indices or loss, or the model has active dropout (the
    recorded loss was then random)."""
    import numpy as np
    import torch
    from torch import nn

    from pipeline.lca.evaluate import Evaluator

    indices = reader.batch_indices
    if indices is None or reader.num_steps < 1:
        return
    row = indices[0][indices[0] >= 0]
    recorded = float(reader.minibatch_loss[0])
    if row.size == 0 or not np.isfinite(recorded):
        return
    if int(row.max()) >= len(split):
        raise ProblemError(f"{reader.path} recorded sample index {int(row.max())} at step 0, but the training data "
                           f"to evaluate ({problem.data}) has {len(split)} samples: it is not the data the run "
                           f"was trained on")
    if any(isinstance(m, nn.Dropout) and m.p > 0 or isinstance(m, nn.MultiheadAttention) and m.dropout > 0
           for m in net.modules()):
        return
    x, y = split.take(torch.as_tensor(row))
    ev = Evaluator(net, reader.layout, x, y, batch_size=len(row), device="cpu", precision="fp64", mode="loop",
                   loss=problem.build_loss(), frozen=reader.frozen())
    replayed = float(ev.loss_and_grad(reader.params(0, 1).astype(np.float64))[0][0])
    if abs(replayed - recorded) > REPLAY_RTOL * max(1.0, abs(recorded)):
        raise ProblemError(
            f"{reader.path} records no data fingerprint, and its first step's minibatch loss {recorded:.6g} is "
            f"{replayed:.6g} on the data to evaluate ({problem.data}) with loss {problem.loss}: the data, model or "
            f"loss differ from training's; use the ones the run was trained with (record them with "
            f"TrajectoryWriter.create(..., problem=...))")


def _unguarded_main() -> str | None:
    """The script being run, if it has no `if __name__ == "__main__":` guard (Dask's spawned worker
    processes re-import it, so they would run the script again instead of starting); else None."""
    import multiprocessing

    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or multiprocessing.parent_process() is not None or not str(path).endswith(".py"):
        return None
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.dump(node.test) and "__main__" in ast.dump(node.test):
            return None
    return str(path)


def _lost(spec: TaskSpec, claim: Claim) -> None:
    if claim.lost:
        raise LCAError(f"this compute lost its claim on LCA result {spec.name!r} in {spec.store} to "
                       f"{claim.lost}; it stopped without writing more")


def _run_inline(spec: TaskSpec, pending: list, steps: int, progress: bool, claim: Claim) -> list[dict[str, Any]]:
    """The same tasks as on a Dask worker, one after another in this process, with the spec's threads; each
    task checks the store and the claim before it writes (run_block's guard), and a lost claim stops here."""
    import torch
    from tqdm.auto import tqdm

    saved = torch.get_num_threads()
    results = []
    bar = tqdm(total=len(pending), unit="block", desc="LCA (inline)", disable=not progress)
    try:
        for b in pending:
            _lost(spec, claim)
            results.append(run_block(spec, b.split, b.index, b.start, b.stop, steps))
            bar.update(1)
    finally:
        bar.close()
        release(spec)
        torch.set_num_threads(saved)
    return results


def _run(client: Any, spec: TaskSpec, pending: list, steps: int, progress: bool, dashboard: str | None,
         worker_timeout: float, claim: Claim) -> list[dict[str, Any]]:
    from distributed import wait
    from tqdm.auto import tqdm

    if dashboard and progress:
        print(f"Dask dashboard: {dashboard}", flush=True)
    futures = [client.submit(run_block, spec, b.split, b.index, b.start, b.stop, steps, pure=False,
                             key=f"lca-{b.split}-{b.index}-{os.getpid()}-{time.time_ns()}") for b in pending]
    results = []
    bar = tqdm(total=len(futures), unit="block", desc="LCA", disable=not progress)
    last_worker = time.monotonic()
    try:
        remaining = set(futures)
        while remaining:
            try:
                done, _ = wait(list(remaining), timeout=1.0, return_when="FIRST_COMPLETED")
            except TimeoutError:  # nothing finished this second: time to look at the workers
                done = set()
            for future in done:
                remaining.discard(future)
                try:
                    results.append(future.result())
                except LCAError:
                    raise
                except Exception as e:  # a worker-side failure that is not ours: keep it short
                    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                    raise LCAError(f"a block task failed on a worker: {type(e).__name__}: {first}") from None
                bar.update(1)
            _lost(spec, claim)
            if remaining:
                if _live_workers(client):
                    last_worker = time.monotonic()
                elif time.monotonic() - last_worker > worker_timeout:
                    raise LCAError(f"no live Dask worker for {worker_timeout:g} s, with {len(remaining)} block(s) "
                                   f"left; finished blocks are kept: start workers (or check why they die) and run "
                                   f"the same command again, or raise --worker-timeout")
    finally:
        bar.close()
        for f in futures:
            if not f.done():
                f.cancel()
    return results


def _live_workers(client: Any) -> int:
    try:
        return len(client.scheduler_info().get("workers", {}))
    except Exception:  # the scheduler itself is unreachable: no workers either
        return 0
