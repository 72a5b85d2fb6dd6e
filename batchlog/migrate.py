"""Migration plans on the target: experiments found or created by name, source runs mapped
to the target runs batchlog creates or finds, and a plan's calls resolved to those runs.

A run is looked up before it is created: every run batchlog creates carries the tag
``batchlog.source_run_id``, so a plan uploaded again with a fresh checkpoint (a nightly
sync, a lost checkpoint) finds the runs it made and creates no second copy. The calls of
one run wait for its creation; an update-run (status, end time) waits for every call of
its run before it; other runs go on concurrently.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Set
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import orjson

from batchlog.plan import Call
from batchlog.retry import NOT_THE_API, Answer
from batchlog.target import Target

SOURCE_TAG = "batchlog.source_run_id"  # on every run batchlog creates: its source run
PARENT_TAG = "mlflow.parentRunId"
USER_TAG = "mlflow.user"
DEPENDENCY_FAILED = 424  # the status a call gets when the run it needs was not created
EXISTS = "RESOURCE_ALREADY_EXISTS"
ALREADY_THERE = "AlreadyThere"  # the code of a create-run that found its run


class Requests(Protocol):
    """What the migration needs of batchlog.transport.Transport."""

    async def request(
        self, rel: str, body: Any = None, *, query: Mapping[str, str] | None = None, token: str = ""
    ) -> tuple[Answer, Any]: ...


Pace = Callable[[], Awaitable[None]]  # waits for the rate gate before each extra request


@dataclass(slots=True)
class _Run:
    """A source run as this job knows it."""

    target: str | None = None  # its target run id, once created or found
    found: bool = False  # the target run was there before (made by an earlier upload)
    failure: str | None = None  # why its create-run failed (recorded as failed)
    settled: anyio.Event = field(default_factory=anyio.Event)  # its create-run has ended
    tickets: int = 0  # calls of the run handed out by the producer
    ended: set[int] = field(default_factory=set)  # tickets whose processing ended
    low: int = 0  # every ticket below it has ended
    moved: anyio.Event = field(default_factory=anyio.Event)  # set when ``low`` moves
    held: set[int] = field(default_factory=set)  # tickets held back, to be sent again


class RunBook:
    """Source run -> target run for one job, and the order of each run's calls.

    The producer declares every create-run it reads (done or not) and hands out a ticket
    to every call of a plan's run; workers wait on the book and tell it when a call's
    processing has ended, whatever its outcome (so nothing waits for ever)."""

    def __init__(self, mapped: Mapping[str, str], found: Set[str] = frozenset()) -> None:
        self._mapped = dict(mapped)  # from the checkpoint
        self._found = set(found)
        self._runs: dict[str, _Run] = {}  # made on the event loop, as they are needed
        self._experiments: dict[str, str] = {}  # name -> target experiment id
        self._experiment_locks: dict[str, anyio.Lock] = {}

    # ---- the producer ----------------------------------------------------------------------

    def declare(self, source: str, done: bool) -> None:
        """A create-run record for ``source`` was read; ``done``: an earlier run finished
        it (if the checkpoint maps no target run to it, it failed there)."""
        run = self._run(source)
        if done and run.target is None and run.failure is None:
            run.failure = "its create-run failed in an earlier run (see the dead letter)"
            run.settled.set()

    def knows(self, source: str) -> bool:
        """Whether ``source`` has a create-run earlier in this job (or in its checkpoint)."""
        return source in self._runs or source in self._mapped

    def ticket(self, source: str) -> int:
        """The next call of ``source``'s run, in manifest order."""
        run = self._run(source)
        run.tickets += 1
        return run.tickets - 1

    # ---- the workers -----------------------------------------------------------------------

    def target_of(self, source: str) -> str | None:
        run = self._runs.get(source)
        return run.target if run is not None else self._mapped.get(source)

    async def wait_created(self, source: str) -> _Run:
        """Wait until ``source``'s create-run has ended: its target, failure, or neither
        (left unfinished: held back by a stop, or the job is stopping)."""
        run = self._run(source)
        await run.settled.wait()
        return run

    async def wait_before(self, source: str, ticket: int) -> None:
        """Wait until every call of ``source``'s run before ``ticket`` has ended."""
        run = self._run(source)
        while run.low < ticket:
            await run.moved.wait()

    def was_found(self, source: str) -> bool:
        """Whether the run's target run was there before this job made it: its calls may
        all have been applied by an earlier upload (a lost checkpoint, a nightly sync)."""
        return self._run(source).found

    def created(self, source: str, target: str, found: bool = False) -> None:
        run = self._run(source)
        run.target, run.failure, run.found = target, None, found
        run.settled.set()

    def failed(self, source: str, reason: str) -> None:
        run = self._run(source)
        if run.target is None:
            run.failure = reason
        run.settled.set()

    def hold(self, source: str, ticket: int) -> None:
        """A call of the run was held back: it may be sent again later (after a success, or
        by the next run of the command), so nothing that must follow it can go now."""
        self._run(source).held.add(ticket)

    def settle(self, source: str, ticket: int) -> None:
        """A call of the run has its outcome (done or recorded failed)."""
        self._run(source).held.discard(ticket)

    def failure_of(self, source: str) -> str | None:
        """Why the run's create-run failed, if it did."""
        return self._run(source).failure

    def held_before(self, source: str, ticket: int) -> bool:
        """Whether a call of the run before ``ticket`` is held back."""
        return any(t < ticket for t in self._run(source).held)

    def ended(self, source: str, ticket: int, op: str) -> None:
        """A call's processing has ended (done, failed, held back or left unfinished)."""
        run = self._run(source)
        if op == "create-run":
            run.settled.set()  # whatever became of it: its calls stop waiting
        run.ended.add(ticket)
        low = run.low
        while low in run.ended:
            run.ended.discard(low)
            low += 1
        if low != run.low:
            run.low = low
            run.moved.set()
            run.moved = anyio.Event()

    def _run(self, source: str) -> _Run:
        run = self._runs.get(source)
        if run is None:
            self._runs[source] = run = _Run(
                target=self._mapped.get(source), found=source in self._found
            )
            if run.target is not None:
                run.settled.set()
        return run

    # ---- experiments -------------------------------------------------------------------------

    async def experiment(
        self, requests: Requests, name: str, scope: str, pace: Pace
    ) -> tuple[Answer, str | None]:
        """The target experiment called ``name``: found (get-by-name), else created (with a
        retry token derived from the name); a name a racing creator took is found again."""
        known = self._experiments.get(name)
        if known is not None:
            return Answer(200), known
        lock = self._experiment_locks.setdefault(name, anyio.Lock())
        async with lock:
            known = self._experiments.get(name)
            if known is not None:
                return Answer(200), known
            answer, found = await _find_experiment(requests, name)
            if found is None and answer.status == 404:
                await pace()
                token = _token(scope, "create-experiment", name.encode())
                answer, doc = await requests.request(
                    "experiments/create", {"name": name}, token=token
                )
                found = doc.get("experiment_id") if isinstance(doc, dict) else None
                if answer.code == EXISTS:  # created meanwhile, by someone else
                    await pace()
                    answer, found = await _find_experiment(requests, name)
                elif 200 <= answer.status < 300 and not isinstance(found, str):
                    return _not_the_api(answer, "experiments/create gave no experiment_id"), None
            if found is not None:
                self._experiments[name] = found
            return answer, found


