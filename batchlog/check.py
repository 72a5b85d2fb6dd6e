"""Offline looks at a job: validate manifests, plan an upload (``--dry-run``: the requests
a run would send, from the manifests and the checkpoint alone), and the status of a
checkpoint. No network, no credentials, and never a write."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from batchlog.errors import CheckpointError, ConfigurationError
from batchlog.files import MIB, UnusableFile, check_regular
from batchlog.journal import (
    OTHER_JOB_HINT,
    Counts,
    ResumePoint,
    line_hash,
    manifest_of,
    other_job,
    read_checkpoint,
    record_key,
    record_of,
)
from batchlog.manifest import (
    STDIN,
    Boundary,
    ManifestChanged,
    ManifestReader,
    check_readable,
    display_name,
    read_lines,
)
from batchlog.plan import Call, Grouper, GroupLimits, outline
from batchlog.planorder import PlanOrder
from batchlog.records import Record, Rejection
from batchlog.resolution import resolved_by
from batchlog.target import MlflowTarget, OciTarget, Target, mlflow_target, without_userinfo
from batchlog.validate import parse_line, parse_manifests

log = logging.getLogger("batchlog")

PLANNED_ENDPOINT = "https://planned.invalid"  # a dry run's stand-in: nothing is sent there


@dataclass(frozen=True)
class CheckSummary:
    records: int
    rejected: int
    calls: int  # requests an upload would send (before retries)


def check_manifests(
    manifests: list[str],
    on_rejection: Callable[[Rejection], None],
    grouping: GroupLimits | None = None,
) -> CheckSummary:
    check_readable(manifests)
    target = OciTarget("http://127.0.0.1", "check", "check")
    grouper = Grouper(target, grouping or GroupLimits(), form=outline)  # counted, not sent
    order = PlanOrder()
    planned = PlannedRequests(order)
    records = rejected = calls = 0
    for item in parse_manifests(manifests):
        records += 1
        if isinstance(item, Record):
            item = order.check(item)
        if isinstance(item, Rejection):
            rejected += 1
            on_rejection(item)
            continue
        calls += sum(planned.of(call) for call in grouper.add(item))
    calls += sum(planned.of(call) for call in grouper.flush())
    return CheckSummary(records, rejected, calls)


class PlannedRequests:
    """The HTTP requests a run sends for a call, as far as can be known without the target
    (batchlog.migrate.create_run): one, but a plan's create-run is several. The first of a
    job lists the target's experiments (one page is assumed); each run is looked up by its
    tag; an experiment met for the first time is looked up by name and, when new, created;
    then the run is created. Without retry tokens
    (open-source MLflow) the tag is searched once more after runs/create, and before each
    update-run. An experiment or run already on the target is found, not created, and a
    run is looked up only in the experiments the target has when it comes (none at first
    on an empty target): an estimate, at most one request over per run."""

    def __init__(self, order: PlanOrder, retry_tokens: bool = True) -> None:
        self._order = order  # its repeats of a create-run send nothing
        self._retry_tokens = retry_tokens
        self._listed = False  # the job's experiments/search, counted once
        self._looked_up: set[str] = set()  # experiment names a create-run counted so far
        self._there: set[str] = set()  # experiment names known to be on the target

    def there(self, record: Record) -> None:
        """``record``, a create-run, was done by an earlier run: its experiment exists."""
        if record.op == "create-run" and record.fields:
            self._there.add(str(record.fields["experiment"]))

    def of(self, call: Call) -> int:
        first = call.records[0]
        if not first.source_run:
            return 1
        if call.op == "update-run":
            return 1 if self._retry_tokens else 2  # the copies looked for first
        if call.op != "create-run" or not first.fields:
            return 1
        if first.seq in self._order.repeats:
            return 0
        count = 2 if self._retry_tokens else 3  # runs/search, runs/create (runs/search)
        if not self._listed:
            self._listed = True
            count += 1  # experiments/search
        name = str(first.fields["experiment"])
        if name not in self._looked_up:
            self._looked_up.add(name)
            count += 1 if name in self._there else 2  # get-by-name (experiments/create)
        return count


# ---- planning an upload (--dry-run) -----------------------------------------------------


@dataclass(frozen=True)
class KnownTarget:
    """What a dry run knows of the target without credentials. ``identity``: the whole of
    it (the checkpoint's ``target``), when every part is known; otherwise the parts given
    (None: not given; an OCI endpoint comes from the profile's region, not read)."""

    kind: str  # "oci-aidp" or "mlflow", as identities start
    identity: str | None = None
    site: str | None = None  # OCI: the endpoint (or "emulator")
    platform_id: str | None = None
    workspace: str | None = None

    def matches(self, identity: str) -> bool:
        if self.identity is not None:
            return identity == self.identity
        if not identity.startswith(self.kind + "/"):
            return False
        if self.kind != "oci-aidp":
            return True
        parts = identity[len(self.kind) + 1 :].rsplit("/", 2)  # site/platform/workspace
        given = (self.site, self.platform_id, self.workspace)
        return len(parts) == 3 and all(
            g is None or g == p for g, p in zip(given, parts, strict=True)
        )

    def token_target(self, identity: str) -> Target:
        """A target whose retry tokens are the real run's (tokens name the workspace, or
        the MLflow server): the parts given, the rest from the checkpoint's ``identity``.
        Only those tokens are used, to check calls in doubt; nothing is sent to it."""
        if self.kind == "mlflow":
            try:
                return mlflow_target(identity.removeprefix("mlflow/"))
            except ConfigurationError:
                return MlflowTarget("http://127.0.0.1")
        parts = identity.removeprefix("oci-aidp/").rsplit("/", 2)
        platform, workspace = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
        return OciTarget(
            PLANNED_ENDPOINT,
            self.platform_id or platform or "-",
            self.workspace or workspace or "-",
        )


@dataclass(frozen=True)
class Plan:
    """What ``upload`` would do, as far as the manifests and the checkpoint tell."""

    records: int  # records of the job, those earlier runs finished included
    done: int  # finished by earlier runs (succeeded, failed or rejected)
    to_send: int  # valid records not finished: a run sends them
    invalid: int  # lines a run would reject (not yet rejected by an earlier run)
    requests: int  # requests a run would send, merging included (before retries;
    # a plan's create-run is several: PlannedRequests)
    in_doubt: int  # of those, calls an earlier run sent that may have been applied (no
    # answer, or a 5xx, and no later one said otherwise); one answered 429 only is not
    # records earlier runs failed or rejected (in the dead letter), unless it was fixed and
    # uploaded since (resolution.resolved_by): what a run would exit 1 for
    unsuccessful_before: int
    checkpoint: str  # what a run does with the checkpoint, in words


def plan_upload(
    manifests: list[str],
    checkpoint: str,
    known: KnownTarget,
    target: Target | None,
    grouping: GroupLimits,
    restart: bool,
    on_rejection: Callable[[Rejection], None],
) -> Plan:
    """The requests an upload would send, with the Grouper and the checkpoint as the job
    uses them: records the checkpoint says are done are skipped, calls an earlier run left
    in doubt are formed again as they were. ``target``: the real one when known (else the
    tokens are taken from the checkpoint). Read only: the checkpoint is never changed
    (a torn tail stays for the run to cut off), and no lock is taken.

    Raises CheckpointError (ManifestChanged included) where a run would refuse to start.
    """
    from batchlog.job import calls_to_send, check_done_lines  # not for validate: it is slow

    check_readable(manifests)
    point, said, identity = _resume_point(manifests, checkpoint, known, grouping, restart)
    if target is None:
        target = known.token_target(identity)
    sent = {key: doubt.records for key, doubt in point.doubt.items()}
    grouper = Grouper(target, grouping, sent)
    counts = {"to_send": 0, "invalid": 0, "requests": 0, "in_doubt": 0}
    order = PlanOrder(point.runs)  # the producer's rules, from the same checkpoint
    planned = PlannedRequests(order, target.retry_tokens)

    def count(calls: list[Call]) -> None:
        for call in calls:
            for unfinished in calls_to_send(target, call, point):
                counts["requests"] += planned.of(unfinished)
                counts["in_doubt"] += unfinished.records[0].seq in point.doubt

    for index, path in enumerate(manifests):
        mark = point.marks[index] if index < len(point.marks) else Boundary()
        reader = ManifestReader(path, index, mark, wait=True)
        try:
            try:
                reader.check_prefix()
                check_done_lines(path, index, mark, point.done)
            except ManifestChanged as exc:
                raise ManifestChanged(
                    f"{exc}, according to checkpoint {checkpoint}: use --restart to start "
                    "this job over, or give another --checkpoint for a new job"
                ) from None
            _plan_manifest(
                reader, grouper, (order, planned), point, checkpoint, counts, on_rejection, count
            )
        finally:
            reader.close()
        count(list(grouper.flush()))  # a call never spans two manifests
    c = point.counts
    return Plan(
        records=point.finished + counts["to_send"] + counts["invalid"],
        done=point.finished,
        to_send=counts["to_send"],
        invalid=counts["invalid"],
        requests=counts["requests"],
        in_doubt=counts["in_doubt"],
        unsuccessful_before=0 if _fixed_since(checkpoint, identity, c) else c.failed + c.rejected,
        checkpoint=said,
    )


def _plan_manifest(
    reader: ManifestReader,
    grouper: Grouper,
    plan: tuple[PlanOrder, PlannedRequests],
    point: ResumePoint,
    checkpoint: str,
    counts: dict[str, int],
    on_rejection: Callable[[Rejection], None],
    count: Callable[[list[Call]], None],
) -> None:
    """One manifest, line by line as the job's producer goes through it."""
    from batchlog.job import READ_BATCH

    index, name = reader.index, display_name(reader.path)
    order, planned = plan
    while True:
        lines, boundary = reader.batch(READ_BATCH)
        if not lines and boundary is None and not reader.blocked:
            break
        for line in lines:
            key = record_key(index, line.record)
            source = f"{name}:{line.number}"
            item: Record | Rejection = (
                Rejection(key, source, line.raw, "(line)", line.problem)
                if line.problem
                else parse_line(line.raw, key, source)
            )
            known = point.done.get(key)
            if isinstance(item, Record):  # the plan's order, as the producer checks it
                if known is not None and item.source_run and item.run_id in point.runs:
                    planned.there(item)  # a run made: its experiment is there
                item = order.check(item, known is not None)
            if known is not None:  # finished by an earlier run
                if known != line_hash(line.raw):
                    raise ManifestChanged(
                        f"{name}:{line.number} changed since checkpoint {checkpoint} recorded "
                        "it as done; use --restart to start over"
                    )
            elif isinstance(item, Rejection):
                counts["invalid"] += 1
                on_rejection(item)
            else:
                counts["to_send"] += 1
            if isinstance(item, Record):  # finished ones too: calls are formed as before
                count(list(grouper.add(item)))
    if reader.partial:
        log.warning(
            "%s:%d has no newline and is not a whole JSON document (still being written?): "
            "a run leaves it for the next one",
            name,
            reader.partial,
        )
    gone = [
        k for k in point.done if manifest_of(k) == index and record_of(k) >= reader.records_read
    ]
    if gone:
        raise ManifestChanged(
            f"{name} ends after {reader.records_read:,} records, but an earlier run "
            f"uploaded its record {record_of(max(gone)) + 1:,}: it was cut short since; "
            "use --restart to start over"
        )


def _resume_point(
    manifests: list[str],
    checkpoint: str,
    known: KnownTarget,
    grouping: GroupLimits,
    restart: bool,
) -> tuple[ResumePoint, str, str]:
    """Where a run would start, read only, as the journal opens it: the point, what a run
    does with the checkpoint (in words), and the target the checkpoint names."""
    fresh = ResumePoint(marks=[Boundary() for _ in manifests])
    if restart:
        return fresh, f"{checkpoint} would be started over (--restart): everything is sent", ""
    try:
        empty = not os.path.exists(checkpoint) or os.path.getsize(checkpoint) == 0
    except OSError:
        empty = True
    if empty:
        return fresh, f"{checkpoint} does not exist yet: a new job", ""
    header, point = _read_only(checkpoint)
    identity = without_userinfo(str(header.get("target", "")))
    c = point.counts
    if not known.matches(str(header.get("target", ""))):
        if not (c.succeeded or c.failed or point.doubt):  # as the journal: nothing reached it
            return fresh, f"{checkpoint} names another target and holds nothing: a new job", ""
        raise CheckpointError(
            f"checkpoint {checkpoint} belongs to another target ({identity}); {OTHER_JOB_HINT}"
        )
    wanted = {"max_datasets": grouping.max_datasets, "max_body": grouping.max_body}
    problem = other_job(checkpoint, header, manifests, wanted, point)  # as a run says it
    if problem:
        raise CheckpointError(problem)
    said = f"{checkpoint} (read, not changed): {point.finished:,} records done, for {identity}"
    return point, said, identity


def _fixed_since(checkpoint: str, identity: str, c: Counts) -> bool:
    """Whether the failures of the checkpoint's job were fixed and uploaded from its dead
    letter since, as a run counts them."""
    if not (c.failed or c.rejected) or not identity:
        return False
    named = _read_only(checkpoint)[0].get("dead_letter")
    return isinstance(named, str) and bool(resolved_by(named, identity))


@dataclass(frozen=True)
class Status:
    target: str
    manifests: list[str]
    succeeded: int
    failed: int
    rejected: int
    # records of the manifests as they are now not finished, read by a run or not: what the
    # same upload command goes on with (the report's ``pending`` counts only those a run
    # read); None when the manifests cannot be read again (stdin, missing)
    not_finished: int | None
    runs_total: int | None
    runs_done: int | None  # every record of the run finished and none failed
    runs_failed: int | None  # some record of the run failed or was rejected
    runs_not_finished: int | None  # some record of the run not finished, none failed
    last_write: float | None
    changed: bool  # a finished line's content differs from what the checkpoint recorded
    # the checkpoint showing the dead letter fixed and uploaded in full, its own upload's
    # (its runs are then done, not with failures): resolution.resolved_by; "" when not
    resolved_by: str = ""
    dead_letter: str = ""  # the dead letter read (the one the checkpoint names, or given)


def checkpoint_status(path: str, dead_letter: str | None = None) -> Status:
    """Read the checkpoint's header and tail, then stream the manifests once (runs, records
    not finished).

    A run counts as done only when every record of it finished and none is in the dead
    letter (the one the checkpoint names, unless ``dead_letter`` is given), or the dead
    letter was fixed and uploaded in full since (``resolved_by``). Read only: the
    checkpoint is never changed. A file that is no checkpoint is a ConfigurationError.
    """
    header, point = _read_only(path)
    # shown without credentials: earlier versions kept a tracking URI's user:password@
    target = without_userinfo(str(header.get("target", "")))
    manifests = [str(m) for m in header.get("manifests", [])]
    c = point.counts
    if any(m == STDIN for m in manifests) or not all(_readable_again(m) for m in manifests):
        return Status(
            target,
            manifests,
            c.succeeded,
            c.failed,
            c.rejected,
            None,
            None,
            None,
            None,
            None,
            point.last_write,
            False,
        )
    named = header.get("dead_letter")
    dead_letter = dead_letter or (named if isinstance(named, str) else None)
    resolved = resolved_by(dead_letter, str(header.get("target", ""))) if dead_letter else []
    failed_runs = _dead_letter_runs(dead_letter) if dead_letter and not resolved else set()
    runs: set[str] = set()
    open_runs: set[str] = set()
    not_finished = 0
    changed = False
    for index, m in enumerate(manifests):
        below = point.marks[index].records if index < len(point.marks) else 0
        for line in read_lines(m, index):
            run = _run_id(line.raw)
            if run is not None:
                runs.add(run)
            key = record_key(index, line.record)
            done = line.record < below
            if not done and key in point.done:
                done = True
                changed |= point.done[key] != line_hash(line.raw)
            if not done:
                not_finished += 1
                if run is not None:
                    open_runs.add(run)
    runs_failed = len(failed_runs & runs)
    runs_not_finished = len(open_runs - failed_runs)
    return Status(
        target,
        manifests,
        c.succeeded,
        c.failed,
        c.rejected,
        not_finished,
        len(runs),
        len(runs) - runs_failed - runs_not_finished,
        runs_failed,
        runs_not_finished,
        point.last_write,
        changed,
        resolved[0] if resolved else "",
        dead_letter or "",
    )


_HEADER_LIMIT = 8 * MIB  # a checkpoint's first line is far shorter


def _read_only(path: str) -> tuple[dict[str, Any], ResumePoint]:
    """The checkpoint's header and state, or a ConfigurationError naming what ``path`` is
    instead (a directory, a FIFO, a foreign file), without changing it."""
    try:
        size = check_regular(path).st_size  # a FIFO would wait for a writer forever
        with open(path, "rb") as f:
            head = f.read(_HEADER_LIMIT)
    except UnusableFile as exc:
        raise ConfigurationError(f"checkpoint {path}: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"checkpoint {path}: cannot be read ({exc.strerror})") from None
    if size > _HEADER_LIMIT and b"\n" not in head:  # one huge line: never read whole
        raise ConfigurationError(f"{path} is not a batchlog checkpoint")
    try:
        return read_checkpoint(path, repair=False)
    except CheckpointError as exc:  # not a checkpoint this version reads: a usage error
        raise ConfigurationError(str(exc)) from None
    except OSError as exc:
        raise ConfigurationError(f"checkpoint {path}: cannot be read ({exc.strerror})") from None


def _readable_again(path: str) -> bool:
    """Whether a manifest can be read again: a regular file (a FIFO would wait for a writer,
    a device might never end)."""
    try:
        check_regular(path)
        with open(path, "rb"):
            return True
    except (UnusableFile, OSError):
        return False


def _run_id(raw: bytes) -> str | None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    run = doc.get("run_id") if isinstance(doc, dict) else None
    return run if isinstance(run, str) else None


def _dead_letter_runs(path: str) -> set[str]:
    runs: set[str] = set()
    try:
        check_regular(path)  # read only if it is a file: not a FIFO, a device
        with open(path, "rb") as f:
            for raw in f:
                run = _run_id(raw)
                if run is not None:
                    runs.add(run)
    except (UnusableFile, OSError):
        pass
    return runs
