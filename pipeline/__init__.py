"""Loss Change Allocation for PyTorch training: train -> store -> compute -> dataset -> analysis.

Importing the package registers the `ds.lca` xarray accessor (pipeline/analysis.py).
"""

from . import analysis  # noqa: F401 - imported for its effect: registers the ds.lca accessor
from .dataset import describe, open_lca

__all__ = ["open_lca", "describe"]
