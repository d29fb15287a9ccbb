"""Printing the bench: one fixed-width table per section, the run's header, and rows made JSON-safe.

A section module declares `TITLE` and `COLUMNS`, a list of (header, json key, format spec, scale): the
spec is a `format` spec, "s" (as is) or "yesno"; a number is multiplied by the scale before formatting."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

MiB = 1 << 20


def _num(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if spec == "yesno":
        return "yes" if v else "NO"
    if spec == "s":
        return str(v)
    return format(v, spec)


def format_table(title: str, cols: Sequence[tuple[str, str, str, float]], rows: Iterable[dict[str, Any]]) -> str:
    cells = [[h for h, _, _, _ in cols]]
    for r in rows:
        line = []
        for _, key, spec, scale in cols:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and scale != 1 and v is not None:
                v = v * scale
                if spec.endswith("d"):
                    v = int(round(v))
            line.append(_num(v, spec))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    text_cols = {i for i, (_, _, spec, _) in enumerate(cols) if spec == "s"}

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in text_cols else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [title, fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in cells[1:]]
    return "\n".join(lines)


def header(meta: dict[str, Any]) -> str:
    peak = f"peak fp32 matmul ({meta['peak_n']}^2): {meta['peak_fp32_tflops']:.3f} TFLOP/s"
    if meta.get("peak_tf32_tflops"):
        peak += f"; tf32: {meta['peak_tf32_tflops']:.3f} TFLOP/s"
    return "\n".join([
        f"LCA bench ({'smoke: tiny sizes, checks the table not the speed' if meta['smoke'] else 'full'})"
        f"  {meta['date']}",
        f"device: {meta['device_name']} [{meta['device']}]; torch {meta['torch']}; "
        f"{meta['threads']} torch threads; python {meta['python']}",
        peak,
        *([f"note: {n}" for n in meta["notes"]]),
    ])


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj
