"""Upload a DataFrame of records from Spark, exactly once across task retries and re-runs.

    from batchlog.spark import upload
    result = upload(spark.read.text("/data/runs/*.jsonl"), settings, "/mnt/shared/ckpt")
    result.report.succeeded, result.tasks, result.dead_letter.show()

Each run's records go to one bucket (a stable hash of the run; a migrated run goes with
the root of its parent chain), in a deterministic order; one Spark task uploads one bucket
with batchlog's own upload, under its own checkpoint ``CHECKPOINT_DIR/bucket-NNNN/``
(batchlog.spark.bucket). A retried, speculative or re-run task resumes that checkpoint.

What ``checkpoint_dir`` needs: a POSIX filesystem that every executor (and the driver)
sees at the same path, with appends that fsync, atomic rename, and flock locks that the
kernel releases when the holding process dies: local disk in local mode; on a cluster, a
shared filesystem such as NFSv4 or OCI File Storage mounted on every node. Object storage
(``oci://``, ``s3://``...) has none of these and is refused.

pyspark is imported only here (``batchlog[spark]``): ``import batchlog`` never loads it.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import orjson

from batchlog.errors import (
    BatchlogError,
    CheckpointError,
    ConfigurationError,
    SystemicError,
)
from batchlog.settings import RATE, Settings
from batchlog.spark.bucket import BucketJob, TaskFigures, write_atomically
from batchlog.spark.results import SparkReport, SparkResult, dead_letter

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["SparkReport", "SparkResult", "TaskFigures", "upload"]

JOB_FILE = "batchlog-spark.json"  # the buckets a checkpoint_dir was made with
_ERROR = re.compile(r"batchlog\.errors\.(\w+Error): (.*)")


def upload(
    df: DataFrame,
    settings: Settings,
    checkpoint_dir: str,
    *,
    buckets: int = 8,
    order_by: Sequence[str] | None = None,
    lines: str = "value",
    spark: SparkSession | None = None,
    lease_wait: float | None = None,
    restart: bool = False,
) -> SparkResult:
    """Upload every record of ``df`` (a string column ``lines`` of manifest lines, its
    other columns ignored, or the manifest's fields as columns); call it again to resume,
    or to find nothing left. Pass ``spark.read.text(...)`` unchanged (at most columns
    selected) for sources ``FILE:LINE``; after a filter or a shuffle a line is named
    ``FILE row KEY``.

    ``settings.rate`` is the limit of the whole job: each task running at once gets its
    share. Records that fail are in ``result.dead_letter``. A bucket that cannot go on
    (a systemic stop: credentials, no connection; a changed input) raises batchlog's one
    line (a BatchlogError) once every task has ended. A second attempt of a bucket waits
    for the first as long as it holds the bucket's lease, or ``lease_wait`` seconds.
    """
    from batchlog.spark.inputs import bucketed

    started = time.monotonic()
    if not 1 <= buckets <= 100_000 or isinstance(buckets, bool):
        raise ConfigurationError(f"buckets {buckets!r}: expected a whole number from 1 to 100000")
    folder = _checkpoint_dir(checkpoint_dir, buckets, restart)
    spark = spark or df.sparkSession
    at_once = max(1, min(buckets, spark.sparkContext.defaultParallelism))
    job = BucketJob(
        settings,
        folder,
        rate=_share(settings.rate, at_once),
        lease_wait=lease_wait,
        restart=uuid.uuid4().hex if restart else "",
    )
    _check_picklable(job)
    rows = bucketed(df, buckets, order_by, lines)
    try:
        tasks = rows.mapPartitionsWithIndex(job).collect()
    except Exception as exc:  # a task failed every retry (not batchlog's stop): say it alone
        raise _task_error(exc) from None
    tasks.sort(key=lambda t: t.bucket)
    stopped = [t for t in tasks if t.status == "stopped"]
    if stopped:  # every task has ended: none still sends once this is raised
        raise _stop_error(stopped)
    report = SparkReport.of(tasks, time.monotonic() - started, folder)
    return SparkResult(report, tasks, dead_letter(spark, folder, buckets))


def _share(rate: float | None, tasks: int) -> float | None:
    if rate is None:
        return None
    return max(RATE.low, rate / tasks)


def _checkpoint_dir(path: str, buckets: int, restart: bool) -> str:
    """The directory, absolute, made if need be; refused when it cannot hold checkpoints
    or was made with another number of buckets (its runs would move between buckets)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) and not path.startswith("file://"):
        raise ConfigurationError(
            f"checkpoint_dir {path}: object storage has no flock, append or atomic rename; "
            "give a path on a filesystem every executor mounts (NFSv4, OCI File Storage)"
        )
    folder = os.path.abspath(path.removeprefix("file://"))
    os.makedirs(folder, exist_ok=True)
    record = os.path.join(folder, JOB_FILE)
    if os.path.isfile(record) and not restart:
        with open(record, "rb") as f:
            made = orjson.loads(f.read()).get("buckets")
        if made != buckets:
            raise ConfigurationError(
                f"checkpoint_dir {path} was made with buckets={made}, not {buckets}: "
                "give the same number, or a new checkpoint_dir"
            )
        return folder
    write_atomically(record, [orjson.dumps({"buckets": buckets})])
    return folder


def _check_picklable(job: BucketJob) -> None:
    """Refuse, before any task, settings that cannot cross to the executors."""
    import pickle

    try:
        pickle.dumps(job)  # as cloudpickle pickles it: BucketJob is a module's class
    except BatchlogError:
        raise
    except Exception as exc:
        raise ConfigurationError(
            f"settings cannot be sent to the Spark executors ({type(exc).__name__}: "
            f"{str(exc)[:200]}): load the keys with batchlog.auth.load_credentials(...)"
        ) from None


_KINDS: dict[str, type[BatchlogError]] = {
    "CheckpointError": CheckpointError,
    "ConfigurationError": ConfigurationError,
    "SystemicError": SystemicError,
}
# batchlog's messages are the CLI's: in a library call, what to call or set instead
_LIBRARY_WORDS = (
    ("run the same command again", "call upload again"),
    ("the same command sends", "calling upload again sends"),
    ("check --endpoint", "check the target's endpoint"),
    ("--ca-bundle", "settings.ca_bundle"),
    ("--tracking-uri", "the tracking URI"),
    ("--restart", "restart=True"),
    ("--checkpoint", "checkpoint_dir"),
    ("--auth ", "auth "),
)


def _stop_error(stopped: Sequence[TaskFigures]) -> BatchlogError:
    """The first stopped bucket's error, naming how many others stopped."""
    first = stopped[0]
    more = f" ({len(stopped) - 1} other buckets stopped too)" if len(stopped) > 1 else ""
    return _KINDS.get(first.error, BatchlogError)(_library_words(first.message) + more)


def _task_error(exc: Exception) -> Exception:
    """The batchlog error that failed a task, as itself (one line, no Java trace); any
    other failure as it is."""
    found = _ERROR.findall(str(exc))
    if not found:
        return exc
    name, message = found[-1]
    return _KINDS.get(name, BatchlogError)(_library_words(message.strip()))


def _library_words(message: str) -> str:
    for cli, library in _LIBRARY_WORDS:
        message = message.replace(cli, library)
    return message
