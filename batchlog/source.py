"""Reading a source MLflow tracking server's REST API, for ``batchlog export``.

Every read goes through the upload's machinery: the ``Transport`` (one aiohttp session,
MLflow's credentials as ``mlflow_target`` takes them, TLS as for ``--target mlflow``), the
rate gate and the ``RetryPolicy`` (429, 5xx and connection errors retried with back-off
and ``Retry-After``). Reads are idempotent, so any answer may be retried. Paged reads
always send ``max_results`` (experiments/search refuses a request without it; get-history
on MLflow 3.4 up to the fix of mlflow#23916 answers nothing, with a token that never
moves) and stop with an error when a page token comes back a second time.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio

from batchlog.errors import SystemicError
from batchlog.ratecontrol import RateGate
from batchlog.retry import CANNOT_CONNECT, NO_ANSWER, NOT_THE_API, Answer, RetryPolicy
from batchlog.target import MlflowTarget
from batchlog.transport import Transport

NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
HISTORY_PAGE = 25_000  # points per get-history page: what MLflow's own client asks for
SEARCH_PAGE = 100  # runs per runs/search page (each run comes whole: params, tags)
EXPERIMENT_PAGE = 1_000
MAX_PAGES = 1_000_000  # a bound on any paged read: a server that pages for ever is wrong


class SourceError(SystemicError):
    """The source server cannot be read, or answered something that cannot be right."""


@dataclass
class ReadCounts:
    """What reading the source cost, for progress and the summary."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0


