"""``batchlog export``: a source MLflow server's runs as a migration plan (JSON Lines).

What is read (``source.Source``): the experiments (``--experiment``, else every active one,
oldest first), their active runs (runs/search, every page, by start time then run id), and
for each run runs/get (params, tags, inputs, outputs), every point of every metric
(metrics/get-history, every page) and its logged models (logged-models/{id}). What is
written, per run, in this order (the plan format: the lines name the run by its source
id): ``create-run``, ``log-batch`` lines (params, metrics, tags, split under MLflow's
log-batch limits), one ``log-inputs`` line per dataset, one ``log-model`` line per model,
``update-run`` (status, end time).

Order and memory: experiments one after another; an experiment's runs are first listed
(ids, start times and parents only), then read ``concurrency`` at a time and written in
order, parents before their children, each run's lines together. A run's lines are
spooled (in memory up to 1 MiB, then on disk) until its turn comes: at most
``concurrency`` runs are held, whatever their size.

The count: after writing an experiment's runs, its runs are listed again; every run listed
then (but those started or ended since the export began, which the next sync takes) must
be in the plan, and every run of the plan still listed. A difference is an
``ExportMismatch`` (exit 3; the plan is not put in place).
"""

from __future__ import annotations

import fcntl
import gzip
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, BinaryIO, Protocol, cast

import anyio
import orjson

from batchlog.durable import close_quietly, sync_directory
from batchlog.errors import ConfigurationError, SystemicError
from batchlog.limits import RUN_ID_PATTERN
from batchlog.source import HISTORY_PAGE, SEARCH_PAGE, Source, SourceError

log = logging.getLogger("batchlog")

STDOUT = "-"
# MLflow's log-batch limits (mlflow/utils/validation.py), the plan's rules (plan-spec)
MAX_PARAMS = 100
MAX_TAGS = 100
MAX_METRICS = 1_000
MAX_ENTRIES = 1_000
MAX_LINE_BYTES = 1_000_000
MAX_PARAM_VALUE = 6_000
MAX_TAG_VALUE = 8_000
MAX_KEY = 250
SPOOL_IN_MEMORY = 1 << 20  # bytes of one run's lines held in memory before going to disk
# tags the plan carries elsewhere (create-run's fields, log-model lines) or that batchlog
# sets itself on the target: never in a log-batch line
PARENT_TAG = "mlflow.parentRunId"
HISTORY_TAG = "mlflow.log-model.history"
SOURCE_TAG = "batchlog.source_run_id"
RUN_NAME_TAG = "mlflow.runName"
USER_TAG = "mlflow.user"
NOT_TAGS = frozenset({PARENT_TAG, HISTORY_TAG, SOURCE_TAG, RUN_NAME_TAG, USER_TAG})
STATUSES = frozenset({"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED", "INTERNAL_ERROR"})
NON_FINITE = frozenset({"NaN", "Infinity", "-Infinity"})
DATASET_FIELDS = ("name", "digest", "source_type", "source", "schema", "profile")


