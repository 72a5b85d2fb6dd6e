"""The dead-letter file: every record that did not succeed, as a manifest the user can fix.

Each line is the original record plus an ``_error`` object (status, code, message, source).
Fields starting with ``_`` are ignored on upload, so the file can be uploaded as it is.
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from batchlog import durable
from batchlog.errors import DeadLetterError


def dead_letter_line(raw: bytes, error: dict[str, Any]) -> bytes:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        doc["_error"] = error
        return orjson.dumps(doc)
    text = raw.decode("utf-8", errors="backslashreplace")
    return orjson.dumps({"_error": error, "_raw": text})


class DeadLetter:
    """Buffered appends, written and fsync'ed by the job's flush task before the journal."""

    def __init__(self, path: str, truncate: bool) -> None:
        self.path = path
        self.count = 0  # lines added in this run
        self._buffer: list[bytes] = []  # lines not yet written
        try:
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            self._file = open(path, "wb" if truncate else "ab")
        except OSError as exc:
            raise DeadLetterError(
                f"cannot open dead-letter file {path}: {exc.strerror or exc}"
            ) from None

    def add(self, raw: bytes, error: dict[str, Any]) -> None:
        self._buffer.append(dead_letter_line(raw, error))
        self.count += 1

    def pending_bytes(self) -> bytes:
        if not self._buffer:
            return b""
        out = b"\n".join(self._buffer) + b"\n"
        self._buffer = []
        return out

    def write(self, data: bytes) -> None:
        """Append and fsync (blocking: call from a thread)."""
        try:
            durable.append(self._file, data)
        except OSError as exc:
            raise DeadLetterError(
                f"cannot write dead-letter file {self.path}: {exc.strerror or exc}; "
                "nothing journaled was lost, run the same command again once fixed"
            ) from None

    def close(self) -> None:
        durable.close_quietly(self._file)
