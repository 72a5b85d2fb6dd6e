"""Stream the lines of JSON Lines manifests (plain, gzip or stdin) with their positions.

Reading is a stream in bounded memory: a manifest's length does not matter, and a line
longer than ``MAX_LINE`` is never held whole (it comes out cut to its first ``KEPT`` bytes,
with a ``problem``). Gzip is recognised by its magic bytes, whatever the name. A job resumes
part way through at a ``Boundary``: ``ManifestReader`` reads the part before it back, checks
that it is what an earlier run uploaded, and goes on from there. On a pipe (stdin) a batch
ends when nothing more has arrived yet, so that what came is processed at once.
"""

from __future__ import annotations

import hashlib
import os
import select
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import orjson

from batchlog.errors import CheckpointError, ConfigurationError

STDIN = "-"
MAX_LINE = 32 << 20  # bytes in one manifest line, its newline excluded (see the README)
KEPT = 1024  # bytes of an over-long line kept (the dead letter's _raw)
_CHUNK = 1 << 16
_PREFIX_CHUNK = 1 << 20
_GZIP = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which may start a line
_OTHER_FORMATS = {  # magic bytes of files people compress manifests with, that we do not read
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
}


@dataclass(frozen=True, slots=True)
class Line:
    """A non-blank line and where it came from."""

    manifest: int  # index in the job's manifest list
    number: int  # 1-based line number
    start: int  # byte offset of the line in the (decompressed) stream
    end: int  # byte offset just past the line
    raw: bytes  # the line without its line ending (an over-long line: its first KEPT bytes)
    record: int = 0  # index among the manifest's non-blank lines (the ManifestReader sets it)
    problem: str = ""  # why the line is rejected before it is parsed (over-long)


def display_name(path: str) -> str:
    return "<stdin>" if path == STDIN else path


def check_readable(paths: list[str]) -> None:
    """Fail before any request when a manifest is missing, unreadable or not JSON Lines."""
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
        if path != STDIN:
            _check_file(path)


def _check_file(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigurationError(f"manifest {path}: is a directory")
        devices = stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)
        if devices and os.path.realpath(path) != os.devnull:
            # /dev/zero would be read for ever: a file, a pipe or - (stdin) only
            raise ConfigurationError(
                f"manifest {path}: is a device or a socket, not a file or a pipe"
            )
        if not stat.S_ISREG(mode):  # a pipe such as <(zcat ...): nothing may be read from it
            if not os.access(path, os.R_OK):
                raise PermissionError
            return
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise ConfigurationError(f"manifest {path}: {_reason(exc)}") from None
    _check_format(path, head)
    if head.startswith(_GZIP):
        _check_inside(path)


def _check_inside(path: str) -> None:
    """Raise ManifestUnreadable if a gzip manifest holds gzip again (its first bytes are
    read: cheap); a damaged one is told with its line when it is read."""
    source: _Input | None = None
    try:
        source = _Input(path)
        source.read(True)
    except (OSError, zlib.error, _Truncated):
        pass
    finally:
        if source is not None:
            source.close()


def is_gzip(path: str) -> bool:
    """Whether a manifest is a gzip file (its magic bytes, whatever its name)."""
    if path == STDIN or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(2) == _GZIP
    except OSError:
        return False


def _reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return (exc.strerror or str(exc)).lower()


def _check_format(path: str, head: bytes) -> None:
    for magic, kind in _OTHER_FORMATS.items():
        if head.startswith(magic):
            raise ManifestUnreadable(
                f"manifest {display_name(path)}: a {kind} file; batchlog reads JSON Lines, "
                "plain or gzip: decompress it first, or pipe it decompressed to batchlog upload -"
            )


EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True, slots=True)
class Boundary:
    """A place in a manifest just after a newline, and what lies before it.

    ``records`` non-blank lines come before it; ``offset`` is its byte position (in the
    decompressed stream for gzip), ``line`` the number of the line that starts there, and
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
    """A manifest that cannot be read (a truncated or corrupt gzip file, a read error)."""


class _Truncated(Exception):
    """The input ended in the middle of a gzip member."""


# ---- bytes -------------------------------------------------------------------------------


class _Gunzip:
    """Gzip members one after another (as gzip and zcat read them), in bounded pieces."""

    def __init__(self) -> None:
        self._input = b""  # compressed bytes not yet taken by the decompressor
        self._d: zlib._Decompress | None = None  # the member being read
        self.fed = 0  # compressed bytes fed so far
        self.inflated = 0  # decompressed bytes given out so far

    def feed(self, data: bytes) -> None:
        self._input += data
        self.fed += len(data)

    def inflate(self) -> bytes:
        """Up to _CHUNK decompressed bytes; b"" when more input is needed (raises zlib.error)."""
        while True:
            if self._d is None:
                self._input = self._input.lstrip(b"\0")  # padding after a member, as gzip allows
                if not self._input:
                    return b""
                self._d = zlib.decompressobj(wbits=31)  # gzip header and CRC checked
            out = self._d.decompress(self._input, _CHUNK)  # bounded: a bomb is no threat
            if self._d.eof:
                self._input, self._d = self._d.unused_data, None
            else:
                self._input = self._d.unconsumed_tail
            if out:
                self.inflated += len(out)
                return out
            if self._d is not None:
                return b""

    def finish(self) -> None:
        if self._d is not None:
            raise _Truncated


class _Input:
    """The bytes of one manifest: a file or stdin, gunzipped when it starts as gzip does.

    ``read`` gives b"" at the end, and on a pipe None when nothing has arrived yet and
    ``wait`` is false: stdin is polled, never blocked on, so a stop is never held up.
    """

    def __init__(self, path: str, offset: int = 0) -> None:
        if path == STDIN:
            self._file = None
            self._fd = 0
        else:
            self._file = open(path, "rb", buffering=0)  # closed by close()
            self._fd = self._file.fileno()
        self.regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._head = b""  # bytes read before the format is known
        self._known = offset > 0  # a reopened plain file: seeked past the format check
        self._gz: _Gunzip | None = None
        self._inflated = False  # the start of the decompressed stream was checked
        self._ended = False
        if offset:
            os.lseek(self._fd, offset, os.SEEK_SET)

    @property
    def fileno(self) -> int:
        return self._fd

    @property
    def gzip(self) -> bool:
        return self._gz is not None

    def _raw(self, wait: bool, size: int) -> bytes | None:
        while True:
            if not (wait or self.regular):
                ready, _, _ = select.select([self._fd], [], [], 0)
                if not ready:
                    return None
            try:
                return os.read(self._fd, size)
            except BlockingIOError:  # O_NONBLOCK set on a shared stdin by someone else
                if not wait:
                    return None
                select.select([self._fd], [], [])

    def read(self, wait: bool, size: int = _CHUNK) -> bytes | None:
        while True:
            if self._gz is not None:
                out = self._gz.inflate()
                if out:
                    if not self._inflated:
                        self._inflated = True
                        self._check_inflated(out)
                    return out
                if self._ended:
                    self._gz.finish()
                    return b""
            elif self._known and self._head:
                out, self._head = self._head, b""
                return out
            elif self._ended:
                return b""
            data = self._raw(wait, size if self._known and self._gz is None else _CHUNK)
            if data is None:
                return None
            if not data:
                self._ended = True
                self._known = True
                continue
            if self._gz is not None:
                self._gz.feed(data)
            elif self._known:
                return data
            else:
                self._head += data
                if len(self._head) >= len(_GZIP) or self._head[:1] != _GZIP[:1]:
                    self._sniff()

    def file_offset(self, offset: int) -> int:
        """Where ``offset`` of the stream lies in the file, for progress: itself for plain
        text; for gzip, estimated from how much the data read so far inflated."""
        gz = self._gz
        if gz is None or not gz.inflated:
            return offset
        taken = gz.fed - len(gz._input)  # what the decompressor consumed
        return min(taken, offset * taken // gz.inflated)

    def _sniff(self) -> None:
        self._known = True
        if self._head.startswith(_GZIP):
            self._gz = _Gunzip()
            self._gz.feed(self._head)
            self._head = b""
        else:
            _check_format(STDIN if self._file is None else self._file.name, self._head)

    def _check_inflated(self, head: bytes) -> None:
        if head.startswith(_GZIP):  # gzip -c run twice: its lines would all be "not UTF-8"
            name = display_name(STDIN if self._file is None else self._file.name)
            raise ManifestUnreadable(f"manifest {name}: gzip inside gzip: decompress it once first")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class _Lines:
    """Lines of an _Input, each at most ``limit`` + 1 bytes at a time (a longer one comes in
    pieces: the caller knows a piece of ``limit`` + 1 bytes with no newline goes on)."""

    def __init__(self, source: _Input) -> None:
        self.source = source
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline

    def take(self, size: int, sink: Callable[[bytes], object]) -> int:
        """Pass the next ``size`` bytes to ``sink`` (fewer at the end); how many there were."""
        left = size
        while left:
            if self._buf:
                piece = self._cut(min(left, len(self._buf)))
            else:
                piece = self.source.read(True, min(left, _PREFIX_CHUNK)) or b""
                if not piece:
                    break
                if len(piece) > left:  # decompressed beyond it: kept for the lines
                    self._buf += piece[left:]
                    piece = piece[:left]
            sink(piece)
            left -= len(piece)
        return size - left

    def line(self, limit: int, wait: bool) -> bytes | None:
        """The next line with its newline; an unterminated last line; b"" at the end; the
        first ``limit`` + 1 bytes of a longer line; None: no whole line yet (a pipe)."""
        while True:
            newline = self._buf.find(b"\n", self._scanned, limit + 1)
            if newline >= 0:
                return self._cut(newline + 1)
            if len(self._buf) > limit:
                return self._cut(limit + 1)
            self._scanned = len(self._buf)
            data = self.source.read(wait)
            if data is None:
                return None
            if not data:
                return self._cut(len(self._buf))
            self._buf += data

    def _cut(self, size: int) -> bytes:
        out = bytes(self._buf[:size])
        del self._buf[:size]  # cheap at the front of a bytearray
        self._scanned = 0
        return out


def _complete(chunk: bytes) -> bool:
    """Whether an unterminated last line is a whole JSON document (not half written)."""
    try:
        orjson.loads(chunk.removeprefix(_BOM))  # read past as the validator does
    except orjson.JSONDecodeError:
        return False
    return True


@dataclass(slots=True)
class _Long:
    """An over-long line being read past."""

    start: int
    kept: bytes
    size: int  # bytes so far, its newline included once it came
    blank: bool


class ManifestReader:
    """One manifest read from a boundary on, hashing every byte that goes past.

    ``check_prefix`` reads the bytes before the start boundary back (stdin and gzip cannot
    seek, and a file's processed part must be checked anyway) and refuses them if they
    differ; ``batch`` then hands out lines, each batch with the last boundary it passed.
    A read error is raised once the lines read before it were handed out.
    """

    def __init__(self, path: str, index: int, start: Boundary, wait: bool = False) -> None:
        self.path = path
        self.index = index
        self.start = start
        self._wait = wait  # block on a pipe (validate) rather than end a batch early
        self._hasher = hashlib.sha256()
        self._lines: _Lines | None = None
        self._pos = 0  # byte offset of the next line
        self._line = 1  # number of the next line
        self._records = 0  # non-blank lines before the next line
        self._long: _Long | None = None
        self._error: ManifestUnreadable | None = None
        self.partial = 0  # number of an unterminated, incomplete last line left unread
        self.keep_partial = False  # hand out such a line as well (validate, status)
        self.blocked = False  # the last batch ended because a pipe had nothing more yet
        self.ended = False  # the whole manifest was read

    @property
    def records_read(self) -> int:
        return self._records

    def file_offset(self, offset: int) -> int:
        """Where ``offset`` (a line's end) lies in the file: for a .gz, the compressed
        position (estimated), to measure progress against the file's size."""
        return offset if self._lines is None else self._lines.source.file_offset(offset)

    def fileno(self) -> int:
        """The descriptor to wait on when ``blocked``."""
        return self._open().source.fileno

    def check_prefix(self, verify: bool = True) -> None:
        """Read back up to the start boundary; raise ManifestChanged if it differs."""
        start, name = self.start, display_name(self.path)
        if (
            not verify
            and self.path != STDIN
            and os.path.isfile(self.path)
            and not is_gzip(self.path)
        ):
            self._pos, self._line, self._records = start.offset, start.line, start.records
            return  # a plain file is opened there by the first batch
        lines = self._open()
        try:
            got = lines.take(start.offset, self._hasher.update)
        except (OSError, zlib.error, _Truncated) as exc:
            where = f"within the {start.offset:,} bytes an earlier run already uploaded"
            raise self._unreadable(exc, where) from None
        if got < start.offset:
            raise ManifestChanged(
                f"{name} is shorter ({got:,} bytes) than the "
                f"{start.offset:,} bytes an earlier run already uploaded"
            )
        if verify and self._hasher.hexdigest() != start.digest:
            raise ManifestChanged(
                f"{name}: lines 1-{start.line - 1} ({start.offset:,} bytes), already "
                "uploaded by an earlier run, are not what they were"
            )
        self._pos, self._line, self._records = start.offset, start.line, start.records
        if lines.source.regular and not lines.source.gzip and self.path != STDIN:
            self.close()  # reopened where it stopped by the first batch: no fd held

    def _open(self) -> _Lines:
        if self._lines is None:
            try:
                self._lines = _Lines(_Input(self.path, self._pos))
            except OSError as exc:
                name = display_name(self.path)
                raise ManifestUnreadable(f"manifest {name}: {_reason(exc)}") from None
        return self._lines

    def batch(self, size: int) -> tuple[list[Line], Boundary | None]:
        """Up to ``size`` non-blank lines, and the last boundary passed (None if none)."""
        lines: list[Line] = []
        boundary: Boundary | None = None
        self.blocked = False
        if self._error is not None:
            raise self._error
        if self.partial or self.ended:
            return lines, None
        source = self._open()
        fresh = False  # lines ended since the last boundary
        try:
            while len(lines) < size:
                long = self._long
                piece = source.line(MAX_LINE if long is None else _CHUNK, self._wait)
                if piece is None:
                    self.blocked = True
                    break
                if long is not None:  # more of an over-long line
                    self._hasher.update(piece)
                    long.size += len(piece)
                    long.blank = long.blank and not piece.strip()
                    if not piece or piece.endswith(b"\n"):
                        self._long = None
                        self._pos = long.start + long.size
                        if not long.blank:
                            lines.append(self._too_long(long, bool(piece)))
                        self._line += 1
                        fresh = bool(piece)
                        if not piece:
                            self.ended = True
                            break
                    continue
                if not piece:
                    self.ended = True
                    break
                ended = piece.endswith(b"\n")
                if not ended and len(piece) > MAX_LINE:  # the rest of the line follows
                    if fresh:
                        boundary, fresh = self._here(), False
                    self._long = _Long(self._pos, piece[:KEPT], len(piece), not piece.strip())
                    self._hasher.update(piece)
                    continue
                if not ended:  # an unterminated last line: the last boundary is before it
                    if fresh:
                        boundary, fresh = self._here(), False
                    if piece.strip() and not self.keep_partial and not _complete(piece):
                        self.partial = self._line  # still being written: for a later run
                        break
                start = self._pos
                self._pos += len(piece)
                raw = piece.rstrip(b"\r\n")
                if raw.strip():
                    lines.append(Line(self.index, self._line, start, self._pos, raw, self._records))
                    self._records += 1
                self._line += 1
                self._hasher.update(piece)
                fresh = ended
        except (OSError, zlib.error, _Truncated) as exc:
            self._error = self._unreadable(exc)
            if not lines:
                raise self._error from None
        if fresh:
            boundary = self._here()
        return lines, boundary

    def _too_long(self, long: _Long, newline: bool) -> Line:
        size = long.size - 1 if newline else long.size
        problem = (
            f"line longer than {MAX_LINE:,} bytes ({size:,} bytes; "
            f"the dead letter keeps its first {KEPT:,})"
        )
        self._records += 1
        return Line(
            self.index, self._line, long.start, self._pos, long.kept, self._records - 1, problem
        )

    def _here(self) -> Boundary:
        return Boundary(self._records, self._pos, self._line, self._hasher.copy().hexdigest())

    def _unreadable(self, exc: BaseException, where: str = "") -> ManifestUnreadable:
        name = display_name(self.path)
        after = where or (
            f"after line {self._line - 1}" if self._line > 1 else "before its first line"
        )
        if isinstance(exc, _Truncated):
            why = f"truncated gzip file: it is cut short {after} (complete it, then run again)"
        elif isinstance(exc, zlib.error):
            why = f"corrupt gzip data {after} ({exc})"
        else:
            assert isinstance(exc, OSError)
            why = f"cannot be read {after}: {_reason(exc)}"
        return ManifestUnreadable(f"manifest {name}: {why}")

    def close(self) -> None:
        if self._lines is not None:
            self._lines.source.close()
        self._lines = None


def read_lines(path: str, manifest: int, start: Boundary | None = None) -> Iterator[Line]:
    """Yield the non-blank lines of one manifest, numbered, from ``start`` on (its prefix
    is not checked); an unterminated last line included. Raises ManifestUnreadable."""
    reader = ManifestReader(path, manifest, start or Boundary(), wait=True)
    reader.keep_partial = True
    try:
        if start is not None:
            reader.check_prefix(verify=False)
        while not reader.ended:
            lines, _ = reader.batch(_LINES_PER_BATCH)
            yield from lines
    finally:
        reader.close()


_LINES_PER_BATCH = 512
