"""Data sets as whole in-memory tensors: X float32 [N, C, H, W], y int64 [N].

LCA needs the loss over the *whole* training split at many parameter vectors, so every split is loaded
once, in a fixed order, and kept in memory (on the GPU when there is one). Everything here is a pure
function of the `DataConfig`: the trainer and every LCA worker (possibly another process on another
machine) call `load_split` with the same resolved config and get bit-identical tensors.

Nothing is downloaded at run time. Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package
(`fetch_fashion_mnist`, i.e. `make data`); CIFAR-10 is the standard python tarball, put in place by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pipeline.config import DataConfig
from pipeline.errors import DataError

SPLITS = ("train", "heldout")

# The digits split must not move with the workflow seed: two runs with different seeds are compared on
# the same held-out samples, and LCA workers rebuild the split from the config alone.
DIGITS_SPLIT_SEED = 20190901
DIGITS_TRAIN_FRACTION = 0.8
SYNTHETIC_SEED = 1909_01440

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "heldout": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_FETCH_HINT = "run `make data` (or `lca data fashion-mnist --dest data/fashion-mnist`)"
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_PACKAGE_DIR = Path("usr/share/datasets/fashion-mnist")

CIFAR_TARBALL = "cifar-10-python.tar.gz"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_MEMBERS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "heldout": ["test_batch"]}
CIFAR_HINT = (f"download {CIFAR_TARBALL} from https://www.cs.toronto.edu/~kriz/cifar.html and set "
              f"data.path in the workflow or $LCA_CIFAR10 to it (or to the folder holding it)")


# ---------------------------------------------------------------------------------------------------------
# public API


def resolve_data_config(cfg: DataConfig) -> DataConfig:
    """The same config with `path` made absolute, so that it means the same thing in any process or cwd.

    An empty path is resolved through the defaults ($LCA_DATA_DIR, ./data, $LCA_CIFAR10). Data sets that
    need no files keep path "".
    """
    if cfg.dataset in ("digits", "synthetic"):
        return dataclasses.replace(cfg, path="")
    if cfg.dataset == "fashion-mnist":
        return dataclasses.replace(cfg, path=str(_fashion_dir(cfg)))
    if cfg.dataset == "cifar10":
        return dataclasses.replace(cfg, path=str(_cifar_source(cfg)))
    raise DataError(f"unknown dataset {cfg.dataset!r}; use one of digits, fashion-mnist, cifar10, synthetic")


def load_split(cfg: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """X float32 [N, C, H, W] and y int64 [N] of split "train" or "heldout", always in the same order."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    loaders: dict[str, Callable[[DataConfig, str], tuple[np.ndarray, np.ndarray]]] = {
        "digits": _load_digits, "fashion-mnist": _load_fashion, "cifar10": _load_cifar,
        "synthetic": _load_synthetic,
    }
    if cfg.dataset not in loaders:
        raise DataError(f"unknown dataset {cfg.dataset!r}; use one of {', '.join(loaders)}")
    x, y = loaders[cfg.dataset](cfg, split)
    if split == "train" and cfg.train_samples:
        x, y = x[:cfg.train_samples], y[:cfg.train_samples]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


def dataset_spec(cfg: DataConfig, sizes: tuple[int, int] | None = None) -> dict[str, Any]:
    """A JSON-able description stored in a trajectory's attributes (what, where, how big).

    `sizes` = (train, heldout) skips probing the files when the caller has already loaded them.
    """
    cfg = resolve_data_config(cfg)
    shape, classes = _shape_and_classes(cfg)
    if sizes is None:
        sizes = (split_size(cfg, "train"), split_size(cfg, "heldout"))
    return {"name": cfg.dataset, "path": cfg.path, "input_shape": list(shape), "num_classes": classes,
            "train_size": int(sizes[0]), "heldout_size": int(sizes[1])}


