"""Every bad input of issue 9's items 10 and 11: one line naming the problem and the fix, exit 1, nothing
half-written. In-process (click's CliRunner) where the case is about values; real subprocesses where it is
about processes and signals (tests/test_signals.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_workflow
from pipeline.errors import LCAError
from pipeline.lca.compute import check_scheduler_address, choose_block
from pipeline.lca.plan import Settings, plan_split, read_done
from trajectory_store import StoreError, open_trajectory

ROOT = Path(__file__).resolve().parents[1]
TINY = '[data]\ndataset = "digits"\n[model]\nhidden = [16]\n[train]\nsteps = 6\nbatch_size = 16\nchunk_steps = 4\n'


def one_line_error(result, *fragments: str, code: int = 1) -> str:
    """The CLI's answer to a bad input: exit `code`, one `error:` line with every fragment, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- workflow values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,fragments", [
    ("[optimizer]\nmomentum = -0.5\n", ["optimizer.momentum", "[0, 1)"]),
    ("[optimizer]\nweight_decay = -1e-4\n", ["optimizer.weight_decay", "negative"]),
    ('[optimizer]\nname = "adam"\nbetas = [1.5, 0.9]\n', ["optimizer.betas", "[0, 1)"]),
    ('[optimizer]\nname = "adam"\nbetas = [0.9]\n', ["optimizer.betas", "two numbers"]),
    ("[optimizer]\nlr = inf\n", ["optimizer.lr", "finite"]),
    ("[optimizer]\nlr = nan\n", ["optimizer.lr", "finite"]),
    ("[optimizer]\nnesterov = true\nmomentum = 0.0\n", ["optimizer.nesterov"]),
    ("[lca]\ntol = inf\n", ["lca.tol", "finite"]),
    ('[schedule]\nkind = "step"\nstep_size = 0\n', ["schedule.step_size", "at least 1"]),
    ('[schedule]\nkind = "step"\ngamma = 0.0\n', ["schedule.gamma", "positive"]),
    ('[lca]\nsplits = ["heldout", "heldout"]\n', ["lca.splits", "twice"]),
    ("seed = -1\n", ["seed"]),
    ("[model]\nhidden = [100000000000]\n", ["memory"]),
    ('[data]\ndataset = "synthetic"\nsynthetic_samples = 1000000000000\n', ["memory"]),
])
def test_bad_workflow_values_are_one_line_and_write_nothing(tmp_path: Path, extra: str, fragments: list[str]) -> None:
    text = TINY.replace("[model]\nhidden = [16]\n", "") if "[model]" in extra else TINY
    text = text.replace('[data]\ndataset = "digits"\n', "") if "[data]" in extra else text
    if extra.startswith("seed"):
        text = extra + text
    else:  # a section given twice is not TOML: merge by appending keys to the existing header
        text = text + extra
    wf = tmp_path / "wf.toml"
    wf.write_text(text)
    one_line_error(cli("train", wf, "--store", tmp_path / "s.zarr"), *fragments)
    assert not (tmp_path / "s.zarr").exists()


def test_workflow_that_is_not_utf8(tmp_path: Path) -> None:
    wf = tmp_path / "latin.toml"
    wf.write_bytes(TINY.encode() + b"# caf\xe9\n")
    one_line_error(cli("train", wf, "--store", tmp_path / "s.zarr"), "not UTF-8", "line 9")
    assert not (tmp_path / "s.zarr").exists()


# ---- command-line values -----------------------------------------------------------------------------------

@pytest.mark.parametrize("address,fragment", [
    ("garbage", "not a scheduler address"),
    ("::::", "not a scheduler address"),
    ("tcp://localhost:", "not a scheduler address"),
    ("http://localhost:8787/status", "web address"),
    ("tcp://localhost:99999", "not a scheduler address"),
])
def test_bad_scheduler_addresses(store_copy, address: str, fragment: str) -> None:
    with pytest.raises(LCAError, match="tcp://HOST:PORT"):
        check_scheduler_address(address)
    store = store_copy()
    one_line_error(cli("compute", store, "--scheduler", address), fragment)
    assert "lca" not in zarr.open_group(store, mode="r")


def test_good_scheduler_addresses_pass() -> None:
    for address in ("tcp://127.0.0.1:8786", "127.0.0.1:8786", "tcp://[::1]:8786", "tls://host:8786"):
        assert check_scheduler_address(address) == address


