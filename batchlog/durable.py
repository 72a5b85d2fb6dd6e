"""Appending to a file so that what was written survives a crash."""

from __future__ import annotations

import os
from typing import BinaryIO


def append(handle: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` and fsync (blocking: call from a thread). Raises OSError.

    ``handle`` is unbuffered (``open(path, "ab", buffering=0)``): a write cut short by a
    full disk leaves nothing behind in a buffer to be written later, after other lines.
    """
    view = memoryview(data)
    while view:
        written = handle.write(view)
        if not written:  # a raw file writes at least one byte or raises
            raise OSError(f"nothing written of {len(view)} bytes")
        view = view[written:]
    os.fsync(handle.fileno())


def close_quietly(handle: BinaryIO) -> None:
    try:
        handle.close()
    except OSError:
        pass


def sync_directory(path: str) -> None:
    """fsync a directory, so that a file created or renamed in it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not possible here (some platforms): the file itself is still fsync'ed
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
