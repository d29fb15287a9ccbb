"""Shared fixtures: one small recorded digits-fc run, copied per test that writes LCA into it."""

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LCA = [sys.executable, "-m", "pipeline.cli"]


def small_digits_workflow(steps: int = 48, chunk_steps: int = 16):
    from pipeline.config import load_workflow

    return load_workflow(ROOT / "workflows" / "digits-fc.toml").replace(
        train={"steps": steps, "chunk_steps": chunk_steps})


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory) -> Path:
    """A 48-step digits-fc trajectory in 3 chunks of 16 steps; never written to by tests (copy it)."""
    from pipeline.train.loop import train

    path = tmp_path_factory.mktemp("runs") / "digits.zarr"
    train(small_digits_workflow(), str(path), progress=False)
    return path


@pytest.fixture
def store_copy(digits_store, tmp_path):
    def make(name: str = "copy.zarr") -> str:
        dest = tmp_path / name
        shutil.copytree(digits_store, dest)
        return str(dest)

    return make
