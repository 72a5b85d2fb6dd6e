"""Verify a migration plan against its target, run by run, field by field.

Every source run of the plan (its create-run line) must be on the target exactly once: the
run carrying the tag ``batchlog.source_run_id`` = its source id in the experiment the plan
names, found as the upload finds it. That run must have the plan's run name, start time,
user (the ``mlflow.user`` tag), parent (``mlflow.parentRunId`` = the target run of the
parent's source run), status and end time, every param (and no other), every tag of the
plan (extra ``mlflow.*`` tags are the server's own), every metric point once (histories
compared as sets of (key, step, timestamp, value): NaN equals NaN, and MLflow's SQL store
keeps infinities as +/-1.7976931348623157e308), every dataset (name, digest) and every
model once (``transport.model_identity``, its run_id rewritten to the target run).

A run is compared once its update-run line is read (export writes a run's lines together,
update-run last) or at the end of the plan: only the runs still open are held in memory.
Hand-written log-batch and update-run lines (a target ``run_id``) are checked alone: their
params, tags, points, status are on that run.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from batchlog.errors import SystemicError
from batchlog.migrate import PARENT_TAG, SOURCE_TAG
from batchlog.planorder import NO_CREATE_RUN, PlanOrder
from batchlog.records import Record, Rejection
from batchlog.retry import RetryPolicy
from batchlog.transport import Transport
from batchlog.verify_compare import (
    Difference,
    PlanRun,
    Point,
    compare_metric,
    compare_run,
    metric_keys,
    metric_lines,
    run_tags,
    target_point,
)

SHOWN = 10  # differences listed per run; the others are counted
HISTORY_PAGE = 25_000  # points per get-history page (MLflow's own client asks for as many)
SEARCH_PAGE = 100  # runs per runs/search page, when looking for a run's copies
MAX_PAGES = 100_000  # a bound on any paged read: a server that pages for ever is wrong
REMEMBERED = 100_000  # closed runs remembered (source -> experiment), for late lines
NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"


class TargetUnreadable(SystemicError):
    """The target could not be read: no proof either way, verify stops (exit 3)."""


# ---- reading the target ----------------------------------------------------------------------


class Reader:
    """Reads of the target through the upload's transport, retried as uploads are (429,
    5xx, no answer); anything else that is not the answer stops the verification."""

    def __init__(
        self, transport: Transport, policy: RetryPolicy, rng: random.Random | None = None
    ) -> None:
        self._transport = transport
        self._policy = policy
        self._rng = rng or random.Random()
        target = transport.target
        self.where = target.where

    async def call(
        self,
        what: str,
        rel: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        absent_404: bool = False,
    ) -> dict[str, Any] | None:
        """The JSON object answered (a GET with ``query``, or a POST of ``body``); None when
        the server says it does not exist (404 RESOURCE_DOES_NOT_EXIST, or any 404 with
        ``absent_404``)."""
        for attempt in range(1, self._policy.max_attempts + 1):
            answer, doc = await self._transport.request(
                rel, body, query=query, large=body is not None
            )
            verdict = self._policy.verdict(answer)
            if verdict == "ok":
                if not isinstance(doc, dict):
                    raise self._unreadable(what, "the answer is not a JSON object")
                return doc
            if answer.status == 404 and (answer.code == NOT_FOUND or absent_404):
                return None
            if verdict != "retry" or attempt == self._policy.max_attempts:
                said = f"{answer.status} {answer.code}: {answer.message}".strip(": ")
                if not answer.status:
                    said = answer.message or answer.code
                systemic = verdict in ("unauthorized", "redirect") or answer.status in (403, 404)
                if systemic and answer.status:  # 0 with NotTheApi: an answer too large
                    said += f" ({self._transport.target.systemic_hint(answer.status)})"
                rid = f" (opc-request-id {answer.request_id})" if answer.request_id else ""
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise self._unreadable(what, f"{said}{rid}{tries}")
            await anyio.sleep(self._policy.delay(attempt, answer, self._rng))
        raise AssertionError("unreachable")  # pragma: no cover

    def _unreadable(self, what: str, why: str) -> TargetUnreadable:
        return TargetUnreadable(
            f"cannot read runs back from {self.where}: {what}: {why}; verify stopped "
            "(exit 3): fix the cause and run verify again"
        )

    async def experiment_id(self, name: str) -> tuple[str | None, str]:
        """(id, why not): the active experiment called ``name``."""
        doc = await self.call(
            f"experiment {name!r}", "experiments/get-by-name", query={"experiment_name": name}
        )
        experiment = doc.get("experiment") if doc else None
        if doc is None or not isinstance(experiment, dict):
            return None, f"there is no experiment {name!r} on the target"
        if experiment.get("lifecycle_stage", "active") != "active":
            return None, f"experiment {name!r} is deleted on the target"
        found = experiment.get("experiment_id")
        if not isinstance(found, str) or not found:
            raise self._unreadable(f"experiment {name!r}", "answered without an experiment_id")
        return found, ""

    async def experiment_ids(self) -> list[str]:
        """The ids of every active experiment (experiments/search, all pages)."""
        body: dict[str, Any] = {"max_results": 1000, "view_type": "ACTIVE_ONLY"}
        what = "the experiments"
        ids: list[str] = []
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = await self.call(what, "experiments/search", body) or {}
            experiments = doc.get("experiments", [])
            if not isinstance(experiments, list):
                raise self._unreadable(what, "experiments/search gave no list of experiments")
            for experiment in experiments:
                eid = experiment.get("experiment_id") if isinstance(experiment, dict) else None
                if not isinstance(eid, str) or not eid:
                    raise self._unreadable(what, "experiments/search gave no experiment_id")
                ids.append(eid)
            token = self._next(doc, bool(experiments), seen, what)
            if not token:
                return ids
            body = {**body, "page_token": token}
        raise self._unreadable(what, f"more than {MAX_PAGES:,} pages")

    async def runs_of(self, experiment_id: str | list[str], source: str) -> list[str]:
        """The ids of the active runs carrying ``batchlog.source_run_id = source`` in the
        experiment (or experiments: at most 100 per search)."""
        wanted = [experiment_id] if isinstance(experiment_id, str) else experiment_id
        ids: list[str] = []
        for i in range(0, len(wanted), 100):
            for run_id in await self._runs_in(wanted[i : i + 100], source):
                if run_id not in ids:
                    ids.append(run_id)
        return ids

    async def _runs_in(self, experiment_ids: list[str], source: str) -> list[str]:
        quoted = source.replace("\\", "\\\\").replace("'", "\\'")
        body: dict[str, Any] = {
            "experiment_ids": experiment_ids,
            "filter": f"tags.`{SOURCE_TAG}` = '{quoted}'",
            "max_results": SEARCH_PAGE,
            "run_view_type": "ACTIVE_ONLY",
        }
        what = f"the runs of source run {source}"
        ids: list[str] = []
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = await self.call(what, "runs/search", body) or {}
            runs = doc.get("runs", [])
            if not isinstance(runs, list):
                raise self._unreadable(what, "runs/search gave no list of runs")
            for run in runs:
                info = run.get("info") if isinstance(run, dict) else None
                run_id = info.get("run_id") if isinstance(info, dict) else None
                if not isinstance(run_id, str) or not run_id:
                    raise self._unreadable(what, "runs/search gave a run without a run_id")
                if run_id not in ids:
                    ids.append(run_id)
            token = self._next(doc, bool(runs), seen, what)
            if not token:
                return ids
            body = {**body, "page_token": token}
        raise self._unreadable(what, f"more than {MAX_PAGES:,} pages")

    async def run(self, run_id: str, absent_404: bool = False) -> dict[str, Any] | None:
        doc = await self.call(
            f"run {run_id}", "runs/get", query={"run_id": run_id}, absent_404=absent_404
        )
        if doc is None:
            return None
        run = doc.get("run")
        if not isinstance(run, dict):
            raise self._unreadable(f"run {run_id}", "200 without a run in it: not the API")
        return run

    async def history(self, run_id: str, key: str) -> Counter[Point]:
        """Every point of one metric of a run (all pages: always with max_results)."""
        what = f"metric {key!r} of run {run_id}"
        query = {"run_id": run_id, "metric_key": key, "max_results": str(HISTORY_PAGE)}
        points: Counter[Point] = Counter()
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = await self.call(what, "metrics/get-history", query=query)
            if doc is None:
                raise self._unreadable(what, "the run no longer exists")
            page = doc.get("metrics", [])
            if not isinstance(page, list):
                raise self._unreadable(what, "metrics that are not a list")
            for item in page:
                point = target_point(item)
                if point is None:
                    raise self._unreadable(what, "a metric point that is not MLflow's")
                points[point] += 1
            token = self._next(doc, bool(page), seen, what)
            if not token:
                return points
            query["page_token"] = token
        raise self._unreadable(what, f"more than {MAX_PAGES:,} pages")

    def _next(self, doc: dict[str, Any], items: bool, seen: set[str], what: str) -> str:
        """The next page token ("" at the end); one that comes back, or an empty page with a
        token (MLflow 3.4 until mlflow#23916), would page for ever."""
        token = doc.get("next_page_token") or ""
        if not token:
            return ""
        if not isinstance(token, str) or token in seen or not items:
            raise self._unreadable(
                what, "the target answered a page token that does not move: paging would not end"
            )
        seen.add(token)
        return token


# ---- the runs of a plan, checked as they close -----------------------------------------------


@dataclass
class PlanTally:
    """What the plan's runs came to."""

    records: int = 0
    complete: int = 0  # records of runs found once with no difference on their line
    runs: int = 0  # whole runs (a create-run) checked
    as_planned: int = 0
    missing: int = 0
    copies: int = 0
    different: int = 0
    lines: list[tuple[int, int, str]] = field(default_factory=list)  # (seq, n, line)


class PlanVerifier:
    """Takes a plan's records in order; checks each run once it closes, ``concurrency``
    runs at a time (the reading waits for a free slot: only open runs are held)."""

    def __init__(
        self,
        reader: Reader,
        status_as: Callable[[str], str],
        concurrency: int,
        task_group: TaskGroup,
    ) -> None:
        self._reader = reader
        self._status_as = status_as  # a status as the target keeps it
        self._tg = task_group
        self._slots = anyio.Semaphore(concurrency)
        self._open: dict[str, PlanRun] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()  # source -> experiment
        self._experiments: dict[str, tuple[str | None, str]] = {}
        self._all_experiments: list[str] | None = None  # every active one, listed once
        self._parents: OrderedDict[str, str | None] = OrderedDict()  # target -> its source
        self._order = PlanOrder()
        self.tally = PlanTally()
        self.problem: TargetUnreadable | None = None

    async def add(self, record: Record) -> None:
        self.tally.records += 1
        if not record.source_run:  # a hand-written line naming its target run: alone
            alone = PlanRun(record.run_id, record.seq, target=record.run_id)
            alone.add(record)
            await self._close(alone)
            return
        checked = self._order.check(record)  # the upload's order rules, the same words
        if isinstance(checked, Rejection):
            self._plan_error(record, checked.reason)
            return
        source = record.run_id
        run: PlanRun | None = self._open.get(source)
        if record.op == "create-run" and run is None:  # (or one repeating a run's first)
            experiment = str((record.fields or {})["experiment"])
            self._open[source] = run = PlanRun(source, record.seq, experiment=experiment)
        elif run is None:  # a line after the run's update-run
            closed = self._closed.get(source)
            if closed is None:
                self._plan_error(record, NO_CREATE_RUN)
                return
            # a line after the run's update-run: checked with whatever else comes late
            self._open[source] = run = PlanRun(source, record.seq, experiment=closed)
        run.add(record)
        if record.op == "update-run":
            del self._open[source]
            await self._close(run)

    async def finish(self) -> None:
        """The plan is read: check the runs left open (no update-run line)."""
        for run in list(self._open.values()):
            await self._close(run)
        self._open.clear()

    def _plan_error(self, record: Record, why: str) -> None:
        self.tally.lines.append((record.seq, 0, f"{record.source}: run {record.run_id}: {why}"))

    async def _close(self, run: PlanRun) -> None:
        if run.experiment is not None:
            self._closed[run.source] = run.experiment
            self._closed.move_to_end(run.source)
            if len(self._closed) > REMEMBERED:
                self._closed.popitem(last=False)
        await self._slots.acquire()
        self._tg.start_soon(self._check_one, run)

    async def _check_one(self, run: PlanRun) -> None:
        try:
            await self._check(run)
        except TargetUnreadable as exc:
            if self.problem is None:
                self.problem = exc
            self._tg.cancel_scope.cancel()
        finally:
            self._slots.release()

    async def _check(self, plan: PlanRun) -> None:
        whole = plan.create is not None
        if whole:
            self.tally.runs += 1
        target = plan.target
        if target is None:
            assert plan.experiment is not None
            found = await self._find(plan)
            if found is None:
                return
            target = found
        run = await self._reader.run(target, absent_404=plan.target is not None)
        if run is None:
            self._report(plan, None, [(plan.seq, f"run {target} not found on the target")])
            self.tally.missing += whole
            return
        diffs = list(plan.early)
        diffs += compare_run(plan, run, target, self._status_as)
        if whole:
            diffs += await self._parent(plan, run)
        latest = metric_keys(run)
        charged: set[int] = set()  # lines with points not on the target, listed once per key
        for key, planned in plan.metrics.items():
            got = await self._reader.history(target, key) if key in latest else Counter()
            diffs += compare_metric(key, planned, got, whole, plan.seq)
            charged |= metric_lines(planned, got)
        self._report(plan, target, diffs, charged)
        if whole:
            if diffs:
                self.tally.different += 1
            else:
                self.tally.as_planned += 1

    async def _find(self, plan: PlanRun) -> str | None:
        """The one target run of a whole run's source, or None (reported)."""
        name = plan.experiment or ""
        if name not in self._experiments:
            if len(self._experiments) > REMEMBERED:
                self._experiments.clear()
            self._experiments[name] = await self._reader.experiment_id(name)
        experiment_id, why = self._experiments[name]
        ids = await self._reader.runs_of(experiment_id, plan.source) if experiment_id else []
        if not ids:  # source run ids are unique: a run kept in an experiment renamed since
            if self._all_experiments is None:
                self._all_experiments = await self._reader.experiment_ids()
            ids = await self._reader.runs_of(self._all_experiments, plan.source)
        if len(ids) == 1:
            return ids[0]
        if not ids:
            why = why or f"no run in experiment {name!r} carries {SOURCE_TAG} = {plan.source}"
            self._report(plan, None, [(plan.seq, f"missing: {why}")])
            self.tally.missing += plan.create is not None
        else:
            shown = ", ".join(ids[:SHOWN]) + (", ..." if len(ids) > SHOWN else "")
            said = f"{len(ids)} copies on the target, in experiment {name!r}: {shown}"
            self._report(plan, None, [(plan.seq, said)])
            self.tally.copies += plan.create is not None
        return None

    async def _parent(self, plan: PlanRun, run: dict[str, Any]) -> list[Difference]:
        """mlflow.parentRunId: the target run of the plan's parent (read back: the parent's
        check may still be under way), or none when the plan names no parent."""
        assert plan.create is not None
        want = plan.create.get("parent_source_run_id")
        got = run_tags(run).get(PARENT_TAG)
        if want is None:
            if got is None:
                return []
            return [(plan.seq, f"parent: the target has {PARENT_TAG} {got}, the plan none")]
        if got is None:
            return [(plan.seq, f"parent: no {PARENT_TAG} on the target (the plan's is {want})")]
        if got not in self._parents:
            parent = await self._reader.run(str(got), absent_404=True)
            tags = run_tags(parent) if parent else {}
            self._parents[got] = tags.get(SOURCE_TAG) if parent else None
            if len(self._parents) > REMEMBERED:
                self._parents.popitem(last=False)
        source = self._parents[got]
        if source == want:
            return []
        said = "is not on the target" if source is None else f"is the copy of {source}"
        return [(plan.seq, f"parent: {PARENT_TAG} is {got}, which {said}, not of {want}")]

    def _report(
        self,
        plan: PlanRun,
        target: str | None,
        diffs: list[Difference],
        charged: set[int] | None = None,
    ) -> None:
        """The run's first SHOWN differences, in plan order, then how many more. Every line
        with a difference counts as missing or different: those ``diffs`` name and those
        ``charged`` (a metric's points spread over many lines, listed once)."""
        records = len(plan.lines)
        wrong = len(({seq for seq, _ in diffs} | (charged or set())) & plan.lines.keys())
        if target is None:  # missing or copied: none of its lines is on the target
            wrong = records
        self.tally.complete += records - wrong
        if not diffs:
            return
        diffs.sort(key=lambda d: d[0])
        name = f"run {plan.source}" + (
            f" (target {target})" if target and target != plan.source else ""
        )
        for n, (seq, text) in enumerate(diffs[:SHOWN]):
            where = plan.lines.get(seq, plan.lines[plan.seq])
            self.tally.lines.append((seq, n, f"{where}: {name}: {text}"))
        if len(diffs) > SHOWN:
            seq = diffs[SHOWN - 1][0]
            where = plan.lines.get(seq, plan.lines[plan.seq])
            more = len(diffs) - SHOWN
            self.tally.lines.append(
                (seq, SHOWN, f"{where}: {name}: and {more:,} more difference{'s' * (more > 1)}")
            )