async def _find_experiment(requests: Requests, name: str) -> tuple[Answer, str | None]:
    """(answer, id): 404 when there is none; a deleted one is a failure naming it."""
    answer, doc = await requests.request("experiments/get-by-name", query={"experiment_name": name})
    if answer.code == "RESOURCE_DOES_NOT_EXIST":
        return dataclasses.replace(answer, status=404), None
    if not 200 <= answer.status < 300:
        return answer, None
    experiment = doc.get("experiment") if isinstance(doc, dict) else None
    found = experiment.get("experiment_id") if isinstance(experiment, dict) else None
    if not isinstance(found, str) or not isinstance(experiment, dict):
        return _not_the_api(answer, "experiments/get-by-name gave no experiment"), None
    if experiment.get("lifecycle_stage", "active") != "active":
        return Answer(
            400,
            "ExperimentDeleted",
            f"experiment {name!r} ({found}) is deleted on the target: restore it there, or "
            "give the runs another experiment name in the plan",
            answer.request_id,
        ), None
    return answer, found


async def find_run(
    requests: Requests, experiment_id: str, source: str
) -> tuple[Answer, str | None]:
    """The target run carrying ``batchlog.source_run_id = source`` in the experiment, if
    any. Two such runs are a failure naming both: never pick one."""
    quoted = source.replace("\\", "\\\\").replace("'", "\\'")
    body = {
        "experiment_ids": [experiment_id],
        "filter": f"tags.`{SOURCE_TAG}` = '{quoted}'",
        "max_results": 2,
        "run_view_type": "ACTIVE_ONLY",
    }
    answer, doc = await requests.request("runs/search", body)
    if not 200 <= answer.status < 300:
        return answer, None
    runs = doc.get("runs", []) if isinstance(doc, dict) else None
    if not isinstance(runs, list):
        return _not_the_api(answer, "runs/search gave no list of runs"), None
    ids = [_run_id(run) for run in runs]
    if any(run_id is None for run_id in ids):
        return _not_the_api(answer, "runs/search gave a run without a run_id"), None
    if len(ids) > 1:
        return Answer(
            409,
            "DuplicateRuns",
            f"two runs on the target carry {SOURCE_TAG} = {source}: {ids[0]} and {ids[1]} "
            "(made by another tool, or copied by hand?): delete one, then run again",
            answer.request_id,
        ), None
    return answer, ids[0] if ids else None


