"""Migration plans on the target: experiments found or created by name, source runs mapped
to the target runs batchlog creates or finds, and a plan's calls resolved to those runs.

A run is looked up before it is created: every run batchlog creates carries the tag
``batchlog.source_run_id``, so a plan uploaded again with a fresh checkpoint (a nightly
sync, a lost checkpoint) finds the runs it made and creates no second copy. The calls of
one run wait for its creation; an update-run (status, end time) waits for every call of
its run before it; other runs go on concurrently.

The lookup covers every active experiment of the target (source run ids are unique), so a
source experiment renamed between two syncs copies nothing again: the run is kept where it
is, and a renamed run gets its new name. On a target without retry tokens (open-source
MLflow) two uploads of one plan at the same time may both create a run: after runs/create
the tag is searched again, and every party keeps the copy with the smallest run id (the
others delete theirs, before any data went to them); a copy created too late for that is
found again before the run's update-run, which then fails naming both copies.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import time
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
# experiment ids per runs/search: MLflow 3.17 sets no limit for runs (20 for datasets), but
# its SQL store binds one variable per id (sqlite: 32,766 at most, 999 on old builds), and
# AI Data Platform documents none: kept well below any of them
SEARCH_IDS = 100
EXPERIMENTS_PAGE = 1000  # experiments/search page (servers support at least 1,000)
MAX_PAGES = 10_000  # pages of experiments read at most (a token that never ends)
COPIES = 10  # copies of a run read at most by one search (two are already too many)
# seconds from journaling a create-run as sent to its runs/create: beyond it (a slow
# lookup) it is journaled again, so a resume waits until runs/create can no longer land
LATE = 0.1
# seconds waited after runs/create before the tag is searched again (no retry tokens):
# three times the run's own lookup-to-creation time, within these bounds, so that another
# upload that looked the run up before this one made it has made its own copy by then (on
# one server, its requests take about as long); a copy made later than that is found
# again before the run's update-run
SETTLE_MIN, SETTLE_MAX = 0.05, 2.0
CONCURRENT = "ConcurrentUpload"  # the code of an update-run whose run has another copy

log = logging.getLogger("batchlog")


class Requests(Protocol):
    """What the migration needs of batchlog.transport.Transport."""

    async def request(
        self,
        rel: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        token: str = "",
        large: bool = False,
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
        self._listed: dict[str, str] | None = None  # active experiment id -> name, once a job
        self._listing = anyio.Lock()
        self._told: set[str] = set()  # experiments a run was found in, told once
        self._made: set[str] = set()  # experiment ids this job's experiments/create made

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

    def given_again(self, source: str) -> None:
        """The run's create-run came again (planorder's repeat: a nightly sync appending a
        run exported again, in this run of the job or after an earlier one): its lines from
        here on may all be there already, so they are read back first (found by review: an
        appended run's lines after a resume were sent again, points doubled on a file
        store, a model logged twice)."""
        self._run(source).found = True

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

    async def experiment_ids(self, requests: Requests, pace: Pace) -> tuple[Answer, list[str]]:
        """The ids of the target's active experiments (listed once per job, all pages; the
        experiments this job found or made since are added): where a run is looked up."""
        async with self._listing:
            if self._listed is None:
                answer, listed = await _list_experiments(requests, pace)
                if listed is None:
                    return answer, []
                self._listed = listed
                for name, eid in self._experiments.items():
                    listed.setdefault(eid, name)
        return Answer(200), list(self._listed)

    def known_ids(self) -> list[str]:
        """The experiment ids known so far (no request): the listing and those found since."""
        ids = dict.fromkeys(self._listed or ())
        ids.update(dict.fromkeys(self._experiments.values()))
        return list(ids)

    def tell_elsewhere(self, source: str, experiment_id: str, planned: str) -> None:
        """A run found in another experiment than the plan names: said once per experiment."""
        name = (self._listed or {}).get(experiment_id, experiment_id)
        if experiment_id in self._told or name == planned:
            return
        self._told.add(experiment_id)
        log.warning(
            "run %s found in experiment %r, the plan names %r (renamed?): its runs are kept "
            "where they are",
            source,
            name,
            planned,
        )

    def made(self, experiment_id: str) -> bool:
        """Whether this job created the experiment: only its own runs can be in it."""
        return experiment_id in self._made

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
                elif 200 <= answer.status < 300:
                    self._made.add(str(found))
            if found is not None:
                self._experiments[name] = found
                if self._listed is not None:
                    self._listed.setdefault(found, name)
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


async def _list_experiments(requests: Requests, pace: Pace) -> tuple[Answer, dict[str, str] | None]:
    """Every active experiment of the target, id -> name (experiments/search, all pages)."""
    body: dict[str, Any] = {"max_results": EXPERIMENTS_PAGE, "view_type": "ACTIVE_ONLY"}
    listed: dict[str, str] = {}
    tokens: set[str] = set()
    answer = Answer(200)
    for _ in range(MAX_PAGES):
        await pace()
        answer, doc = await requests.request("experiments/search", body, large=True)
        if not 200 <= answer.status < 300:
            return answer, None
        experiments = doc.get("experiments", []) if isinstance(doc, dict) else None
        if not isinstance(experiments, list):
            return _not_the_api(answer, "experiments/search gave no list of experiments"), None
        for experiment in experiments:
            eid = experiment.get("experiment_id") if isinstance(experiment, dict) else None
            if not isinstance(eid, str) or not eid or not isinstance(experiment, dict):
                return _not_the_api(answer, "experiments/search gave no experiment_id"), None
            if experiment.get("lifecycle_stage", "active") == "active":
                listed[eid] = str(experiment.get("name", ""))
        token = doc.get("next_page_token") if isinstance(doc, dict) else None
        if not token:
            return answer, listed
        if not isinstance(token, str) or token in tokens:
            return _not_the_api(answer, "experiments/search repeated a page token"), None
        tokens.add(token)
        body = {**body, "page_token": token}
    return _not_the_api(answer, f"experiments/search: more than {MAX_PAGES:,} pages"), None


@dataclass(frozen=True, slots=True)
class Copy:
    """A target run carrying a source run's tag."""

    run_id: str
    experiment_id: str
    run_name: str | None


