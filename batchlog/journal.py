"""The checkpoint: an append-only journal of what a job finished, with group commit.

Every line is a JSON document followed by ``|`` and the CRC-32 of the document, so that a
torn or damaged line is told from a good one:

    {"batchlog_checkpoint": 2, "target": ..., "manifests": [...], ...}        header (line 1)
    {"snap": {"marks": [[RECORDS, OFFSET, LINE, DIGEST]...], "done": [[KEY, HASH]...],
              "doubt": [[KEY, FIRST_SENT, UNTIL]...], "n": [SUCCEEDED, FAILED, REJECTED]}}
                                                                the whole state, now and then
    {"f": [KEY...], "h": [HASH...], "st": STATUS, "rid": ID, "etag": ETAG}  a call finished
    {"w": M, "at": [RECORDS, OFFSET, LINE, DIGEST]}            manifest M's watermark moved
    {"d": KEY, "t": FIRST_SENT, "u": UNTIL, "n": RECORDS, "k": TOKEN}   a call went out
    {"c": KEY}                                   a call known not applied: no longer in doubt
    {"commit": [SUCCEEDED, FAILED, REJECTED], "dl": BYTES}     the end of one group commit

A record's KEY is its manifest's index shifted left by 40 bits, plus its index among that
manifest's non-blank lines, so appending to any manifest never renumbers another.

Each manifest has a watermark, a ``Boundary``: every record before it is finished, and the
SHA-256 of every byte before it is kept, so a resume reads that part back and refuses it if
it changed. ``done`` holds the records finished beyond their watermark, with the hash of
their line (checked when the line is read again); ``doubt`` the calls sent and not yet
answered, named by their first record, with the time first sent (for the retry token's
24 h) and the time the last attempt can no longer land (for reading back before resending).

Only changes are journaled; a snapshot of the whole state is written when the lines since
the last one outgrow twice its size (and at least ``SNAPSHOT_EVERY`` bytes), so the file
grows with the work done, not with how long a slow record is held. A resume reads from the
last intact snapshot on: its cost does not grow with the job. A damaged snapshot is skipped
(the lines before it still hold everything it restated); a damaged line elsewhere is
skipped with a warning, and a torn tail is cut off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import orjson

from batchlog import durable
from batchlog.errors import CheckpointError
from batchlog.manifest import Boundary
from batchlog.target import without_userinfo

log = logging.getLogger("batchlog")

FORMAT = 2
REJECTED = "rejected"
KEY_BITS = 40  # a record's index within its manifest
SNAPSHOT_EVERY = 1 << 20  # bytes of changes at least between two snapshots
TOKEN_CHARS = 16  # of a retry token kept with a call in doubt
_SNAP_MARK = b'{"snap":'


def record_key(manifest: int, record: int) -> int:
    return (manifest << KEY_BITS) | record


def manifest_of(key: int) -> int:
    return key >> KEY_BITS


def record_of(key: int) -> int:
    return key & ((1 << KEY_BITS) - 1)


def line_hash(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def seal(doc: Any) -> bytes:
    """One journal line: the document and its CRC-32."""
    data = orjson.dumps(doc)
    return b"%s|%08x\n" % (data, zlib.crc32(data))


def unseal(line: bytes) -> Any:
    """The document of an intact line (ending in a newline), or None."""
    if len(line) < 11 or not line.endswith(b"\n") or line[-10:-9] != b"|":
        return None
    data = line[:-10]
    try:
        if int(line[-9:-1], 16) != zlib.crc32(data):
            return None
        return orjson.loads(data)
    except (ValueError, orjson.JSONDecodeError):
        return None


@dataclass(slots=True)
class Counts:
    succeeded: int = 0
    failed: int = 0  # answered with a permanent error, or out of attempts
    rejected: int = 0  # invalid manifest lines

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.rejected

    @property
    def unsuccessful(self) -> int:
        return self.failed + self.rejected

    def tally(self, status: int | str, n: int) -> None:
        if status == REJECTED:
            self.rejected += n
        elif isinstance(status, int) and 200 <= status < 300:
            self.succeeded += n
        else:
            self.failed += n


@dataclass(frozen=True, slots=True)
class Doubt:
    """A call sent and not answered for sure: it may have been applied."""

    first_sent: float  # unix time of its first attempt (the retry token lives 24 h)
    until: float  # unix time after which its last attempt can no longer land
    records: int = 1  # how many records the call had: it is formed again exactly
    token: str = ""  # the start of its retry token: its lines must not have changed


@dataclass(slots=True)
class ResumePoint:
    """Where a job stands according to its checkpoint."""

    marks: list[Boundary] = field(default_factory=list)  # per manifest: all before finished
    done: dict[int, str] = field(default_factory=dict)  # key -> line hash, beyond its mark
    doubt: dict[int, Doubt] = field(default_factory=dict)  # call's first key -> doubt
    counts: Counts = field(default_factory=Counts)
    manifests: list[str] = field(default_factory=list)  # as the header lists them
    last_write: float | None = None  # when the checkpoint was last written
    damaged: int = 0  # damaged lines skipped while reading
    dead_letter_size: int | None = None  # bytes of the dead letter the journal accounts for
    created: bool = False  # the checkpoint was created now: a new job, or --restart
    dead_letter_id: list[int] | None = None  # [device, inode] of the dead letter written
    runs: dict[str, str] = field(default_factory=dict)  # a plan's source run -> target run
    found: set[str] = field(default_factory=set)  # source runs whose target run was there

    @property
    def finished(self) -> int:
        return sum(m.records for m in self.marks) + len(self.done)

    def snapshot(self) -> dict[str, Any]:
        return {
            "snap": {
                "marks": [[m.records, m.offset, m.line, m.digest] for m in self.marks],
                "done": [[k, h] for k, h in sorted(self.done.items())],
                "doubt": [
                    [k, d.first_sent, d.until, d.records, d.token]
                    for k, d in sorted(self.doubt.items())
                ],
                "n": [self.counts.succeeded, self.counts.failed, self.counts.rejected],
                "dl": self.dead_letter_size,
                "dli": self.dead_letter_id,
                "runs": [[k, v, int(k in self.found)] for k, v in sorted(self.runs.items())],
            }
        }

    def apply(self, doc: dict[str, Any]) -> None:
        """Replay one journal line."""
        if "f" in doc:
            keys, hashes, status = doc["f"], doc["h"], doc["st"]
            fresh = 0
            for key, h in zip(keys, hashes, strict=True):
                key = int(key)
                if self._below(key) or key in self.done:
                    continue
                self.done[key] = str(h)
                fresh += 1
            self.counts.tally(status, fresh)
            if keys:
                self.doubt.pop(int(keys[0]), None)
            run = doc.get("run")
            if isinstance(run, list) and len(run) >= 2:
                self.runs[str(run[0])] = str(run[1])
                if len(run) > 2 and run[2]:
                    self.found.add(str(run[0]))
        elif "w" in doc:
            self.advance(int(doc["w"]), _boundary(doc["at"]))
        elif "d" in doc:
            key = int(doc["d"])
            if not self._below(key) and key not in self.done:
                earlier = self.doubt.get(key)
                first = float(doc["t"]) if earlier is None else earlier.first_sent
                self.doubt[key] = Doubt(
                    first, float(doc["u"]), int(doc.get("n", 1)), str(doc.get("k", ""))
                )
        elif "commit" in doc:
            self.counts = Counts(*(int(x) for x in doc["commit"]))  # right past damaged lines
            if doc.get("dl") is not None:
                self.dead_letter_size = int(doc["dl"])
            if isinstance(doc.get("dli"), list):
                self.dead_letter_id = [int(x) for x in doc["dli"]]
        elif "c" in doc:
            self.doubt.pop(int(doc["c"]), None)
        elif "snap" in doc:
            snap = doc["snap"]
            self.marks = [_boundary(m) for m in snap["marks"]]
            self.done = {int(k): str(h) for k, h in snap["done"]}
            self.doubt = {
                int(d[0]): Doubt(float(d[1]), float(d[2]), int(d[3]), str(d[4]))
                for d in snap["doubt"]
            }
            self.counts = Counts(*(int(x) for x in snap["n"]))
            self.dead_letter_size = snap.get("dl")
            dli = snap.get("dli")
            self.dead_letter_id = [int(x) for x in dli] if isinstance(dli, list) else None
            runs = snap.get("runs", [])
            self.runs = {str(r[0]): str(r[1]) for r in runs}
            self.found = {str(r[0]) for r in runs if len(r) > 2 and r[2]}

    def advance(self, manifest: int, mark: Boundary) -> None:
        old = self.marks[manifest]
        if mark.records <= old.records:
            return
        self.marks[manifest] = mark
        base = manifest << KEY_BITS
        for n in range(old.records, mark.records):
            self.done.pop(base | n, None)

    def _below(self, key: int) -> bool:
        m = manifest_of(key)
        return m < len(self.marks) and record_of(key) < self.marks[m].records


def _boundary(doc: Sequence[Any]) -> Boundary:
    records, offset, line, digest = doc
    return Boundary(int(records), int(offset), int(line), str(digest))


class Journal:
    """Appends changes, and a snapshot now and then; flushed by the job's flush task."""

    def __init__(self, path: str, handle: BinaryIO, point: ResumePoint, tail: int) -> None:
        self.path = path
        self.lock: BinaryIO | None = None  # held while the job runs
        self._file = handle  # binary append handle
        self._state = ResumePoint(
            marks=list(point.marks),
            done=dict(point.done),
            doubt=dict(point.doubt),
            counts=Counts(point.counts.succeeded, point.counts.failed, point.counts.rejected),
            runs=dict(point.runs),
            found=set(point.found),
            # restated by every commit and snapshot until this run writes the dead letter:
            # a snapshot without them made a later resume set the dead letter aside
            dead_letter_size=point.dead_letter_size,
            dead_letter_id=point.dead_letter_id,
        )
        self._low = [m.records for m in point.marks]  # per manifest: first record not finished
        self._bounds: list[deque[Boundary]] = [deque() for _ in point.marks]  # passed, pending
        self._hashes: dict[int, str] = {}  # line hashes of records read and not finished
        self._buffer: list[bytes] = []  # lines not yet written
        self._since_snapshot = tail  # bytes written after the last snapshot
        self._snapshot_size = 0
        self._snapshot_due = point.damaged > 0  # restate what was read around damage

    @property
    def counts(self) -> Counts:
        return self._state.counts

    def read(self, key: int, hash_: str) -> None:
        """The producer read record ``key``, which is not finished."""
        self._hashes[key] = hash_

    def skip(self, key: int) -> None:
        """The producer read record ``key``, which an earlier run finished."""
        self._advance(manifest_of(key))

    def boundary(self, manifest: int, mark: Boundary) -> None:
        """The producer read every line of ``manifest`` before ``mark``."""
        self._bounds[manifest].append(mark)
        self._advance(manifest)

    def finish(
        self,
        keys: Sequence[int],
        status: int | str,
        request_id: str = "",
        etag: str = "",
        run: tuple[str, str, bool] | None = None,
    ) -> None:
        """Record that the records ``keys`` (one call's) are finished, at the next flush.

        One line for the whole call: a torn write loses all of it or none, so a resume never
        sees part of a merged call done and regroups the rest under another retry token.
        """
        hashes = [self._hashes.pop(key) for key in keys]
        entry: dict[str, Any] = {"f": list(keys), "h": hashes, "st": status}
        if request_id:
            entry["rid"] = request_id
        if etag:
            entry["etag"] = etag
        if run is not None:  # a create-run's: source run -> the target run, found or made
            entry["run"] = [run[0], run[1], int(run[2])]
        self._buffer.append(seal(entry))
        self._state.apply(entry)
        for m in {manifest_of(key) for key in keys}:
            self._advance(m)

    def sent(self, key: int, first_sent: float, until: float, records: int, token: str) -> None:
        """A call (named by its first record) is going out: in doubt until it finishes."""
        entry = {
            "d": key,
            "t": round(first_sent, 3),
            "u": round(until, 3),
            "n": records,
            "k": token[:TOKEN_CHARS],
        }
        self._buffer.append(seal(entry))
        self._state.apply(entry)

    def settled(self, key: int) -> None:
        """A call not finished is known not to have been applied (answered 429, 401, ...,
        with no earlier attempt that may have landed): no longer in doubt, so a resume (and
        a dry run) neither counts it as sent and never answered, nor reads it back, nor
        holds its lines to what was sent. Its next attempt is journaled as sent again."""
        if key in self._state.doubt:
            self._buffer.append(seal({"c": key}))
            self._state.doubt.pop(key)

    def in_doubt(self, key: int) -> bool:
        """Whether the call named by its first record ``key`` is journaled as in doubt."""
        return key in self._state.doubt

    def _advance(self, manifest: int) -> None:
        state, base = self._state, manifest << KEY_BITS
        low = self._low[manifest]
        while (base | low) in state.done:
            low += 1
        self._low[manifest] = low
        bounds = self._bounds[manifest]
        mark = None
        while bounds and bounds[0].records <= low:
            mark = bounds.popleft()
        if mark is not None and mark.records > state.marks[manifest].records:
            state.advance(manifest, mark)
            self._buffer.append(
                seal({"w": manifest, "at": [mark.records, mark.offset, mark.line, mark.digest]})
            )

    def pending_bytes(
        self, dead_letter_size: int | None = None, dead_letter_id: list[int] | None = None
    ) -> bytes:
        """What the next flush writes: the changes, closed by a commit line with the counts
        and the size the dead letter has once its own pending lines are written; and a
        snapshot when due."""
        if not self._buffer and not self._snapshot_due:
            return b""
        state = self._state
        if dead_letter_size is not None:
            state.dead_letter_size = dead_letter_size
        if dead_letter_id is not None:
            state.dead_letter_id = dead_letter_id
        c = state.counts
        commit: dict[str, Any] = {
            "commit": [c.succeeded, c.failed, c.rejected],
            "dl": state.dead_letter_size,
        }
        if state.dead_letter_id is not None:
            commit["dli"] = state.dead_letter_id
        self._buffer.append(seal(commit))
        out = b"".join(self._buffer)
        self._buffer = []
        self._since_snapshot += len(out)
        if self._snapshot_due or self._since_snapshot > max(
            SNAPSHOT_EVERY, 2 * self._snapshot_size
        ):
            snap = seal(self._state.snapshot())
            out += snap
            self._snapshot_size = len(snap)
            self._since_snapshot = 0
            self._snapshot_due = False
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
        if self.lock is not None:
            durable.close_quietly(self.lock)  # releases the lock


