"""Stream the lines of JSON Lines manifests (plain, .gz or stdin) with their positions.

Reading is a stream: memory does not grow with a manifest's length. A job resumes part way
through at a ``Boundary``: ``ManifestReader`` reads the part before it back, checks that it
is what an earlier run uploaded, and goes on from there.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import orjson

from batchlog.errors import CheckpointError, ConfigurationError

STDIN = "-"
_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class Line:
    """A non-blank line and where it came from."""

    manifest: int  # index in the job's manifest list
    number: int  # 1-based line number
    start: int  # byte offset of the line in the (decompressed) stream
    end: int  # byte offset just past the line
    raw: bytes  # the line without its line ending
    record: int = 0  # index among the manifest's non-blank lines (the ManifestReader sets it)


def display_name(path: str) -> str:
    return "<stdin>" if path == STDIN else path


def check_readable(paths: list[str]) -> None:
    """Fail before any request when a manifest is missing or unreadable."""
    if not paths:
        raise ConfigurationError("no manifest given: name one or more JSON Lines files, or -")
    if paths.count(STDIN) > 1:
        raise ConfigurationError("'-' (stdin) can be given only once")
    real = [os.path.realpath(p) for p in paths if p != STDIN]
    if len(set(real)) < len(real):
        raise ConfigurationError(
            "the same manifest is given twice: its records would be uploaded twice"
        )
    for path in paths:
        if path == STDIN:
            continue
        if not os.path.exists(path):
            raise ConfigurationError(f"manifest {path}: no such file")
        if os.path.isdir(path):
            raise ConfigurationError(f"manifest {path}: is a directory")
        if not os.access(path, os.R_OK):
            raise ConfigurationError(f"manifest {path}: not readable")


def _chunks(stream: BinaryIO, path: str) -> Iterator[bytes]:
    while True:
        try:
            chunk = stream.readline()
        except _READ_ERRORS as exc:
            raise _unreadable(path, exc) from None
        if not chunk:
            return
        yield chunk


def open_stream(path: str) -> BinaryIO:
    if path == STDIN:
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=_CHUNK)


def read_lines(path: str, manifest: int) -> Iterator[Line]:
    """Yield the non-blank lines of one manifest, numbered (no resume, no hashing)."""
    stream = open_stream(path)
    try:
        pos = 0
        record = 0
        for number, chunk in enumerate(_chunks(stream, path), 1):
            start = pos
            pos += len(chunk)
            raw = chunk.rstrip(b"\r\n")
            if raw.strip():
                yield Line(manifest, number, start, pos, raw, record)
                record += 1
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
_PREFIX_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Boundary:
    """A place in a manifest just after a newline, and what lies before it.

    ``records`` non-blank lines come before it; ``offset`` is its byte position (in the
    decompressed stream for .gz), ``line`` the number of the line that starts there, and
    ``digest`` the SHA-256 of every byte before it: a resume reads that prefix back and
    goes on only when it is the same, so an edited, cut or different stream is refused.
    """

    records: int = 0
    offset: int = 0
    line: int = 1
    digest: str = EMPTY_DIGEST


class ManifestChanged(CheckpointError):
    """The part of a manifest that an earlier run processed is not what it was."""


class ManifestUnreadable(ConfigurationError):
    """A manifest that cannot be read as it says it is (a truncated or corrupt .gz)."""


def _unreadable(path: str, exc: BaseException) -> ManifestUnreadable:
    kind = "a truncated or corrupt gzip file" if path.endswith(".gz") else "unreadable"
    return ManifestUnreadable(f"manifest {display_name(path)}: {kind} ({exc})")


_READ_ERRORS = (OSError, EOFError, zlib.error)


def _complete(chunk: bytes) -> bool:
    """Whether an unterminated last line is a whole JSON document (not half written)."""
    try:
        orjson.loads(chunk)
    except orjson.JSONDecodeError:
        return False
    return True


class ManifestReader:
    """One manifest read from a boundary on, hashing every byte that goes past.

    ``check_prefix`` reads the bytes before the start boundary back (stdin and .gz cannot
    seek, and a file's processed part must be checked anyway) and refuses them if they
    differ; ``batch`` then hands out lines, each batch with the last boundary it passed.
    """

    def __init__(self, path: str, index: int, start: Boundary) -> None:
        self.path = path
        self.index = index
        self.start = start
        self._hasher = hashlib.sha256()
        self._stream: BinaryIO | None = None
        self._pos = 0  # byte offset of the next line
        self._line = 1  # number of the next line
        self._records = 0  # non-blank lines before the next line
        self.partial = 0  # number of an unterminated, incomplete last line left unread

    @property
    def records_read(self) -> int:
        return self._records

    def check_prefix(self) -> None:
        """Read back up to the start boundary; raise ManifestChanged if it differs."""
        start, name = self.start, display_name(self.path)
        stream = self._stream = open_stream(self.path)
        left = start.offset
        while left:
            try:
                got = stream.read(min(left, _PREFIX_CHUNK))
            except _READ_ERRORS as exc:
                raise _unreadable(self.path, exc) from None
            if not got:
                raise ManifestChanged(
                    f"{name} is shorter ({start.offset - left:,} bytes) than the "
                    f"{start.offset:,} bytes an earlier run already uploaded"
                )
            self._hasher.update(got)
            left -= len(got)
        if self._hasher.hexdigest() != start.digest:
            raise ManifestChanged(
                f"{name}: lines 1-{start.line - 1} ({start.offset:,} bytes), already "
                "uploaded by an earlier run, are not what they were"
            )
        self._pos, self._line, self._records = start.offset, start.line, start.records
        if self.path != STDIN and not self.path.endswith(".gz") and os.path.isfile(self.path):
            stream.close()  # reopened where it stopped by the first batch: no fd held
            self._stream = None

    def batch(self, size: int) -> tuple[list[Line], Boundary | None]:
        """Up to ``size`` non-blank lines, and the last boundary passed (None if none)."""
        stream = self._stream
        if stream is None:
            stream = self._stream = open_stream(self.path)
            stream.seek(self._pos)
        lines: list[Line] = []
        boundary: Boundary | None = None
        ended = False  # the last chunk read ended with a newline
        if self.partial:
            return lines, None
        while len(lines) < size:
            try:
                chunk = stream.readline()
            except _READ_ERRORS as exc:
                raise _unreadable(self.path, exc) from None
            if not chunk:
                break
            ended = chunk.endswith(b"\n")
            if not ended:  # an unterminated last line: the last boundary is before it
                boundary = self._here()
                if chunk.strip() and not _complete(chunk):
                    # still being written (a concurrent writer): left for a later run
                    self.partial = self._line
                    break
            start = self._pos
            self._pos += len(chunk)
            raw = chunk.rstrip(b"\r\n")
            if raw.strip():
                lines.append(Line(self.index, self._line, start, self._pos, raw, self._records))
                self._records += 1
            self._line += 1
            self._hasher.update(chunk)
        if ended:
            boundary = self._here()
        return lines, boundary

    def _here(self) -> Boundary:
        return Boundary(self._records, self._pos, self._line, self._hasher.copy().hexdigest())

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdin.buffer:
            self._stream.close()
        self._stream = None
