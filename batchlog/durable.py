"""Appending to a file so that what was written survives a crash."""

from __future__ import annotations

import os
from typing import BinaryIO


def append(handle: BinaryIO, data: bytes) -> None:
    """Write, flush and fsync (blocking: call from a thread). Raises OSError."""
    if not data:
        return
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())


def close_quietly(handle: BinaryIO) -> None:
    try:
        handle.close()
    except OSError:
        pass