class Sink(Protocol):
    """Where plan lines go: a binary file, gzip, stdout's buffer."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...


# ---- what to export ------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """Which runs: ``experiments`` (names or ids; none: every active experiment) or
    ``run_ids`` (not both), and ``since`` (ms: runs that started or ended at or after it)."""

    experiments: tuple[str, ...] = ()
    run_ids: tuple[str, ...] = ()
    since: int | None = None

    def __post_init__(self) -> None:
        if self.run_ids and (self.experiments or self.since is not None):
            raise ConfigurationError(
                "--run-id/--run-ids name the runs: give them without --experiment and --since"
            )


def parse_since(text: str) -> int:
    """``--since``: epoch milliseconds (digits), or an ISO-8601 date or time (UTC unless it
    says otherwise): as milliseconds since the epoch."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            f"--since {text[:40]!r}: expected an ISO-8601 time (2024-05-01, "
            "2024-05-01T02:30:00+02:00; UTC when no offset) or epoch milliseconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0, int(when.timestamp() * 1000))


def read_run_ids(path: str, text: str) -> list[str]:
    """The run ids of a ``--run-ids`` file's ``text``: one a line; blank lines and lines
    starting with '#' skipped. An id MLflow could not have made is a ConfigurationError
    naming its line."""
    ids: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        check_run_id(word, f"--run-ids {path}:{number}")
        ids.append(word)
    return ids


def check_run_id(run_id: str, where: str = "--run-id") -> None:
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise ConfigurationError(f"{where}: {run_id[:40]!r} is not a run id")


# ---- the report ---------------------------------------------------------------------------


@dataclass
class ExperimentCount:
    """One experiment's runs: what the plan holds, what the source lists."""

    experiment_id: str
    name: str
    exported: int = 0  # its runs in the plan (create-run lines)
    listed: int = 0  # its runs the source lists for the selection, counted after writing
    parents_added: int = 0  # its runs outside the selection, exported as parents of others
    missing: list[str] = field(default_factory=list)  # listed by the source, not exported
    gone: list[str] = field(default_factory=list)  # exported, no longer listed

    @property
    def source(self) -> int:
        """The source's count: the runs it lists for the selection, and the parents."""
        return self.listed + self.parents_added

    @property
    def matches(self) -> bool:
        return self.exported == self.source and not self.missing and not self.gone


@dataclass
class ExportProgress:
    experiment: str  # the experiment being exported
    experiment_runs: int  # its runs listed
    experiment_done: int  # of those, written
    runs: int  # runs written in all
    experiments_done: int
    experiments: int
    requests: int
    retries: int
    throttled: int
    rate: float
    elapsed_s: float


@dataclass
class ExportReport:
    experiments: list[ExperimentCount] = field(default_factory=list)
    runs: int = 0
    lines: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    elapsed_s: float = 0.0

    @property
    def mismatched(self) -> list[ExperimentCount]:
        return [c for c in self.experiments if not c.matches]


class ExportMismatch(SystemicError):
    """The runs exported are not the runs the source lists (exit 3: the plan is not put in
    place). ``report`` has the counts."""

    def __init__(self, message: str, report: ExportReport) -> None:
        super().__init__(message)
        self.report = report


# ---- the plan file --------------------------------------------------------------------------


class PlanFile:
    """Where the plan goes: ``-`` (``stdout``, streamed), or a file written beside its final
    name (``.NAME.partial``, locked: one export per output) and renamed into place by
    ``commit`` once whole and fsync'ed; a name ending ``.gz`` is gzip (reproducible: no
    name, no time in its header). A symbolic link's target is what is replaced; a FIFO or
    a device (``/dev/null``) is written as it is, never renamed over."""

    def __init__(self, path: str, stdout: BinaryIO) -> None:
        self.path = path
        self._raw: BinaryIO | None = None
        self._gzip: gzip.GzipFile | None = None
        self._partial = ""  # "": written in place (stdout, a FIFO, a device)
        if path == STDOUT:
            self.stream: Sink = stdout
            return
        self._final = os.path.realpath(path)
        if os.path.isdir(self._final):
            raise ConfigurationError(f"-o {path}: is a directory")
        directory, name = os.path.split(self._final)
        if not os.path.isdir(directory):
            raise ConfigurationError(f"-o {path}: no such directory {directory}")
        if os.path.exists(self._final) and not os.path.isfile(self._final):
            raw = _open(self._final, "wb", path)
        else:
            self._partial = os.path.join(directory, f".{name}.partial")
            raw = _open(self._partial, "ab", path)
            try:
                fcntl.flock(raw.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raw.close()
                raise ConfigurationError(
                    f"-o {path}: another batchlog export is writing it ({self._partial})"
                ) from None
            raw.truncate(0)  # what a killed export left
        self._raw = raw
        self.stream = raw
        if path.endswith(".gz"):
            self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
            self.stream = self._gzip

    def commit(self) -> None:
        """The whole plan under its final name (durable: fsync'ed, directory included)."""
        if self._raw is None:
            self.stream.flush()
            return
        if self._gzip is not None:
            self._gzip.close()
        self._raw.flush()
        if self._partial:
            os.fsync(self._raw.fileno())
            os.replace(self._partial, self._final)  # still locked: no other export writes
        self._raw.close()
        self._raw = None
        if self._partial:
            sync_directory(os.path.dirname(self._partial))

    def abort(self) -> None:
        """No plan: the partial file goes (a plan already at the final name is kept)."""
        if self._raw is None:
            return
        if self._gzip is not None:
            try:
                self._gzip.close()
            except OSError:
                pass
        if self._partial:
            try:
                os.unlink(self._partial)
            except OSError:
                pass
        close_quietly(self._raw)
        self._raw = None


def _open(path: str, mode: str, shown: str) -> BinaryIO:
    try:
        return cast(BinaryIO, open(path, mode))  # closed by commit or abort
    except OSError as exc:
        raise ConfigurationError(f"-o {shown}: cannot write {path}: {exc.strerror}") from None


# ---- the export -------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """A run listed for export: only what ordering and counting need."""

    experiment_id: str
    start: int
    end: int | None
    parent: str | None  # the source id of its parent run (mlflow.parentRunId)
    added: bool = False  # a parent outside the selection, pulled in


@dataclass
class _Slot:
    run_id: str
    done: anyio.Event = field(default_factory=anyio.Event)
    spool: IO[bytes] | None = None
    lines: int = 0
    error: Exception | None = None


class Exporter:
    """One export: reads through ``source``, writes plan lines to ``out``.

    Nested runs: a run's parent must be created before it. A parent outside the selection
    (not matching ``--since``, not named by ``--run-id``, or in another experiment: MLflow's
    fluent API puts a nested run in the active experiment, whatever its parent's) is
    exported too, once, just before its first child, in its own experiment (counted there
    as a parent added). A parent that does not exist or is deleted is left out, and the
    child exported without it, with a warning.
    """

    def __init__(
        self,
        source: Source,
        out: Sink,
        *,
        concurrency: int = 16,
        on_progress: Callable[[ExportProgress], None] | None = None,
        history_page: int = HISTORY_PAGE,
        search_page: int = SEARCH_PAGE,
    ) -> None:
        self._source = source
        self._out = out
        self._window = max(1, concurrency)
        self._on_progress = on_progress
        self._history_page = history_page
        self._search_page = search_page
        self._started = time.monotonic()
        self._started_ms = int(time.time() * 1000)  # runs started or ended since: next sync
        self.report = ExportReport()
        self._counts: dict[str, ExperimentCount] = {}  # by experiment id, in report order
        self._names: dict[str, str] = {}  # experiment id -> name
        self._pulled: dict[str, str] = {}  # parents written before their experiment's turn
        self._done: set[str] = set()  # experiments whose turn is over
        self._selection = Selection()
        self._run_ids: frozenset[str] = frozenset()
        self._model_inputs = 0  # runs with MLflow 3 model inputs (not carried)
        self._experiments = 0  # experiments selected
        self._current = ""  # the experiment whose turn it is
        self._turn_runs = self._turn_done = 0

    async def run(self, selection: Selection) -> ExportReport:
        """Export the selection; the report, or ExportMismatch / SourceError / ..."""
        self._selection = selection
        if selection.run_ids:
            await self._by_run_ids(selection.run_ids)
        else:
            experiments = await self._experiments_of(selection.experiments)
            self._experiments = len(experiments)
            for experiment_id, name in experiments:
                self._names[experiment_id] = name
                await self._experiment(experiment_id, selection.since)
        if self._model_inputs:
            log.warning(
                "%d runs have logged models as inputs (MLflow 3 model inputs): not carried "
                "by the plan",
                self._model_inputs,
            )
        r = self.report
        r.experiments = list(self._counts.values())
        counts = self._source.counts
        r.requests, r.retries, r.throttled = counts.requests, counts.retries, counts.throttled
        r.elapsed_s = time.monotonic() - self._started
        if r.mismatched:
            raise ExportMismatch(_mismatch_message(r.mismatched), r)
        return r

    # ---- selecting -----------------------------------------------------------------------

    async def _experiments_of(self, wanted: Iterable[str]) -> list[tuple[str, str]]:
        """(id, name) of the experiments to export, in order, each once."""
        found: dict[str, str] = {}
        wanted = list(wanted)
        if not wanted:
            async for experiment in self._source.experiments():
                found.setdefault(str(experiment.get("experiment_id")), _name(experiment))
            return list(found.items())
        for word in wanted:
            named = await self._source.experiment_by_name(word)
            named = named or await self._source.experiment_by_id(word)
            if named is None:
                raise ConfigurationError(
                    f"--experiment {word!r}: no experiment of that name or id on {self._source.uri}"
                )
            if named.get("lifecycle_stage", "active") != "active":
                raise ConfigurationError(
                    f"--experiment {word!r}: the experiment is deleted on {self._source.uri} "
                    "(restore it to export it)"
                )
            found.setdefault(str(named.get("experiment_id")), _name(named))
        return list(found.items())

    async def _experiment(self, experiment_id: str, since: int | None) -> None:
        """One experiment's turn: list, write, list again and count."""
        count = await self._count(experiment_id)
        listed: dict[str, _Entry] = {}
        for filter_ in _filters(since):
            async for run in self._source.runs(experiment_id, filter_, self._search_page):
                run_id, entry = _entry(run)
                listed.setdefault(run_id, entry)  # a run in both searches, or paged twice
        selected = set(listed)
        await self._turn(experiment_id, listed)
        now: dict[str, _Entry] = {}
        for filter_ in _filters(since):
            async for run in self._source.runs(experiment_id, filter_, self._search_page):
                run_id, entry = _entry(run)
                now.setdefault(run_id, entry)
        # started or ended since the export began: the next sync's, not a missing run
        recent = {rid for rid, e in now.items() if self._is_recent(e) and rid not in selected}
        count.listed = len(now) - len(recent)
        count.missing = sorted(set(now) - recent - selected)
        count.gone = sorted(selected - set(now))

    def _is_recent(self, entry: _Entry) -> bool:
        return entry.start >= self._started_ms or (entry.end or 0) >= self._started_ms

    async def _by_run_ids(self, run_ids: tuple[str, ...]) -> None:
        """The runs named, by experiment (in the order their first run was named)."""
        entries: dict[str, _Entry] = {}

        async def look(run_id: str) -> None:
            run = await self._source.run(run_id)
            if run is None:
                raise ConfigurationError(f"--run-id {run_id}: no such run on {self._source.uri}")
            if _info(run).get("lifecycle_stage", "active") != "active":
                raise ConfigurationError(
                    f"--run-id {run_id}: the run is deleted on {self._source.uri}"
                )
            entries[run_id] = _entry(run)[1]

        unique = list(dict.fromkeys(run_ids))
        self._run_ids = frozenset(unique)
        await _gather(look, unique, self._window)
        groups: dict[str, dict[str, _Entry]] = {}
        for run_id in unique:
            entry = entries[run_id]
            groups.setdefault(entry.experiment_id, {})[run_id] = entry
        self._experiments = len(groups)
        for experiment_id, listed in groups.items():
            count = await self._count(experiment_id)
            count.listed = len(listed)
            await self._turn(experiment_id, listed)

    async def _count(self, experiment_id: str) -> ExperimentCount:
        """The count of an experiment, made (and its name read) the first time."""
        count = self._counts.get(experiment_id)
        if count is None:
            name = self._names.get(experiment_id)
            if name is None:
                experiment = await self._source.experiment_by_id(experiment_id)
                if experiment is None:
                    raise SourceError(f"experiment {experiment_id} of a run: does not exist")
                name = self._names[experiment_id] = _name(experiment)
            count = self._counts[experiment_id] = ExperimentCount(experiment_id, name)
        return count

    # ---- parents -------------------------------------------------------------------------

    async def _turn(self, experiment_id: str, listed: dict[str, _Entry]) -> None:
        """Write an experiment's selected runs (those written earlier as parents are not
        written again: they now count as selected), with the parents they need."""
        count = self._counts[experiment_id]
        self._current = count.name
        for run_id in [rid for rid in listed if rid in self._pulled]:
            del listed[run_id]  # in the plan already, before its children
            del self._pulled[run_id]
            count.parents_added -= 1  # selected after all: counted as listed
        await self._add_parents(listed)
        await self._write(listed)
        self._done.add(experiment_id)

    async def _add_parents(self, listed: dict[str, _Entry]) -> None:
        """Add to ``listed`` the parent of every run whose parent is in no earlier part of
        the plan, up the chain (see the class's docstring)."""
        work = [rid for rid, e in listed.items() if e.parent and e.parent not in listed]
        while work:
            child = work.pop()
            entry = listed[child]
            parent = entry.parent
            if parent is None or parent in listed or parent in self._pulled:
                continue
            run = await self._source.run(parent)
            if run is None or _info(run).get("lifecycle_stage", "active") != "active":
                log.warning(
                    "run %s: its parent run %s %s on the source: exported without a parent",
                    child,
                    parent,
                    "does not exist" if run is None else "is deleted",
                )
                entry.parent = None
                continue
            _, found = _entry(run)
            if self._written(parent, found):
                continue
            found.added = True
            listed[parent] = found
            count = await self._count(found.experiment_id)
            count.parents_added += 1
            if found.experiment_id not in self._done:  # not written again in its own turn
                self._pulled[parent] = found.experiment_id
            if found.parent and found.parent not in listed:
                work.append(parent)

    def _written(self, run_id: str, entry: _Entry) -> bool:
        """Whether a run is in the plan already: selected in an experiment done before."""
        if entry.experiment_id not in self._done:
            return False
        if self._selection.run_ids:
            return run_id in self._run_ids
        since = self._selection.since
        return since is None or entry.start >= since or (entry.end or -1) >= since

    # ---- writing ---------------------------------------------------------------------------

    async def _write(self, listed: dict[str, _Entry]) -> None:
        """Read the runs ``self._window`` at a time; write them in order, whole."""
        order = _parents_first(listed)
        self._turn_runs, self._turn_done = len(order), 0
        pending: deque[_Slot] = deque()
        runs = iter(order)
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            while True:
                while len(pending) < self._window:
                    run_id = next(runs, None)
                    if run_id is None:
                        break
                    slot = _Slot(run_id)
                    pending.append(slot)
                    entry = listed[run_id]
                    name = self._names[entry.experiment_id]
                    tg.start_soon(self._fill, slot, name, entry.parent)
                if not pending:
                    break
                slot = pending.popleft()
                await slot.done.wait()
                # raised here, an error would reach the caller in an exception group
                try:
                    self._put(slot, listed[slot.run_id].experiment_id)
                except Exception as exc:
                    failure = exc
                    tg.cancel_scope.cancel()
                    break
                finally:
                    if slot.spool is not None:
                        slot.spool.close()
        for slot in pending:
            if slot.spool is not None:
                slot.spool.close()
        if failure is not None:
            raise failure

    def _put(self, slot: _Slot, experiment_id: str) -> None:
        """A run read whole: its lines into the plan (or its error raised)."""
        if slot.error is not None:
            raise slot.error
        assert slot.spool is not None
        slot.spool.seek(0)
        shutil.copyfileobj(slot.spool, self._out, 1 << 20)
        self._counts[experiment_id].exported += 1
        self._turn_done += 1
        self.report.runs += 1
        self.report.lines += slot.lines
        self._progress()

    async def _fill(self, slot: _Slot, experiment: str, parent: str | None) -> None:
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY)
        slot.spool = spool
        try:
            writer = _RunWriter(slot.run_id, spool)
            await self._run_lines(writer, experiment, parent)
            slot.lines = writer.lines
        except Exception as exc:  # handed to the writer, which stops the export with it
            slot.error = exc
        finally:
            slot.done.set()

    async def _run_lines(self, w: _RunWriter, experiment: str, parent: str | None) -> None:
        run_id = w.run_id
        run = await self._source.run(run_id)
        if run is None:
            raise SourceError(f"run {run_id}: deleted from the source during the export")
        info, data = _info(run), run.get("data") or {}
        if info.get("lifecycle_stage", "active") != "active":
            raise SourceError(f"run {run_id}: deleted on the source during the export")
        tags = {t["key"]: t.get("value", "") for t in _pairs(data, "tags", run_id)}
        create: dict[str, Any] = {
            "op": "create-run",
            "source_run_id": run_id,
            "experiment": experiment,
        }
        run_name = info.get("run_name") or tags.get(RUN_NAME_TAG)
        if run_name:
            create["run_name"] = run_name
        if isinstance(info.get("start_time"), int):
            create["start_time"] = info["start_time"]
        user = tags.get(USER_TAG) or info.get("user_id")
        if user:
            create["user"] = user
        if parent:
            create["parent_source_run_id"] = parent
        w.line(create)

        batch = _Batch(w)
        for p in sorted(_pairs(data, "params", run_id), key=lambda p: p["key"]):
            batch.add("params", {"key": p["key"], "value": p.get("value", "")})
        for key in sorted(tags):
            if key not in NOT_TAGS:
                batch.add("tags", {"key": key, "value": tags[key]})
        for key in sorted({m["key"] for m in _pairs(data, "metrics", run_id)}):
            async for points in self._source.metric_history(run_id, key, self._history_page):
                for point in points:
                    batch.add("metrics", _metric(point, key, run_id))
        batch.flush()

        inputs = run.get("inputs") or {}
        for item in inputs.get("dataset_inputs") or []:
            w.line(
                {"op": "log-inputs", "source_run_id": run_id, "dataset_inputs": [_dataset(item)]}
            )
        if inputs.get("model_inputs"):
            self._model_inputs += 1

        uuids: set[str] = set()
        for model in _history_models(tags.get(HISTORY_TAG), run_id):
            uuid = model.get("model_uuid")
            if isinstance(uuid, str) and uuid:
                if uuid in uuids:
                    continue
                uuids.add(uuid)
            w.model(model)
        outputs = run.get("outputs") or {}
        for output in outputs.get("model_outputs") or []:
            model_id = output.get("model_id") if isinstance(output, dict) else None
            if not isinstance(model_id, str) or not model_id or model_id in uuids:
                continue
            uuids.add(model_id)
            logged = await self._source.logged_model(model_id)
            if logged is None:
                log.warning(
                    "run %s: its logged model %s does not exist: left out", run_id, model_id
                )
                continue
            w.model(_from_logged_model(logged, run_id, output.get("step")))

        status = info.get("status")
        update: dict[str, Any] = {"op": "update-run", "source_run_id": run_id}
        update["status"] = status if status in STATUSES else "FAILED"
        if isinstance(info.get("end_time"), int):
            update["end_time"] = info["end_time"]
        w.line(update)

    def _progress(self) -> None:
        if self._on_progress is None:
            return
        counts = self._source.counts
        self._on_progress(
            ExportProgress(
                experiment=self._current,
                experiment_runs=self._turn_runs,
                experiment_done=self._turn_done,
                runs=self.report.runs,
                experiments_done=len(self._done),
                experiments=self._experiments,
                requests=counts.requests,
                retries=counts.retries,
                throttled=counts.throttled,
                rate=self._source.rate,
                elapsed_s=time.monotonic() - self._started,
            )
        )


async def export(
    source: Source,
    out: Sink,
    selection: Selection,
    *,
    concurrency: int = 16,
    on_progress: Callable[[ExportProgress], None] | None = None,
    history_page: int = HISTORY_PAGE,
    search_page: int = SEARCH_PAGE,
) -> ExportReport:
    """Write the plan of ``selection`` to ``out``; see the module's docstring."""
    exporter = Exporter(
        source,
        out,
        concurrency=concurrency,
        on_progress=on_progress,
        history_page=history_page,
        search_page=search_page,
    )
    return await exporter.run(selection)


# ---- lines ---------------------------------------------------------------------------------


class _RunWriter:
    """One run's lines, encoded, into its spool."""

    def __init__(self, run_id: str, spool: IO[bytes]) -> None:
        self.run_id = run_id
        self._spool = spool
        self.lines = 0

    def line(self, record: dict[str, Any]) -> None:
        self.raw(orjson.dumps(record))

    def raw(self, line: bytes) -> None:
        self._spool.write(line + b"\n")
        self.lines += 1

    def model(self, model: dict[str, Any]) -> None:
        model["run_id"] = self.run_id  # the source id: rewritten to the target run at send
        text = orjson.dumps(model).decode()
        self.line({"op": "log-model", "source_run_id": self.run_id, "model_json": text})


class _Batch:
    """log-batch lines of one run under the limits: 100 params, 100 tags, 1,000 metrics,
    1,000 entries in all, 1,000,000 bytes a line. An entry MLflow would truncate (a value
    too long) goes alone on a line of its own, with a warning: the upload refuses that
    line, naming it, and sends the others."""

    def __init__(self, w: _RunWriter) -> None:
        self._w = w
        self._base = len(_batch_line(w.run_id, [], [], [])) + 1  # the newline
        self._reset()

    def _reset(self) -> None:
        self._items: dict[str, list[bytes]] = {"params": [], "metrics": [], "tags": []}
        self._size = self._base
        self._count = 0

    def add(self, kind: str, entry: dict[str, Any]) -> None:
        data = orjson.dumps(entry)
        too_long = _too_long(kind, entry)
        if too_long:
            log.warning(
                "run %s: %s: exported on a log-batch line of its own", self._w.run_id, too_long
            )
            self.flush()
        items = self._items[kind]
        limit = {"params": MAX_PARAMS, "tags": MAX_TAGS, "metrics": MAX_METRICS}[kind]
        if (
            len(items) >= limit
            or self._count >= MAX_ENTRIES
            or self._size + len(data) + 1 > MAX_LINE_BYTES
        ):
            self.flush()
            items = self._items[kind]
        items.append(data)
        self._size += len(data) + 1
        self._count += 1
        if too_long:
            self.flush()

    def flush(self) -> None:
        if not self._count:
            return
        items = self._items
        self._w.raw(_batch_line(self._w.run_id, items["params"], items["metrics"], items["tags"]))
        self._reset()


def _batch_line(run_id: str, params: list[bytes], metrics: list[bytes], tags: list[bytes]) -> bytes:
    """A log-batch line from entries already encoded (each encoded once)."""
    head = orjson.dumps({"op": "log-batch", "source_run_id": run_id})[:-1]
    return b"".join(
        (
            head,
            b',"params":[',
            b",".join(params),
            b'],"metrics":[',
            b",".join(metrics),
            b'],"tags":[',
            b",".join(tags),
            b"]}",
        )
    )


def _too_long(kind: str, entry: dict[str, Any]) -> str:
    key = entry["key"]
    if len(key) > MAX_KEY:
        return f"{kind[:-1]} key {key[:40]!r}... is longer than {MAX_KEY} characters"
    value = entry.get("value")
    limit = {"params": MAX_PARAM_VALUE, "tags": MAX_TAG_VALUE}.get(kind)
    if limit and isinstance(value, str) and len(value) > limit:
        return f"{kind[:-1]} {key!r}: its value is longer than {limit:,} characters"
    return ""


def _metric(point: dict[str, Any], key: str, run_id: str) -> dict[str, Any]:
    value = point.get("value")
    timestamp = point.get("timestamp")
    step = point.get("step", 0)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number or value in NON_FINITE) or not isinstance(timestamp, int):
        raise SourceError(
            f"metric {key!r} of run {run_id}: a point without a number value or a timestamp"
        )
    return {"key": key, "value": value, "timestamp": timestamp, "step": step}


