"""What to do with a server's answer: a frozen policy that classifies and computes delays.

It never sleeps: the pool does, on the event loop.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Literal

Verdict = Literal["ok", "retry", "permanent", "unauthorized", "redirect"]

# 409 codes that describe a passing state, worth retrying (as the OCI SDK does)
TRANSIENT_CONFLICTS = frozenset({"IncorrectState", "LockConflict", "ConcurrentModification"})
NO_ANSWER = 0  # status of an attempt that got no HTTP answer (timeout, connection error)
CANNOT_CONNECT = "CannotConnect"  # code: no connection could be made, nothing was sent
SIGNING_FAILED = "SigningFailed"  # code: the request could not be signed, nothing was sent
REDIRECT = "Redirect"  # code of a 3xx answer (redirects are never followed)
# code of a 2xx whose body is not a JSON object (the API answers {}): a login page served
# with 200, a proxy's page; the job is not talking to the API, as with a redirect
NOT_THE_API = "NotTheApi"
# code of a 400/500 caused by a database unique constraint: two writes of the same thing
# raced (a late-applied duplicate and its retry); it may have been applied: read it back
UNIQUE_CONFLICT = "UniqueConflict"
# code of an answer whose status is no final HTTP status (below 200, above 599): something
# came back, garbled; the request may have been applied, as with no answer at all
BAD_STATUS = "BadStatus"
# code of an answer saying the server's database was busy, not that the request is wrong:
# SQLAlchemy's pool exhausted behind MLflow ("QueuePool limit of size N overflow M reached,
# connection timed out"), which MLflow answers 400 under load. Transient (retried with the
# back-off) and in doubt (the request may have been applied before the pool ran out, as a
# late write of the same request can be): a call that is not replay-safe is read back
DATABASE_BUSY = "DatabaseBusy"
# codes whose answer may have been applied although it is no success: retried, and read
# back first where a replay is not safe
IN_DOUBT_CODES = frozenset({UNIQUE_CONFLICT, BAD_STATUS, DATABASE_BUSY})
# the longest a server's Retry-After is honoured, for one call and for the shared pacer
# alike: a proxy's "Retry-After: 100000" must not hold a job for a day (README)
MAX_RETRY_AFTER = 300.0
_DELAY_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # RFC 9110 delay-seconds (and decimals)


@dataclass(frozen=True, slots=True)
class Answer:
    """What one attempt got back."""

    status: int  # HTTP status, or NO_ANSWER
    code: str = ""  # the error body's code, or the exception's kind
    message: str = ""
    request_id: str = ""  # opc-request-id echoed by the server (or the one we sent)
    etag: str = ""
    retry_after: float | None = None  # seconds, from a Retry-After header
    sent: bool = True  # False: the request never reached the server
    run_id: str = ""  # a create-run's: the target run it made or found

    @property
    def in_doubt(self) -> bool:
        """The request may have been applied although no success was seen."""
        if not self.sent:  # no connection was made, or it was never signed
            return False
        if self.code == NOT_THE_API:  # the API never saw it
            return False
        if self.code in IN_DOUBT_CODES:
            return True
        return self.status == NO_ANSWER or self.status >= 500


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 0.25  # seconds; the first retry waits up to this
    max_delay: float = 60.0  # cap of the exponential back-off
    max_retry_after: float = MAX_RETRY_AFTER  # a Retry-After larger than this is clipped

    def verdict(self, answer: Answer) -> Verdict:
        status = answer.status
        if answer.code == NOT_THE_API:
            return "redirect"  # a 2xx, but not from the API: never a success
        if 200 <= status < 300:
            return "ok"
        if 300 <= status < 400:
            return "redirect"  # a proxy or login page: never followed, never a success
        if answer.code in IN_DOUBT_CODES:
            return "retry"  # a transient conflict, a busy database, a garbled answer
        if status == NO_ANSWER or status == 429 or (status >= 500 and status != 501):
            return "retry"
        if status == 409 and answer.code in TRANSIENT_CONFLICTS:
            return "retry"
        if status == 401:
            return "unauthorized"
        return "permanent"

    def delay(self, attempt: int, answer: Answer, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        wait = answer.retry_after
        if wait is not None and math.isfinite(wait):
            return min(max(wait, 0.0), self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return rng.uniform(0.0, ceiling)  # full jitter


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header, at most MAX_RETRY_AFTER; None when there
    is none or it cannot be read (nan, inf, negative, garbage: the back-off applies).

    RFC 9110 allows delay-seconds (a non-negative integer) or an HTTP-date: IMF-fixdate,
    the obsolete RFC 850 form or asctime's; a date in the past means now. A date without a
    zone (asctime) or in ``-0000`` is UTC, as every HTTP-date is.
    """
    if not value:
        return None
    text = value.strip()
    if _DELAY_SECONDS.fullmatch(text):
        if len(text.partition(".")[0]) > 9:  # far beyond the cap (and float() of 5,000
            return MAX_RETRY_AFTER  # digits is slow): no need to read it
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    except OverflowError:
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)
