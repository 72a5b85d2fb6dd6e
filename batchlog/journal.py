"""The checkpoint: an append-only journal of finished records, with group commit.

File format, one JSON object a line:

    {"batchlog_checkpoint": 1, "target": ..., "manifests": [...], ...}    header (line 1)
    {"s": [SEQ...], "h": [LINEHASH...], "st": STATUS, "rid": REQUEST_ID, "etag": ETAG}
                                                                one finished call's records
    {"wm": W, "at": [M, OFFSET, LINE], "chk": [START, END, HASH], "above": [[SEQ, HASH]...],
     "n": [SUCCEEDED, FAILED, REJECTED], "doubt": [[SEQ, UNIXTIME]...], "t": UNIXTIME}
                                                                            a watermark

Every flush appends the records finished since the last one and then a watermark: all
records with seq < W are finished; reading resumes at byte OFFSET of manifest M (line LINE);
``above`` lists the records finished beyond W; ``doubt`` the calls sent but not answered
(by their first record) with the time they were first sent, for the 24 h token horizon.
A resume therefore reads only the file's tail back to its last watermark: it costs the
same for ten records done or ten million.
``chk`` is the span and hash of the line of record W-1, so a manifest whose processed part
changed is noticed; the line hashes in entries catch changes above the watermark.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchlog import durable
from batchlog.errors import CheckpointError

log = logging.getLogger("batchlog")

FORMAT = 1
REJECTED = "rejected"


def line_hash(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


@dataclass(slots=True)
class Counts:
    succeeded: int = 0
    failed: int = 0  # answered with a permanent error, or out of attempts
    rejected: int = 0  # invalid manifest lines

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.rejected


@dataclass(slots=True)
class ResumePoint:
    """Where a job stands according to its checkpoint."""

    watermark: int = 0  # every record with seq < watermark is finished
    at: tuple[int, int, int] = (0, 0, 1)  # manifest index, byte offset, line number to read next
    check: tuple[int, int, str] | None = None  # span and hash of record watermark-1's line
    done_above: dict[int, str] = field(default_factory=dict)  # seq -> line hash, beyond wm
    counts: Counts = field(default_factory=Counts)
    last_write: float | None = None  # unix time of the last watermark
    manifests: list[dict[str, Any]] = field(default_factory=list)  # as the header lists them
    doubt: dict[int, float] = field(default_factory=dict)  # call's first seq -> first sent

    @property
    def finished(self) -> int:
        return self.watermark + len(self.done_above)


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a record's line is, kept until the watermark passes it."""

    manifest: int
    start: int
    end: int
    line: int
    hash: str