async def find_copies(
    requests: Requests, experiment_ids: list[str], source: str, pace: Pace
) -> tuple[Answer, list[Copy]]:
    """The active target runs carrying ``batchlog.source_run_id = source`` in any of the
    experiments (a few at most: more than one is already a problem), by smallest run id."""
    quoted = source.replace("\\", "\\\\").replace("'", "\\'")
    found: dict[str, Copy] = {}
    answer = Answer(200)
    for i in range(0, len(experiment_ids), SEARCH_IDS):
        body = {
            "experiment_ids": experiment_ids[i : i + SEARCH_IDS],
            "filter": f"tags.`{SOURCE_TAG}` = '{quoted}'",
            "max_results": COPIES,
            "run_view_type": "ACTIVE_ONLY",
        }
        await pace()
        answer, doc = await requests.request("runs/search", body, large=True)
        if not 200 <= answer.status < 300:
            return answer, []
        runs = doc.get("runs", []) if isinstance(doc, dict) else None
        if not isinstance(runs, list):
            return _not_the_api(answer, "runs/search gave no list of runs"), []
        for run in runs:
            run_id = _run_id(run)
            if run_id is None:
                return _not_the_api(answer, "runs/search gave a run without a run_id"), []
            info = run["info"]
            name = info.get("run_name")
            found[run_id] = Copy(
                run_id, str(info.get("experiment_id", "")), name if isinstance(name, str) else None
            )
    return answer, [found[k] for k in sorted(found)]


async def find_run(
    requests: Requests, experiment_ids: list[str], source: str, pace: Pace
) -> tuple[Answer, Copy | None]:
    """The one target run of ``source`` in the experiments, if any. Two such runs are
    looked for again after a moment (another upload of the plan at the same time deletes
    its own copy), and then are a failure naming both: never pick one."""
    answer, found = await find_copies(requests, experiment_ids, source, pace)
    if len(found) > 1:
        await anyio.sleep(SETTLE_MAX)  # another upload at the same time deletes its copy
        answer, found = await find_copies(requests, experiment_ids, source, pace)
    if not 200 <= answer.status < 300:
        return answer, None
    if len(found) > 1:
        return Answer(
            409,
            "DuplicateRuns",
            f"two runs on the target carry {SOURCE_TAG} = {source}: {found[0].run_id} and "
            f"{found[1].run_id} (made by another tool, or copied by hand?): delete one, then "
            "run again",
            answer.request_id,
        ), None
    return answer, found[0] if found else None


