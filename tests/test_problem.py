"""Your own model, data and loss: the problem definition by reference, the loss contract, provenance, any
nn.Module, and the in-process executor.

Every LCA here is checked against a float64 computation written in this file (plain autograd on a plain
copy of the model, the losses spelled out again), never against the project's own evaluator.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from torch import nn

from pipeline import Problem, compute_lca, load_workflow, open_lca
from pipeline.errors import LCAError, ProblemError, WorkflowError
from pipeline.lca.evaluate import Evaluator
from pipeline.lca.plan import array_names
from pipeline.lca.results import select_result
from trajectory_store import ParamLayout, TrajectoryWriter, open_trajectory

from . import own_problem
from .conftest import LCA, ROOT

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------------------
# a researcher's own loop


def user_loop(problem: Problem, path, *, steps=12, lr=0.05, batch=16, seed=0, compiled=False, freeze=None,
              record_problem=True):
    """Train with plain SGD on random minibatches, recording with TrajectoryWriter (and the problem)."""
    torch.manual_seed(seed)
    model = problem.build_model()
    if freeze:
        for name, p in model.named_parameters():
            if name.startswith(freeze):
                p.requires_grad_(False)
    split = problem.build_split("train")
    loss_fn = problem.build_loss()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    recorded = torch.compile(model) if compiled else model
    with TrajectoryWriter.create(str(path), recorded, steps=steps, chunk_steps=4,
                                 problem=problem if record_problem else None) as w:
        model.train()
        for _ in range(steps):
            idx = torch.randperm(len(split), generator=g)[:batch]
            x, y = split.take(idx)
            total, count = loss_fn(model(**x) if isinstance(x, dict) else model(x), y)
            loss = total / count
            opt.zero_grad()
            loss.backward()
            opt.step()
            w.record(recorded, loss=loss.item(), lr=lr, batch_indices=idx)
    return model


# ---------------------------------------------------------------------------------------------------------
# the independent float64 reference


def ref_loss(kind, output, y):
    """The three losses, written again: (sum, count)."""
    out = output["logits"] if isinstance(output, dict) else output
    if kind == "mse":
        return ((out - y) ** 2).sum(), y.numel()
    if kind == "cross-entropy":
        return -torch.log_softmax(out, 1).gather(1, y[:, None]).sum(), y.shape[0]
    logp = torch.log_softmax(out[:, :-1], -1)
    labels = y[:, 1:]
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * keep).sum(), int(keep.sum())


def reference_grad_fn(model_factory, kind, split, eval_batch, frozen=None):
    """theta -> (L, dL/dtheta) in float64 over the whole split, batch by batch, dropout off, BN on batch stats."""
    model = model_factory().double()
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.MultiheadAttention)):
            m.eval()
    named = dict(model.named_parameters())
    for name, value in (frozen or {}).items():
        named[name].data.copy_(torch.as_tensor(value, dtype=torch.float64))
        named[name].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]

    def fn(theta):
        torch.nn.utils.vector_to_parameters(torch.as_tensor(theta, dtype=torch.float64), params)
        total, count = 0.0, 0
        grads = [torch.zeros_like(p) for p in params]
        for s in range(0, len(split), eval_batch):
            x, y = split.slice(s, s + eval_batch)
            x = {k: v for k, v in x.items()} if isinstance(x, dict) else x.double()
            y = y.double() if y.is_floating_point() else y
            loss, n = ref_loss(kind, model(**x) if isinstance(x, dict) else model(x), y)
            for acc, gr in zip(grads, torch.autograd.grad(loss, params)):
                acc += gr
            total, count = total + loss.item(), count + n
        return total / count, torch.cat([gr.reshape(-1) for gr in grads]).numpy() / count

    return fn


def check_against_reference(store, model_factory, kind, split, eval_batch, steps=(0, 5), frozen=None):
    """Per-parameter LCA of some steps vs composite Simpson on the float64 reference; conservation on all."""
    root = zarr.open_group(str(store), mode="r")
    names = array_names("train", select_result(root, None, str(store)).path)
    lca = np.asarray(root[names["lca"]][:])
    loss = np.asarray(root[names["loss"]][:])
    residual = np.asarray(root[names["residual"]][:])
    nsplits = np.asarray(root[names["splits"]][:])
    rows = open_trajectory(str(store)).params().astype(np.float64)
    dl = np.diff(loss)
    assert np.all(np.abs(lca.astype(np.float64).sum(axis=1) + residual - dl) < 1e-9)
    fn = reference_grad_fn(model_factory, kind, split, eval_batch, frozen)
    for t in steps:
        n = int(nsplits[t])
        w = np.array([1.0] + [4.0 if k % 2 else 2.0 for k in range(1, n)] + [1.0]) / (3 * n)
        delta = rows[t + 1] - rows[t]
        integral = sum(wk * fn(rows[t] + (k / n) * delta)[1] for k, wk in enumerate(w))
        expected = delta * integral
        scale = np.abs(expected).max()
        np.testing.assert_allclose(lca[t], expected, rtol=0, atol=1e-6 * scale)
        assert fn(rows[t])[0] == pytest.approx(loss[t], rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# any nn.Module: LCA against float64 autograd


def test_mse_layernorm_mlp_per_parameter_and_conservation(tmp_path):
    problem = Problem.define(model={"factory": "tests.own_problem:mlp", "kwargs": {"hidden": 16}},
                             data="tests.own_problem:regression", loss="mse")
    user_loop(problem, tmp_path / "mlp.zarr")
    compute_lca(str(tmp_path / "mlp.zarr"), executor="inline", precision="fp64", eval_batch_size=40,
                progress=False)  # nothing but the store: it records its problem
    check_against_reference(tmp_path / "mlp.zarr", lambda: own_problem.mlp(16), "mse",
                            problem.build_split("train"), 40)
    ds = open_lca(str(tmp_path / "mlp.zarr"))
    assert ds.sizes["iteration"] == 12


def test_cnn_batchnorm_dropout(tmp_path):
    problem = Problem.define(model="tests.own_problem:cnn", data="tests.own_problem:digits_subset")
    user_loop(problem, tmp_path / "cnn.zarr", steps=8)
    compute_lca(str(tmp_path / "cnn.zarr"), executor="inline", precision="fp64", eval_batch_size=64,
                progress=False)
    check_against_reference(tmp_path / "cnn.zarr", own_problem.cnn, "cross-entropy",
                            problem.build_split("train"), 64, steps=(0, 7))


def test_tiny_causal_transformer_tied_embeddings_token_loss(tmp_path):
    problem = Problem.define(model="tests.own_problem:tiny_gpt", data="tests.own_problem:tokens",
                             loss="token-cross-entropy")
    model = user_loop(problem, tmp_path / "gpt.zarr", steps=8, batch=8, lr=0.1)
    layout = open_trajectory(str(tmp_path / "gpt.zarr")).layout
    assert "wte.weight" in layout.names and "lm_head.weight" not in layout.names  # tied: one entry
    assert layout.size == sum(p.numel() for p in model.parameters())
    compute_lca(str(tmp_path / "gpt.zarr"), executor="inline", precision="fp64", eval_batch_size=10,
                progress=False)
    check_against_reference(tmp_path / "gpt.zarr", own_problem.tiny_gpt, "token-cross-entropy",
                            problem.build_split("train"), 10, steps=(0, 7))


def test_token_loss_is_the_exact_split_mean_for_any_batch_size():
    """Sequences differ in how many labels count (-100 padding): batch means of means would differ."""
    problem = Problem.define(model="tests.own_problem:tiny_gpt", data="tests.own_problem:tokens",
                             loss="token-cross-entropy")
    split = problem.build_split("train")
    torch.manual_seed(1)
    model = problem.build_model()
    layout = ParamLayout.from_model(model)
    theta = layout.flatten(model).astype(np.float64)
    expected, _ = reference_grad_fn(lambda: own_problem.tiny_gpt(), "token-cross-entropy", split, len(split))(theta)
    for bs in (1, 5, 7, 24):
        ev = Evaluator(model, layout, split.inputs, split.targets, batch_size=bs, precision="fp64",
                       loss=problem.build_loss())
        loss, _ = ev.loss_and_grad(theta)
        assert loss[0] == pytest.approx(expected, rel=1e-13), bs
    mean_of_batch_means = np.mean([  # what a per-batch mean would have given: not the split's mean
        reference_grad_fn(lambda: own_problem.tiny_gpt(), "token-cross-entropy",
                          type(split)({"input_ids": split.inputs["input_ids"][s:s + 7]}, split.targets[s:s + 7]),
                          7)(theta)[0] for s in range(0, 24, 7)])
    assert abs(mean_of_batch_means - expected) > 1e-4


def test_compiled_module_names_and_frozen_parameters(tmp_path):
    """A torch.compile'd model records plain names; frozen parameters are outside the layout, stored once,
    and held at their recorded values even when the factory initialises them differently."""
    problem = Problem.define(model="tests.own_problem:mlp", data="tests.own_problem:regression", loss="mse")
    path = tmp_path / "frozen.zarr"
    model = user_loop(problem, path, compiled=True, freeze="inp.", seed=3)
    reader = open_trajectory(str(path))
    assert reader.layout.names == ["norm.weight", "norm.bias", "out.weight", "out.bias"]
    frozen = reader.frozen()
    assert sorted(frozen) == ["inp.bias", "inp.weight"]
    np.testing.assert_array_equal(frozen["inp.weight"], model.inp.weight.detach().numpy())
    plain = own_problem.mlp()
    assert ParamLayout.from_model(torch.compile(plain)).names == ParamLayout.from_model(plain).names
    assert not any("_orig_mod" in n for n in ParamLayout.from_model(torch.compile(plain)).names)
    out = subprocess.run([*LCA, "info", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert "frozen" in out.stdout and "outside the layout" in out.stdout
    # The factory's fresh random init of `inp` differs from training's; LCA must use the recorded values.
    torch.manual_seed(12345)
    compute_lca(str(path), executor="inline", precision="fp64", eval_batch_size=96, progress=False)
    check_against_reference(path, own_problem.mlp, "mse", problem.build_split("train"), 96, frozen=frozen)


# ---------------------------------------------------------------------------------------------------------
# definition, workflow sections, executors


def test_problem_json_round_trip_and_builtin_entries():
    wf = load_workflow(ROOT / "workflows" / "digits-fc.toml")
    p = Problem.from_workflow(wf)
    assert p.model.factory == "pipeline.problem.models:fc" and p.data.factory == "pipeline.problem.data:digits"
    q = p.with_fingerprints()
    assert Problem.from_json(json.loads(json.dumps(q.to_json()))) == q
    assert set(q.to_json()) == {"model", "data", "loss", "fingerprints"}
    assert q.fingerprints["train"].startswith("blake2b:")
    assert ParamLayout.from_model(p.build_model()).size == 64 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10


def test_workflow_sections_are_strict(tmp_path):
    def load(text):
        f = tmp_path / "w.toml"
        f.write_text(textwrap.dedent(text))
        return load_workflow(f)

    wf = load("""
        [model]
        factory = "tests.own_problem:mlp"
        kwargs = { hidden = 8 }
        [data]
        factory = "tests.own_problem:regression"
        [loss]
        kind = "mse"
        [train]
        steps = 3
    """)
    assert wf.model.kwargs == {"hidden": 8} and wf.loss.kind == "mse"
    assert Problem.from_workflow(wf).model.kwargs == {"hidden": 8}
    assert load_workflow_round_trip(wf) == wf
    for bad, msg in [
        ('[model]\nfactory = "a:b"\narch = "lenet"\n[train]\nsteps=1', "both factory and arch"),
        ('[model]\nkwargs = { a = 1 }\n[train]\nsteps=1', "kwargs but no factory"),
        ('[model]\nfactory = "not a ref"\n[train]\nsteps=1', "package.module:attr"),
        ('[loss]\nkind = "hinge"\n[train]\nsteps=1', "cross-entropy, mse, token-cross-entropy"),
        ('[loss]\nfactory = "a:b"\nkind = "mse"\n[train]\nsteps=1', "both factory and kind"),
        ('[loss]\nfactorie = "a:b"\n[train]\nsteps=1', "unknown key 'factorie'"),
        ('[model]\nfactory = "a:b"\nkwargs = 3\n[train]\nsteps=1', "must be a table"),
    ]:
        with pytest.raises(WorkflowError, match=msg):
            load(bad)


def load_workflow_round_trip(wf):
    from pipeline.config import Workflow

    return Workflow.from_dict(json.loads(json.dumps(wf.to_dict())))


@pytest.mark.slow
def test_inline_executor_is_bit_identical_to_dask(tmp_path):
    problem = Problem.define(model="tests.own_problem:mlp", data="tests.own_problem:regression", loss="mse")
    user_loop(problem, tmp_path / "a.zarr", steps=8)
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "b.zarr")
    compute_lca(str(tmp_path / "a.zarr"), executor="inline", threads_per_worker=1, progress=False)
    compute_lca(str(tmp_path / "b.zarr"), workers=1, threads_per_worker=1, progress=False)
    a, b = (zarr.open_group(str(tmp_path / n), mode="r") for n in ("a.zarr", "b.zarr"))
    paths = [array_names("train", select_result(g, None, "").path) for g in (a, b)]
    assert paths[0].keys() == paths[1].keys()
    for key in paths[0]:
        np.testing.assert_array_equal(np.asarray(a[paths[0][key]][:]), np.asarray(b[paths[1][key]][:]), err_msg=key,
                                      strict=True)


@pytest.mark.slow
def test_script_without_main_guard_computes_in_process(tmp_path):
    problem = Problem.define(model="tests.own_problem:mlp", data="tests.own_problem:regression", loss="mse")
    user_loop(problem, tmp_path / "s.zarr", steps=4)
    script = tmp_path / "unguarded.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom pipeline import compute_lca\n"
                      f"print(compute_lca({str(tmp_path / 's.zarr')!r}, workers=2, progress=False))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    note = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(note) == 1 and 'if __name__ == "__main__":' in note[0] and "in this process" in note[0]
    assert "100.0% within tol" in out.stdout


# ---------------------------------------------------------------------------------------------------------
# provenance and bad input: one line, non-zero exit, nothing written


def lca_cli(*args, cwd=ROOT):
    return subprocess.run([*LCA, *args], capture_output=True, text=True, cwd=cwd, timeout=240)


def assert_refused(out, store, *needles):
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "lca" not in zarr.open_group(str(store), mode="r"), "something was written"


def test_wrong_data_is_refused_naming_both_fingerprints(tmp_path):
    """The issue's case: trained in a user's loop on the first 500 digits with unscaled pixels (and the
    problem recorded), computed with the digits-fc workflow: L would be the project's digits split."""
    own = Problem.define(model={"factory": "pipeline.problem.models:fc",
                                "kwargs": {"input_shape": [1, 8, 8], "num_classes": 10, "hidden": [100, 50]}},
                         data={"factory": "tests.own_problem:digits_subset", "kwargs": {"n": 500, "scaled": False}})
    store = tmp_path / "own.zarr"
    user_loop(own, store, steps=4, lr=0.001)
    recorded = open_trajectory(str(store)).problem["fingerprints"]["train"]
    digits = Problem.from_workflow(load_workflow(ROOT / "workflows" / "digits-fc.toml")).with_fingerprints(("train",))
    out = lca_cli("compute", str(store), "--workflow", "workflows/digits-fc.toml", "--inline")
    assert_refused(out, store, recorded, digits.fingerprints["train"])
    with pytest.raises(ProblemError, match="fingerprint"):
        compute_lca(str(store), workflow=load_workflow(ROOT / "workflows" / "digits-fc.toml"), executor="inline",
                    progress=False)
    # The same loop recording no problem at all, only its sample indices (the README's earlier loop): the
    # first step's minibatch loss, replayed on the workflow's data, gives it away.
    bare = tmp_path / "bare.zarr"
    user_loop(own, bare, steps=4, lr=0.001, record_problem=False)
    out = lca_cli("compute", str(bare), "--workflow", "workflows/digits-fc.toml", "--inline")
    assert_refused(out, bare, "records no data fingerprint", "minibatch loss")


