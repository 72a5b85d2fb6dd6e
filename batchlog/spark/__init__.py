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
from batchlog.spark.bucket import BucketJob, TaskFigures
from batchlog.spark.results import SparkReport, SparkResult, dead_letter

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["SparkReport", "SparkResult", "TaskFigures", "upload"]

LEASE_WAIT = 300.0  # seconds a second attempt of a bucket waits for the first one
JOB_FILE = "batchlog-spark.json"  # the buckets a checkpoint_dir was made with
_ERROR = re.compile(r"batchlog\.errors\.(\w+Error): (.*)")


def upload(
    df: DataFrame,
    settings: Settings,
    checkpoint_dir: str,
    *,
    buckets: int = 8,
    order_by: Sequence[str] | None = None,
    spark: SparkSession | None = None,
    lease_wait: float = LEASE_WAIT,
    restart: bool = False,
) -> SparkResult:
    """Upload every record of ``df`` (one string column of manifest lines, or the
    manifest's fields as columns); call it again to resume, or to find nothing left.

    ``settings.rate`` is the limit of the whole job: each task running at once gets its
    share. Records that fail are in ``result.dead_letter``; a systemic stop (credentials,
    no connection) fails the Spark job with batchlog's message, as a BatchlogError.
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
    rows = bucketed(df, buckets, order_by)
    try:
        tasks = rows.mapPartitionsWithIndex(job).collect()
    except Exception as exc:  # a task's batchlog error, retried and failed: say it alone
        raise _task_error(exc) from None
    tasks.sort(key=lambda t: t.bucket)
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
        made = orjson.loads(open(record, "rb").read()).get("buckets")
        if made != buckets:
            raise ConfigurationError(
                f"checkpoint_dir {path} was made with buckets={made}, not {buckets}: "
                "give the same number, or a new checkpoint_dir"
            )
        return folder
    with open(record + ".tmp", "wb") as f:
        f.write(orjson.dumps({"buckets": buckets}))
    os.replace(record + ".tmp", record)
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


def _task_error(exc: Exception) -> Exception:
    """The batchlog error that failed a task, as itself (one line, no Java trace); any
    other failure as it is."""
    found = _ERROR.findall(str(exc))
    if not found:
        return exc
    name, message = found[-1]
    kinds: dict[str, type[BatchlogError]] = {
        "CheckpointError": CheckpointError,
        "ConfigurationError": ConfigurationError,
        "SystemicError": SystemicError,
    }
    return kinds.get(name, BatchlogError)(message.strip())
