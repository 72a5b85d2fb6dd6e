"""What to do with a server's answer: a frozen policy that classifies and computes delays.

It never sleeps: the pool does, on the event loop.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
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

    @property
    def in_doubt(self) -> bool:
        """The request may have been applied although no success was seen."""
        if not self.sent:  # no connection was made, or it was never signed
            return False
        if self.code == NOT_THE_API:  # the API never saw it
            return False
        if self.code == UNIQUE_CONFLICT:
            return True
        return self.status == NO_ANSWER or self.status >= 500


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 8
    base_delay: float = 0.25  # seconds; the first retry waits up to this
    max_delay: float = 60.0  # cap of the exponential back-off
    max_retry_after: float = 300.0  # a Retry-After larger than this is clipped

    def verdict(self, answer: Answer) -> Verdict:
        status = answer.status
        if answer.code == NOT_THE_API:
            return "redirect"  # a 2xx, but not from the API: never a success
        if 200 <= status < 300:
            return "ok"
        if 300 <= status < 400:
            return "redirect"  # a proxy or login page: never followed, never a success
        if answer.code == UNIQUE_CONFLICT:
            return "retry"  # a transient conflict: read back, then resend if absent
        if status == NO_ANSWER or status == 429 or (status >= 500 and status != 501):
            return "retry"
        if status == 409 and answer.code in TRANSIENT_CONFLICTS:
            return "retry"
        if status == 401:
            return "unauthorized"
        return "permanent"

    def delay(self, attempt: int, answer: Answer, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if answer.retry_after is not None:
            return min(max(answer.retry_after, 0.0), self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return rng.uniform(0.0, ceiling)  # full jitter


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    from datetime import datetime, timezone
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())
