"""Workflow validation: every mistake a person can make in a TOML file is one line naming key and fix."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import Workflow, load_workflow
from pipeline.errors import WorkflowError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "workflows").glob("*.toml"))
BASE = ROOT / "workflows" / "digits-fc.toml"


def to_toml(raw: dict) -> str:
    """Enough TOML for these tests: JSON scalars and arrays are valid TOML values."""
    top = [f"{k} = {json.dumps(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    sections = [f"[{k}]\n" + "\n".join(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())
                for k, v in raw.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n\n" + "\n\n".join(sections) + "\n"


def base_raw() -> dict:
    return tomllib.loads(BASE.read_text())


def write(tmp_path: Path, raw: dict | str, name: str = "wf.toml") -> Path:
    p = tmp_path / name
    p.write_text(raw if isinstance(raw, str) else to_toml(raw))
    return p


def load_error(tmp_path: Path, raw: dict | str) -> str:
    with pytest.raises(WorkflowError) as info:
        load_workflow(write(tmp_path, raw))
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_workflow_loads(path: Path) -> None:
    wf = load_workflow(path)
    assert wf.name == path.stem
    raw = tomllib.loads(path.read_text())
    for key in ("rule", "tol", "max_splits", "splits", "eval_batch_size", "precision"):
        assert key in raw["lca"], f"{path.name} must name lca.{key} explicitly"
    assert Workflow.from_dict(wf.to_dict()) == wf  # the stored JSON form round-trips


def test_shipped_workflows_are_the_documented_ones() -> None:
    assert {p.stem for p in SHIPPED} >= {"digits-fc", "fashion-fc", "fashion-lenet", "cifar10-resnet20"}


def test_digits_default_evaluates_the_training_split_in_one_pass() -> None:
    from pipeline.problem.data import dataset_spec

    wf = load_workflow(BASE)
    assert wf.lca.eval_batch_size >= dataset_spec(wf.data)["train_size"]


def test_base_toml_round_trips_through_the_test_writer(tmp_path: Path) -> None:
    assert load_workflow(write(tmp_path, base_raw(), "digits-fc.toml")) == load_workflow(BASE)


@pytest.mark.parametrize("section", [None, "data", "model", "optimizer", "schedule", "train", "lca"])
def test_unknown_key_in_each_section(tmp_path: Path, section: str | None) -> None:
    raw = base_raw()
    (raw if section is None else raw.setdefault(section, {}))["lr_shedule"] = 1
    msg = load_error(tmp_path, raw)
    assert "unknown key 'lr_shedule'" in msg and "valid keys" in msg
    assert (f"[{section}]" if section else "top level") in msg


@pytest.mark.parametrize("section,key,value", [
    ("train", "steps", "ten"),
    ("train", "batch_size", 6.4),
    ("train", "steps", True),
    ("optimizer", "lr", "fast"),
    ("optimizer", "nesterov", 1),
    ("model", "hidden", 100),
    ("model", "hidden", [100, "50"]),
    ("lca", "splits", "train"),
    ("data", "path", 3),
    (None, "seed", 1.5),
    (None, "name", 7),
])
def test_wrong_type(tmp_path: Path, section: str | None, key: str, value: object) -> None:
    raw = base_raw()
    (raw if section is None else raw[section])[key] = value
    msg = load_error(tmp_path, raw)
    assert key in msg and "must be" in msg


@pytest.mark.parametrize("section,key,value", [
    ("data", "dataset", "mnist"),
    ("model", "arch", "vgg"),
    ("optimizer", "name", "rmsprop"),
    ("schedule", "kind", "linear"),
    ("train", "device", "tpu"),
    ("lca", "rule", "euler"),
    ("lca", "precision", "bf16"),
])
def test_bad_choice(tmp_path: Path, section: str, key: str, value: str) -> None:
    raw = base_raw()
    raw[section][key] = value
    msg = load_error(tmp_path, raw)
    assert f"{section}.{key} must be one of" in msg and repr(value) in msg


@pytest.mark.parametrize("steps,epochs", [(10, 2), (0, 0)])
def test_steps_and_epochs_exactly_one(tmp_path: Path, steps: int, epochs: int) -> None:
    raw = base_raw()
    raw["train"].update(steps=steps, epochs=epochs)
    assert "exactly one of train.steps and train.epochs" in load_error(tmp_path, raw)


@pytest.mark.parametrize("section,key,value,fragment", [
    ("train", "batch_size", 0, "batch_size"),
    ("optimizer", "lr", 0.0, "optimizer.lr"),
    ("optimizer", "lr", -1.0, "optimizer.lr"),
    ("lca", "max_splits", 3, "max_splits"),
    ("lca", "tol", 0.0, "lca.tol"),
    ("lca", "rtol", -0.1, "lca.rtol"),
    ("lca", "splits", ["train", "test"], "lca.splits"),
    ("lca", "splits", [], "lca.splits"),
    ("lca", "eval_batch_size", 0, "eval_batch_size"),
    ("model", "hidden", [100, 0], "model.hidden"),
    ("train", "chunk_steps", 0, "chunk_steps"),
])
def test_bad_values(tmp_path: Path, section: str, key: str, value: object, fragment: str) -> None:
    raw = base_raw()
    raw[section][key] = value
    assert fragment in load_error(tmp_path, raw)


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    raw = base_raw()
    raw["data"] = "digits"
    assert "[data] must be a table" in load_error(tmp_path, raw)


def test_bad_toml_syntax(tmp_path: Path) -> None:
    msg = load_error(tmp_path, '[train]\nsteps = = 10\n')
    assert "not valid TOML" in msg and "line" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WorkflowError, match="does not exist") as info:
        load_workflow(tmp_path / "nope.toml")
    assert "\n" not in str(info.value)


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    raw = base_raw()
    del raw["name"]
    assert load_workflow(write(tmp_path, raw, "my-run.toml")).name == "my-run"


def test_replace_validates_again() -> None:
    wf = load_workflow(BASE)
    assert wf.replace(train={"steps": 7}).train.steps == 7
    with pytest.raises(WorkflowError):
        wf.replace(train={"epochs": 3})  # steps and epochs both set


@pytest.mark.parametrize("text,fragment", [
    ('[train]\nsteps = "x"\n', "train.steps must be an integer"),
    ('[model]\narch = "mlp"\n', "model.arch must be one of"),
    ("[train\n", "not valid TOML"),
])
def test_cli_train_bad_workflow_is_one_error_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    result = CliRunner().invoke(main, ["train", str(path), "--store", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert not (tmp_path / "s.zarr").exists()


def test_cli_train_missing_workflow(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", str(tmp_path / "missing.toml")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr


def test_negative_train_samples_is_rejected() -> None:
    with pytest.raises(WorkflowError, match="data.train_samples must be 0"):
        Workflow.from_dict({"train": {"steps": 3}, "data": {"train_samples": -5}})
