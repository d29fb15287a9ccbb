"""Errors the pipeline reports to a person: each message is one line naming the problem and the fix."""

from trajectory_store.errors import StoreError


class LCAError(Exception):
    """Base for user-facing failures of the pipeline (bad workflow, missing data, bad store, bad cluster)."""


class WorkflowError(LCAError):
    """A workflow TOML file has an unknown key, a wrong type or a value outside the valid choices."""


class DataError(LCAError):
    """A data set is missing or malformed; the message gives the command that fetches it."""


class ProblemError(LCAError):
    """The problem definition (model, data or loss factory) cannot be built, or does not match the store."""


class DivergenceError(LCAError):
    """Training produced a non-finite loss or parameters; the message names the step."""


class IncompleteResultError(LCAError):
    """An analysis that sums over iterations was asked of a result whose LCA is not fully computed."""


class IncompleteResultWarning(UserWarning):
    """A result opened for analysis is missing iterations (their rows are NaN); says how many."""


class ShortRunWarning(UserWarning):
    """A statistic was computed on a run too short for its settings to say much (for example its window)."""


class ToleranceWarning(UserWarning):
    """Compute finished but a share of steps did not reach the residual tolerance even at max_splits."""
class Interrupted(LCAError):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to continue. Exit status 130."""


USER_ERRORS = (LCAError, StoreError)
