"""One writer per result: a compute claims `lca/<name>` before it plans, and every task checks the claim.

The claim is JSON in the result group's attributes: a random token, the owner's pid, host and process start
time, the settings it computes, and a heartbeat the client refreshes every `LEASE_S / 4` seconds. A second
compute of the same result is refused while the owner lives, naming it. An owner is dead when it ran on this
host and its process is gone (then a new compute takes over at once), or when its heartbeat is older than the
lease (another host; `lca unlock` releases it after a look). Tasks compare the token, and the store's
creation stamp, before they write and again before they mark a block done (`Guard`), so a compute whose
claim was taken over, or whose store was retrained under it, writes nothing more.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import zarr

from pipeline.errors import LCAError
from pipeline.lca.results import GROUP, now

LEASE_S = 60.0


def _process_start(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # psutil missing, or no such process
        return None


def _alive_here(claim: dict[str, Any]) -> bool:
    """Is the claim's owner a running process on this host (and not a newer process that reuses its pid)?"""
    pid = claim.get("pid")
    if not isinstance(pid, int):
        return False
    started = _process_start(pid)
    if started is None:
        return False
    recorded = claim.get("process_start")
    return not isinstance(recorded, (int, float)) or abs(started - recorded) < 1.0


def claim_state(claim: dict[str, Any], lease_s: float = LEASE_S) -> str:
    """'alive', 'dead' (its process is gone: certain) or 'expired' (no heartbeat for a lease: probable)."""
    if claim.get("host") == socket.gethostname():
        return "alive" if _alive_here(claim) else "dead"
    beat = claim.get("heartbeat")
    if not isinstance(beat, (int, float)) or time.time() - beat > float(claim.get("lease_s", lease_s)):
        return "expired"
    return "alive"


def describe_owner(claim: dict[str, Any]) -> str:
    beat = claim.get("heartbeat")
    ago = f", last heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    return f"pid {claim.get('pid')} on {claim.get('host')} (started {str(claim.get('started', '?'))[:19]}{ago})"


def _group(root: zarr.Group, name: str) -> zarr.Group:
    return root[f"{GROUP}/{name}"]  # a lookup reads the attributes from the store afresh


@dataclass
class Claim:
    """This process's claim on one result; `release` (or the context manager) gives it back."""

    root: zarr.Group
    name: str
    token: str
    lock: threading.Lock
    lost: str | None = None
    _stop: threading.Event | None = None
    _thread: threading.Thread | None = None

    def current(self) -> dict[str, Any] | None:
        claim = _group(self.root, self.name).attrs.get("claim")
        return claim if isinstance(claim, dict) else None

    def update_attrs(self, values: dict[str, Any]) -> None:
        """Write other attributes of the result group without racing the heartbeat."""
        with self.lock:
            _group(self.root, self.name).attrs.update(values)

    def start_heartbeat(self, every: float = LEASE_S / 4) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(every,), daemon=True, name="lca-claim-heartbeat")
        self._thread.start()

    def _beat(self, every: float) -> None:
        assert self._stop is not None
        while not self._stop.wait(every):
            try:
                with self.lock:
                    group = _group(self.root, self.name)
                    claim = group.attrs.get("claim")
                    if not isinstance(claim, dict) or claim.get("token") != self.token:
                        self.lost = describe_owner(claim) if isinstance(claim, dict) else "nobody (released)"
                        return
                    group.attrs["claim"] = {**claim, "heartbeat": time.time()}
            except Exception:  # a transient store error: the next beat tries again
                continue

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=5)
        try:
            with self.lock:
                group = _group(self.root, self.name)
                claim = group.attrs.get("claim")
                if isinstance(claim, dict) and claim.get("token") == self.token:
                    group.attrs["claim"] = None
        except Exception:  # the store is gone (retrained, deleted): nothing left to release
            pass

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire(root: zarr.Group, name: str, store: str, settings: dict[str, Any], *, takeover: bool = False,
            settle_s: float = 0.3) -> tuple[Claim, str | None]:
    """Claim result `name`, or raise one line naming the owner; returns the claim and a note if it took one over.

    Two processes that claim at the same instant both write; each reads back after `settle_s` and only the
    one whose token survived goes on.
    """
    group = _group(root, name)
    old = group.attrs.get("claim")
    note = None
    if isinstance(old, dict):
        state = claim_state(old)
        same = old.get("settings") == settings
        if state == "alive":
            if same:
                raise LCAError(f"LCA result {name!r} in {store} is being computed right now by "
                               f"{describe_owner(old)} with the same settings; wait for it to finish (running "
                               f"this again afterwards resumes any blocks left), or use --name NEW")
            raise LCAError(f"LCA result {name!r} in {store} is being computed right now by {describe_owner(old)} "
                           f"under other settings; wait for it to finish, or use --name NEW to compute beside it")
        if state == "expired" and not takeover:
            raise LCAError(f"LCA result {name!r} in {store} is claimed by {describe_owner(old)}, which has not "
                           f"renewed its claim for over {LEASE_S:.0f} s; if it is dead, run `lca unlock {store} "
                           f"--result {name}` (or pass --takeover)")
        note = f"took over the claim of {describe_owner(old)}, which is no longer running"
    token = secrets.token_hex(16)
    mine = {"token": token, "pid": os.getpid(), "host": socket.gethostname(),
            "process_start": _process_start(os.getpid()), "started": now(), "heartbeat": time.time(),
            "lease_s": LEASE_S, "settings": settings}
    group.attrs["claim"] = mine
    time.sleep(settle_s)
    got = _group(root, name).attrs.get("claim")
    if not isinstance(got, dict) or got.get("token") != token:
        who = describe_owner(got) if isinstance(got, dict) else "another compute"
        raise LCAError(f"LCA result {name!r} in {store} was claimed at the same moment by {who}; wait for it "
                       f"to finish, or use --name NEW")
    return Claim(root, name, token, threading.Lock()), note


