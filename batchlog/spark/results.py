"""The results of a Spark upload: figures summed on the driver, the dead letter as data."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from batchlog.report import EXIT_OK, EXIT_SOME_FAILED
from batchlog.spark.bucket import DEAD_LETTER, RECORDS, SOURCES, TaskFigures, bucket_dir

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

DEAD_LETTER_SCHEMA = "bucket int, record string, reason string, status string, source string"


@dataclass(frozen=True)
class SparkReport:
    """The tasks' figures summed, as batchlog's Report names them."""

    records: int
    succeeded: int  # in this call
    failed: int  # in this call
    rejected: int  # in this call
    already_done: int  # finished by earlier calls (or earlier attempts of a task)
    requests: int
    retries: int
    throttled: int  # attempts answered 429
    read_backs: int
    elapsed_s: float  # the whole call, on the driver
    checkpoint_dir: str
    failed_total: int = 0  # of the whole job, earlier calls included
    rejected_total: int = 0

    @property
    def unsuccessful_total(self) -> int:
        return max(self.failed_total + self.rejected_total, self.failed + self.rejected)

    @property
    def exit_code(self) -> int:
        """0 or 1, as the CLI's (a systemic stop raises instead)."""
        return EXIT_SOME_FAILED if self.unsuccessful_total else EXIT_OK

    @staticmethod
    def of(tasks: Sequence[TaskFigures], elapsed: float, checkpoint_dir: str) -> SparkReport:
        return SparkReport(
            records=sum(t.records for t in tasks),
            succeeded=sum(t.succeeded for t in tasks),
            failed=sum(t.failed for t in tasks),
            rejected=sum(t.rejected for t in tasks),
            already_done=sum(t.already_done for t in tasks),
            requests=sum(t.requests for t in tasks),
            retries=sum(t.retries for t in tasks),
            throttled=sum(t.throttled for t in tasks),
            read_backs=sum(t.read_backs for t in tasks),
            elapsed_s=round(elapsed, 3),
            checkpoint_dir=checkpoint_dir,
            failed_total=sum(t.failed_total for t in tasks),
            rejected_total=sum(t.rejected_total for t in tasks),
        )


@dataclass(frozen=True)
class SparkResult:
    report: SparkReport
    tasks: list[TaskFigures]  # one per bucket, by bucket
    dead_letter: DataFrame  # DEAD_LETTER_SCHEMA; read from the buckets' files when used


def dead_letter(spark: SparkSession, checkpoint_dir: str, buckets: int) -> DataFrame:
    """Every bucket's dead letter as rows (bucket, record, reason, status, source): the
    record is the line as given, its source where it came from. ``status`` is the HTTP
    status, ``rejected`` for an invalid line, or ``context``: a copy of a migrated run's
    create-run line that goes before its run's failed lines (no failure; keep it with them
    to upload them again, filter it out to count failures). One task per bucket reads that
    bucket's files; nothing passes through the driver."""
    read = _BucketDeadLetter(checkpoint_dir)
    rows = spark.sparkContext.parallelize(range(buckets), buckets).flatMap(read)
    return spark.createDataFrame(rows, DEAD_LETTER_SCHEMA)


@dataclass(frozen=True)
class _BucketDeadLetter:
    checkpoint_dir: str

    def __call__(self, bucket: int) -> Iterator[tuple[int, str, str, str, str]]:
        folder = bucket_dir(self.checkpoint_dir, bucket)
        try:
            handle = open(f"{folder}/{DEAD_LETTER}", "rb")
        except FileNotFoundError:
            return
        wanted: list[tuple[int, int, str, str]] = []  # (record line, order, reason, status)
        with handle:
            for order, raw in enumerate(handle):
                if raw.strip():
                    number, reason, status = _entry(raw)
                    wanted.append((number, order, reason, status))
        wanted.sort()
        for (_, _, reason, status), (record, source) in zip(
            wanted, _lines_at(folder, [w[0] for w in wanted]), strict=True
        ):
            yield bucket, record, reason, status, source


def _entry(raw: bytes) -> tuple[int, str, str]:
    """(record line number, reason, status) of one dead-letter line."""
    error = orjson.loads(raw).get("_error") or {}
    source = str(error.get("source", ""))
    number = int(source.rsplit(":", 1)[1]) if ":" in source else 0
    message = str(error.get("message", ""))
    field = error.get("field")
    reason = f"{field}: {message}" if field else message
    return number, reason, str(error.get("status", ""))


def _lines_at(folder: str, numbers: list[int]) -> Iterator[tuple[str, str]]:
    """(record, source) of the lines ``numbers`` (sorted, 1-based) of records.jsonl and
    sources.txt, read once in step."""
    with (
        open(f"{folder}/{RECORDS}", "rb") as records,
        open(f"{folder}/{SOURCES}", "rb") as sources,
    ):
        at, record, source = 0, b"", b""
        for number in numbers:
            while at < number:
                record, source = records.readline(), sources.readline()
                at += 1
            yield (
                record.rstrip(b"\n").decode("utf-8", "backslashreplace"),
                source.rstrip(b"\n").decode("utf-8", "backslashreplace"),
            )
