"""Turning a path or fsspec URL into a zarr store, and refusing what would destroy or misread data.

Local paths and `file://` URLs (without storage_options) both become zarr's LocalStore, because its writes
go to a temporary file that is renamed into place: a killed trainer leaves whole files, never torn ones,
which the `checkpoints` commit protocol relies on. fsspec's local file system writes in place, so it is only
used for `file://` when the caller passes storage_options for it; every other URL goes through fsspec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from .errors import StoreError

StorePathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Location:
    """Where a store lives: its name for messages, and the local directory when there is one."""

    name: str
    local: Path | None
    url: str | None
    storage_options: dict[str, Any] | None

    def open_store(self, *, read_only: bool) -> Store:
        if self.local is not None:
            return LocalStore(self.local, read_only=read_only)
        assert self.url is not None
        try:
            return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)
        except (ImportError, ValueError, OSError) as e:
            raise StoreError(f"cannot open {self.name}: {e}") from e


def locate(path_or_url: StorePathLike, storage_options: dict[str, Any] | None = None) -> Location:
    """Classify a store argument without touching it."""
    text = os.fspath(path_or_url)
    if not isinstance(text, str) or not text:
        raise StoreError(f"store path must be a non-empty string, got {path_or_url!r}")
    if "://" not in text:
        if storage_options:
            raise StoreError(f"storage_options only apply to URLs, not the local path {text}")
        return Location(text, Path(text).expanduser().absolute(), None, None)
    if text.startswith("file://") and not storage_options:
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"cannot use {text}: file:// URLs must name a local path (file:///abs/path)")
        return Location(text, Path(unquote(parsed.path)).absolute(), None, None)
    return Location(text, None, text, dict(storage_options or {}))


def describe_oserror(e: OSError) -> str:
    """'permission denied' rather than "[Errno 13] Permission denied: '/x/y/zarr.json'": one short line."""
    reason = (e.strerror or str(e) or type(e).__name__).lower()
    if isinstance(e, NotADirectoryError):
        reason += " (a parent of it is a file)"
    return reason


def has_metadata(loc: Location, store: Store | None = None) -> bool:
    """Is there a Zarr root (zarr.json) at this location?"""
    if loc.local is not None:
        return (loc.local / "zarr.json").is_file()
    store = store or loc.open_store(read_only=True)
    try:
        return bool(sync(store.exists("zarr.json")))
    except (OSError, ValueError) as e:
        raise StoreError(f"cannot read {loc.name}: {e}") from e


def check_inside(loc: Location, *parts: str) -> None:
    """Refuse a symbolic link anywhere in the store's `parts` (or the whole store): writing or deleting through
    one would reach outside the store's folder. A local store only; the store's own path may be a link."""
    if loc.local is None:
        return
    for part in parts or ("",):
        top = loc.local / part if part else loc.local
        if part and top.is_symlink():
            _refuse_link(loc, top)
        if not top.is_dir():
            continue
        for folder, dirs, files in os.walk(top, followlinks=False):
            for entry in dirs + files:
                path = Path(folder) / entry
                if path.is_symlink():
                    _refuse_link(loc, path)


def _refuse_link(loc: Location, path: Path) -> None:
    rel = path.relative_to(loc.local) if loc.local is not None else path
    raise StoreError(f"{loc.name}: {rel} is a symbolic link (to {os.readlink(path)}); refusing to write or delete "
                     f"through it, since a store's contents must stay inside its folder: replace the link with "
                     f"the folder it points to, or use another store")


def check_ours(loc: Location) -> None:
    """Before an overwrite deletes a local store: it must be a trajectory store and hold nothing else."""
    import json

    assert loc.local is not None
    try:
        meta = json.loads((loc.local / "zarr.json").read_text())
        attrs = meta.get("attributes") or {}
        ours = meta.get("node_type") == "group" and "format_version" in attrs and "layout" in attrs
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise StoreError(f"{loc.name} holds a Zarr store that is not a trajectory store; refusing to replace it: "
                         f"delete it yourself or choose another store path")
    for entry in sorted(loc.local.iterdir()):
        if entry.name == "zarr.json" and entry.is_file() and not entry.is_symlink():
            continue
        if entry.is_symlink() or not entry.is_dir() or not (entry / "zarr.json").is_file():
            raise StoreError(f"{loc.name} holds {entry.name}, which is not part of a trajectory store; refusing "
                             f"to delete it with --overwrite: move it away or choose another store path")
    check_inside(loc)


def check_creatable(loc: Location, overwrite: bool) -> None:
    """Refuse to replace a store without overwrite, and anything that is not one of our stores, ever."""
    if loc.local is not None:
        p = loc.local
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise StoreError(f"{loc.name} exists and is not a Zarr store; refusing to replace it")
            if has_metadata(loc):
                if not overwrite:
                    raise StoreError(f"store {loc.name} already exists; pass --overwrite to replace it")
                check_ours(loc)
            elif any(p.iterdir()):
                raise StoreError(f"{loc.name} is a non-empty folder that is not a Zarr store; "
                                 "refusing to write there")
        return
    if has_metadata(loc) and not overwrite:
        raise StoreError(f"store {loc.name} already exists; pass --overwrite to replace it")


def store_exists(path_or_url: StorePathLike, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether a Zarr store (trajectory or not) is at this path or URL; for 'train unless already trained'."""
    loc = locate(path_or_url, storage_options)
    return has_metadata(loc)
