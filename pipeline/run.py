"""`lca run`: one workflow end to end, train (or continue training), then compute LCA.

`make lca` is this command, so it must never quietly use a store that does not match the workflow file in
front of the user: an edited file is refused with the keys that differ, and the fix depends on what changed
(LCA settings: `--recompute`; anything that changes the trajectory: `--overwrite`, which retrains).
"""

from __future__ import annotations

from trajectory_store import open_trajectory, store_exists

from pipeline.config import Workflow, describe_differences, workflow_differences
from pipeline.errors import LCAError
from pipeline.train.loop import recorded_workflow, train


def prepare_run(workflow: Workflow, store: str, *, source: str, overwrite: bool = False,
                recompute: bool = False, partial: bool = False, progress: bool = True) -> str:
    """Make `store` hold the whole trajectory of `workflow` (training or continuing it as needed) and its
    stored LCA settings match the workflow's; returns what was done, as one line for the user."""
    if overwrite or not store_exists(store):
        return str(train(workflow, store, overwrite=overwrite, progress=progress))
    reader = open_trajectory(store)
    if not reader.workflow:
        raise LCAError(f"{store} was recorded by a user's own loop, not from {source}; compute it with "
                       f"`lca compute {store}`, or pass --overwrite to retrain it from {source}")
    wanted = recorded_workflow(workflow).to_dict()
    diffs = workflow_differences(reader.workflow, wanted)
    if diffs:
        training = {k: v for k, v in diffs.items() if not k.startswith("lca.")}
        if training:
            raise LCAError(f"{store} was trained with another workflow than {source}: "
                           f"{describe_differences(training)}; pass --overwrite to retrain (this replaces the "
                           f"store and its LCA), or give another --store")
        if not recompute:
            raise LCAError(f"{source} changes the LCA settings stored in {store}: {describe_differences(diffs)}; "
                           f"pass --recompute to recompute LCA with them")
        # The stored workflow is what a plain `lca compute STORE` uses: make it the one just asked for.
        reader.group.attrs["workflow"] = {**reader.workflow, "lca": wanted["lca"]}
    if reader.status == "complete":
        return f"using the trajectory already in {store} ({reader.num_steps} steps)"
    if partial:
        return (f"the trajectory in {store} is {reader.status} ({reader.num_steps} steps recorded); "
                f"computing LCA over those steps only (--partial)")
    return str(train(workflow, store, progress=progress))
