"""Files a user names for batchlog to read whole (an OCI config, a key, a session token, a
CA bundle) or to look at (a checkpoint): regular files only, read with a cap. A FIFO, a
device or a huge file, named by mistake or by malice, is refused at once, where reading it
would wait forever (a FIFO without a writer) or fill the memory (``/dev/zero``)."""

from __future__ import annotations

import os
import re
import stat

KIB = 1 << 10
MIB = 1 << 20


class UnusableFile(Exception):
    """Why a file cannot be used, in a few words: never a word of its content."""


def check_regular(path: str) -> os.stat_result:
    """The file's status, if it is a regular file; else UnusableFile saying what it is."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UnusableFile(_reason(exc)) from None
    _check_mode(st.st_mode)
    return st


def read_capped(path: str, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; UnusableFile if
    it is anything else or larger (``what`` names what it should be: "a key")."""
    check_regular(path)  # a FIFO or a device is never opened
    try:  # opened without waiting, and checked again: it may have been replaced since
        with open(path, "rb", opener=_without_waiting) as f:
            _check_mode(os.fstat(f.fileno()).st_mode)
            data = f.read(limit + 1)
    except OSError as exc:
        raise UnusableFile(_reason(exc)) from None
    if len(data) > limit:
        raise UnusableFile(f"is larger than {_size(limit)}: not {what}")
    return data


def _without_waiting(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))


def _check_mode(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise UnusableFile("is a directory")
    if not stat.S_ISREG(mode):
        raise UnusableFile("is not a regular file (a pipe or a device?)")


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def _size(limit: int) -> str:
    for unit, name in ((MIB, "MiB"), (KIB, "KiB")):
        if limit >= unit and limit % unit == 0:
            return f"{limit // unit} {name}"
    return f"{limit} bytes"


CA_BUNDLE_LIMIT = 16 * MIB  # the whole Mozilla bundle is about 250 KiB
_CERTIFICATE = re.compile(
    rb"-----BEGIN (?:TRUSTED |X509 )?CERTIFICATE-----[\t\n\r -~]*?"
    rb"-----END (?:TRUSTED |X509 )?CERTIFICATE-----"
)


def read_ca_bundle(path: str) -> str:
    """The PEM certificates of the CA bundle ``path``, for ``ssl``'s ``cadata`` (OpenSSL,
    given the file's name, would open a FIFO and wait, or read ``/dev/zero`` forever);
    UnusableFile if it is no regular file, too large or holds no certificate."""
    data = read_capped(path, CA_BUNDLE_LIMIT, "a CA bundle")
    certificates = _CERTIFICATE.findall(data)
    if not certificates:  # an empty cadata would mean the system's CAs: never that
        raise UnusableFile("no PEM certificate in it")
    return "\n".join(c.decode("ascii") for c in certificates) + "\n"