def _dataset(item: dict[str, Any]) -> dict[str, Any]:
    dataset = item.get("dataset") or {}
    out: dict[str, Any] = {
        "dataset": {k: dataset[k] for k in DATASET_FIELDS if dataset.get(k) is not None}
    }
    tags = [{"key": t.get("key", ""), "value": t.get("value", "")} for t in item.get("tags") or []]
    if tags:
        out["tags"] = tags
    return out


def _history_models(value: str | None, run_id: str) -> list[dict[str, Any]]:
    """The models of an MLflow 2 ``mlflow.log-model.history`` tag. MLflow cuts tag values at
    8,000 characters, so a long history can end mid-JSON: the whole entries before the cut
    are kept, and a warning says the rest is lost on the source already."""
    if not value:
        return []
    try:
        models = orjson.loads(value)
    except orjson.JSONDecodeError:
        models = _salvage(value)
        log.warning(
            "run %s: its %s tag is cut short (MLflow truncates tags at 8,000 characters): "
            "%d whole models exported, the rest cannot be read",
            run_id,
            HISTORY_TAG,
            len(models),
        )
    if not isinstance(models, list):
        log.warning("run %s: its %s tag is not a list: no models exported", run_id, HISTORY_TAG)
        return []
    models = [m for m in models if isinstance(m, dict)]
    for model in models:
        if (
            not (model.get("artifact_path") and isinstance(model.get("flavors"), dict))
            or not str(model.get("utc_time_created") or "").strip()
        ):
            log.warning(
                "run %s: a model in its %s tag lacks artifact_path, flavors or "
                "utc_time_created: exported as it is, the upload will refuse it",
                run_id,
                HISTORY_TAG,
            )
    return models