def test_bad_factories_and_losses_are_one_line_each(tmp_path):
    good = Problem.define(model="tests.own_problem:mlp", data="tests.own_problem:regression", loss="mse")
    store = tmp_path / "s.zarr"
    user_loop(good, store, steps=2, record_problem=False)
    cases = [
        (["--model", "no_such_module:make"], ["no_such_module:make", "looked for in"]),
        (["--model", "tests.own_problem:not_a_module"], ["not a torch.nn.Module"]),
        (["--data", "tests.own_problem:only_heldout"], ["without 'train'"]),
        (["--loss", "tests.own_problem:per_sample_loss"], ["shape [96]", "scalar"]),
        (["--loss", "tests.own_problem:nan_loss"], ["non-finite"]),
        (["--model", "tests.own_problem:cnn"], ["first", "conv.weight"]),
    ]
    base = {"--model": "tests.own_problem:mlp", "--data": "tests.own_problem:regression", "--loss": "mse"}
    for override, needles in cases:
        args = dict(base)
        args[override[0]] = override[1]
        flat = [x for kv in args.items() for x in kv]
        out = lca_cli("compute", str(store), *flat, "--inline")
        assert_refused(out, store, *needles)
    # Nothing given at all: the store records no problem.
    assert_refused(lca_cli("compute", str(store), "--inline"), store, "records no problem definition")
    # The right definition passes every check, the replay of the first step's minibatch loss included.
    compute_lca(str(store), model="tests.own_problem:mlp", data="tests.own_problem:regression", loss="mse",
                executor="inline", progress=False)
    assert open_lca(str(store)).sizes["iteration"] == 2
    # The store records its problem: another loss is refused too.
    store2 = tmp_path / "s2.zarr"
    user_loop(good, store2, steps=2)
    with pytest.raises(ProblemError, match="trained with loss mse"):
        compute_lca(str(store2), loss="cross-entropy", executor="inline", progress=False)
    assert "lca" not in zarr.open_group(str(store2), mode="r")


