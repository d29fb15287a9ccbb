"""References to user code: `"package.module:attr"` strings plus JSON keyword arguments.

This is the convention of Python entry points. A reference is plain data, so a whole problem definition
travels as JSON to any Dask worker (or sits in a store's attributes) and is rebuilt there by importing
the module and calling `attr(**kwargs)`; no pickled objects, no code in the store.

Where modules are found: `sys.path` as usual (installed packages, PYTHONPATH). The `lca` command also puts
the current directory first, as `python -m` does, so `mynets.py` next to the workflow file imports.
Dask workers get the folders that the client imported the factories from (`module_roots`).
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import ProblemError

_REF = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def check_ref(ref: Any, where: str) -> str:
    if not isinstance(ref, str) or not _REF.match(ref):
        raise ProblemError(f"{where} must be a reference \"package.module:attr\" (e.g. \"mynets:make_mlp\"), "
                           f"got {ref!r}")
    return ref


def check_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    """Keyword arguments must be a JSON object: they are stored in the store and sent to workers."""
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ProblemError(f"{where} must be a table of keyword arguments, got {kwargs!r}")
    try:
        return json.loads(json.dumps(kwargs, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ProblemError(f"{where} must hold only JSON values (strings, numbers, booleans, lists, "
                           f"tables): {e}") from None


def _search_path() -> str:
    shown = [p or "(current directory)" for p in sys.path[:6]]
    return ", ".join(shown) + (f", ... ({len(sys.path)} entries)" if len(sys.path) > 6 else "")


def resolve(ref: str, what: str) -> Callable[..., Any]:
    """The object `ref` names; any failure is one line naming the reference and where modules are looked for."""
    check_ref(ref, what)
    module_name, attr = ref.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module's own code failing at import
        raise ProblemError(
            f"{what} {ref!r}: cannot import {module_name!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"modules are looked for in: {_search_path()} (run from the folder that holds it, or add it to "
            f"PYTHONPATH)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ProblemError(f"{what} {ref!r}: module {module_name!r} ({getattr(obj, '__file__', '?')}) has no "
                               f"attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ProblemError(f"{what} {ref!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def call(ref: str, kwargs: dict[str, Any], what: str) -> Any:
    fn = resolve(ref, what)
    try:
        return fn(**kwargs)
    except ProblemError:
        raise
    except Exception as e:
        from pipeline.errors import LCAError

        if isinstance(e, LCAError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ProblemError(f"{what} {ref!r} with kwargs {json.dumps(kwargs)} failed: {type(e).__name__}: {first}") \
            from None


def module_root(ref: str) -> str | None:
    """The sys.path entry the reference's module was imported from (None for installed packages)."""
    module_name = ref.split(":", 1)[0]
    mod = sys.modules.get(module_name)
    file = getattr(mod, "__file__", None)
    if not file:
        return None
    path = Path(file).resolve()
    depth = module_name.count(".") + (1 if path.name == "__init__.py" else 0)
    root = path.parents[depth]
    if "site-packages" in root.parts or "dist-packages" in root.parts:
        return None
    return str(root)


def add_module_roots(roots: list[str]) -> None:
    """Put the client's module folders on this process's path (a worker), if they exist here."""
    for root in roots:
        if root not in sys.path and Path(root).is_dir():
            sys.path.insert(0, root)