def _salvage(value: str) -> list[Any]:
    import json

    decoder = json.JSONDecoder()
    text = value.lstrip()
    if not text.startswith("["):
        return []
    pos, found = 1, list[Any]()
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return found
        found.append(item)


def _from_logged_model(logged: dict[str, Any], run_id: str, step: Any) -> dict[str, Any]:
    """An MLflow 3 logged model as the model_json MLflow's log-model takes: its id as
    ``model_uuid``, its name as ``artifact_path``, its creation time; its type, tags and
    params in ``metadata``. Not carried: its artifacts (flavors are in its MLmodel file,
    which is not read: ``flavors`` is empty), its metrics and status."""
    info = logged.get("info") or {}
    data = logged.get("data") or {}
    model_id = str(info.get("model_id", ""))
    created = info.get("creation_timestamp_ms")
    when = datetime.fromtimestamp((created if isinstance(created, int) else 0) / 1000, timezone.utc)
    metadata: dict[str, Any] = {"model_id": model_id}
    for name, value in (
        ("name", info.get("name")),
        ("model_type", info.get("model_type")),
        ("step", step),
        ("tags", {t["key"]: t.get("value", "") for t in info.get("tags") or [] if "key" in t}),
        ("params", {p["key"]: p.get("value", "") for p in data.get("params") or [] if "key" in p}),
        ("source_artifact_uri", info.get("artifact_uri")),
    ):
        if value not in (None, "", {}):
            metadata[name] = value
    return {
        "artifact_path": info.get("name") or model_id,
        "flavors": {},
        "utc_time_created": when.strftime("%Y-%m-%d %H:%M:%S.%f"),
        "run_id": run_id,
        "model_uuid": model_id,
        "metadata": {"batchlog.logged_model": metadata},
    }


