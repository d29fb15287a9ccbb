"""Interrupted training (issue 9, item 7) and an edited workflow (item 8).

A run stopped by Ctrl-C or killed outright continues, when the same command runs again, to a trajectory
bit-identical to an uninterrupted run; until then `lca info` says so and LCA over it needs --partial. An
edited workflow is refused by `lca run`, naming the keys that differ.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_workflow
from pipeline.errors import Interrupted, LCAError
from pipeline.run import prepare_run
from pipeline.train.loop import train
from trajectory_store import StoreError, open_trajectory

ROOT = Path(__file__).resolve().parents[1]
LCA = [sys.executable, "-m", "pipeline.cli"]


def workflow_file(tmp_path: Path, *, steps: int, optimizer: str = "momentum", extra: str = "",
                  name: str = "wf.toml") -> Path:
    opt = {"momentum": '[optimizer]\nname = "momentum"\nlr = 0.02\n',
           "adam": '[optimizer]\nname = "adam"\nlr = 0.003\n'}[optimizer]
    p = tmp_path / name
    p.write_text(f'name = "resume"\n[data]\ndataset = "digits"\n[model]\nhidden = [32]\n{opt}'
                 f'[train]\nsteps = {steps}\nbatch_size = 32\nchunk_steps = 8\n[lca]\neval_batch_size = 2048\n'
                 + extra)
    return p


def same_trajectory(a: str, b: str) -> None:
    ra, rb = open_trajectory(a, mode="r"), open_trajectory(b, mode="r")
    assert ra.status == rb.status == "complete" and ra.num_checkpoints == rb.num_checkpoints
    assert ra.params().tobytes() == rb.params().tobytes()
    assert ra.minibatch_loss.tobytes() == rb.minibatch_loss.tobytes()
    assert ra.lr.tobytes() == rb.lr.tobytes()
    np.testing.assert_array_equal(ra.batch_indices, rb.batch_indices)


def committed(store: Path) -> int:
    try:
        return int(json.loads((store / "trajectory" / "zarr.json").read_text())["attributes"]["checkpoints"])
    except (OSError, ValueError, KeyError):
        return 0


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


STEPS = 160
# The real `lca` command, slowed by 10 ms a step so that a signal surely lands mid-training on any machine.
SLOW_LCA = """
import sys, time
from trajectory_store import TrajectoryWriter
record = TrajectoryWriter.record
TrajectoryWriter.record = lambda self, *a, **k: (time.sleep(0.01), record(self, *a, **k))[1]
from pipeline.cli import main
sys.argv[0] = "lca"
main()
"""


@pytest.mark.parametrize("sig,optimizer", [(signal.SIGINT, "momentum"), (signal.SIGKILL, "adam")])
def test_training_interrupted_in_a_real_process_continues_bit_identically(tmp_path: Path, sig, optimizer) -> None:
    wf = workflow_file(tmp_path, steps=STEPS, optimizer=optimizer)
    reference = str(tmp_path / "reference.zarr")
    train(load_workflow(wf), reference, progress=False)

    store = tmp_path / "run.zarr"
    driver = tmp_path / "slow_lca.py"
    driver.write_text(SLOW_LCA)
    proc = subprocess.Popen([sys.executable, str(driver), "train", str(wf), "--store", str(store)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while committed(store) < 25 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be interrupted: make the run longer"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    reader = open_trajectory(str(store), mode="r")
    steps = reader.num_steps
    assert 24 <= steps < STEPS
    if sig == signal.SIGINT:  # a clean stop after the current step: the message says exactly what was kept
        assert proc.returncode == 130, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0] == (f"interrupted: training stopped after step {steps} of {STEPS}; the {steps} steps and "
                            f"the training state are saved in {store}: run the same command again to continue")
        assert reader.status == "interrupted" and reader.training_state().steps_done == steps
    else:
        assert proc.returncode == -signal.SIGKILL
        assert reader.status == "recording" and reader.writer_alive is False
        assert reader.training_state().steps_done % 8 == 0  # the last chunk boundary's state

    info = cli("info", store)
    assert info.exit_code == 0
    status = next(line for line in info.output.splitlines() if line.startswith("trajectory"))
    assert f"{steps} of {STEPS} steps" in status and "--partial" in status
    assert ("interrupted (Ctrl-C)" in status) if sig == signal.SIGINT else ("writer" in status and "gone" in status)

    refused = cli("compute", store, "--workers", "1")
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert f"{steps} of {STEPS} steps recorded" in refused.stderr and "--partial" in refused.stderr

    again = cli("train", wf, "--store", store)
    assert again.exit_code == 0, again.output
    assert "continued after step" in again.output
    same_trajectory(reference, str(store))
    assert f"complete ({STEPS} of {STEPS} steps)" in cli("info", store).output


def stop_after(monkeypatch, steps: int) -> None:
    """Make the loop see a stop request (what Ctrl-C sets) once `steps` steps are done in this call."""
    loop = sys.modules["pipeline.train.loop"]
    real = loop._run_steps

    def run_steps(*args, **kwargs):
        first = kwargs.get("first", 0)
        done = iter(range(10**9))
        kwargs["stop_asked"] = lambda: next(done) >= steps - first
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_run_steps", run_steps)


@pytest.mark.parametrize("stops", [[13], [8, 21], [1, 2, 3]])
def test_repeated_interruptions_at_any_step_still_give_the_same_bits(monkeypatch, tmp_path: Path, stops) -> None:
    wf = load_workflow(workflow_file(tmp_path, steps=50, optimizer="adam"))
    reference, store = str(tmp_path / "reference.zarr"), str(tmp_path / "run.zarr")
    train(wf, reference, progress=False)
    for k in stops:
        with monkeypatch.context() as m:
            stop_after(m, k)
            with pytest.raises(Interrupted, match=f"stopped after step {k} of 50"):
                train(wf, store, progress=False)
        assert open_trajectory(store, mode="r").num_steps == k
    result = train(wf, store, progress=False)
    assert result.resumed_from == stops[-1]
    same_trajectory(reference, store)


def test_lca_run_continues_interrupted_training_and_partial_skips_it(monkeypatch, tmp_path: Path) -> None:
    path = workflow_file(tmp_path, steps=40)
    wf, store = load_workflow(path), str(tmp_path / "run.zarr")
    with monkeypatch.context() as m:
        stop_after(m, 17)
        with pytest.raises(Interrupted):
            train(wf, store, progress=False)
    message = prepare_run(wf, store, source=str(path), partial=True, progress=False)
    assert "interrupted (17 steps recorded)" in message and "--partial" in message
    assert open_trajectory(store, mode="r").num_steps == 17
    message = prepare_run(wf, store, source=str(path), progress=False)
    assert "continued after step 17" in message
    assert open_trajectory(store, mode="r").status == "complete"
    assert "using the trajectory already in" in prepare_run(wf, store, source=str(path), progress=False)


def test_unresumable_stores_are_refused_in_one_line(monkeypatch, tmp_path: Path) -> None:
    path = workflow_file(tmp_path, steps=40)
    wf, store = load_workflow(path), str(tmp_path / "run.zarr")
    with monkeypatch.context() as m:
        stop_after(m, 9)
        with pytest.raises(Interrupted):
            train(wf, store, progress=False)
    with pytest.raises(StoreError, match=r"another workflow \(differs in train.steps \(40 stored, 60 now\)\); "
                                         r"pass --overwrite"):
        train(wf.replace(train={"steps": 60}), store, progress=False)
    # a writer that is alive (here: this very process) is never raced
    traj = open_trajectory(store).group["trajectory"]
    traj.update_attributes({"status": "recording"})
    with pytest.raises(StoreError, match="is being recorded by process"):
        train(wf, store, progress=False)
    train(wf, store, progress=False, overwrite=True)
    with pytest.raises(StoreError, match="already exists and holds a complete run"):
        train(wf, store, progress=False)


# ---- an edited workflow -------------------------------------------------------------------------------------

@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, str]:
    path = workflow_file(tmp_path, steps=6)
    store = str(tmp_path / "run.zarr")
    train(load_workflow(path), store, progress=False)
    return path, store


@pytest.mark.parametrize("extra,fragments", [
    ("", None),
    ("[schedule]\nkind = \"cosine\"\n", ["schedule.kind ('constant' stored, 'cosine' now)", "--overwrite"]),
    ("seed = 3\n", ["seed (0 stored, 3 now)", "--overwrite"]),
])
def test_lca_run_refuses_a_workflow_that_trains_differently(trained, extra: str, fragments) -> None:
    path, store = trained
    text = path.read_text()
    if extra.startswith("seed"):
        text = extra + text
    elif extra:
        text += extra
    text = text.replace("lr = 0.02", "lr = 0.05") if fragments is None else text
    edited = path.with_name("edited.toml")
    edited.write_text(text)
    before = open_trajectory(store, mode="r").params().tobytes()
    result = cli("run", edited, "--store", store, "--workers", "1")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "another workflow than" in line
    for f in fragments or ["optimizer.lr (0.02 stored, 0.05 now)", "--overwrite"]:
        assert f in line
    assert open_trajectory(store, mode="r").params().tobytes() == before


def test_lca_run_with_changed_lca_settings_needs_recompute(trained) -> None:
    path, store = trained
    edited = path.with_name("edited.toml")
    edited.write_text(path.read_text().replace("eval_batch_size = 2048", 'eval_batch_size = 2048\ntol = 1e-3\n'
                                               'splits = ["train", "heldout"]'))
    result = cli("run", edited, "--store", store, "--workers", "1")
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "changes the LCA settings" in line and "--recompute" in line
    assert "lca.tol (0.0001 stored, 0.001 now)" in line and "lca.splits" in line
    wf = load_workflow(edited)
    with pytest.raises(LCAError, match="--recompute"):
        prepare_run(wf, store, source=str(edited), progress=False)
    assert "using the trajectory already in" in prepare_run(wf, store, source=str(edited), recompute=True,
                                                            progress=False)
    stored = open_trajectory(store, mode="r").workflow["lca"]
    assert stored["tol"] == 1e-3 and stored["splits"] == ["train", "heldout"]
    assert "using the trajectory" in prepare_run(wf, store, source=str(edited), progress=False)  # now in step


def test_lca_run_overwrite_retrains_with_the_edited_workflow(trained) -> None:
    path, store = trained
    edited = path.with_name("edited.toml")
    edited.write_text(path.read_text().replace("steps = 6", "steps = 9"))
    wf = load_workflow(edited)
    with pytest.raises(LCAError, match=r"train.steps \(6 stored, 9 now\)"):
        prepare_run(wf, store, source=str(edited), progress=False)
    assert "for 9 steps" in prepare_run(wf, store, source=str(edited), overwrite=True, progress=False)
    assert open_trajectory(store, mode="r").num_steps == 9
    renamed = path.with_name("renamed.toml")
    renamed.write_text(edited.read_text().replace('name = "resume"', 'name = "other-name"'))
    assert "using the trajectory" in prepare_run(load_workflow(renamed), store, source=str(renamed),
                                                 progress=False)
