"""Calls the target may hold already, from a line of this job given again, and what of a
log-batch is missing from its run.

A run given twice in one job (``cat plan plan``; a sync appending a run exported again once
it ended) or a line repeated in a hand-written manifest would be applied twice where a
replay is not free: MLflow appends a model to a run's history on every log-model, and an
MLflow file store (``--backend-store-uri ./mlruns``) appends every metric point it is sent,
replays included (its SQL store drops exact duplicates). Such calls are read back first.

``Replays`` is fed every call the producer forms (an earlier run's finished ones too) and
tells the workers which to read back: a call whose identity (its retry token: the
operation and its body, a plan's naming the source run) came before, every call sharing
such an identity, and the calls of a plan's run met again after its update-run (its last
line). Memory: a fixed 8 MiB filter of identities (a false positive costs one read back,
never a call), plus the identities and runs that did repeat.

``missing`` reads a log-batch's run back (runs/get, and every page of metrics/get-history
for each metric key in the batch) and gives the body of what is not there yet: params and
tags whose value differs or is absent (a changed param is still refused by the server, as
it would be), metric points (key, step, timestamp, value) the run does not hold.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any, Protocol

import anyio
import orjson

from batchlog.operations import operation
from batchlog.plan import Call
from batchlog.retry import Answer
from batchlog.verify_compare import metric_value, target_point

FILTER_BITS = 1 << 26  # 8 MiB: about 4% false positives at 10 million calls
_PROBES = 4
HISTORY_PAGE = 25_000  # points per get-history page, as MLflow's own client asks
MAX_PAGES = 10_000


class Requests(Protocol):
    async def request(
        self, rel: str, body: Any = None, *, query: Mapping[str, str] | None = None, token: str = ""
    ) -> tuple[Answer, Any]: ...


def reads_back(call: Call) -> bool:
    """Whether the call's operation can be confirmed by reading its run back."""
    return operation(call.op).confirm in ("models", "datasets", "missing")


class Replays:
    """Which calls of a job repeat an earlier one (see the module's docstring)."""

    def __init__(self) -> None:
        self._seen: bytearray | None = None  # a Bloom filter of identities, made on first use
        self._repeated: set[str] = set()  # identities met more than once
        self._flagged: set[int] = set()  # first record of each call that repeats one
        self._ended: set[str] = set()  # plan runs whose update-run was met
        self._again: set[str] = set()  # plan runs met again after their update-run
        self._turns: dict[str, tuple[anyio.Lock, int]] = {}

    # ---- the producer ----------------------------------------------------------------------

    def note(self, call: Call) -> None:
        """A call the producer formed, in manifest order, finished or not."""
        first = call.records[0]
        if first.source_run:
            if call.op == "update-run":
                self._ended.add(first.run_id)
            elif call.op != "create-run" and first.run_id in self._ended:
                self._again.add(first.run_id)
        if not reads_back(call):
            return
        if self._seen is None:
            self._seen = bytearray(FILTER_BITS // 8)
        seen, fresh = self._seen, False
        for i in range(_PROBES):
            bit = int(call.token[i * 16 : i * 16 + 16], 16) % FILTER_BITS
            if not seen[bit >> 3] & (1 << (bit & 7)):
                fresh = True
                seen[bit >> 3] |= 1 << (bit & 7)
        if not fresh:
            self._repeated.add(call.token)
            self._flagged.add(first.seq)

    # ---- the workers -----------------------------------------------------------------------

    def repeats(self, call: Call) -> bool:
        """Whether the call must be read back before each attempt: its identity came more
        than once, or its plan run was met again after its update-run."""
        if not reads_back(call):
            return False
        first = call.records[0]
        return (
            call.token in self._repeated
            or first.seq in self._flagged
            or (first.source_run and first.run_id in self._again)
        )

    async def enter(self, call: Call) -> None:
        """A hand-written call's turn among the calls of its identity: one at a time, so
        that a repeat reads back what the one before it did. Cancelled, it holds none."""
        lock, users = self._turns.get(call.token, (None, 0))
        if lock is None:
            lock = anyio.Lock(fast_acquire=True)  # no loop pass when free (most calls)
        self._turns[call.token] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._drop(call.token)
            raise

    def leave(self, call: Call) -> None:
        self._turns[call.token][0].release()
        self._drop(call.token)

    def _drop(self, token: str) -> None:
        lock, users = self._turns[token]
        if users == 1:
            del self._turns[token]
        else:
            self._turns[token] = (lock, users - 1)


async def missing(requests: Requests, call: Call) -> dict[str, Any] | None:
    """The body of what of a (resolved) log-batch call its run does not hold yet: {} when
    it holds everything; None when the run cannot be read now."""
    doc = orjson.loads(call.body)
    run_id = str(doc["run_id"])
    answer, found = await requests.request("runs/get", query={"run_id": run_id})
    run = found.get("run") if isinstance(found, dict) and answer.status == 200 else None
    if not isinstance(run, dict):
        return None
    data = run.get("data")
    if not isinstance(data, dict):
        data = {}
    params, tags = _pairs(data.get("params")), _pairs(data.get("tags"))
    out: dict[str, Any] = {}
    left = [p for p in doc.get("params") or [] if params.get(p["key"]) != p["value"]]
    if left:
        out["params"] = left
    left = [t for t in doc.get("tags") or [] if tags.get(t["key"]) != t["value"]]
    if left:
        out["tags"] = left
    metrics = doc.get("metrics") or []
    held: dict[str, set[Any]] = {}
    for key in dict.fromkeys(m["key"] for m in metrics):
        points = await _history(requests, run_id, key)
        if points is None:
            return None
        held[key] = points
    left = [m for m in metrics if _point(m) not in held[m["key"]]]
    if left:
        out["metrics"] = left
    if out:
        out["run_id"] = doc["run_id"]
    return out


def trimmed(call: Call, body: Mapping[str, Any]) -> Call:
    """``call`` sending ``body`` instead: its retry token derived from the call's and the new
    body (the old token with another body would be refused as a conflict)."""
    data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    token = hashlib.sha256(call.token.encode() + b"\n" + data).hexdigest()
    sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
    return dataclasses.replace(call, body=data, body_sha256=sha, token=token)


async def _history(requests: Requests, run_id: str, key: str) -> set[Any] | None:
    """(step, timestamp, value) of every point of one metric of a run; None if unreadable
    (or a page token that does not move)."""
    query = {"run_id": run_id, "metric_key": key, "max_results": str(HISTORY_PAGE)}
    points: set[Any] = set()
    tokens: set[str] = set()
    for _ in range(MAX_PAGES):
        answer, doc = await requests.request("metrics/get-history", query=query)
        if answer.status != 200 or not isinstance(doc, dict):
            return None
        page = doc.get("metrics") or []
        if not isinstance(page, list):
            return None
        for item in page:
            point = target_point(item)
            if point is None:
                return None
            points.add(point)
        token = doc.get("next_page_token") or ""
        if not token:
            return points
        if not isinstance(token, str) or token in tokens or not page:
            return None
        tokens.add(token)
        query["page_token"] = token
    return None


def _point(metric: Mapping[str, Any]) -> Any:
    return (int(metric.get("step", 0)), int(metric["timestamp"]), metric_value(metric["value"]))


def _pairs(items: Any) -> dict[str, Any]:
    return {
        str(i["key"]): i.get("value")
        for i in (items if isinstance(items, list) else [])
        if isinstance(i, dict) and "key" in i
    }
