"""The exceptions batchlog raises.

    BatchlogError                 root of everything raised on purpose
    +-- ConfigurationError        a bad flag, missing config or key: nothing was sent (exit 2)
    +-- CheckpointError           the checkpoint belongs to another job or cannot be written
    +-- DeadLetterError           the dead-letter file cannot be written
    +-- SystemicError             the server refuses every request alike (auth, wrong ids)

A bad manifest line is not an exception: it is a ``Rejection`` that flows to the dead letter
like any other failed record. Transient and permanent request failures are outcomes too.
"""

from __future__ import annotations

import re


class BatchlogError(Exception):
    """Root of batchlog's own exceptions."""


class ConfigurationError(BatchlogError):
    """A flag, a config file or a key is wrong or missing; raised before any request."""


class CheckpointError(BatchlogError):
    """The checkpoint is from another job, or cannot be read or written."""


class DeadLetterError(BatchlogError):
    """The dead-letter file cannot be written."""


class SystemicError(BatchlogError):
    """Every request fails the same way (credentials, platform id, workspace): stop early."""


def internal_error(exc: BaseException) -> str:
    """One line naming an exception nobody expected (a bug): its type and its message.

    An exception group (what a task group raises) is named by its first leaf. The message
    is cut to one line of bounded length: it may quote data, never more than a glimpse.
    """
    inner = getattr(exc, "exceptions", None)  # an exception group (3.11, or its backport)
    while isinstance(inner, tuple) and inner and isinstance(inner[0], BaseException):
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    text = redact(" ".join(str(exc).split()))
    if len(text) > 200:
        text = text[:200] + "..."
    name = type(exc).__qualname__
    return f"internal error: {name}: {text}" if text else f"internal error: {name}"


BUG_ADVICE = (
    "this is a bug in batchlog (-v shows its traceback: please report it); nothing was "
    "recorded as failed and the checkpoint is intact: run the same command again"
)


# What credentials look like in text nobody meant to show: an Authorization value, the
# userinfo of a URL, a PEM block, a pass_phrase or password assignment, a JWT (OCI session
# tokens), and any long unbroken run of base64 (keys, signatures, tokens).
_SECRET_SHAPES = re.compile(
    r"(?i:authorization)['\"]?\s*[:=]\s*['\"]?[^'\"\n,}]+"
    r"|(?i:bearer)\s+[\w.~+/-]{8,}=*"
    r"|(?i:basic)\s+(?=[A-Za-z0-9+/]*[0-9+/=])[A-Za-z0-9+/]{6,}=*"
    r"|(?i:signature)\s+(?:version|keyId|headers|algorithm|signature)=[^\n]*"
    r"|(?<=://)[^\s@]*(?=@)"
    r"|-----BEGIN[^-]*-----.*?(?:-----END[^-]*-----|$)"
    r"|(?i:pass_?phrase|password|passwd)(?:\s*[=:]\s*|\s+)[^\s,;]+"
    r"|(?i:token|secret|key_content)\s*[=:]\s*[^\s,;]+"
    r"|\beyJ[\w-]+\.[\w-]+\.?[\w-]*",
    re.DOTALL,
)
_LONG_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{80,}={0,2}")


def redact(text: str, long_runs: bool = True) -> str:
    """``text`` with anything shaped like a credential replaced by ``[redacted]``.

    A last line of defence for text batchlog does not control (an unexpected exception's
    message, a traceback shown with -v, a server's error message): batchlog's own messages
    never hold secrets. ``long_runs``: also any run of 80 base64 characters (a key, a
    signature); off for a server's messages, which may quote long ids or data.
    """
    text = _SECRET_SHAPES.sub("[redacted]", text)
    return _LONG_BASE64.sub("[redacted]", text) if long_runs else text