# ---- helpers ----------------------------------------------------------------------------


def _filters(since: int | None) -> list[str]:
    """runs/search filters whose union is the selection. MLflow runs have no update time,
    and its filters no OR: ``--since`` is two searches, by start time and by end time."""
    if since is None:
        return [""]
    return [f"attributes.start_time >= {since}", f"attributes.end_time >= {since}"]


def _info(run: dict[str, Any]) -> dict[str, Any]:
    info = run.get("info")
    if not isinstance(info, dict) or not isinstance(info.get("run_id"), str):
        raise SourceError("the source answered a run without info.run_id: not the MLflow API")
    return info


def _entry(run: dict[str, Any]) -> tuple[str, _Entry]:
    info = _info(run)
    parent = None
    data = run.get("data") or {}
    for tag in data.get("tags") or []:
        if isinstance(tag, dict) and tag.get("key") == PARENT_TAG and tag.get("value"):
            parent = str(tag["value"])
    start = info.get("start_time")
    end = info.get("end_time")
    entry = _Entry(
        str(info.get("experiment_id")),
        start if isinstance(start, int) else 0,
        end if isinstance(end, int) else None,
        parent,
    )
    return info["run_id"], entry


def _pairs(data: dict[str, Any], name: str, run_id: str) -> list[dict[str, Any]]:
    items = data.get(name) or []
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("key"), str) for i in items
    ):
        raise SourceError(f"run {run_id}: its {name} are not a list of keys and values")
    return items