class Journal:
    """Appends completions and watermarks; one writer, flushed by the job's flush task."""

    def __init__(self, path: str, handle: Any, point: ResumePoint) -> None:
        self.path = path
        self._file = handle  # binary append handle
        self._watermark = point.watermark  # every seq below it is finished
        self._at = point.at  # resume position for the watermark
        self._check = point.check
        self._above: dict[int, str] = dict(point.done_above)  # finished beyond the watermark
        self._marks: dict[int, Mark] = {}  # positions of records read but not below watermark
        self._counts = point.counts
        self._buffer: list[bytes] = []  # entries not yet written
        self._dirty = False  # something to write
        self._doubt: dict[int, float] = {}  # first seq of each call sent, unfinished -> unix time

    @property
    def counts(self) -> Counts:
        return self._counts

    def read(self, seq: int, mark: Mark) -> None:
        """The producer read record ``seq`` at ``mark``."""
        self._marks[seq] = mark

    def finish(
        self, seqs: Sequence[int], status: int | str, request_id: str = "", etag: str = ""
    ) -> None:
        """Record that the records ``seqs`` (one call's) are finished, at the next flush.

        One line for the whole call: a torn write loses all of it or none, so a resume never
        sees part of a merged call done and regroups the rest under another retry token.
        """
        hashes = [self._marks[seq].hash for seq in seqs]
        entry: dict[str, Any] = {"s": list(seqs), "h": hashes, "st": status}
        if request_id:
            entry["rid"] = request_id
        if etag:
            entry["etag"] = etag
        self._buffer.append(orjson.dumps(entry))
        n = len(seqs)
        if status == REJECTED:
            self._counts.rejected += n
        elif isinstance(status, int) and 200 <= status < 300:
            self._counts.succeeded += n
        else:
            self._counts.failed += n
        for seq, h in zip(seqs, hashes, strict=True):
            self._above[seq] = h
        self._dirty = True
        self._advance()

    def skip(self, seq: int, mark: Mark) -> None:
        """The producer read record ``seq``, which an earlier run finished."""
        self._marks[seq] = mark
        self._advance()

    def _advance(self) -> None:
        # a seq is passed once finished and read (its position is then known)
        while self._watermark in self._above and self._watermark in self._marks:
            del self._above[self._watermark]
            passed = self._marks.pop(self._watermark)
            self._at = (passed.manifest, passed.end, passed.line + 1)
            self._check = (passed.start, passed.end, passed.hash)
            self._watermark += 1
            self._dirty = True

    def sent(self, first_seq: int, when: float) -> None:
        """A call (named by its first record) went out: in doubt until it finishes."""
        self._doubt[first_seq] = round(when, 3)
        self._dirty = True

    def answered(self, first_seq: int) -> None:
        self._doubt.pop(first_seq, None)

    def pending_bytes(self) -> bytes:
        """What the next flush writes: the new entries and a watermark. Clears the buffer."""
        if not self._dirty:
            return b""
        wm = {
            "wm": self._watermark,
            "at": list(self._at),
            "chk": list(self._check) if self._check else None,
            "above": [[s, h] for s, h in sorted(self._above.items())],
            "n": [self._counts.succeeded, self._counts.failed, self._counts.rejected],
            "doubt": [[s, t] for s, t in sorted(self._doubt.items())],
            "t": round(time.time(), 3),
        }
        self._buffer.append(orjson.dumps(wm))
        out = b"\n".join(self._buffer) + b"\n"
        self._buffer = []
        self._dirty = False
        return out

    def write(self, data: bytes) -> None:
        """Append and fsync (blocking: call from a thread)."""
        try:
            durable.append(self._file, data)
        except OSError as exc:
            raise CheckpointError(
                f"cannot write checkpoint {self.path}: {exc.strerror or exc}; "
                "records journaled before this point are safe, run the same command again "
                "once the cause is fixed"
            ) from None

    def close(self) -> None:
        durable.close_quietly(self._file)


def header_doc(
    target: str, manifests: list[dict[str, Any]], grouping: dict[str, int]
) -> dict[str, Any]:
    return {
        "batchlog_checkpoint": FORMAT,
        "target": target,
        "manifests": manifests,
        "grouping": grouping,
        "created": round(time.time(), 3),
    }


def open_journal(path: str, header: dict[str, Any], restart: bool) -> tuple[Journal, ResumePoint]:
    """Open or create the checkpoint at ``path`` for the job that ``header`` describes."""
    try:
        if restart or not os.path.exists(path) or os.path.getsize(path) == 0:
            return _create(path, header)
        existing, point = read_checkpoint(path, repair=True)
        if existing.get("target") != header["target"] and not (
            point.counts.succeeded or point.counts.failed
        ):
            return _create(path, header)  # nothing ever reached that target: start afresh
    except OSError as exc:
        raise CheckpointError(f"cannot open checkpoint {path}: {exc.strerror or exc}") from None
    _check_same_job(path, existing, header, point)
    try:
        handle = open(path, "ab")
    except OSError as exc:
        raise CheckpointError(f"cannot open checkpoint {path}: {exc.strerror or exc}") from None
    return Journal(path, handle, point), point


def _create(path: str, header: dict[str, Any]) -> tuple[Journal, ResumePoint]:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(header) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    point = ResumePoint()
    return Journal(path, open(path, "ab"), point), point


