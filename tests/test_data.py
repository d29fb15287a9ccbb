"""Loaders on fabricated files in the real formats, their failure messages, and the real Fashion-MNIST."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pickle
import stat
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import DataConfig
from pipeline.problem.data import (dataset_spec, fetch_fashion_mnist, load_split, resolve_data_config, split_size)
from pipeline.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
REAL_FASHION = ROOT / "data" / "fashion-mnist"


# ---------------------------------------------------------------------------------------------- IDX files

def idx_bytes(a: np.ndarray) -> bytes:
    assert a.dtype == np.uint8
    return bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes() + a.tobytes()


def write_fashion(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_loader_reads_idx(tmp_path: Path, gz: bool) -> None:
    arrays = write_fashion(tmp_path / "fm", gz=gz)
    cfg = DataConfig(dataset="fashion-mnist", path=str(tmp_path / "fm"))
    x, y = load_split(cfg, "train")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (6, 1, 28, 28) and y.shape == (6,)
    np.testing.assert_array_equal(x[:, 0].numpy(), arrays["train-images-idx3-ubyte"] / np.float32(255))
    np.testing.assert_array_equal(y.numpy(), arrays["train-labels-idx1-ubyte"])
    xh, yh = load_split(cfg, "heldout")
    assert xh.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(yh.numpy(), arrays["t10k-labels-idx1-ubyte"])
    spec = dataset_spec(cfg)
    assert spec == {"name": "fashion-mnist", "path": str((tmp_path / "fm").resolve()), "input_shape": [1, 28, 28],
                    "num_classes": 10, "train_size": 6, "heldout_size": 4}
    json.dumps(spec)


def corrupt_cases() -> dict:
    good = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    return {
        "truncated": good[:-5],
        "trailing bytes": good + b"\0",
        "bad magic": b"\x01\x00" + good[2:],
        "unknown type": good[:2] + b"\x42" + good[3:],
        "short header": good[:6],
        "empty": b"",
    }


@pytest.mark.parametrize("case", sorted(corrupt_cases()))
def test_corrupt_idx_is_one_data_error(tmp_path: Path, case: str) -> None:
    write_fashion(tmp_path / "fm", n_train=3)
    (tmp_path / "fm" / "train-images-idx3-ubyte").write_bytes(corrupt_cases()[case])
    with pytest.raises(DataError, match="not a valid IDX file") as info:
        load_split(DataConfig(dataset="fashion-mnist", path=str(tmp_path / "fm")), "train")
    assert "\n" not in str(info.value) and "make data" in str(info.value)


def test_corrupt_gzip_is_one_data_error(tmp_path: Path) -> None:
    write_fashion(tmp_path / "fm", gz=True)
    p = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[:40])  # a gzip stream cut short
    with pytest.raises(DataError, match="not a valid IDX file"):
        load_split(DataConfig(dataset="fashion-mnist", path=str(tmp_path / "fm")), "train")


def test_images_and_labels_must_agree(tmp_path: Path) -> None:
    write_fashion(tmp_path / "fm")
    (tmp_path / "fm" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="6 images but .* 5 labels"):
        load_split(DataConfig(dataset="fashion-mnist", path=str(tmp_path / "fm")), "train")


def test_missing_fashion_names_make_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LCA_DATA_DIR", raising=False)
    with pytest.raises(DataError) as info:
        load_split(DataConfig(dataset="fashion-mnist"), "train")
    msg = str(info.value)
    assert "\n" not in msg and "make data" in msg and "lca data fashion-mnist" in msg
    assert str(tmp_path / "data" / "fashion-mnist") in msg


def test_fashion_default_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fashion(tmp_path / "env" / "fashion-mnist")
    write_fashion(tmp_path / "cwd" / "data" / "fashion-mnist", n_train=5)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("LCA_DATA_DIR", raising=False)
    cfg = DataConfig(dataset="fashion-mnist")
    assert resolve_data_config(cfg).path == str(tmp_path / "cwd" / "data" / "fashion-mnist")
    assert len(load_split(cfg, "train")[1]) == 5
    monkeypatch.setenv("LCA_DATA_DIR", str(tmp_path / "env"))
    resolved = resolve_data_config(cfg)
    assert resolved.path == str(tmp_path / "env" / "fashion-mnist") and os.path.isabs(resolved.path)
    monkeypatch.chdir(tmp_path)  # a resolved config means the same thing from any directory
    assert len(load_split(resolved, "train")[1]) == 6


def test_real_fashion_mnist() -> None:
    """CI runs `make data` first, so the real files must be there: no skip."""
    cfg = resolve_data_config(DataConfig(dataset="fashion-mnist", path=str(REAL_FASHION)))
    assert (REAL_FASHION / ".complete").is_file(), "run `make data` first"
    x, y = load_split(cfg, "train")
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert int(y.min()) == 0 and int(y.max()) == 9 and torch.bincount(y).tolist() == [6000] * 10
    xh, yh = load_split(cfg, "heldout")
    assert xh.shape == (10000, 1, 28, 28) and yh.shape == (10000,)
    assert torch.bincount(yh).tolist() == [1000] * 10
    assert dataset_spec(cfg)["train_size"] == 60000 and split_size(cfg, "heldout") == 10000


# ------------------------------------------------------------------------------------------- fetch errors

def test_fetch_without_apt_is_one_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DataError, match="apt-get") as info:
        fetch_fashion_mnist(tmp_path / "dest")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "dest" / ".complete").exists()


def test_fetch_reports_apts_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'W: some warning' >&2\necho 'E: Unable to locate package x' >&2\nexit 100\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataError, match="E: Unable to locate package") as info:
        fetch_fashion_mnist(tmp_path / "dest")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "dest" / ".complete").exists()


# --------------------------------------------------------------------------------------------- CIFAR-10

def cifar_batch(n: int, rng: np.random.Generator, label: str, protocol: int = 2) -> bytes:
    """The real format: a dict with bytes keys, pickled by Python 2 (protocol 2) with numpy's _reconstruct."""
    d = {b"batch_label": label.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
         b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return pickle.dumps(d, protocol=protocol)


def py2_batch(n: int, rng: np.random.Generator, label: str, protocol: int = 2) -> bytes:
    """Byte for byte what Python 2's cPickle wrote for CIFAR: py2 `str`s (SHORT_BINSTRING/BINSTRING) and
    numpy's old `numpy.core.multiarray._reconstruct` + BUILD state, assembled from raw opcodes."""
    import struct

    def s(b: bytes) -> bytes:
        return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b")
             + b"\x87R" + b"(" + i(1) + i(n) + i(3072) + b"\x86" + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1)
             + b"\x87R" + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb" + b"\x89"
             + s(data.tobytes()) + b"tb")
    return (b"\x80\x02}(" + s(b"batch_label") + s(label.encode()) + s(b"data") + array + s(b"labels")
            + b"](" + b"".join(i(v) for v in labels) + b"e" + b"u.")