def fetch_fashion_mnist(dest: Path) -> Path:
    """Put Fashion-MNIST's four IDX files in `dest` from Debian's package; `dest/.complete` is written last.

    Debian's mirror is reachable where the original download site is not, and `apt-get download` + `dpkg -x`
    need no root: if the package lists are missing, a private lists folder is updated and used instead.
    """
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="lca-fetch-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o755)  # apt's unprivileged `_apt` user may write the .deb into it
        try:
            _run(["apt-get", "download", FASHION_PACKAGE], tmp)
        except DataError:
            lists = tmp / "lists"
            (lists / "partial").mkdir(parents=True)
            (tmp / "cache" / "archives" / "partial").mkdir(parents=True)
            opts = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={tmp / 'cache'}",
                    "-o", "Debug::NoLocking=1"]
            _run(["apt-get", *opts, "update"], tmp)
            _run(["apt-get", *opts, "download", FASHION_PACKAGE], tmp)
        debs = sorted(tmp.glob(f"{FASHION_PACKAGE}_*.deb"))
        if not debs:
            raise DataError(f"apt-get download {FASHION_PACKAGE} produced no .deb; check apt's sources")
        _run(["dpkg", "-x", str(debs[-1]), str(tmp / "root")], tmp)
        src = tmp / "root" / FASHION_PACKAGE_DIR
        dest.mkdir(parents=True, exist_ok=True)
        (dest / ".complete").unlink(missing_ok=True)
        for images, labels in FASHION_FILES.values():
            for stem in (images, labels):
                found = _find_idx(src, stem)
                if found is None:
                    raise DataError(f"{debs[-1].name} has no {stem}[.gz] under /{FASHION_PACKAGE_DIR}")
                for stale in (dest / stem, dest / (stem + ".gz")):  # an old copy would shadow the new one
                    stale.unlink(missing_ok=True)
                shutil.copyfile(found, dest / found.name)
    for split in SPLITS:  # prove the copy is whole before declaring it complete
        _read_fashion_split(dest, split)
    (dest / ".complete").write_text(f"{FASHION_PACKAGE}\n")
    return dest.resolve()