def lock_job(path: str) -> BinaryIO:
    """Hold ``path``.lock for as long as the job runs: two processes resuming one job at
    once (a cron run that overlaps the last one) would send the same records twice."""
    import fcntl

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    handle = open(path + ".lock", "ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise CheckpointError(
            f"checkpoint {path} is in use by another batchlog process running this job; "
            "wait for it to finish (two at once would send the same records twice)"
        ) from None
    return handle


def header_doc(
    target: str, manifests: list[str], grouping: dict[str, int], dead_letter: str = ""
) -> dict[str, Any]:
    return {
        "batchlog_checkpoint": FORMAT,
        "target": target,
        "manifests": manifests,
        "grouping": grouping,
        "dead_letter": dead_letter,
        "created": round(time.time(), 3),
    }


def open_journal(path: str, header: dict[str, Any], restart: bool) -> tuple[Journal, ResumePoint]:
    """Open or create the checkpoint at ``path`` for the job that ``header`` describes, and
    hold its lock until the journal is closed."""
    try:
        lock = lock_job(path)
    except OSError as exc:
        raise CheckpointError(f"cannot lock checkpoint {path}: {exc.strerror or exc}") from None
    try:
        journal, point = _open(path, header, restart)
    except BaseException:
        durable.close_quietly(lock)
        raise
    journal.lock = lock
    return journal, point


