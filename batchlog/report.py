"""The numbers of a job: live counters while it runs, and the final report."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["completed", "stopped", "interrupted", "failed"]

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_SYSTEMIC = 3
EXIT_INTERRUPTED = 130


@dataclass
class Counters:
    """Mutable counts, updated by the job as it goes; read by progress displays."""

    records: int = 0  # records of the job, those already done before included
    succeeded: int = 0  # in this run
    failed: int = 0  # in this run: permanent errors, attempts exhausted
    rejected: int = 0  # in this run: invalid manifest lines
    skipped: int = 0  # finished by an earlier run
    requests: int = 0  # HTTP attempts sent
    read_backs: int = 0  # runs read back to learn whether a call in doubt was applied
    retries: int = 0
    throttled: int = 0  # attempts answered 429
    in_flight: int = 0  # requests awaiting an answer now
    rate: float = math.inf  # the rate limit in force, requests per second
    bytes_total: int | None = None  # size of the manifests, when known (not .gz or stdin)
    bytes_read: int = 0  # how far the reader is through them
    retry_after_until: float = 0.0  # monotonic time a call waits until on a Retry-After
    started: float = field(default_factory=time.monotonic)

    def waiting_on_retry_after(self, seconds: float | None) -> None:
        """A call waits ``seconds`` (None or 0: it does not) because the server said so."""
        if seconds is not None and seconds > 0:
            until = time.monotonic() + seconds
            self.retry_after_until = max(self.retry_after_until, until)

    def retry_after_left(self) -> float:
        """Seconds the longest wait on a server's Retry-After still lasts (0: none)."""
        return max(0.0, self.retry_after_until - time.monotonic())

    def eta(self) -> float | None:
        """Seconds left, estimated from the bytes read and the pace of this run."""
        if not self.bytes_total or not self.bytes_read:
            return None
        done_here = self.succeeded + self.failed + self.rejected
        elapsed = time.monotonic() - self.started
        if not done_here or elapsed <= 0:
            return None
        expected = self.records * self.bytes_total / self.bytes_read
        return max(0.0, expected - self.finished) / (done_here / elapsed)

    @property
    def finished(self) -> int:
        return self.skipped + self.succeeded + self.failed + self.rejected


@dataclass(frozen=True)
class Report:
    records: int
    succeeded: int
    failed: int
    rejected: int
    skipped: int
    requests: int
    retries: int
    throttled: int
    elapsed_s: float
    rate: float | None  # the final rate limit (None when unlimited)
    status: Status
    message: str  # why it stopped, or ""
    checkpoint: str
    dead_letter: str
    read_backs: int = 0
    failed_total: int = 0  # failed records of the whole job, earlier runs included
    rejected_total: int = 0  # rejected lines of the whole job, earlier runs included

    @property
    def unsuccessful_total(self) -> int:
        """Records of the job that did not succeed (they are in the dead letter)."""
        return max(self.failed_total + self.rejected_total, self.failed + self.rejected)

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
        doc = asdict(self)
        doc["exit_code"] = self.exit_code
        return doc

    @staticmethod
    def build(
        c: Counters, status: Status, message: str, checkpoint: str, dead_letter: str
    ) -> Report:
        return Report(
            records=c.records,
            succeeded=c.succeeded,
            failed=c.failed,
            rejected=c.rejected,
            skipped=c.skipped,
            requests=c.requests,
            read_backs=c.read_backs,
            retries=c.retries,
            throttled=c.throttled,
            elapsed_s=round(time.monotonic() - c.started, 3),
            rate=None if math.isinf(c.rate) else round(c.rate, 1),
            status=status,
            message=message,
            checkpoint=checkpoint,
            dead_letter=dead_letter,
        )