# ---------------------------------------------------------------------------------------------------------
# digits and synthetic: no files


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits, scaled to [0, 1]; cached (read-only) because both splits and the size probe need them."""
    from sklearn.datasets import load_digits  # scikit-learn takes a second to import: only when used

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _load_digits(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    n_train = int(round(DIGITS_TRAIN_FRACTION * len(y)))
    idx = order[:n_train] if split == "train" else order[n_train:]
    idx = np.sort(idx)  # a fixed order that does not look shuffled when inspected
    return x[idx], y[idx]


def _load_synthetic(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, so losses actually move."""
    shape, classes, n = _synthetic_dims(cfg)
    d = int(np.prod(shape))
    rng = np.random.default_rng(SYNTHETIC_SEED)
    teacher = rng.standard_normal((d, classes)).astype(np.float32)
    offset = 0 if split == "train" else 1
    data_rng = np.random.default_rng([SYNTHETIC_SEED, offset])
    count = n if split == "train" else max(1, n // 4)
    x = data_rng.standard_normal((count, d), dtype=np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    return x.reshape((count, *shape)), y


def _synthetic_dims(cfg: DataConfig) -> tuple[tuple[int, ...], int, int]:
    shape = tuple(int(s) for s in cfg.synthetic_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"data.synthetic_shape must be three positive sizes [C, H, W], got {list(shape)}")
    if cfg.synthetic_classes < 2 or cfg.synthetic_samples < 1:
        raise DataError("data.synthetic_classes must be at least 2 and data.synthetic_samples at least 1; "
                        f"got {cfg.synthetic_classes} and {cfg.synthetic_samples}")
    return shape, int(cfg.synthetic_classes), int(cfg.synthetic_samples)


def _shape_and_classes(cfg: DataConfig) -> tuple[tuple[int, ...], int]:
    if cfg.dataset == "synthetic":
        shape, classes, _ = _synthetic_dims(cfg)
        return shape, classes
    return {"digits": ((1, 8, 8), 10), "fashion-mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10)}[
        cfg.dataset]


def split_size(cfg: DataConfig, split: str) -> int:
    """How many samples a split has, reading as little as the format allows (IDX: only the header)."""
    cfg = resolve_data_config(cfg)
    if split == "train" and cfg.train_samples:
        return min(cfg.train_samples, split_size(dataclasses.replace(cfg, train_samples=0), split))
    if cfg.dataset == "cifar10":
        names = CIFAR_MEMBERS[split]
        return sum(len(b[1]) for b in _read_cifar_batches(_cifar_source(cfg), names).values())
    if cfg.dataset == "fashion-mnist":
        images, _ = FASHION_FILES[split]
        path = _find_idx(Path(cfg.path), images)
        if path is None:
            raise _fashion_missing(Path(cfg.path))
        return _read_idx(path, header_only=True)[0]
    return len(load_split(cfg, split)[1])


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST: IDX files


def _fashion_dir(cfg: DataConfig) -> Path:
    """cfg.path if given, else the first of $LCA_DATA_DIR/fashion-mnist and ./data/fashion-mnist that exists."""
    if cfg.path:
        return Path(cfg.path).expanduser().resolve()
    candidates = []
    if os.environ.get("LCA_DATA_DIR"):
        candidates.append(Path(os.environ["LCA_DATA_DIR"]).expanduser() / "fashion-mnist")
    candidates.append(Path("data") / "fashion-mnist")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return candidates[0].resolve()


def _fashion_missing(folder: Path) -> DataError:
    return DataError(f"Fashion-MNIST IDX files not found in {folder}; {FASHION_FETCH_HINT}, "
                     f"or set data.path / $LCA_DATA_DIR to where they are")


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_fashion(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _read_fashion_split(_fashion_dir(cfg), split)
    return (x.astype(np.float32) / 255.0)[:, None], y.astype(np.int64)


def _read_fashion_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [_find_idx(folder, stem) for stem in FASHION_FILES[split]]
    if None in paths:
        raise _fashion_missing(folder)
    images, labels = (_read_idx(p) for p in paths)  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{paths[0]} / {paths[1]}: expected 3-d images and 1-d labels, got "
                        f"{images.ndim}-d and {labels.ndim}-d; {FASHION_FETCH_HINT} to fetch them again")
    if images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]}: images of {list(images.shape[1:])} pixels, Fashion-MNIST's are [28, 28]; "
                        f"{FASHION_FETCH_HINT} to fetch them again")
    if len(images) != len(labels):
        raise DataError(f"{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels; "
                        f"{FASHION_FETCH_HINT} to fetch them again")
    if labels.size and labels.max() > 9:
        raise DataError(f"{paths[1]}: label {labels.max()} outside 0..9; {FASHION_FETCH_HINT} to fetch them again")
    return images, labels


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_idx(path: Path, header_only: bool = False) -> Any:
    """Parse an IDX file strictly: magic, dimension count, dimensions and exact payload size are checked.

    Returns the array, or with header_only the dimensions (reading only the first bytes of the file).
    """
    def bad(why: str) -> DataError:
        return DataError(f"{path}: not a valid IDX file ({why}); delete it and {FASHION_FETCH_HINT}")

    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise bad(f"magic number {head.hex() or 'missing'}, expected 0000xxyy")
            if head[2] not in _IDX_DTYPES:
                raise bad(f"unknown element type 0x{head[2]:02x}")
            ndim = head[3]
            if ndim < 1:
                raise bad("zero dimensions")
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) != 4 * ndim:
                raise bad("header truncated")
            dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
            if header_only:
                return dims
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
            payload = f.read(expected + 1)
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{path} does not exist; {FASHION_FETCH_HINT}") from None
        raise bad(f"unreadable: {e}") from None
    if len(payload) != expected:
        raise bad(f"{len(payload)}{'+' if len(payload) > expected else ''} payload bytes for dimensions "
                  f"{list(dims)}, expected {expected}")
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10: the python tarball of pickled batches, read through a restricted unpickler


