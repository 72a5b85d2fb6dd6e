"""What flows through batchlog: records read from manifests, and lines rejected on the way."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Op = Literal["log-inputs", "log-model", "create-run", "log-batch", "update-run"]
OPS: tuple[Op, ...] = ("log-inputs", "log-model", "create-run", "log-batch", "update-run")
PLAN_OPS: tuple[Op, ...] = ("create-run", "log-batch", "update-run")  # migration plans only


@dataclass(frozen=True, slots=True)
class Position:
    """Where a line sits in the job's manifests."""

    manifest: int  # index of the manifest in the job's list
    line: int  # 1-based line number
    start: int  # byte offset of the line's first byte (decompressed, for .gz)
    end: int  # byte offset just past the line's newline


@dataclass(frozen=True, slots=True)
class Record:
    """One valid manifest line: one call's worth of data.

    A migration plan's lines name their run by ``source_run_id`` (its id on the source
    server): ``run_id`` holds that id and ``source_run`` is set; the target run it maps to
    is known only once the run's create-run record is done (batchlog.migrate)."""

    seq: int  # position among the job's non-blank lines, 0-based, stable across runs
    source: str  # "FILE:LINE", for messages and the dead letter
    raw: bytes  # the line as read, without its newline
    op: Op
    run_id: str
    dataset_inputs: tuple[dict[str, Any], ...]  # log-inputs only
    model_json: str  # log-model only: the MLmodel document's JSON text, as written
    source_run: bool = False  # run_id is a source run id (a plan's line)
    # create-run, log-batch, update-run: the request's fields, validated (batchlog.validate)
    fields: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Rejection:
    """A manifest line that failed validation; it is never sent."""

    seq: int
    source: str
    raw: bytes
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.field}: {self.reason}"