def test_lca_train_and_compute_a_factory_workflow_from_its_folder(tmp_path):
    """`lca train WORKFLOW` on the user's own factory modules, found in the current directory; then a plain
    `lca compute STORE` needs nothing more, and `lca info` shows the problem and its fingerprints."""
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        from torch import nn
        def make_mlp(hidden):
            return nn.Sequential(nn.Linear(4, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 2))
    """))
    (tmp_path / "mydata.py").write_text(textwrap.dedent("""
        import torch
        def splits(n):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, 4, generator=g)
            return {"train": torch.utils.data.TensorDataset(x, torch.stack([x[:, 0] * x[:, 1], x[:, 2]], 1))}
    """))
    (tmp_path / "mine.toml").write_text(textwrap.dedent("""
        [model]
        factory = "mynets:make_mlp"
        kwargs = { hidden = 8 }
        [data]
        factory = "mydata:splits"
        kwargs = { n = 64 }
        [loss]
        kind = "mse"
        [optimizer]
        name = "sgd"
        lr = 0.1
        [train]
        steps = 6
        batch_size = 16
        chunk_steps = 3
    """))
    out = lca_cli("train", "mine.toml", "--store", "mine.zarr", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = lca_cli("compute", "mine.zarr", "--inline", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "100.0% within tol" in out.stdout
    info = lca_cli("info", "mine.zarr", cwd=tmp_path).stdout
    assert "mynets:make_mlp" in info and "mydata:splits" in info and "mse" in info and "blake2b:" in info
