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
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from batchlog import durable
from batchlog.errors import CheckpointError, SystemicError
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
    status: str  # the bucket's batchlog Report status ("completed")
    records: int
    succeeded: int
    failed: int
    rejected: int
    already_done: int
    requests: int
    retries: int
    throttled: int  # attempts answered 429
    read_backs: int
    elapsed_s: float
    lease_wait_s: float  # seconds spent waiting for another attempt's lease
    rate_limit: float | None  # this task's share of the rate (requests/s), None: none
    failed_total: int = 0  # the bucket's failed records, earlier runs included
    rejected_total: int = 0


def bucket_dir(checkpoint_dir: str, bucket: int) -> str:
    return os.path.join(checkpoint_dir, f"bucket-{bucket:04d}")


@dataclass(frozen=True)
class BucketJob:
    """The task function: pickled to the executors. ``settings`` crosses as how to load
    its keys (batchlog.auth), never as key material."""

    settings: Settings
    checkpoint_dir: str  # absolute
    rate: float | None  # this task's share of settings.rate
    lease_wait: float  # seconds a second attempt waits for the lease before failing
    restart: str = ""  # the upload call's id when it restarts every bucket ("": resume)

    def __call__(self, bucket: int, rows: Iterable[tuple[int, str, str]]) -> Iterator[TaskFigures]:
        yield self.run(bucket, _of_bucket(bucket, rows))

    def run(self, bucket: int, lines: Iterable[tuple[str, str]]) -> TaskFigures:
        folder = bucket_dir(self.checkpoint_dir, bucket)
        os.makedirs(folder, exist_ok=True)
        attempt, attempt_id = _attempt()
        with Lease(os.path.join(folder, LEASE), self.lease_wait, attempt_id) as waited:
            if self.restart:
                _restart_once(folder, self.restart)
            count = spill(folder, lines)
            return self._upload(bucket, folder, count, attempt, waited)

    def _upload(
        self, bucket: int, folder: str, count: int, attempt: int, waited: float
    ) -> TaskFigures:
        import anyio

        from batchlog.job import upload

        if count == 0:  # nothing in this bucket (and nothing before: spill checked)
            return TaskFigures(
                bucket, attempt, "completed", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.0, waited, self.rate
            )
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
        if report.status != "completed":  # a systemic stop: the task fails, Spark retries
            raise SystemicError(f"bucket {bucket}: {report.message or report.status}")
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
    """The bucket's lease: an exclusive flock on ``path``, waited for up to ``wait`` s."""

    def __init__(self, path: str, wait: float, attempt_id: str) -> None:
        self.path = path
        self.wait = wait
        self.note = f"host={socket.gethostname()} pid={os.getpid()} attempt={attempt_id}\n"
        self._handle: BinaryIO | None = None

    def __enter__(self) -> float:
        import fcntl

        handle = open(self.path, "a+b")
        started = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - started >= self.wait:
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
            "records; wait for it, or raise lease_wait"
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
    _write_atomically(marker, [call_id.encode() + b"\n"])


def spill(folder: str, lines: Iterable[tuple[str, str]]) -> int:
    """Write the bucket's lines to ``records.jsonl`` and their sources to ``sources.txt``
    (temp file, fsync, rename); return how many. A ``records.jsonl`` an earlier attempt
    wrote is kept when it is the same, and refused when it is not: its checkpoint names
    those records, by line."""
    records = os.path.join(folder, RECORDS)
    digest = hashlib.sha256()
    count = 0
    with (
        open(records + ".tmp", "wb") as out,
        open(os.path.join(folder, SOURCES + ".tmp"), "wb") as sources,
    ):
        for line, source in lines:
            data = _one_line(line)
            digest.update(data)
            out.write(data)
            sources.write(_one_line(source))
            count += 1
        for handle in (out, sources):
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(os.path.join(folder, SOURCES + ".tmp"), os.path.join(folder, SOURCES))
    if os.path.isfile(records):
        if _file_digest(records) != digest.digest():
            os.remove(records + ".tmp")
            raise CheckpointError(
                f"{records} holds other records than this input gives the bucket: the input "
                "(or buckets, or order_by) changed since this checkpoint_dir was written; "
                "use a new checkpoint_dir, or restart=True to upload it afresh"
            )
        os.remove(records + ".tmp")
    else:
        os.replace(records + ".tmp", records)
    durable.sync_directory(folder)
    return count


def _one_line(text: str) -> bytes:
    """``text`` as one line: a line break inside it (a string column built by hand) would
    split the record in two, so it is read as the blank it is between JSON tokens."""
    if "\n" in text or "\r" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    return text.encode("utf-8", "surrogatepass") + b"\n"


def _file_digest(path: str) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.digest()


def _write_atomically(path: str, chunks: Iterable[bytes]) -> None:
    with open(path + ".tmp", "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    durable.sync_directory(os.path.dirname(path))
