"""Loss Change Allocation for PyTorch training: workflow -> train -> store -> compute -> dataset -> analysis.

The public API lives here; the phases are subpackages (`problem`, `train`, `lca`, `analysis`, `bench`).
Importing the package registers the `ds.lca` xarray accessor.
"""

from pipeline.analysis import describe, open_lca
from pipeline.config import Workflow, load_workflow
from pipeline.lca import compute_lca
from pipeline.problem import Problem
from pipeline.train import train

__all__ = ["Problem", "Workflow", "compute_lca", "describe", "load_workflow", "open_lca", "train"]
