"""How `trajectory/params` is cut into chunks: whole rows when they fit, equal column slices when not.

A chunk is the unit of writing, checksumming and reading. Keeping a chunk under ~8 MiB bounds the memory
of one encode/decode and lets the LCA phase read a block of checkpoints for a slice of a huge model;
splitting P into 2^k equal parts (not fixed-width slices) avoids a ragged, poorly compressed last chunk.
"""

from __future__ import annotations

MAX_CHUNK_BYTES = 8 << 20
MAX_CHUNK_STEPS = 1 << 16


def param_chunk_for(num_params: int, chunk_steps: int, *, itemsize: int = 4,
                    max_chunk_bytes: int = MAX_CHUNK_BYTES) -> int:
    """Columns per chunk: P itself, or ceil(P / 2^k) for the smallest k that fits max_chunk_bytes."""
    if num_params <= 0:
        return 1
    parts = 1
    while True:
        width = -(-num_params // parts)
        if width * chunk_steps * itemsize <= max_chunk_bytes or width == 1:
            return width
        parts *= 2
