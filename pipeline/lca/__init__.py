"""Phase two: integrate the full-split gradient along every recorded step and write LCA into the store."""

from pipeline.lca.compute import ComputeSummary, compute_lca

__all__ = ["ComputeSummary", "compute_lca"]