def _check_same_job(
    path: str, existing: dict[str, Any], header: dict[str, Any], point: ResumePoint
) -> None:
    hint = "use --restart to start over, or give another --checkpoint"
    if existing.get("target") != header["target"]:
        raise CheckpointError(
            f"checkpoint {path} belongs to another target ({existing.get('target')}); {hint}"
        )
    old = [m["path"] for m in existing.get("manifests", [])]
    new = [m["path"] for m in header["manifests"]]
    if old != new:
        raise CheckpointError(
            f"checkpoint {path} was written for manifests {old}, not {new}; {hint}"
        )
    if existing.get("grouping") != header["grouping"] and point.finished:
        raise CheckpointError(
            f"checkpoint {path} was written with grouping {existing.get('grouping')}; "
            f"resuming with {header['grouping']} would change retry tokens; "
            f"use the same --max-datasets-per-request, or {hint}"
        )


_TAIL_CHUNK = 1 << 16


def read_checkpoint(path: str, repair: bool = False) -> tuple[dict[str, Any], ResumePoint]:
    """The header and the resume point, reading only the header and the tail.

    A torn or corrupt tail is cut off (when ``repair``) with a warning.
    """
    with open(path, "rb") as f:
        first = f.readline()
        try:
            header = orjson.loads(first)
        except orjson.JSONDecodeError:
            header = None
        if not isinstance(header, dict) or header.get("batchlog_checkpoint") != FORMAT:
            raise CheckpointError(f"{path} is not a batchlog checkpoint")
        body_start = len(first)
        size = f.seek(0, os.SEEK_END)
        lines, tail_start = _tail_lines(f, body_start, size)
    point = ResumePoint()
    entries: list[dict[str, Any]] = []
    good_end = tail_start
    bad = False
    for raw in lines:
        if not raw.endswith(b"\n"):
            bad = True
            break
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            bad = True
            break
        if not isinstance(doc, dict):
            bad = True
            break
        good_end += len(raw)
        if "wm" in doc:
            entries = []
            _apply_watermark(point, doc)
        elif "s" in doc:
            entries.append(doc)
    if bad:
        log.warning(
            "checkpoint %s: cut off a torn or corrupt tail of %d bytes (a crash while writing)",
            path,
            size - good_end,
        )
        if repair:
            with open(path, "r+b") as f:
                f.truncate(good_end)
    for doc in entries:
        _apply_entry(point, doc)
    point.manifests = list(header.get("manifests", []))
    return header, point


def _tail_lines(f: Any, body_start: int, size: int) -> tuple[list[bytes], int]:
    """Lines from the last watermark line on (or from the body's start), and their offset."""
    end = size
    buf = b""
    while True:
        start = max(body_start, end - _TAIL_CHUNK)
        f.seek(start)
        buf = f.read(end - start) + buf
        end = start
        # look for the last complete watermark line in what we have
        idx = len(buf)
        while True:
            idx = buf.rfind(b'\n{"wm":', 0, idx)
            if idx < 0:
                break
            nl = buf.find(b"\n", idx + 1)
            if nl >= 0:  # complete line: start from it
                chunk = buf[idx + 1 :]
                return chunk.splitlines(keepends=True), start + idx + 1
        if start == body_start:  # no complete watermark after the first line
            return buf.splitlines(keepends=True), start


def _apply_watermark(point: ResumePoint, doc: dict[str, Any]) -> None:
    point.watermark = int(doc["wm"])
    m, off, line = doc["at"]
    point.at = (int(m), int(off), int(line))
    chk = doc.get("chk")
    point.check = (int(chk[0]), int(chk[1]), str(chk[2])) if chk else None
    point.done_above = {int(s): str(h) for s, h in doc.get("above", [])}
    ok, failed, rejected = doc.get("n", [0, 0, 0])
    point.counts = Counts(int(ok), int(failed), int(rejected))
    point.last_write = float(doc.get("t", 0.0))
    point.doubt = {int(seq): float(t) for seq, t in doc.get("doubt", [])}


def _apply_entry(point: ResumePoint, doc: dict[str, Any]) -> None:
    seqs, hashes = doc["s"], doc.get("h", [])
    status = doc.get("st")
    for seq, h in zip(seqs, hashes, strict=True):
        seq = int(seq)
        if seq < point.watermark or seq in point.done_above:
            continue
        point.done_above[seq] = str(h)
        if status == REJECTED:
            point.counts.rejected += 1
        elif isinstance(status, int) and 200 <= status < 300:
            point.counts.succeeded += 1
        else:
            point.counts.failed += 1
