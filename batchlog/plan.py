"""Turn records into calls: merge consecutive log-inputs of one run, derive retry tokens.

Pure and deterministic: the calls depend only on the records and the settings, never on
timing, so a resumed job forms the same calls and sends the same retry tokens.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from batchlog.operations import operation
from batchlog.records import Op, Record
from batchlog.target import Target


@dataclass(frozen=True, slots=True)
class GroupLimits:
    max_datasets: int = 100  # dataset inputs in one log-inputs call
    max_body: int = 4 << 20  # bytes of manifest lines merged into one call


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request's worth of work, and the records it speaks for."""

    op: Op
    run_id: str
    records: tuple[Record, ...]
    body: bytes  # canonical JSON, identical on every attempt and every run
    token: str  # opc-retry-token: a digest of the target, the operation and the body
    body_sha256: str  # base64 SHA-256 of body, for the x-content-sha256 header
    ticket: int = -1  # a plan's call: its place among its run's calls (batchlog.migrate)


def make_call(target: Target, records: tuple[Record, ...]) -> Call:
    """The call for ``records``. A plan's call names its run by the source run id: its body
    is a template until that run's target id is known (``batchlog.migrate.resolve``), and
    its retry token is derived from the template, so that it never depends on the target
    run's id (the same on every attempt and every run, as for any call)."""
    first = records[0]
    doc: dict[str, Any] = {"source_run_id" if first.source_run else "run_id": first.run_id}
    if first.op == "log-inputs":
        doc[target.datasets_field] = [d for r in records for d in r.dataset_inputs]
    elif first.op == "log-model":
        doc["model_json"] = first.model_json
    else:
        doc.update(first.fields or {})
    body = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(body).digest()
    token_src = hashlib.sha256(f"{target.token_scope}\n{first.op}\n".encode() + body).hexdigest()
    return Call(
        op=first.op,
        run_id=first.run_id,
        records=records,
        body=body,
        token=token_src,
        body_sha256=base64.b64encode(digest).decode(),
    )


def outline(target: Target, records: tuple[Record, ...]) -> Call:
    """The call for ``records`` without its body and retry token: what counting requests
    needs (``batchlog validate``; forming every body cost it a fifth of its time)."""
    first = records[0]
    return Call(first.op, first.run_id, records, body=b"", token="", body_sha256="")


class Grouper:
    """Collects consecutive log-inputs records of one run into one call.

    ``sent`` names calls an earlier run sent and never saw answered (first record's key ->
    number of records): those are formed again exactly, whatever was appended since, so
    that they go out again with the same body and retry token. ``form`` makes each call
    (``outline``: calls to count only).
    """

    __slots__ = (
        "_datasets",
        "_fixed",
        "_form",
        "_limit",
        "_limits",
        "_pending",
        "_size",
        "_target",
    )

    def __init__(
        self,
        target: Target,
        limits: GroupLimits,
        sent: dict[int, int] | None = None,
        form: Callable[[Target, tuple[Record, ...]], Call] = make_call,
    ) -> None:
        self._target = target
        self._form = form
        self._limits = limits
        self._fixed = sent or {}
        self._pending: list[Record] = []  # the open group, all log-inputs of one run
        self._limit: int | None = None  # records the open group must have (an earlier call)
        self._datasets = 0  # dataset inputs in the open group
        self._size = 0  # bytes of raw lines in the open group

    def add(self, record: Record) -> Iterator[Call]:
        """Take a record; yield the calls that are now complete."""
        if not operation(record.op).merges:
            yield from self.flush()
            yield self._form(self._target, (record,))
            return
        n = len(record.dataset_inputs)
        if self._pending and (
            record.seq in self._fixed  # an earlier call starts here
            or self._pending[0].run_id != record.run_id
            or self._pending[0].source_run != record.source_run
            or (
                self._limit is None
                and (
                    self._datasets + n > self._limits.max_datasets
                    or self._size + len(record.raw) > self._limits.max_body
                )
            )
        ):
            yield from self.flush()
        if not self._pending:
            self._limit = self._fixed.get(record.seq)
        self._pending.append(record)
        self._datasets += n
        self._size += len(record.raw)
        if self._limit is not None and len(self._pending) >= self._limit:
            yield from self.flush()

    def flush(self) -> Iterator[Call]:
        if self._pending:
            group = tuple(self._pending)
            self._pending = []
            self._limit = None
            self._datasets = self._size = 0
            yield self._form(self._target, group)


def split(target: Target, call: Call) -> list[Call]:
    """One call per record, for a merged call the server rejected as a whole."""
    return [make_call(target, (r,)) for r in call.records]
