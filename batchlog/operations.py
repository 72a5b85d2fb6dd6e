"""What each operation is, in one place: where it goes, whether its records merge, whether a
replay changes anything, and how a call that may have been applied is confirmed.

The job, the journal and the pool ask this table instead of naming operations; a target
says what it is (retry tokens or not) in batchlog.target. Validation of each operation's
fields is in batchlog.validate (log-inputs, log-model) and batchlog.planfields (a plan's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from batchlog.records import Op

# how a call that may have been applied is confirmed, on a target without retry tokens (or
# once its token expired): "models" / "datasets": read its run back and look for them;
# "missing": read its run back and send only what it lacks (batchlog.replay: a log-batch,
# whose replay an MLflow file store applies again); "resend": a replay changes nothing,
# send it again; "lookup": a create-run finds its run by its source tag before it creates
# one (batchlog.migrate)
Confirm = Literal["models", "datasets", "missing", "resend", "lookup"]


@dataclass(frozen=True, slots=True)
class Operation:
    name: Op
    rel: str  # its path under the MLflow API prefix
    merges: bool  # consecutive records of one run go out in one call
    replay_safe: bool  # sent twice without a retry token, it is applied once
    confirm: Confirm


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        # MLflow stores a dataset once per run
        Operation("log-inputs", "runs/log-inputs", True, True, "datasets"),
        # MLflow appends a model to the run's history on every call
        Operation("log-model", "runs/log-model", False, False, "models"),
        # every runs/create makes a new run
        Operation("create-run", "runs/create", False, False, "lookup"),
        # a param set again to its value, a tag: kept once; an identical metric point kept
        # once by MLflow's SQL store and AI Data Platform, but appended again by an MLflow
        # file store: read back (not locked per run) where it may be a replay (batchlog.job)
        Operation("log-batch", "runs/log-batch", False, True, "missing"),
        Operation("update-run", "runs/update", False, True, "resend"),
    )
}


def operation(op: str) -> Operation:
    return OPERATIONS[op]