def _name(experiment: dict[str, Any]) -> str:
    name = experiment.get("name")
    if not isinstance(name, str) or not name:
        raise SourceError(f"experiment {experiment.get('experiment_id')}: has no name")
    return name


def _parents_first(listed: dict[str, _Entry]) -> list[str]:
    """The runs by start time then id, each parent before its children (a child waits for
    its parent, then follows it). A cycle of parents (which MLflow does not prevent: the
    tag is free text) is broken at one of its runs, with a warning."""
    order = sorted(listed, key=lambda rid: (listed[rid].start, rid))
    out: list[str] = []
    emitted: set[str] = set()
    waiting: dict[str, list[str]] = {}

    def emit(run_id: str) -> None:
        stack = [run_id]
        while stack:
            rid = stack.pop()
            out.append(rid)
            emitted.add(rid)
            stack.extend(reversed(waiting.pop(rid, [])))

    for rid in order:
        parent = listed[rid].parent
        if parent is None or parent not in listed or parent in emitted:
            emit(rid)
        else:
            waiting.setdefault(parent, []).append(rid)
    for rid in order:  # left waiting: a cycle of parents above it
        if rid in emitted:
            continue
        node, path = rid, set()
        while node not in path:  # up the chain, to a run met twice: in the cycle
            path.add(node)
            parent = listed[node].parent
            assert parent is not None
            node = parent
        log.warning(
            "run %s: its parents form a cycle (through %s): exported without a parent",
            node,
            listed[node].parent,
        )
        waiting[listed[node].parent or ""].remove(node)
        listed[node].parent = None
        emit(node)
    return out


