"""Offline looks at a job: validate manifests (no network), and the status of a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from batchlog.errors import CheckpointError, ConfigurationError
from batchlog.files import MIB, UnusableFile, check_regular
from batchlog.journal import ResumePoint, line_hash, read_checkpoint, record_key
from batchlog.manifest import STDIN, check_readable, read_lines
from batchlog.plan import Grouper, GroupLimits
from batchlog.records import Rejection
from batchlog.target import OciTarget, without_userinfo
from batchlog.validate import parse_manifests


@dataclass(frozen=True)
class CheckSummary:
    records: int
    rejected: int
    calls: int  # requests an upload would send (before retries)


def check_manifests(
    manifests: list[str],
    on_rejection: Callable[[Rejection], None],
    grouping: GroupLimits | None = None,
) -> CheckSummary:
    check_readable(manifests)
    grouper = Grouper(OciTarget("http://127.0.0.1", "check", "check"), grouping or GroupLimits())
    records = rejected = calls = 0
    for item in parse_manifests(manifests):
        records += 1
        if isinstance(item, Rejection):
            rejected += 1
            on_rejection(item)
            continue
        calls += sum(1 for _ in grouper.add(item))
    calls += sum(1 for _ in grouper.flush())
    return CheckSummary(records, rejected, calls)


@dataclass(frozen=True)
class Status:
    target: str
    manifests: list[str]
    succeeded: int
    failed: int
    rejected: int
    pending: int | None  # None when the manifests cannot be read again (stdin, missing)
    runs_total: int | None
    runs_done: int | None  # every record of the run finished and none failed
    runs_failed: int | None  # some record of the run failed or was rejected
    runs_pending: int | None
    last_write: float | None
    changed: bool  # a finished line's content differs from what the checkpoint recorded


def checkpoint_status(path: str, dead_letter: str | None = None) -> Status:
    """Read the checkpoint's header and tail, then stream the manifests once (runs, pending).

    A run counts as done only when every record of it finished and none is in the dead
    letter (the one the checkpoint names, unless ``dead_letter`` is given). Read only: the
    checkpoint is never changed. A file that is no checkpoint is a ConfigurationError.
    """
    header, point = _read_only(path)
    # shown without credentials: earlier versions kept a tracking URI's user:password@
    target = without_userinfo(str(header.get("target", "")))
    manifests = [str(m) for m in header.get("manifests", [])]
    c = point.counts
    if any(m == STDIN for m in manifests) or not all(_readable_again(m) for m in manifests):
        return Status(
            target,
            manifests,
            c.succeeded,
            c.failed,
            c.rejected,
            None,
            None,
            None,
            None,
            None,
            point.last_write,
            False,
        )
    named = header.get("dead_letter")
    dead_letter = dead_letter or (named if isinstance(named, str) else None)
    failed_runs = _dead_letter_runs(dead_letter) if dead_letter else set()
    runs: set[str] = set()
    pending_runs: set[str] = set()
    pending = 0
    changed = False
    for index, m in enumerate(manifests):
        below = point.marks[index].records if index < len(point.marks) else 0
        for line in read_lines(m, index):
            run = _run_id(line.raw)
            if run is not None:
                runs.add(run)
            key = record_key(index, line.record)
            done = line.record < below
            if not done and key in point.done:
                done = True
                changed |= point.done[key] != line_hash(line.raw)
            if not done:
                pending += 1
                if run is not None:
                    pending_runs.add(run)
    runs_failed = len(failed_runs & runs)
    runs_pending = len(pending_runs - failed_runs)
    return Status(
        target,
        manifests,
        c.succeeded,
        c.failed,
        c.rejected,
        pending,
        len(runs),
        len(runs) - runs_failed - runs_pending,
        runs_failed,
        runs_pending,
        point.last_write,
        changed,
    )


_HEADER_LIMIT = 8 * MIB  # a checkpoint's first line is far shorter


def _read_only(path: str) -> tuple[dict[str, Any], ResumePoint]:
    """The checkpoint's header and state, or a ConfigurationError naming what ``path`` is
    instead (a directory, a FIFO, a foreign file), without changing it."""
    try:
        size = check_regular(path).st_size  # a FIFO would wait for a writer forever
        with open(path, "rb") as f:
            head = f.read(_HEADER_LIMIT)
    except UnusableFile as exc:
        raise ConfigurationError(f"checkpoint {path}: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"checkpoint {path}: cannot be read ({exc.strerror})") from None
    if size > _HEADER_LIMIT and b"\n" not in head:  # one huge line: never read whole
        raise ConfigurationError(f"{path} is not a batchlog checkpoint")
    try:
        return read_checkpoint(path, repair=False)
    except CheckpointError as exc:  # not a checkpoint this version reads: a usage error
        raise ConfigurationError(str(exc)) from None
    except OSError as exc:
        raise ConfigurationError(f"checkpoint {path}: cannot be read ({exc.strerror})") from None


def _readable_again(path: str) -> bool:
    """Whether a manifest can be read again: a regular file (a FIFO would wait for a writer,
    a device might never end)."""
    try:
        check_regular(path)
        with open(path, "rb"):
            return True
    except (UnusableFile, OSError):
        return False


def _run_id(raw: bytes) -> str | None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    run = doc.get("run_id") if isinstance(doc, dict) else None
    return run if isinstance(run, str) else None


def _dead_letter_runs(path: str) -> set[str]:
    runs: set[str] = set()
    try:
        check_regular(path)  # read only if it is a file: not a FIFO, a device
        with open(path, "rb") as f:
            for raw in f:
                run = _run_id(raw)
                if run is not None:
                    runs.add(run)
    except (UnusableFile, OSError):
        pass
    return runs