def write_cifar(path: Path, per_batch: int = 4, test: int = 3, extra: dict[str, bytes] | None = None,
                make=cifar_batch) -> Path:
    rng = np.random.default_rng(1)
    members = {f"cifar-10-batches-py/data_batch_{i}": make(per_batch, rng, f"training batch {i} of 5")
               for i in range(1, 6)}
    members["cifar-10-batches-py/test_batch"] = make(test, rng, "testing batch 1 of 1")
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"airplane"]}, protocol=2)
    members.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


@pytest.mark.parametrize("make", [py2_batch, cifar_batch, partial(cifar_batch, protocol=5)],
                         ids=["python2", "protocol2", "protocol5"])
def test_cifar_tarball(tmp_path: Path, make) -> None:
    tarball = write_cifar(tmp_path / "cifar-10-python.tar.gz", make=make)
    cfg = DataConfig(dataset="cifar10", path=str(tarball))
    x, y = load_split(cfg, "train")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (20,)
    per_channel = x.permute(1, 0, 2, 3).reshape(3, -1).double()
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    xh, yh = load_split(cfg, "heldout")
    assert xh.shape == (3, 3, 32, 32) and yh.shape == (3,)
    assert dataset_spec(cfg) == {"name": "cifar10", "path": str(tarball), "input_shape": [3, 32, 32],
                                 "num_classes": 10, "train_size": 20, "heldout_size": 3}
    # the folder holding the tarball, and $LCA_CIFAR10, find the same data
    assert torch.equal(load_split(DataConfig(dataset="cifar10", path=str(tmp_path)), "train")[0], x)