def _open(path: str, header: dict[str, Any], restart: bool) -> tuple[Journal, ResumePoint]:
    try:
        if restart or not os.path.exists(path) or os.path.getsize(path) == 0:
            return _create(path, header)
        existing, point, tail = _read(path, repair=True)
        if existing.get("target") != header["target"] and not (
            point.counts.succeeded or point.counts.failed or point.doubt
        ):
            return _create(path, header)  # nothing ever reached that target: start afresh
    except OSError as exc:
        raise CheckpointError(f"cannot open checkpoint {path}: {exc.strerror or exc}") from None
    _check_same_job(path, existing, header, point)
    try:
        handle = open(path, "ab", buffering=0)
    except OSError as exc:
        raise CheckpointError(f"cannot open checkpoint {path}: {exc.strerror or exc}") from None
    return Journal(path, handle, point, tail), point


def _create(path: str, header: dict[str, Any]) -> tuple[Journal, ResumePoint]:
    point = ResumePoint(marks=[Boundary() for _ in header["manifests"]], created=True)
    point.manifests = list(header["manifests"])
    point.dead_letter_size = 0  # the job's dead letter holds nothing of it yet
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(seal(header) + seal(point.snapshot()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    durable.sync_directory(parent)  # the new file's name survives a power cut too
    return Journal(path, open(path, "ab", buffering=0), point, 0), point


OTHER_JOB_HINT = "use --restart to start over, or give another --checkpoint"


def _check_same_job(
    path: str, existing: dict[str, Any], header: dict[str, Any], point: ResumePoint
) -> None:
    if existing.get("target") != header["target"]:
        raise CheckpointError(
            f"checkpoint {path} belongs to another target "
            f"({without_userinfo(str(existing.get('target')))}); {OTHER_JOB_HINT}"
        )
    problem = other_job(path, existing, header["manifests"], header["grouping"], point)
    if problem:
        raise CheckpointError(problem)


def other_job(
    path: str,
    existing: dict[str, Any],
    manifests: list[str],
    grouping: dict[str, int],
    point: ResumePoint,
) -> str:
    """Why the checkpoint ``existing`` (its header) is not this job's: other manifests, or
    other merge settings once anything was done; "" if neither. Shared with the dry run, so
    that both say it in the same words: the manifests and flags as the user types them."""
    old = existing.get("manifests")
    if old != manifests:
        return (
            f"checkpoint {path} was written for manifests {_names(old)} "
            f"(this job names {_names(manifests)}); {OTHER_JOB_HINT}"
        )
    before = existing.get("grouping")
    if before == grouping or not (point.finished or point.doubt):
        return ""
    return (
        f"checkpoint {path} was written with another grouping ({_grouping(before, grouping)}): "
        f"resuming would change how records are merged, and so their retry tokens; "
        f"use the same --max-datasets-per-request, or {OTHER_JOB_HINT}"
    )


def _names(manifests: object) -> str:
    if not isinstance(manifests, list) or not manifests:
        return "(none recorded)"
    return ", ".join(str(m) for m in manifests)


def _grouping(before: object, now: dict[str, int]) -> str:
    """How two merge settings differ, in the words of the flag (or of the library's
    GroupLimits, for the size no flag sets)."""
    old = before if isinstance(before, dict) else {}
    parts = []
    if old.get("max_datasets") != now["max_datasets"]:
        parts.append(
            f"--max-datasets-per-request {old.get('max_datasets', 'unknown')}, "
            f"not {now['max_datasets']}"
        )
    if old.get("max_body") != now["max_body"]:
        was = old.get("max_body")
        parts.append(
            f"merged calls of at most {was:,} bytes, not {now['max_body']:,}"
            if isinstance(was, int)
            else f"merged calls of at most {now['max_body']:,} bytes, not as recorded"
        )
    return "; ".join(parts) or "recorded differently"


def read_checkpoint(path: str, repair: bool = False) -> tuple[dict[str, Any], ResumePoint]:
    """The header and the resume point, reading only the header and the tail."""
    header, point, _ = _read(path, repair)
    return header, point


_TAIL_CHUNK = 1 << 16


def _read(path: str, repair: bool) -> tuple[dict[str, Any], ResumePoint, int]:
    with open(path, "rb") as f:
        first = f.readline()
        header = unseal(first)
        if not isinstance(header, dict) or header.get("batchlog_checkpoint") != FORMAT:
            raise CheckpointError(_not_a_checkpoint(path, first))
        body = len(first)
        size = f.seek(0, os.SEEK_END)
        start = _last_snapshot(f, body, size)
        f.seek(start)
        data = f.read(size - start)
    point = ResumePoint(marks=[Boundary() for _ in header.get("manifests", [])])
    point.manifests = list(header.get("manifests", []))
    point.last_write = os.path.getmtime(path)
    # A flush writes a group of lines closed by a commit line (or a snapshot, which restates
    # everything): a group counts only once closed. Lines after the last close were cut
    # short by a crash or a full disk; nothing was sent on their account (a call waits for
    # its flush), and the dead letter is cut back to the size the last commit names.
    good_end = start  # just past the last line that closes a group
    pos = start
    damaged = 0  # damaged lines inside closed groups (skipped)
    group: list[dict[str, Any]] = []
    bad_in_group = 0
    for piece in data.split(b"\n")[:-1]:
        line = piece + b"\n"
        doc = unseal(line)
        pos += len(line)
        if not isinstance(doc, dict):
            bad_in_group += 1
            continue
        group.append(doc)
        if "commit" in doc or "snap" in doc:
            for entry in group:
                point.apply(entry)
            damaged += bad_in_group
            group, bad_in_group = [], 0
            good_end = pos
    point.damaged = damaged
    if damaged:
        log.warning(
            "checkpoint %s: skipped %d damaged line(s) (a disk fault?); the records they "
            "spoke for are checked again",
            path,
            damaged,
        )
    if good_end < size:
        log.warning(
            "checkpoint %s: %s an unfinished or damaged tail of %d bytes (a crash or a full "
            "disk while writing); %s",
            path,
            "cut off" if repair else "has",
            size - good_end,
            "the records it spoke for are processed again"
            if repair
            else "the next run cuts it off and processes its records again",
        )
        if repair:
            with open(path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
    return header, point, good_end - start


def _not_a_checkpoint(path: str, first: bytes) -> str:
    try:
        doc = orjson.loads(first)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict) and "batchlog_checkpoint" in doc:
        return (
            f"checkpoint {path} was written by another version of batchlog (format "
            f"{doc['batchlog_checkpoint']}, this one reads {FORMAT}); finish it with that "
            "version, or use --restart (retry tokens are the same, so records sent in the "
            "last 24 h are not applied twice)"
        )
    return f"{path} is not a batchlog checkpoint"


def _last_snapshot(f: BinaryIO, body: int, size: int) -> int:
    """Offset of the last intact snapshot line, or of the body's start if there is none."""
    end = size
    buf = b""
    while True:
        start = max(body, end - _TAIL_CHUNK)
        f.seek(start)
        buf = f.read(end - start) + buf
        end = start
        idx = len(buf)
        while True:
            idx = buf.rfind(b"\n" + _SNAP_MARK, 0, idx)
            if idx < 0:
                break
            nl = buf.find(b"\n", idx + 1)
            if nl >= 0 and unseal(buf[idx + 1 : nl + 1]) is not None:
                return start + idx + 1
        if start == body:  # the body's first line, if a snapshot, is read from here too
            return body
