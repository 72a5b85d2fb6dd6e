"""The dead-letter file: every record that did not succeed, as a manifest the user can fix.

Each line is a JSON object whose last member is ``_error`` (status, code, message, source):
the original line, byte for byte, with ``_error`` added; or, for a line that is not a JSON
object (invalid JSON, not UTF-8, over-long), ``{"_raw": THE LINE AS TEXT, "_error": ...}``.
Fields starting with ``_`` are ignored on upload, so a fixed file can be uploaded as it is;
a line still holding ``_raw`` and no record is rejected again (validate.kept_as_text), and
its next dead-letter line is the same with its ``_error`` replaced, never wrapped twice.

A plan's line names its run by its source id, which only the run's create-run line maps:
the first line of a run going to a dead letter comes after a copy of that create-run line
(``CreateRunCopies``; ``_error.status`` "context", no failure), so that the dead letter's
own upload finds the run by its tag and logs to it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, BinaryIO

import orjson

from batchlog import durable
from batchlog.errors import BatchlogError, DeadLetterError
from batchlog.journal import record_key
from batchlog.manifest import STDIN, Boundary, display_name, read_lines
from batchlog.records import Record
from batchlog.validate import parse_line, top_level_spans

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
        self.count = 0  # records added in this run (a create-run's copy is none)
        self.lines = 0  # lines added in this run
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

    def add(self, raw: bytes, error: dict[str, Any], record: bool = True) -> None:
        """Add ``raw`` with its ``_error``; ``record``: a record that did not succeed (else
        a copy that only makes the file uploadable, CreateRunCopies)."""
        self._buffer.append(dead_letter_line(raw, error))
        self.count += 1 if record else 0
        self.lines += 1

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
            created = not os.path.exists(self.path)
            try:
                os.makedirs(parent, exist_ok=True)
                self._file = open(self.path, "ab", buffering=0)
            except OSError as exc:  # checked at the start; changed since, or a full disk
                raise DeadLetterError(
                    f"cannot create dead-letter file {self.path}: {exc.strerror or exc}"
                ) from None
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


CONTEXT = "context"  # _error.status of a create-run's copy: no failure


class CreateRunCopies:
    """The create-run lines of a plan's runs, so that a dead letter holding a line of a run
    holds that run's create-run line before it, once (found by review: a dead letter of
    log-batch lines alone could not be uploaded, "no create-run for this run earlier").

    A run whose create-run failed has its own line there (a failure); a run created (or
    found) gets a copy of its line, a note in ``_error`` saying so: uploaded, it finds the
    run by its tag, and creates nothing."""

    def __init__(self, present: set[str]) -> None:
        self._lines: dict[str, tuple[int, bytes, str]] = {}  # run -> (seq, line, FILE:LINE)
        self._present = present  # runs whose create-run line the dead letter holds
        self._sought: set[str] = set()  # runs whose line was looked for in the manifests

    def wants(self, run: str) -> bool:
        """Whether the create-run line of ``run`` (a run the checkpoint maps) is to be
        looked for behind the watermark (find_create_runs): not known, never sought."""
        return run not in self._lines and run not in self._present and run not in self._sought

    def sought(self, run: str, found: list[Record]) -> None:
        self._sought.add(run)
        for record in found:
            self.declared(record)

    def declared(self, record: Record) -> None:
        """``record`` is its run's create-run (it passed the plan's order rules)."""
        self._lines[record.run_id] = (record.seq, record.raw, record.source)

    def knows(self, run: str) -> bool:
        return run in self._lines

    def is_declaration(self, record: Record) -> bool:
        line = self._lines.get(record.run_id)
        return record.op == "create-run" and line is not None and line[0] == record.seq

    def failed(self, run: str) -> None:
        """The run's create-run failed: its own line goes to the dead letter."""
        self._present.add(run)

    def parent_of(self, run: str) -> str | None:
        """The parent run its create-run names, if its line is known."""
        line = self._lines.get(run)
        if line is None:
            return None
        try:
            parent = orjson.loads(line[1]).get("parent_source_run_id")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        return parent if isinstance(parent, str) and parent else None

    def copy_for(self, run: str, target: str) -> tuple[bytes, dict[str, Any]] | None:
        """The line and ``_error`` of the run's create-run copy, if the dead letter needs
        one (``target``: the run on the target); None when it holds one or none is known."""
        line = self._lines.get(run)
        if line is None or run in self._present:
            return None
        self._present.add(run)
        _, raw, source = line
        note = {
            "status": CONTEXT,
            "code": "RunCreated",
            "message": (
                f"not a failure: the create-run of run {run}, done (target run {target}), "
                "copied here so that the lines of its run after it can be uploaded from this "
                "dead letter: uploaded, it finds that run by its tag and creates nothing"
            ),
            "source": source,
        }
        return raw, note


def find_create_runs(manifests: list[str], marks: list[Boundary], run: str) -> list[Record]:
    """The create-run line of ``run`` in the part of the manifests below ``marks`` (read by
    an earlier run of the job, never read again by this one), if it can be read again:
    for a line appended to a run an earlier run created (blocking: call from a thread)."""
    for index, path in enumerate(manifests):
        below = marks[index].records if index < len(marks) else 0
        if not below or path == STDIN or not os.path.isfile(path):
            continue
        name = display_name(path)
        try:
            for line in read_lines(path, index):
                if line.record >= below:
                    break
                if line.problem or b"create-run" not in line.raw:
                    continue
                item = parse_line(line.raw, record_key(index, line.record), f"{name}:{line.number}")
                if isinstance(item, Record) and item.op == "create-run" and item.run_id == run:
                    return [item]  # the first: a second was rejected
        except (BatchlogError, OSError):  # not readable again: no copy
            continue
    return []


def create_runs_in(path: str) -> set[str]:
    """The runs whose create-run line the dead letter at ``path`` holds (a resumed job goes
    on adding to it: never a second copy)."""
    runs: set[str] = set()
    try:
        with open(path, "rb") as f:
            for raw in f:
                if b"create-run" not in raw:
                    continue
                try:
                    doc = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(doc, dict) and doc.get("op") == "create-run":
                    run = doc.get("source_run_id")
                    if isinstance(run, str):
                        runs.add(run)
    except OSError:
        pass  # none there
    return runs


def run_named(raw: bytes) -> str | None:
    """The ``source_run_id`` a line names, if it is a JSON object naming one (a line
    rejected for another field)."""
    if b"source_run_id" not in raw:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    run = doc.get("source_run_id") if isinstance(doc, dict) else None
    return run if isinstance(run, str) else None
