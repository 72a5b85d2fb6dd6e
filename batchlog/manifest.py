"""Stream the lines of JSON Lines manifests (plain, .gz or stdin) with their positions.

Reading is a stream: memory does not grow with a manifest's length. A job can start part
way through (resume): ``open_at`` seeks to a byte offset, reading forward where the file
cannot seek.
"""

from __future__ import annotations

import gzip
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from batchlog.errors import ConfigurationError

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


def display_name(path: str) -> str:
    return "<stdin>" if path == STDIN else path


def check_readable(paths: list[str]) -> None:
    """Fail before any request when a manifest is missing or unreadable."""
    if not paths:
        raise ConfigurationError("no manifest given: name one or more JSON Lines files, or -")
    if paths.count(STDIN) > 1:
        raise ConfigurationError("'-' (stdin) can be given only once")
    for path in paths:
        if path == STDIN:
            continue
        if not os.path.isfile(path):
            raise ConfigurationError(f"manifest {path}: no such file")
        if not os.access(path, os.R_OK):
            raise ConfigurationError(f"manifest {path}: not readable")


def open_stream(path: str) -> BinaryIO:
    if path == STDIN:
        return sys.stdin.buffer
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=_CHUNK)


def read_lines(path: str, manifest: int, offset: int = 0, first_line: int = 1) -> Iterator[Line]:
    """Yield the non-blank lines of one manifest from ``offset`` on.

    ``offset`` must be the start of a line (a position that an earlier run recorded).
    """
    stream = open_stream(path)
    try:
        skip_to(stream, offset)
        pos = offset
        number = first_line - 1
        for chunk in stream:
            number += 1
            start = pos
            pos += len(chunk)
            raw = chunk.rstrip(b"\r\n")
            if raw.strip():
                yield Line(manifest, number, start, pos, raw)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def skip_to(stream: BinaryIO, offset: int) -> None:
    if offset == 0:
        return
    if stream.seekable():
        stream.seek(offset)
        return
    left = offset
    while left:
        got = stream.read(min(left, _CHUNK))
        if not got:
            raise ConfigurationError("manifest is shorter than the checkpoint says it was")
        left -= len(got)


def read_span(path: str, start: int, end: int) -> bytes | None:
    """Bytes [start, end) of a manifest, or None where they cannot be read again (stdin)."""
    if path == STDIN:
        return None
    with open_stream(path) as stream:
        try:
            stream.seek(start)
        except (OSError, io.UnsupportedOperation):
            return None
        return stream.read(end - start)