async def create_run(
    requests: Requests,
    book: RunBook,
    target: Target,
    call: Call,
    parent: str | None,
    pace: Pace,
    sending: Pace,
) -> Answer:
    """One attempt at a create-run: the experiment found or created, the run looked up by
    its source tag, and created only if it is not there. The answer names the target run
    (``run_id``) on success. ``parent``: the target id of its parent run, if it has one;
    ``sending`` is awaited just before runs/create goes out (from then on it may land)."""
    fields = call.records[0].fields or {}
    source = call.run_id
    answer, experiment_id = await book.experiment(
        requests, str(fields["experiment"]), target.token_scope, pace
    )
    if experiment_id is None:
        return answer
    await pace()
    answer, found = await find_run(requests, experiment_id, source)
    if found is not None:
        return dataclasses.replace(answer, code=ALREADY_THERE, run_id=found)
    if not 200 <= answer.status < 300:
        return answer
    await pace()
    await sending()
    answer, doc = await requests.request(
        "runs/create", create_body(target, fields, source, experiment_id, parent), token=call.token
    )
    if not 200 <= answer.status < 300:
        return answer
    run = doc.get("run") if isinstance(doc, dict) else None
    run_id = _run_id(run)
    if run_id is None:
        return _not_the_api(answer, "runs/create gave no run_id")
    return dataclasses.replace(answer, run_id=run_id)


def create_body(
    target: Target, fields: Mapping[str, Any], source: str, experiment_id: str, parent: str | None
) -> dict[str, Any]:
    tags = [{"key": SOURCE_TAG, "value": source}]
    user = fields.get("user")
    if user:
        tags.append({"key": USER_TAG, "value": str(user)})
    if parent:
        tags.append({"key": PARENT_TAG, "value": parent})
    body: dict[str, Any] = {"experiment_id": experiment_id, "tags": tags}
    for name in ("run_name", "start_time"):
        if fields.get(name) is not None:
            body[name] = fields[name]
    if user and target.takes_user_id:  # AI Data Platform's has none
        body["user_id"] = str(user)
    return body


def resolve(target: Target, call: Call, run_id: str) -> Call:
    """A plan's call with its run's target id in its body (log-model: in its model_json
    too; MLflow: an INTERNAL_ERROR status, which it drops without a word, sent as FAILED).
    Its retry token stays the one derived from the template."""
    doc = orjson.loads(call.body)
    doc.pop("source_run_id", None)
    doc["run_id"] = run_id
    if call.op == "log-model":
        doc["model_json"] = with_run_id(doc["model_json"], run_id)
    if call.op == "update-run":
        doc["status"] = target.run_status(doc["status"])
    body = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    sha = base64.b64encode(hashlib.sha256(body).digest()).decode()
    return dataclasses.replace(call, run_id=run_id, body=body, body_sha256=sha)


def with_run_id(model_json: str, run_id: str) -> str:
    """``model_json`` as written, but for the value of its top-level ``run_id`` member.
    Not parsed and written again (found by test): orjson reads an integer beyond 64 bits
    as a float and refuses a number beyond a double, which a validated line may hold.
    Raises ValueError if it is not a JSON object."""
    text = model_json
    values = json.JSONDecoder(parse_float=str, parse_int=str, parse_constant=str)
    spans: list[tuple[int, int]] = []
    i = _skip(text, 0)
    if text[i : i + 1] != "{":
        raise ValueError("model_json is not a JSON object")
    i = _skip(text, i + 1)
    more = text[i : i + 1] != "}"
    while more:
        if text[i : i + 1] != '"':
            raise ValueError("model_json: a member name expected")
        key, i = values.raw_decode(text, i)
        i = _skip(text, i)
        if text[i : i + 1] != ":":
            raise ValueError("model_json: ':' expected")
        start = _skip(text, i + 1)
        _, end = values.raw_decode(text, start)
        if key == "run_id":
            spans.append((start, end))
        i = _skip(text, end)
        if text[i : i + 1] == ",":
            i = _skip(text, i + 1)
        elif text[i : i + 1] == "}":
            more = False
        else:
            raise ValueError("model_json: ',' or '}' expected")
    for start, end in reversed(spans):
        text = text[:start] + json.dumps(run_id) + text[end:]
    return text


def _skip(text: str, i: int) -> int:
    while text[i : i + 1] in (" ", "\t", "\n", "\r"):
        i += 1
    return i


def _run_id(run: Any) -> str | None:
    info = run.get("info") if isinstance(run, dict) else None
    run_id = info.get("run_id") if isinstance(info, dict) else None
    return run_id if isinstance(run_id, str) and run_id else None


def _token(scope: str, op: str, data: bytes) -> str:
    return hashlib.sha256(f"{scope}\n{op}\n".encode() + data).hexdigest()


def _not_the_api(answer: Answer, what: str) -> Answer:
    return dataclasses.replace(answer, code=NOT_THE_API, message=f"{what}: not the API's answer")