async def create_run(
    requests: Requests,
    book: RunBook,
    target: Target,
    call: Call,
    parent: str | None,
    pace: Pace,
    sending: Pace,
) -> Answer:
    """One attempt at a create-run: the run looked up by its source tag in every active
    experiment, else the experiment found or created and the run created in it; without
    retry tokens, then converged with a copy another upload made at the same time. The
    answer names the target run (``run_id``) on success. ``parent``: the target id of its
    parent run, if it has one; ``sending`` is awaited before runs/create goes out (from
    then on it may land). An answer before runs/create went out is not in doubt."""
    fields = call.records[0].fields or {}
    source, name = call.run_id, str(fields["experiment"])
    answer, ids = await book.experiment_ids(requests, pace)
    if not ids and not 200 <= answer.status < 300:
        return _unsent(answer)
    # journaled before the lookup, not after it (found by test: the journal's flush between
    # the two let another upload look up, create and search again unseen)
    journaled = time.monotonic()
    await sending()
    looked = time.monotonic()
    answer, found = await find_run(requests, ids, source, pace)
    experiment_id = ""
    if found is None and 200 <= answer.status < 300:
        answer, made_or_found = await book.experiment(requests, name, target.token_scope, pace)
        if made_or_found is None:
            return _unsent(answer)
        experiment_id = made_or_found
        if experiment_id not in ids and not book.made(experiment_id):
            # found, yet not listed: made since the listing by another upload of the plan
            answer, found = await find_run(requests, [experiment_id], source, pace)
    if found is not None:
        return await _adopt(requests, book, target, fields, source, found, pace)
    if not 200 <= answer.status < 300:
        return _unsent(answer)
    if time.monotonic() - journaled > LATE:  # in doubt from when runs/create goes out
        await sending()
    await pace()
    answer, doc = await requests.request(
        "runs/create", create_body(target, fields, source, experiment_id, parent), token=call.token
    )
    if not 200 <= answer.status < 300:
        return answer
    run = doc.get("run") if isinstance(doc, dict) else None
    run_id = _run_id(run)
    if run_id is None:
        return _not_the_api(answer, "runs/create gave no run_id")
    made = dataclasses.replace(answer, run_id=run_id)
    if target.retry_tokens:  # another upload's runs/create with the same token: this run
        return made
    settle = min(SETTLE_MAX, max(SETTLE_MIN, 3 * (time.monotonic() - looked)))
    await anyio.sleep(settle)
    checked, copies = await find_copies(requests, [*ids, experiment_id], source, pace)
    if not 200 <= checked.status < 300:
        return made  # cannot tell now: looked for again before the run's update-run
    winner = min([run_id, *(c.run_id for c in copies)])
    if winner == run_id:
        return made
    # another upload made one too: every party keeps the smallest id, and this run has no
    # data yet (its calls wait for this create-run)
    await pace()
    deleted, _ = await requests.request("runs/delete", {"run_id": run_id})
    if not 200 <= deleted.status < 300:
        return made  # both stay: found again before the run's update-run
    log.info(
        "run %s: another upload made it at the same time: %s kept, %s deleted",
        source,
        winner,
        run_id,
    )
    return dataclasses.replace(answer, code=ALREADY_THERE, run_id=winner)


async def _adopt(
    requests: Requests,
    book: RunBook,
    target: Target,
    fields: Mapping[str, Any],
    source: str,
    found: Copy,
    pace: Pace,
) -> Answer:
    """The run is on the target already: kept where it is (told once per experiment when
    that is not the plan's), renamed if the plan names it otherwise."""
    book.tell_elsewhere(source, found.experiment_id, str(fields["experiment"]))
    wanted = fields.get("run_name")
    answer = Answer(200)
    if wanted and found.run_name is not None and found.run_name != wanted:
        await pace()
        body = {"run_id": found.run_id, "run_name": str(wanted)}
        token = _token(target.token_scope, "rename-run", orjson.dumps(body))
        answer, _ = await requests.request("runs/update", body, token=token)
        if not 200 <= answer.status < 300:
            return _unsent(answer)  # the rename only: found and renamed again on a retry
    return dataclasses.replace(answer, code=ALREADY_THERE, run_id=found.run_id)


async def other_copy(
    requests: Requests, book: RunBook, source: str, run_id: str, pace: Pace
) -> Answer | None:
    """Before a run's update-run on a target without retry tokens: a failure naming both
    copies if another active run carries its source tag (another upload of the same plan
    created it too late to converge at creation), else None (also when it cannot tell)."""
    answer, copies = await find_copies(requests, book.known_ids(), source, pace)
    others = [c.run_id for c in copies if c.run_id != run_id]
    if others and 200 <= answer.status < 300:
        # the other upload deletes its copy once it sees this one (found by review: a copy
        # about to be deleted was named, and a user told to delete one may delete the only)
        await anyio.sleep(SETTLE_MAX)
        answer, copies = await find_copies(requests, book.known_ids(), source, pace)
        others = [c.run_id for c in copies if c.run_id != run_id]
    if not 200 <= answer.status < 300 or not others:
        return None
    return Answer(
        409,
        CONCURRENT,
        f"source run {source} has two copies on the target, {run_id} and {others[0]}: "
        "another upload of the same plan ran at the same time; delete one of them (runs/"
        "delete), then upload again",
        answer.request_id,
    )


def _unsent(answer: Answer) -> Answer:
    """An answer of a create-run attempt whose runs/create never went out: not in doubt."""
    return dataclasses.replace(answer, sent=False)


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
