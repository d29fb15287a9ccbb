"""Lossless, checksummed, crash-consistent storage of a training trajectory (one Zarr v3 store per run).

The `lca.bit_delta` codec is registered with zarr through the `zarr.codecs` entry point (pyproject.toml),
so plain zarr and xarray read a store without importing this package; importing it registers it too.
"""

from .codecs import BitDeltaCodec, params_codecs
from .errors import StoreError
from .layout import ParamLayout, TensorSpec
from .location import store_exists
from .reader import TrajectoryReader, open_trajectory
from .state import TrainingState
from .writer import FORMAT_VERSION, TrajectoryWriter

__all__ = [
    "FORMAT_VERSION",
    "BitDeltaCodec",
    "ParamLayout",
    "StoreError",
    "TensorSpec",
    "TrainingState",
    "TrajectoryReader",
    "TrajectoryWriter",
    "open_trajectory",
    "params_codecs",
    "store_exists",
]
