"""Named results side by side in one store, and replacing one only once its successor is complete.

A store can hold LCA computed under several settings (fp32 and fp64, two tolerances, two rules). Each is a
*result*: the group `lca/<name>`, named by its settings unless the user names it. A result's arrays live one
level further down, in a *version* group `lca/<name>/r<k>`; the result group's attribute `current` names the
version readers see. A recompute fills a new version (`pending`) while the old one stays readable, then
switches `current` with one attribute write and deletes the old version: an interrupted recompute leaves the
old result intact. Stores of format 1 kept one unnamed result directly in `lca/`; they are still read, under
the name `LEGACY`.

Everything here is metadata on the client; `plan.py` creates the arrays, `claims.py` says who may write them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import zarr

from pipeline.errors import LCAError

GROUP = "lca"
FORMAT = 2
LEGACY = "lca"  # the name under which a format-1 store's one result is listed and selected
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,119}$")
VERSION_RE = re.compile(r"^r[0-9]{1,9}$")  # what `current`/`pending` may name: nothing like "../.." gets through
# Format-1 array names sit directly in `lca/`; a result may not take one of them (or the legacy name).
_FLAT = {"train", "heldout", "unit", "layer", "loss", "residual", "points", "splits", "blocks_done", LEGACY}
# Format-1 arrays that carry a split's attributes: per-layer (once it existed), else per-parameter.
_FLAT_META = ("layer", "train", "heldout_layer", "heldout")
_SHORT = {"rule": "", "tol": "tol", "precision": "", "max_splits": "n", "eval_batch_size": "eb"}


@dataclass(frozen=True)
class ResultRef:
    """One result as readers see it: its name and the group that holds its arrays (its current version)."""

    name: str
    path: str              # "lca/<name>/r<k>", or "lca" for a format-1 store
    settings: dict[str, Any]
    block: int
    steps: int
    created: str           # when this version was started (ISO, UTC)
    legacy: bool = False


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# Settings left out of a default name at their default value (names stay as they were before them).
_UNNAMED: dict[str, Any] = {"keep": "parameter", "keep_layers": []}


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return str(value)


def default_name(settings: dict[str, Any]) -> str:
    """A readable name that differs whenever the settings do: `rk4-tol1e-07-fp32-n16-eb4096`."""
    parts = [f"{_SHORT[k]}{_fmt(settings[k])}" for k in _SHORT if k in settings]
    parts += [f"{k}{_fmt(v)}" for k, v in sorted(settings.items())
              if k not in _SHORT and _UNNAMED.get(k, object()) != v]
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", "-".join(parts))[:120]


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name in _FLAT or name.startswith("heldout_"):
        raise LCAError(f"result name {name!r} is not allowed: use 1-120 letters, digits or ._+=- starting with "
                       f"a letter or digit, other than {', '.join(sorted(_FLAT))}")
    return name


def is_legacy(root: zarr.Group) -> bool:
    """A format-1 store: its one result's arrays sit directly in `lca/`."""
    return any(f"{GROUP}/{key}" in root and isinstance(root[f"{GROUP}/{key}"], zarr.Array) for key in _FLAT_META)


def _legacy_ref(root: zarr.Group) -> ResultRef:
    first = next(f"{GROUP}/{key}" for key in _FLAT_META if f"{GROUP}/{key}" in root)
    attrs = dict(root[first].attrs)
    return ResultRef(LEGACY, GROUP, dict(attrs.get("settings", {})), int(attrs.get("block", 0)),
                     int(attrs.get("steps", root[first].shape[0])), "", legacy=True)


def valid_version(version: Any) -> bool:
    return isinstance(version, str) and bool(VERSION_RE.match(version))


def version_ref(root: zarr.Group, name: str, version: str) -> ResultRef:
    path = f"{GROUP}/{name}/{version}"
    attrs = dict(root[path].attrs)
    return ResultRef(name, path, dict(attrs.get("settings", {})), int(attrs.get("block", 0)),
                     int(attrs.get("steps", 0)), str(attrs.get("created", "")))


def result_attrs(root: zarr.Group, name: str) -> dict[str, Any]:
    path = f"{GROUP}/{name}"
    return dict(root[path].attrs) if path in root else {}


def list_results(root: zarr.Group) -> list[ResultRef]:
    """Every readable result (current versions only), oldest first; a result still without one is skipped."""
    refs = [_legacy_ref(root)] if is_legacy(root) else []
    if GROUP not in root or not isinstance(root[GROUP], zarr.Group):
        return refs
    for name, node in sorted(root[GROUP].groups()):
        current = node.attrs.get("current")
        if NAME_RE.match(name) and valid_version(current) and current in node:
            refs.append(version_ref(root, name, current))
    return sorted(refs, key=lambda r: r.created)


def select_result(root: zarr.Group, name: str | None, store: str) -> ResultRef:
    """The result `name`, or by default the only one, else the most recently started one."""
    refs = list_results(root)
    if not refs:
        raise LCAError(f"{store} has no LCA yet; compute it with `lca compute {store}` (or `make lca`)")
    if name is None:
        return refs[-1]
    for ref in refs:
        if ref.name == name:
            return ref
    raise LCAError(f"{store} has no LCA result named {name!r}; it holds {', '.join(r.name for r in refs)} "
                   f"(`lca info {store}` lists them)")