@pytest.mark.parametrize("args,fragments", [
    (["--tol", "inf"], ["--tol", "finite"]),
    (["--tol", "nan"], ["--tol", "finite"]),
    (["--tol", "-1"], ["--tol"]),
    (["--block-steps", "0"], ["block_steps"]),
    (["--workers", "0"], ["--workers"]),
])
def test_bad_compute_options_write_nothing(store_copy, args: list[str], fragments: list[str]) -> None:
    store = store_copy()
    before = files_under(Path(store))
    one_line_error(cli("compute", store, *args), *fragments)
    assert files_under(Path(store)) == before  # no lca/ arrays, no attribute with a non-standard JSON value


class _Reader:
    def __init__(self, steps: int, param_chunk: int, chunk_steps: int = 64) -> None:
        self.num_steps, self.param_chunk, self.chunk_steps = steps, param_chunk, chunk_steps


def test_block_steps_is_clamped_to_the_run_and_refused_beyond_the_chunk_budget() -> None:
    assert choose_block(_Reader(300, 12060), 100_000) == 300       # digits-fc: one block of the whole run
    assert choose_block(_Reader(300, 12060), None) == 64
    assert choose_block(_Reader(20, 12060), None) == 20
    with pytest.raises(LCAError, match=r"--block-steps 100000 would make output chunks of \d+ MiB; use at most"):
        choose_block(_Reader(480_000, 21_015), 100_000)              # fashion-fc sized: 8 GiB chunks


def test_duplicate_split_is_computed_once(monkeypatch, store_copy) -> None:
    import pipeline.lca.compute as compute

    seen = []
    real = compute.plan_split
    monkeypatch.setattr(compute, "plan_split", lambda root, split, **kw: seen.append(split) or real(root, split, **kw))
    monkeypatch.setattr(compute, "_client", lambda *a: (_ for _ in ()).throw(LCAError("stop here")))
    with pytest.raises(LCAError, match="stop here"):
        compute.compute_lca(store_copy(), splits=["heldout", "heldout"], progress=False)
    assert seen == ["heldout"]


# ---- damaged stores ----------------------------------------------------------------------------------------

def _edit_json(path: Path, fn) -> None:
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage,fragment", [
    (lambda s: _edit_json(s / "zarr.json", lambda m: m["attributes"].update(layout="x")), "layout"),
    (lambda s: _edit_json(s / "zarr.json", lambda m: m["attributes"].update(layout=[{"name": 1}])), "layout"),
    (lambda s: (s / "trajectory" / "params" / "zarr.json").write_text("{not json"), "damaged"),
    (lambda s: (s / "trajectory" / "zarr.json").write_text("[]"), "damaged"),
    (lambda s: (s / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": 7}'), ""),
    (lambda s: _edit_json(s / "trajectory" / "zarr.json", lambda m: m["attributes"].update(checkpoints="9")),
     "checkpoints"),
])
def test_damaged_store_metadata_is_one_line(store_copy, damage, fragment: str) -> None:
    store = Path(store_copy())
    damage(store)
    before = files_under(store)
    for command in ("info", "compute"):
        one_line_error(cli(command, store, "--workers", "1") if command == "compute" else cli(command, store),
                       fragment)
    assert files_under(store) == before


def test_deleted_trajectory_chunk_is_reported_as_missing_data(store_copy) -> None:
    store = Path(store_copy())
    (store / "trajectory" / "params" / "c" / "1" / "0").unlink()
    with pytest.raises(StoreError, match=r"damaged: 1 chunk\(s\) of trajectory/params are missing \(c/1/0\)"):
        open_trajectory(str(store)).params(10, 20)
    np.testing.assert_array_equal(open_trajectory(str(store)).params(0, 16).shape, (16, 12060))  # chunk 0 intact


def _fake_lca(store: str, split: str = "train", block: int = 16) -> None:
    """LCA arrays as compute plans them, every block marked done (values are not what these tests check)."""
    r = open_trajectory(store)
    plan = plan_split(r.group, split, steps=r.num_steps, size=r.layout.size, block=block,
                      param_chunk=r.param_chunk, settings=Settings("rk4", 1e-4, 32, "fp32", 2048))
    root = r.group
    root[f"lca/{split}"][:] = 0.0
    root["lca/loss"][:] = 1.0
    root["lca/residual"][:] = 0.0
    root["lca/points"][:] = 2
    root["lca/blocks_done"][:] = 1
    assert len(plan.blocks) == 3