def unlock(root: zarr.Group, store: str, name: str | None = None, *, force: bool = False) -> list[str]:
    """Release the claims of dead or silent computes (every result, or `name`); a live one only with `force`."""
    from trajectory_store.location import check_inside, locate

    if GROUP not in root:
        return []
    check_inside(locate(store), GROUP)
    names = [name] if name else [n for n, _ in root[GROUP].groups()]
    released = []
    for n in names:
        if f"{GROUP}/{n}" not in root:
            raise LCAError(f"{store} has no LCA result named {n!r}; `lca info {store}` lists them")
        claim = _group(root, n).attrs.get("claim")
        if not isinstance(claim, dict):
            continue
        if claim_state(claim) == "alive" and not force:
            raise LCAError(f"LCA result {n!r} in {store} is held by {describe_owner(claim)}, which is still "
                           f"alive; stop it first (or pass --force if you know it is dead)")
        _group(root, n).attrs["claim"] = None
        released.append(f"{n}: released the claim of {describe_owner(claim)}")
    return released


# ---- inside tasks --------------------------------------------------------------------------------------


def _read_json(store: Any, key: str) -> dict[str, Any] | None:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    try:
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    except (OSError, ValueError):
        return None
    if buf is None:
        return None
    try:
        doc = json.loads(buf.to_bytes())
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


@dataclass(frozen=True)
class Guard:
    """What a task checks before writing: the store is the one planned on, and the claim is still ours."""

    store: str
    created: str
    name: str
    token: str

    def __call__(self, root: zarr.Group) -> None:
        meta = _read_json(root.store, "zarr.json")
        created = None if meta is None else str((meta.get("attributes") or {}).get("created", ""))
        if created != self.created:
            now_there = "nothing there now" if created is None else f"now one created {created}"
            raise LCAError(f"the store at {self.store} was replaced or removed while this compute ran ({now_there}; "
                           f"planned on the one created {self.created}); this compute stopped without writing "
                           f"more: run `lca compute` again for the new store")
        meta = _read_json(root.store, f"{GROUP}/{self.name}/zarr.json")
        claim = ((meta or {}).get("attributes") or {}).get("claim")
        if not isinstance(claim, dict) or claim.get("token") != self.token:
            who = describe_owner(claim) if isinstance(claim, dict) else "nobody (it was released)"
            raise LCAError(f"LCA result {self.name!r} in {self.store} is no longer claimed by this compute (now "
                           f"{who}); this compute stopped without writing more")
