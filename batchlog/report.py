"""The numbers of a job: live counters while it runs, and the final report.

The report's fields (and the JSON ``--report`` writes from them) are a documented schema,
``version`` 1 (README, "Output for schedulers"): a field is added, never renamed or removed,
without a new version.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

Status = Literal["completed", "stopped", "interrupted", "failed"]

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_SYSTEMIC = 3
EXIT_INTERRUPTED = 130

REPORT_VERSION = 1


@dataclass
class Counters:
    """Mutable counts, updated by the job as it goes; read by progress displays."""

    records: int = 0  # records of the job read so far, those already done before included
    succeeded: int = 0  # in this run
    failed: int = 0  # in this run: permanent errors, attempts exhausted
    rejected: int = 0  # in this run: invalid manifest lines
    skipped: int = 0  # finished by an earlier run ("already done" in the report)
    requests: int = 0  # HTTP attempts sent
    read_backs: int = 0  # runs read back to learn whether a call in doubt was applied
    retries: int = 0
    throttled: int = 0  # attempts answered 429
    in_flight: int = 0  # requests awaiting an answer now
    rate: float = math.inf  # the rate limit in force, requests per second
    bytes_total: int | None = None  # size of the manifests (of a .gz, compressed), when known
    bytes_read: int = 0  # how far the reader is through them (in a .gz, estimated)
    retry_after_until: float = 0.0  # monotonic time a call waits until on a Retry-After
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)  # unix time, for the report

    def waiting_on_retry_after(self, seconds: float | None) -> None:
        """A call waits ``seconds`` (None or 0: it does not) because the server said so."""
        if seconds is not None and seconds > 0:
            until = time.monotonic() + seconds
            self.retry_after_until = max(self.retry_after_until, until)

    def retry_after_left(self) -> float:
        """Seconds the longest wait on a server's Retry-After still lasts (0: none)."""
        return max(0.0, self.retry_after_until - time.monotonic())

    def total(self) -> tuple[int, bool] | None:
        """Records of the whole job and whether that is exact (every byte read), estimated
        from the bytes read of the bytes total; None when the total size is not known."""
        if not self.bytes_total or not self.bytes_read or not self.records:
            return None
        if self.bytes_read >= self.bytes_total:
            return self.records, True
        return max(self.records, round(self.records * self.bytes_total / self.bytes_read)), False

    def eta(self, records_per_s: float) -> float | None:
        """Seconds left at ``records_per_s``; None when the total or the pace is not known."""
        total = self.total()
        if total is None or records_per_s <= 0:
            return None
        return max(0, total[0] - self.finished) / records_per_s

    @property
    def done_here(self) -> int:
        """Records this run finished, one way or another."""
        return self.succeeded + self.failed + self.rejected

    @property
    def finished(self) -> int:
        return self.skipped + self.done_here

    @property
    def pending(self) -> int:
        """Records read but not finished: in flight, waiting to be sent, or held back."""
        return max(0, self.records - self.finished)


@dataclass(frozen=True)
class Report:
    """The final figures of a run, named as the text summary names them."""

    status: Status
    message: str  # why it stopped, or ""
    records: int  # records of the job read (those already done included)
    succeeded: int  # in this run
    failed: int  # in this run
    rejected: int  # in this run
    already_done: int  # finished by earlier runs
    pending: int  # read, not finished: sent when the same command runs again
    requests: int  # HTTP attempts sent
    retries: int
    throttled: int  # attempts answered 429
    read_backs: int  # runs read back to learn whether a call in doubt was applied
    records_per_s: float  # records this run finished, per second of the run
    requests_per_s: float  # requests sent, per second of the run
    rate_limit: float | None  # the rate limit in force at the end, requests/s (None: none)
    started_at: str  # UTC, ISO 8601
    finished_at: str
    elapsed_s: float
    checkpoint: str
    dead_letter: str
    failed_total: int = 0  # failed records of the whole job, earlier runs included
    rejected_total: int = 0  # rejected lines of the whole job, earlier runs included
    held_back: int = 0  # of pending: calls' records held back by a stop, not recorded as failed

    # the checkpoint showing the failures of earlier runs fixed and uploaded from the dead
    # letter: its own upload's (resolution.resolved_by); "" when they were not, or none
    resolved_by: str = ""

    @property
    def unsuccessful_total(self) -> int:
        """Records of the job that did not succeed (they are in the dead letter), but for
        those of earlier runs once fixed and uploaded from it (``resolved_by``)."""
        if self.resolved_by:
            return self.failed + self.rejected
        return max(self.failed_total + self.rejected_total, self.failed + self.rejected)

    @property
    def resolved_total(self) -> int:
        """Failures of earlier runs fixed and uploaded from the dead letter."""
        if not self.resolved_by:
            return 0
        return max(0, self.failed_total + self.rejected_total - self.failed - self.rejected)

    @property
    def already_done_parts(self) -> tuple[int, int, int]:
        """Of the records already done: how many earlier runs saw succeed, fail and rejected
        (found by review: "0 rejected, 9 already done" hid 3 lines rejected before)."""
        failed = max(0, self.failed_total - self.failed)
        rejected = max(0, self.rejected_total - self.rejected)
        return max(0, self.already_done - failed - rejected), failed, rejected

    @property
    def exit_code(self) -> int:
        if self.status == "stopped":
            return EXIT_SYSTEMIC
        if self.status == "interrupted":
            return EXIT_INTERRUPTED
        if self.status == "failed":
            return EXIT_SYSTEMIC
        return EXIT_SOME_FAILED if self.unsuccessful_total else EXIT_OK

    def as_dict(self) -> dict[str, Any]:
        """The report as ``--report`` writes it and the JSON ``summary`` event carries it."""
        return {
            "version": REPORT_VERSION,
            "exit_code": self.exit_code,
            **asdict(self),
            "unsuccessful_total": self.unsuccessful_total,
        }

    @staticmethod
    def build(
        c: Counters, status: Status, message: str, checkpoint: str, dead_letter: str
    ) -> Report:
        elapsed = max(time.monotonic() - c.started, 0.0)
        per_s = 1 / elapsed if elapsed > 0 else 0.0
        return Report(
            status=status,
            message=message,
            records=c.records,
            succeeded=c.succeeded,
            failed=c.failed,
            rejected=c.rejected,
            already_done=c.skipped,
            pending=c.pending,
            requests=c.requests,
            retries=c.retries,
            throttled=c.throttled,
            read_backs=c.read_backs,
            records_per_s=round(c.done_here * per_s, 1),
            requests_per_s=round(c.requests * per_s, 1),
            rate_limit=None if math.isinf(c.rate) else round(c.rate, 1),
            started_at=utc_iso(c.started_at),
            finished_at=utc_iso(c.started_at + elapsed),
            elapsed_s=round(elapsed, 3),
            checkpoint=checkpoint,
            dead_letter=dead_letter,
        )


def counted(n: int, noun: str, plural: str = "") -> str:
    """``n`` and ``noun``, plural (``plural``, or ``noun`` + "s") unless one: "1 attempt",
    "2 attempts", "1,024 records", "1 retry", "3 retries"."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {plural or noun + 's'}"


def utc_iso(unix: float) -> str:
    """``unix`` as UTC ISO 8601 to the millisecond: 2026-11-22T10:00:00.123Z."""
    moment = datetime.fromtimestamp(unix, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