@pytest.mark.parametrize("damage,fragment", [
    (lambda s: shutil.rmtree(s / "lca" / "blocks_done"), "missing"),
    (lambda s: zarr.open_group(str(s))["lca"].create_array("blocks_done", shape=(5,), dtype="uint8",
                                                            overwrite=True), "has shape (5,), expected (3,)"),
])
def test_damaged_completion_record(store_copy, damage, fragment: str) -> None:
    store = store_copy()
    _fake_lca(store)
    damage(Path(store))
    with pytest.raises(StoreError, match="--recompute"):
        read_done(zarr.open_group(store), "train")
    for args in (["info", store], ["compute", store, "--workers", "1"], ["report", store, "--out",
                                                                         str(Path(store).parent / "rep")]):
        one_line_error(cli(*args), "blocks_done", fragment, "--recompute")
    assert not (Path(store).parent / "rep").exists()


def test_report_out_that_is_a_file_or_not_writable(store_copy, tmp_path: Path) -> None:
    store = store_copy()
    _fake_lca(store)
    a_file = tmp_path / "taken.txt"
    a_file.write_text("mine")
    one_line_error(cli("report", store, "--out", a_file), "is a file")
    assert a_file.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        one_line_error(cli("report", store, "--out", locked / "rep"), "cannot write the report", "give a folder you can write to")
    assert not (locked / "rep").exists()


class read_only:
    """A folder nobody may write into, root included: `chattr +i` when running as root, else chmod."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        if os.geteuid() == 0:
            done = subprocess.run(["chattr", "+i", str(self.path)], capture_output=True)
            if done.returncode != 0:
                pytest.skip(f"running as root and chattr +i is not available: {done.stderr!r}")
        else:
            self.path.chmod(0o555)
        return self.path

    def __exit__(self, *exc: object) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(self.path)], check=True)
        else:
            self.path.chmod(0o755)


def test_read_only_store_on_compute(store_copy) -> None:
    store = Path(store_copy())
    before = files_under(store)
    with read_only(store):
        one_line_error(cli("compute", store, "--workers", "1"), "cannot create the train LCA arrays",
                       "make the store writable")
    assert files_under(store) == before


def _no_space_after(monkeypatch, calls: int) -> None:
    """Simulate a disk that fills up: every store write after the first `calls` fails with ENOSPC."""
    from zarr.storage import LocalStore

    real = LocalStore.set
    count = {"n": 0}

    async def set_(self, key, value):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, key, value)

    monkeypatch.setattr(LocalStore, "set", set_)


@pytest.mark.parametrize("calls", [0, 3])
def test_full_disk_while_the_trajectory_arrays_are_created(monkeypatch, tmp_path: Path, calls: int) -> None:
    wf = tmp_path / "wf.toml"
    wf.write_text(TINY)
    _no_space_after(monkeypatch, calls)
    one_line_error(cli("train", wf, "--store", tmp_path / "s.zarr"), "no space left on device")
    assert not (tmp_path / "s.zarr").exists()  # nothing half-created is left behind


@pytest.mark.parametrize("calls", [0, 1, 4])
def test_full_disk_while_the_lca_arrays_are_created(monkeypatch, store_copy, calls: int) -> None:
    store = Path(store_copy())
    before = files_under(store)
    _no_space_after(monkeypatch, calls)
    one_line_error(cli("compute", store, "--workers", "1"), "no space left on device", "free some disk space")
    monkeypatch.undo()
    assert files_under(store) == before  # the arrays created before the disk filled were removed again


def test_overflowing_parameters_never_give_rows_marked_done(store_copy) -> None:
    """A parameter of 1e38: the float32 loss overflows; the block fails with one line and nothing is written."""
    from pipeline.lca.compute import resolve_settings
    from pipeline.config import Workflow
    from pipeline.lca.worker import TaskSpec, run_block

    store = store_copy()
    params = zarr.open_group(store)["trajectory/params"]
    rows = np.asarray(params[:16])
    rows[:, :64] = 1e38
    params.with_config({"write_empty_chunks": True})[:16] = rows
    r = open_trajectory(store)
    wf = Workflow.from_dict(r.workflow)
    settings = resolve_settings(wf)
    plan_split(r.group, "train", steps=r.num_steps, size=r.layout.size, block=16, param_chunk=r.param_chunk,
               settings=settings)
    spec = TaskSpec(store=store, created=str(r.attrs["created"]), problem=dict(r.attrs["problem"]),
                    settings=settings.to_json(), device="cpu", threads=1)
    with pytest.raises(LCAError, match=r"not finite") as info:
        run_block(spec, "train", 0, 0, 16, r.num_steps)
    assert "\n" not in str(info.value)
    assert not read_done(zarr.open_group(store), "train").any()
    assert np.isnan(np.asarray(zarr.open_group(store)["lca/train"][:16])).all()
