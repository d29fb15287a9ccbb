"""Lossless, checksummed, crash-consistent storage of a training trajectory (one Zarr v3 store per run).

Importing the package registers the `lca.bit_delta` codec with zarr, which reading a store needs.
"""

from .codecs import BitDeltaCodec, params_codecs
from .errors import StoreError
from .layout import ParamLayout, TensorSpec
from .location import store_exists
from .reader import TrajectoryReader, open_trajectory
from .writer import FORMAT_VERSION, TrajectoryWriter

__all__ = [
    "FORMAT_VERSION",
    "BitDeltaCodec",
    "ParamLayout",
    "StoreError",
    "TensorSpec",
    "TrajectoryReader",
    "TrajectoryWriter",
    "open_trajectory",
    "params_codecs",
    "store_exists",
]