def _cifar_source(cfg: DataConfig) -> Path:
    """The tarball, or an already extracted cifar-10-batches-py folder, from data.path or $LCA_CIFAR10."""
    given = cfg.path or os.environ.get("LCA_CIFAR10", "")
    if not given:
        raise DataError(f"CIFAR-10 location not set; {CIFAR_HINT}")
    p = Path(given).expanduser().resolve()
    for candidate in (p, p / CIFAR_TARBALL, p / CIFAR_DIR):
        if candidate.is_file() or (candidate.is_dir() and (candidate / "test_batch").is_file()):
            return candidate
    raise DataError(f"CIFAR-10 not found at {p}; {CIFAR_HINT}")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's batches are pickled dicts of numpy arrays; pickle can run arbitrary code, so allow only the
    few numpy globals that rebuild an array and refuse everything else."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], Any]:
        try:
            from numpy._core import multiarray, numeric  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray, numeric  # type: ignore[no-redef]
        allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "_reconstruct")] = multiarray._reconstruct
            allowed[(mod, "scalar")] = multiarray.scalar
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = numeric._frombuffer
        allowed[("_codecs", "encode")] = _latin1_bytes  # how Python 3 writes bytes at protocol 2
        return allowed

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return obj


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed in a CIFAR batch")
    return text.encode("latin1")