class Source:
    """A source MLflow server, read with retries under a shared rate gate."""

    def __init__(
        self,
        transport: Transport,
        gate: RateGate,
        policy: RetryPolicy,
        *,
        rng: random.Random | None = None,
    ) -> None:
        target = transport.target
        if not isinstance(target, MlflowTarget):  # pragma: no cover - the CLI builds it
            raise TypeError("an export reads an MLflow server")
        self._transport = transport
        self._target = target
        self._gate = gate
        self._policy = policy
        self._rng = rng or random.Random()
        self._answered = False  # some request succeeded: a 404 now is about its object
        self.counts = ReadCounts()

    @property
    def uri(self) -> str:
        return self._target.uri  # never with credentials

    @property
    def rate(self) -> float:
        return self._gate.rate

    async def call(
        self,
        what: str,
        rel: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        large: bool = False,
    ) -> dict[str, Any] | None:
        """The JSON object a read answered (GET with ``query``, or POST of ``body``); None
        when the server says the object does not exist (404 RESOURCE_DOES_NOT_EXIST).
        Retried as uploads are; anything else is a SourceError naming ``what``."""
        attempt = 0
        while True:
            await self._gate.acquire()
            attempt += 1
            self.counts.requests += 1
            answer, doc = await self._transport.request(rel, body, query=query, large=large)
            verdict = self._policy.verdict(answer)
            if verdict == "ok":
                self._gate.on_success()
                if not isinstance(doc, dict):  # NaN outside quotes, say: not MLflow's JSON
                    raise SourceError(f"{what}: the answer is not a JSON object ({self.uri})")
                self._answered = True
                return doc
            if answer.status == 429:
                self.counts.throttled += 1
                self._gate.on_throttle(answer.retry_after)
            # nothing listening before any answer: a wrong URI, not a passing fault
            stuck = answer.code == CANNOT_CONNECT and not self._answered
            if verdict == "retry" and attempt < self._policy.max_attempts and not stuck:
                self.counts.retries += 1
                await anyio.sleep(self._policy.delay(attempt, answer, self._rng))
                continue
            if answer.status == 404 and answer.code == NOT_FOUND:
                self._answered = True
                return None
            raise SourceError(self._problem(what, answer, verdict, attempt))

    def _problem(self, what: str, answer: Answer, verdict: str, attempts: int) -> str:
        status = answer.status
        if answer.code == NOT_THE_API and status == NO_ANSWER:  # too large to read
            return f"{what}: {answer.message}"
        if verdict in ("unauthorized", "redirect") or status == 403:
            return f"source: {self._target.systemic_hint(status)}"
        if not self._answered and status in (404, 405, NO_ANSWER):
            return f"source: {self._target.systemic_hint(status)}"
        said = f"{status} {answer.code}: {answer.message}" if status else answer.message
        tries = f" (after {attempts} attempts)" if attempts > 1 else ""
        return f"{what}: {said}{tries}"

    # ---- the reads an export makes ---------------------------------------------------------

    async def experiment_by_name(self, name: str) -> dict[str, Any] | None:
        doc = await self.call(
            f"experiment {name!r}", "experiments/get-by-name", query={"experiment_name": name}
        )
        return _object(doc, "experiment")

    async def experiment_by_id(self, experiment_id: str) -> dict[str, Any] | None:
        try:
            doc = await self.call(
                f"experiment {experiment_id}",
                "experiments/get",
                query={"experiment_id": experiment_id},
            )
        except SourceError:
            if experiment_id.isdigit():
                raise
            return None  # MLflow's SQL store answers 400 for an id that is not a number
        return _object(doc, "experiment")

    async def experiments(self, page: int = EXPERIMENT_PAGE) -> AsyncIterator[dict[str, Any]]:
        """Every active experiment, oldest first."""
        body: dict[str, Any] = {
            "max_results": page,
            "view_type": "ACTIVE_ONLY",
            "order_by": ["creation_time ASC", "experiment_id ASC"],
        }
        async for doc in self._pages("experiments/search", body, "the experiments", large=True):
            for experiment in _list(doc, "experiments"):
                yield experiment

    async def runs(
        self, experiment_id: str, filter_: str = "", page: int = SEARCH_PAGE
    ) -> AsyncIterator[dict[str, Any]]:
        """The active runs of an experiment matching ``filter_``, by start time then id."""
        body: dict[str, Any] = {
            "experiment_ids": [experiment_id],
            "filter": filter_,
            "run_view_type": "ACTIVE_ONLY",
            "max_results": page,
            "order_by": ["attributes.start_time ASC", "attributes.run_id ASC"],
        }
        what = f"the runs of experiment {experiment_id}"
        async for doc in self._pages("runs/search", body, what, large=True):
            for run in _list(doc, "runs"):
                yield run

    async def run(self, run_id: str) -> dict[str, Any] | None:
        doc = await self.call(f"run {run_id}", "runs/get", query={"run_id": run_id})
        return _object(doc, "run")

    async def metric_history(
        self, run_id: str, key: str, page: int = HISTORY_PAGE
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The points of one metric of a run, a page at a time, every step and timestamp."""
        query = {"run_id": run_id, "metric_key": key, "max_results": str(page)}
        what = f"metric {key!r} of run {run_id}"
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = await self.call(what, "metrics/get-history", query=query)
            if doc is None:
                raise SourceError(f"{what}: the run or the metric no longer exists")
            points = _list(doc, "metrics")
            token = doc.get("next_page_token") or ""
            if token and not points:  # MLflow 3.4 until mlflow#23916: nothing, and a token
                raise SourceError(
                    f"{what}: the source answered an empty page with a next page token: "
                    "its metric history cannot be read whole (upgrade the MLflow server)"
                )
            yield points
            if not token:
                return
            _check_token(token, seen, what)
            query["page_token"] = token
        raise SourceError(f"{what}: more than {MAX_PAGES:,} pages")

    async def logged_model(self, model_id: str) -> dict[str, Any] | None:
        doc = await self.call(f"logged model {model_id}", f"logged-models/{quote(model_id, '')}")
        return _object(doc, "model")

    async def _pages(
        self, rel: str, body: dict[str, Any], what: str, large: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = await self.call(what, rel, body, large=large)
            if doc is None:
                raise SourceError(f"{what}: answered 404 {NOT_FOUND}")
            yield doc
            token = doc.get("next_page_token") or ""
            if not token:
                return
            _check_token(token, seen, what)
            body = {**body, "page_token": token}
        raise SourceError(f"{what}: more than {MAX_PAGES:,} pages")


def _check_token(token: Any, seen: set[str], what: str) -> None:
    """A page token must be a string never seen before: one that comes back would page for
    ever (or, read on, repeat the same items)."""
    if not isinstance(token, str):
        raise SourceError(f"{what}: the next page token is not a string")
    if token in seen:
        raise SourceError(
            f"{what}: the source answered a page token it had already given "
            f"({token[:40]!r}): paging would not end; nothing more is read"
        )
    seen.add(token)


def _object(doc: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    if doc is None:
        return None
    value = doc.get(name)
    if not isinstance(value, dict):
        raise SourceError(f"the source answered without {name!r}: not the MLflow API")
    return value


def _list(doc: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = doc.get(name, [])  # MLflow leaves an empty list out
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise SourceError(f"the source answered {name!r} that is not a list of objects")
    return value
