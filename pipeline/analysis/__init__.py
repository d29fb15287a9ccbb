"""Reading results: the lazy xarray view, the `ds.lca` accessor with the paper's analyses, and the report.

Importing this package registers the accessor.
"""

from pipeline.analysis import accessor  # noqa: F401 - imported for its effect: registers the accessor
from pipeline.analysis.accessor import LCAAccessor, coincidences, local_peaks, shuffled_coincidences
from pipeline.analysis.dataset import describe, open_lca

__all__ = ["LCAAccessor", "coincidences", "describe", "local_peaks", "open_lca", "shuffled_coincidences"]