def _unpickle_batch(blob: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:  # any malformed pickle is one clear error, never a traceback
        raise DataError(f"{where}: not a CIFAR-10 python batch ({e}); {CIFAR_HINT}") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: not a CIFAR-10 python batch (a {type(d).__name__}, not a dict); {CIFAR_HINT}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{where}: CIFAR-10 batch without 'data' and 'labels'; {CIFAR_HINT}")
    x = np.asarray(d["data"], dtype=np.uint8)
    y = np.asarray(d["labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise DataError(f"{where}: CIFAR-10 batch with data {x.shape} and {len(y)} labels, expected "
                        f"[N, 3072] and N labels in 0..9; {CIFAR_HINT}")
    return x.reshape(-1, 3, 32, 32), y


def _read_cifar_batches(source: Path, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The named batches, straight from the tarball (no extraction) or from an extracted folder."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if source.is_dir():
        for name in names:
            if not (source / name).is_file():
                raise DataError(f"{source / name} is missing; {CIFAR_HINT}")
            out[name] = _unpickle_batch((source / name).read_bytes(), str(source / name))
        return out
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:  # one sequential pass: a .tar.gz cannot seek cheaply
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names and base not in out:
                    f = tar.extractfile(member)
                    assert f is not None
                    out[base] = _unpickle_batch(f.read(), f"{source}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{source}: unreadable CIFAR-10 tarball ({e}); {CIFAR_HINT}") from None
    missing = [n for n in names if n not in out]
    if missing:
        raise DataError(f"{source} lacks {CIFAR_DIR}/{missing[0]}; {CIFAR_HINT}")
    return out


def _load_cifar(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel normalisation with the *training* split's statistics, so both splits share one scale."""
    source = _cifar_source(cfg)
    wanted = CIFAR_MEMBERS["train"] + (CIFAR_MEMBERS["heldout"] if split == "heldout" else [])
    batches = _read_cifar_batches(source, wanted)
    train_x = np.concatenate([batches[n][0] for n in CIFAR_MEMBERS["train"]])
    # Exact float64 statistics from per-channel histograms of the bytes, then a 256-entry lookup table
    # per channel: no float64 copy of the whole set is ever made.
    levels = np.arange(256, dtype=np.float64) / 255.0
    names = CIFAR_MEMBERS[split]
    x = np.concatenate([batches[n][0] for n in names]) if split == "heldout" else train_x
    out = np.empty(x.shape, dtype=np.float32)
    for c in range(3):
        counts = np.bincount(train_x[:, c].reshape(-1), minlength=256).astype(np.float64)
        mean = float(counts @ levels / counts.sum())
        std = float(np.sqrt(counts @ (levels - mean) ** 2 / counts.sum())) or 1.0
        out[:, c] = ((levels - mean) / std).astype(np.float32)[x[:, c]]
    return out, np.concatenate([batches[n][1] for n in names])


# ---------------------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise DataError(f"`{cmd[0]}` not found: fetching Fashion-MNIST needs a Debian-based system "
                        f"(or copy its IDX files into the data folder by hand)") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        errs = [ln for ln in lines if ln.startswith("E:")] or lines or ["no output"]
        raise DataError(f"`{' '.join(cmd)}` failed: {errs[-1]}")


# ---------------------------------------------------------------------------------------------------------
# The built-in data sets as data factories ("pipeline.problem.data:digits", ...): the same mechanism as a
# user's own `[data] factory`, so workers rebuild either from the same JSON.


class LazySplits(Mapping):
    """{split name: (inputs, targets)} that loads a split only when asked for it (and then once)."""

    def __init__(self, cfg: DataConfig) -> None:
        self._cfg = resolve_data_config(cfg)
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in SPLITS:
            raise KeyError(split)
        if split not in self._loaded:
            self._loaded[split] = load_split(self._cfg, split)
        return self._loaded[split]

    def __contains__(self, split: object) -> bool:  # without loading it
        return split in SPLITS

    def __iter__(self) -> Iterator[str]:
        return iter(SPLITS)

    def __len__(self) -> int:
        return len(SPLITS)


def digits(train_samples: int = 0) -> LazySplits:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], a fixed 80/20 split."""
    return LazySplits(DataConfig(dataset="digits", train_samples=train_samples))


def fashion_mnist(path: str = "", train_samples: int = 0) -> LazySplits:
    """Fashion-MNIST from its IDX files (`make data`), pixels scaled to [0, 1]."""
    return LazySplits(DataConfig(dataset="fashion-mnist", path=path, train_samples=train_samples))


def cifar10(path: str = "", train_samples: int = 0) -> LazySplits:
    """CIFAR-10 from the python tarball, normalised per channel with the training split's statistics."""
    return LazySplits(DataConfig(dataset="cifar10", path=path, train_samples=train_samples))


def synthetic(samples: int = 1024, shape: list[int] | None = None, classes: int = 10,
              train_samples: int = 0) -> LazySplits:
    """Gaussian inputs labelled by a fixed random linear teacher (timing runs)."""
    return LazySplits(DataConfig(dataset="synthetic", synthetic_samples=samples,
                                 synthetic_shape=list(shape or [1, 28, 28]), synthetic_classes=classes,
                                 train_samples=train_samples))


def factory_of(cfg: DataConfig) -> tuple[str, dict[str, Any]]:
    """The built-in data set of a workflow's `[data]` shorthand, as a reference and JSON kwargs."""
    cfg = resolve_data_config(cfg)
    base = "pipeline.problem.data:"
    if cfg.dataset == "digits":
        return base + "digits", {"train_samples": cfg.train_samples}
    if cfg.dataset == "fashion-mnist":
        return base + "fashion_mnist", {"path": cfg.path, "train_samples": cfg.train_samples}
    if cfg.dataset == "cifar10":
        return base + "cifar10", {"path": cfg.path, "train_samples": cfg.train_samples}
    return base + "synthetic", {"samples": cfg.synthetic_samples, "shape": list(cfg.synthetic_shape),
                                "classes": cfg.synthetic_classes, "train_samples": cfg.train_samples}


def shape_and_classes(cfg: DataConfig) -> tuple[tuple[int, ...], int]:
    """Input shape [C, H, W] and class count of a built-in data set, without loading it."""
    return _shape_and_classes(resolve_data_config(cfg))
