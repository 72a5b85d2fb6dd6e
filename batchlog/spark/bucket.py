"""What one Spark task does with one bucket: lease, spill, upload, figures.

Everything lives under ``CHECKPOINT_DIR/bucket-NNNN/`` (named by the bucket, never by the
task attempt, so every attempt of a bucket finds the same files):

    lease              flock'ed by the attempt at work; holds host, pid and attempt id
    records.jsonl      the bucket's lines, in their order (the manifest batchlog uploads)
    sources.txt        line N: where record N came from (FILE:LINE or "row KEY")
    checkpoint         batchlog's own checkpoint of that manifest
    dead-letter.jsonl  batchlog's own dead letter of that manifest
    restarted          the id of the upload call that last restarted the bucket

The lease comes first: a second attempt of the bucket at once (speculation, an executor
lost but still running) waits for it, then resumes the checkpoint and sends nothing twice.
The kernel drops a flock when its process dies, so the retry of a killed task goes on.

A task that cannot go on for a reason no retry changes (batchlog's CheckpointError,
ConfigurationError, SystemicError: batchlog already retried what it could; an OSError on
the bucket's own files, as a CheckpointError naming the path) returns it as its figures
(status "stopped"): Spark does not run it again, and the driver raises it
once every task has ended. Anything else (a bug, a killed worker) fails the task, which
Spark retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from batchlog import durable
from batchlog.errors import BatchlogError, CheckpointError, ConfigurationError, SystemicError
from batchlog.settings import Settings

RECORDS = "records.jsonl"
SOURCES = "sources.txt"
CHECKPOINT = "checkpoint"
DEAD_LETTER = "dead-letter.jsonl"
LEASE = "lease"
RESTARTED = "restarted"
POLL = 0.2  # seconds between two tries of a held lease
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TaskFigures:
    """One bucket's figures, as its task returned them (the only data sent to the driver)."""

    bucket: int
    attempt: int  # Spark's attempt number of the task (0: the first)
    status: str  # "completed", or "stopped": ``error`` and ``message`` say why
    rate_limit: float | None  # this task's share of the rate (requests/s), None: none
    records: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    already_done: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0  # attempts answered 429
    read_backs: int = 0
    elapsed_s: float = 0.0
    lease_wait_s: float = 0.0  # seconds spent waiting for another attempt's lease
    failed_total: int = 0  # the bucket's failed records, earlier runs included
    rejected_total: int = 0
    error: str = ""  # a stopped task's batchlog error class: "SystemicError", ...
    message: str = ""  # a stopped task's one line, naming its bucket


def bucket_dir(checkpoint_dir: str, bucket: int) -> str:
    return os.path.join(checkpoint_dir, f"bucket-{bucket:04d}")


@dataclass(frozen=True)
class BucketJob:
    """The task function: pickled to the executors. ``settings`` crosses as how to load
    its keys (batchlog.auth), never as key material."""

    settings: Settings
    checkpoint_dir: str  # absolute
    rate: float | None  # this task's share of settings.rate
    lease_wait: float | None  # seconds a second attempt waits for the lease (None: while held)
    restart: str = ""  # the upload call's id when it restarts every bucket ("": resume)

    def __call__(self, bucket: int, rows: Iterable[tuple[int, str, str]]) -> Iterator[TaskFigures]:
        yield self.run(bucket, _of_bucket(bucket, rows))

    def run(self, bucket: int, lines: Iterable[tuple[str, str]]) -> TaskFigures:
        folder = bucket_dir(self.checkpoint_dir, bucket)
        attempt, attempt_id = _attempt()
        try:
            with _own_files(folder):
                os.makedirs(folder, exist_ok=True)
            with Lease(os.path.join(folder, LEASE), self.lease_wait, attempt_id) as waited:
                with _own_files(folder):
                    if self.restart:
                        _restart_once(folder, self.restart)
                    count = spill(folder, _from_input(lines))
                return self._upload(bucket, folder, count, attempt, waited)
        except (CheckpointError, ConfigurationError, SystemicError) as exc:
            # the same on every retry: told once, without a retry or a trace per attempt
            return _stopped(bucket, attempt, self.rate, exc)

    def _upload(
        self, bucket: int, folder: str, count: int, attempt: int, waited: float
    ) -> TaskFigures:
        import anyio

        from batchlog.job import upload

        if count == 0:  # nothing in this bucket (and nothing before: spill checked)
            return TaskFigures(bucket, attempt, "completed", self.rate, lease_wait_s=waited)
        settings = dataclasses.replace(
            self.settings,
            checkpoint=os.path.join(folder, CHECKPOINT),
            dead_letter=os.path.join(folder, DEAD_LETTER),
            rate=self.rate,
            restart=False,  # a restart is done once per call, by _restart_once
        )
        named = SourceNames(folder)
        log = logging.getLogger("batchlog")
        log.addFilter(named)
        try:
            report = anyio.run(upload, [os.path.join(folder, RECORDS)], settings)
        finally:
            log.removeFilter(named)
        if report.status == "stopped":  # a systemic stop: batchlog retried what it could
            raise SystemicError(report.message or report.status)
        if report.status != "completed":  # the checkpoint not written, a bug: Spark retries
            raise BatchlogError(f"bucket {bucket}: {report.message or report.status}")
        return TaskFigures(
            bucket=bucket,
            attempt=attempt,
            status=report.status,
            records=report.records,
            succeeded=report.succeeded,
            failed=report.failed,
            rejected=report.rejected,
            already_done=report.already_done,
            requests=report.requests,
            retries=report.retries,
            throttled=report.throttled,
            read_backs=report.read_backs,
            elapsed_s=report.elapsed_s,
            lease_wait_s=waited,
            rate_limit=self.rate,
            failed_total=report.failed_total,
            rejected_total=report.rejected_total,
        )


