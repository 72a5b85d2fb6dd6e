"""The dead-letter file: every record that did not succeed, as a manifest the user can fix.

Each line is a JSON object whose last member is ``_error`` (status, code, message, source):
the original line, byte for byte, with ``_error`` added; or, for a line that is not a JSON
object (invalid JSON, not UTF-8, over-long), ``{"_raw": THE LINE AS TEXT, "_error": ...}``.
Fields starting with ``_`` are ignored on upload, so a fixed file can be uploaded as it is;
a line still holding ``_raw`` and no record is rejected again (validate.kept_as_text), and
its next dead-letter line is the same with its ``_error`` replaced, never wrapped twice.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, BinaryIO

import orjson

from batchlog import durable
from batchlog.errors import DeadLetterError
from batchlog.validate import top_level_spans

log = logging.getLogger("batchlog")


def dead_letter_line(raw: bytes, error: dict[str, Any]) -> bytes:
    """The manifest line ``raw`` with ``error`` as its ``_error`` member, added last.

    The line's own bytes are kept exactly: never parsed and written again, which would turn
    a big integer into a float, respell numbers and escapes, and drop a duplicated key, so
    that the fixed dead letter would send something else than the manifest said. A top-level
    ``_error`` already there (a dead letter uploaded again) is taken out, with its comma, so
    the line has one. A line that is not a JSON object (or nests deeper than the parser's
    stack) is kept as the string ``_raw``, with ``_error`` after it as in every other line.
    """
    note = b'"_error":' + orjson.dumps(error)
    try:
        text = raw.decode("utf-8")
        members = top_level_spans(text)
    except ValueError:  # not UTF-8, or not a JSON object
        text = raw.decode("utf-8", errors="backslashreplace")
        return orjson.dumps({"_raw": text, "_error": error})
    for start, end in reversed(_error_cuts(text, members)):  # in order and apart
        text = text[:start] + text[end:]
    close = len(text.rstrip(" \t\r\n")) - 1  # the object's closing brace
    left = any(key != "_error" for key, _, _ in members)
    comma = b"," if left else b""
    return text[:close].encode() + comma + note + text[close:].encode()


def _error_cuts(text: str, members: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """The spans of ``text`` to cut so that no top-level ``_error`` member is left, each with
    its comma: a leading run of them up to the next member, any other from the comma before
    it (the whitespace before that comma stays: cutting what this module added gives back
    the line as it was). In order, none overlapping."""
    lead = 0
    while lead < len(members) and members[lead][0] == "_error":
        lead += 1
    cuts = []
    if lead == len(members) and members:  # nothing but _error: the object becomes empty
        cuts.append((members[0][1], members[-1][2]))
    elif lead:
        cuts.append((members[0][1], members[lead][1]))
    for i in range(lead, len(members)):
        if members[i][0] == "_error":
            cuts.append((text.index(",", members[i - 1][2]), members[i][2]))
    return cuts


class DeadLetter:
    """Buffered appends, written and fsync'ed by the job's flush task before the journal.

    The file (and its directory) is created by the first line written: a job where every
    record succeeds leaves none behind.
    """

    def __init__(self, path: str, set_aside: bool) -> None:
        """``set_aside``: the job starts afresh (a new checkpoint), so a dead letter left at
        ``path`` by an earlier job is renamed now, never mixed into this one's (one line per
        record that did not succeed), never cut back by its resume, and never lost."""
        self.path = path
        self.count = 0  # lines added in this run
        self._buffer: list[bytes] = []  # lines not yet written
        self._file: BinaryIO | None = None  # opened by the first write
        try:
            if set_aside and os.path.exists(path) and os.path.getsize(path) > 0:
                self.set_aside()
            self.size = os.path.getsize(path) if os.path.exists(path) else 0  # bytes written
        except OSError as exc:
            raise DeadLetterError(
                f"cannot open dead-letter file {path}: {exc.strerror or exc}"
            ) from None
        _check_creatable(path)  # found now, before any request, not at the first failure

    def set_aside(self) -> None:
        """Rename the file at ``path`` (an earlier job's) to a name never used before."""
        if not os.path.isfile(self.path):  # never a device or a pipe, whoever names it
            raise DeadLetterError(f"dead letter {self.path} is not a regular file")
        parent = os.path.dirname(os.path.abspath(self.path))
        stem = f"{self.path}.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        aside, n = stem, 1
        while os.path.lexists(aside):  # two fresh starts within a second keep both
            n += 1
            aside = f"{stem}-{n}"
        os.replace(self.path, aside)
        durable.sync_directory(parent)  # the rename survives a power cut
        log.warning("an earlier dead letter was kept as %s (this job starts afresh)", aside)
        self.size = 0

    def open_now(self) -> tuple[int, int]:
        """Open (create) the file now; its (device, inode), for the journal's commit."""
        st = os.fstat(self._open().fileno())
        return (st.st_dev, st.st_ino)

    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the file at ``path`` now; None if there is none."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def add(self, raw: bytes, error: dict[str, Any]) -> None:
        self._buffer.append(dead_letter_line(raw, error))
        self.count += 1

    def cut_to(self, size: int) -> None:
        """Drop what lies beyond ``size`` bytes (lines of records the journal does not count
        as finished: written just before a crash, they are written again)."""
        if self.size <= size:
            return
        try:
            with open(self.path, "r+b") as f:
                f.truncate(size)
                os.fsync(f.fileno())
        except OSError as exc:
            raise DeadLetterError(
                f"cannot cut dead-letter file {self.path} back to {size} bytes: "
                f"{exc.strerror or exc}"
            ) from None
        self.size = size

    def pending_bytes(self) -> bytes:
        if not self._buffer:
            return b""
        out = b"\n".join(self._buffer) + b"\n"
        self._buffer = []
        return out

    def write(self, data: bytes) -> None:
        """Append and fsync (blocking: call from a thread); the first data creates the file."""
        if not data:
            return
        try:
            handle = self._open()
            durable.append(handle, data)
            self.size += len(data)
        except OSError as exc:
            if self._file is not None:  # a part may have been written
                self.size = os.fstat(self._file.fileno()).st_size
            raise DeadLetterError(
                f"cannot write dead-letter file {self.path}: {exc.strerror or exc}; "
                "nothing journaled was lost, run the same command again once fixed"
            ) from None

    def _open(self) -> BinaryIO:
        if self._file is None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            created = not os.path.exists(self.path)
            self._file = open(self.path, "ab", buffering=0)
            self.size = self._file.seek(0, os.SEEK_END)
            if created:
                durable.sync_directory(parent)  # the file's name survives a power cut
        return self._file

    def close(self) -> None:
        if self._file is not None:
            durable.close_quietly(self._file)


def _check_creatable(path: str) -> None:
    """Raise DeadLetterError if ``path`` could not be written or created: the nearest
    directory that exists on the way to it must be writable."""
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise DeadLetterError(f"cannot write dead-letter file {path}: permission denied")
        return
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise DeadLetterError(f"cannot create dead-letter file {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DeadLetterError(f"cannot create dead-letter file {path}: cannot write in {folder}")