def test_cifar_from_env_and_extracted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = write_cifar(tmp_path / "c" / "cifar-10-python.tar.gz")
    monkeypatch.setenv("LCA_CIFAR10", str(tarball))
    cfg = DataConfig(dataset="cifar10")
    assert resolve_data_config(cfg).path == str(tarball)
    x, y = load_split(cfg, "heldout")
    with tarfile.open(tarball) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    monkeypatch.setenv("LCA_CIFAR10", str(tmp_path / "x"))
    x2, y2 = load_split(cfg, "heldout")
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_cifar_missing_names_the_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LCA_CIFAR10", raising=False)
    for cfg in (DataConfig(dataset="cifar10"), DataConfig(dataset="cifar10", path=str(tmp_path / "nothing"))):
        with pytest.raises(DataError, match="LCA_CIFAR10") as info:
            load_split(cfg, "train")
        assert "\n" not in str(info.value) and "cifar-10-python.tar.gz" in str(info.value)


def test_cifar_missing_batch(tmp_path: Path) -> None:
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        blob = cifar_batch(2, np.random.default_rng(0), "x")
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/data_batch_2"):
        load_split(DataConfig(dataset="cifar10", path=str(tarball)), "train")


def test_python2_batch_matches_its_source() -> None:
    from pipeline.problem.data import _unpickle_batch

    x, y = _unpickle_batch(py2_batch(3, np.random.default_rng(5), "b"), "test")
    rng = np.random.default_rng(5)
    np.testing.assert_array_equal(x.reshape(3, -1), rng.integers(0, 256, (3, 3072), dtype=np.uint8))
    assert y.tolist() == [int(v) for v in rng.integers(0, 10, 3)]


class _Evil:
    def __reduce__(self):  # what a malicious "batch" would do: run a command on load
        return (os.system, ("touch pwned",))


def test_cifar_unpickler_refuses_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = pickle.dumps({b"data": _Evil(), b"labels": []}, protocol=2)
    tarball = write_cifar(tmp_path / "cifar-10-python.tar.gz", extra={"cifar-10-batches-py/data_batch_3": evil})
    with pytest.raises(DataError, match="is not allowed") as info:
        load_split(DataConfig(dataset="cifar10", path=str(tarball)), "train")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_cifar_not_a_tarball(tmp_path: Path) -> None:
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"definitely not gzip")
    with pytest.raises(DataError, match="unreadable CIFAR-10 tarball"):
        load_split(DataConfig(dataset="cifar10", path=str(bad)), "train")


# ------------------------------------------------------------------------------------ digits, synthetic

def test_digits_split_is_fixed() -> None:
    cfg = DataConfig(dataset="digits")
    x, y = load_split(cfg, "train")
    xh, yh = load_split(cfg, "heldout")
    assert x.shape == (1438, 1, 8, 8) and xh.shape == (359, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    x2, y2 = load_split(cfg, "train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    torch.manual_seed(123)  # the global seed (the workflow's) must not move the split
    assert torch.equal(load_split(cfg, "heldout")[1], yh)
    spec = dataset_spec(cfg)
    assert spec == {"name": "digits", "path": "", "input_shape": [1, 8, 8], "num_classes": 10,
                    "train_size": 1438, "heldout_size": 359}


def test_synthetic_is_fixed_and_shaped() -> None:
    cfg = DataConfig(dataset="synthetic", synthetic_samples=100, synthetic_shape=[3, 4, 5], synthetic_classes=7)
    x, y = load_split(cfg, "train")
    assert x.shape == (100, 3, 4, 5) and y.shape == (100,) and int(y.max()) < 7
    assert torch.equal(load_split(cfg, "train")[0], x)
    assert load_split(cfg, "heldout")[0].shape == (25, 3, 4, 5)
    assert dataset_spec(cfg)["num_classes"] == 7 and dataset_spec(cfg)["input_shape"] == [3, 4, 5]
    with pytest.raises(DataError, match="synthetic_shape"):
        load_split(dataclasses.replace(cfg, synthetic_shape=[10]), "train")


def test_unknown_split() -> None:
    with pytest.raises(DataError, match="unknown split"):
        load_split(DataConfig(), "test")


def test_train_samples_keeps_the_first_n_training_images_only() -> None:
    import dataclasses

    cfg = resolve_data_config(DataConfig(dataset="fashion-mnist", path=str(REAL_FASHION)))
    small = dataclasses.replace(cfg, train_samples=2000)
    x_all, y_all = load_split(cfg, "train")
    x, y = load_split(small, "train")
    assert x.shape == (2000, 1, 28, 28) and torch.equal(x, x_all[:2000]) and torch.equal(y, y_all[:2000])
    assert split_size(small, "train") == 2000 and split_size(small, "heldout") == 10000
    assert load_split(small, "heldout")[0].shape[0] == 10000  # the held-out split is never cut