def _stopped(bucket: int, attempt: int, rate: float | None, exc: BatchlogError) -> TaskFigures:
    """A task's figures for a stop no retry changes: nothing done, why in one line."""
    message = f"bucket {bucket}: {' '.join(str(exc).split())}"
    return TaskFigures(bucket, attempt, "stopped", rate, error=type(exc).__name__, message=message)


@contextlib.contextmanager
def _own_files(folder: str) -> Iterator[None]:
    """An OSError on the bucket's own files (its folder not made, a missing or read-only
    mount, a full disk while spilling) as a CheckpointError naming the path and why: no
    retry of the task changes it, so the bucket stops once, in one line."""
    try:
        yield
    except OSError as exc:
        path = exc.filename if isinstance(exc.filename, str) else folder
        why = exc.strerror or type(exc).__name__
        raise CheckpointError(
            f"{path}: {why} (errno {exc.errno}): the bucket's files under checkpoint_dir "
            "cannot be written (a missing or read-only mount, a full disk, permissions?); "
            "fix it and call upload again: the other buckets' work is kept"
        ) from None


class InputError(Exception):
    """An OSError reading the bucket's rows from Spark, not its files: the task fails and
    Spark retries it."""


def _from_input(lines: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    try:
        yield from lines
    except OSError as exc:
        raise InputError(f"reading the bucket's rows: {exc}") from exc


def _of_bucket(bucket: int, rows: Iterable[tuple[int, str, str]]) -> Iterator[tuple[str, str]]:
    """(line, source) of each row (bucket, line, source) of partition ``bucket``, which
    holds that bucket's rows only: a row of another would go to the wrong checkpoint."""
    for of, line, source in rows:
        if of != bucket:
            raise SystemicError(
                f"partition {bucket} holds a line of bucket {of}: Spark did not partition "
                "as batchlog.spark expects (a bug: please report it with your Spark version)"
            )
        yield line, source


class SourceNames(logging.Filter):
    """The task's log lines name where a record came from (``sources.txt``: the input's
    FILE:LINE or ``row KEY``), not the line of ``records.jsonl`` batchlog was given. The
    bucket's dead letter keeps naming that line: the dead-letter frame reads it."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder
        self._place = re.compile(re.escape(os.path.join(folder, RECORDS)) + r":(\d+)")
        self._sources: list[str] | None = None  # read at the first line that needs it

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._place.search(message):
            record.msg, record.args = self._place.sub(self._name, message), None
        failure = getattr(record, "batchlog_failure", None)
        if isinstance(failure, dict) and isinstance(failure.get("source"), str):
            source = self._place.sub(self._name, failure["source"])
            record.batchlog_failure = {**failure, "source": source}  # not the dead letter's
        return True

    def _name(self, found: re.Match[str]) -> str:
        if self._sources is None:
            with open(os.path.join(self.folder, SOURCES), encoding="utf-8", errors="replace") as f:
                self._sources = f.read().splitlines()
        number = int(found.group(1))
        return self._sources[number - 1] if 0 < number <= len(self._sources) else found[0]


def _attempt() -> tuple[int, str]:
    """Spark's attempt number of this task and its attempt id ("" outside a task)."""
    try:
        from pyspark import TaskContext

        context = TaskContext.get()
    except ImportError:
        context = None
    if context is None:
        return 0, ""
    return context.attemptNumber(), str(context.taskAttemptId())


class Lease:
    """The bucket's lease: an exclusive flock on ``path``, waited for up to ``wait`` s, or
    as long as its holder holds it (``None``): the kernel drops it when the holder dies,
    and Spark kills a speculative copy when the other attempt ends."""

    def __init__(self, path: str, wait: float | None, attempt_id: str) -> None:
        self.path = path
        self.wait = wait
        self.note = f"host={socket.gethostname()} pid={os.getpid()} attempt={attempt_id}\n"
        self._handle: BinaryIO | None = None

    def __enter__(self) -> float:
        with _own_files(os.path.dirname(self.path)):
            return self._take()

    def _take(self) -> float:
        import fcntl

        handle = open(self.path, "a+b")
        started = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self.wait is not None and time.monotonic() - started >= self.wait:
                        raise CheckpointError(self._busy()) from None
                    time.sleep(POLL)
            handle.seek(0)
            handle.truncate()
            handle.write(self.note.encode())
            handle.flush()
        except BaseException:
            handle.close()
            raise
        self._handle = handle
        return round(time.monotonic() - started, 3)

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()  # the flock goes with it
            self._handle = None

    def _busy(self) -> str:
        try:
            with open(self.path, "rb") as f:
                holder = f.read(300).decode("utf-8", "replace").strip() or "unknown"
        except OSError:
            holder = "unknown"
        return (
            f"{self.path} is held by another attempt of this bucket ({holder}) for over "
            f"{self.wait:g} s: a speculative or lost task still running? it sends the same "
            "records; wait for it, or give lease_wait=None to wait while it holds the lease"
        )


def _restart_once(folder: str, call_id: str) -> None:
    """Forget the bucket's checkpoint, dead letter and records, once per upload call: a
    retried attempt of the same call resumes what the first attempt sent."""
    marker = os.path.join(folder, RESTARTED)
    try:
        with open(marker, encoding="utf-8") as f:
            if f.read().strip() == call_id:
                return
    except OSError:
        pass
    for path in [*glob.glob(os.path.join(folder, CHECKPOINT + "*")), folder + "/" + DEAD_LETTER]:
        if os.path.isfile(path):
            os.remove(path)
    for name in (RECORDS, SOURCES):
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    write_atomically(marker, [call_id.encode() + b"\n"])


def spill(folder: str, lines: Iterable[tuple[str, str]]) -> int:
    """Write the bucket's lines to ``records.jsonl`` and their sources to ``sources.txt``
    (temp files, fsync, rename); return how many. A ``records.jsonl`` an earlier attempt
    wrote is kept when the lines are the same, and grows when they are its lines with more
    after them (the input appended to: its checkpoint resumes, as batchlog's does for an
    appended manifest); otherwise both files stay as they were and the bucket is refused:
    its checkpoint and dead letter name those records by line."""
    records = os.path.join(folder, RECORDS)
    sources = os.path.join(folder, SOURCES)
    count = 0
    with open(records + ".tmp", "wb") as out, open(sources + ".tmp", "wb") as where:
        for line, source in lines:
            out.write(_one_line(line))
            where.write(_one_line(source))
            count += 1
        for handle in (out, where):
            handle.flush()
            os.fsync(handle.fileno())
    kept = os.path.getsize(records) if os.path.isfile(records) else -1
    grown = _starts_with(records + ".tmp", records)  # or the same
    same = grown and kept == os.path.getsize(records + ".tmp")
    if not same and not (grown and _starts_with(sources + ".tmp", sources)):
        os.remove(records + ".tmp")
        os.remove(sources + ".tmp")
        raise CheckpointError(
            f"{records} holds other records than this input gives the bucket: lines of it "
            "were changed, removed or put before them since this checkpoint_dir was written "
            "(or buckets or order_by changed), and only lines added after them resume. "
            "restart=True or a new checkpoint_dir sends every record of the bucket again: "
            "applied twice on a server without retry tokens (MLflow) or after 24 h on AI "
            "Data Platform; to add records, append them after the input's lines (a new file "
            "that sorts last)"
        )
    # the sources first: whichever rename a crash stops before, the next attempt finds
    # the old records a prefix of the new ones, or the same
    os.replace(sources + ".tmp", sources)
    if same:
        os.remove(records + ".tmp")
    else:
        os.replace(records + ".tmp", records)
    durable.sync_directory(folder)
    return count


def _starts_with(path: str, head: str) -> bool:
    """Whether the file ``path`` begins with the bytes of the file ``head`` (a missing
    ``head``: yes, as an empty one)."""
    try:
        prefix = open(head, "rb")
    except FileNotFoundError:
        return True
    with prefix, open(path, "rb") as whole:
        if os.fstat(prefix.fileno()).st_size > os.fstat(whole.fileno()).st_size:
            return False
        while chunk := prefix.read(_CHUNK):
            if whole.read(len(chunk)) != chunk:
                return False
        return True


def _one_line(text: str) -> bytes:
    """``text`` as one line: a line break inside it (a string column built by hand) would
    split the record in two, so it is read as the blank it is between JSON tokens."""
    if "\n" in text or "\r" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    return text.encode("utf-8", "surrogatepass") + b"\n"


def write_atomically(path: str, chunks: Iterable[bytes]) -> None:
    with open(path + ".tmp", "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    durable.sync_directory(os.path.dirname(path))