async def _gather(fn: Callable[[str], Any], items: list[str], limit: int) -> None:
    """``fn`` on every item, by ``limit`` workers; the first exception raised as it is (not
    in an exception group), the other workers cancelled."""
    failure: list[Exception] = []
    todo = iter(items)  # shared: each item taken by one worker

    async def worker() -> None:
        for item in todo:
            try:
                await fn(item)
            except Exception as exc:
                failure.append(exc)
                tg.cancel_scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        for _ in range(min(limit, len(items))):
            tg.start_soon(worker)
    if failure:
        raise failure[0]


def _mismatch_message(mismatched: list[ExperimentCount]) -> str:
    parts = []
    for c in mismatched[:3]:
        said = f"experiment {c.name!r}: {c.exported:,} runs exported, the source lists {c.source:,}"
        if c.missing:
            said += f"; not exported: {', '.join(c.missing[:5])}"
        if c.gone:
            said += f"; no longer on the source: {', '.join(c.gone[:5])}"
        parts.append(said)
    more = f" (and {len(mismatched) - 3} more experiments)" if len(mismatched) > 3 else ""
    return (
        "the runs exported are not the runs the source lists (it changed during the export?): "
        + "; ".join(parts)
        + more
        + ": the plan was not written; run the export again"
    )
