"""What L is: the model, the data and the loss whose full-split mean LCA integrates.

`Problem` names each by reference ("package.module:attr" + JSON kwargs); `data.py` and `models.py` hold the
built-in data sets and models, which are factories of the same mechanism; `losses.py` the loss contract.
"""

from pipeline.problem.definition import LossSpec, Problem, Ref
from pipeline.problem.splits import Split

__all__ = ["LossSpec", "Problem", "Ref", "Split"]
