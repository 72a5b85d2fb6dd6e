"""Whether a job's dead letter was fixed and uploaded: its earlier failures then no longer
count against it (the exit code, the summary, ``status``).

A dead letter is resolved when its own upload job (the checkpoint ``batchlog upload
DEAD_LETTER`` gives it, against the same target) finished every line the file holds now,
with none failing, or with its own dead letter resolved the same way. Read only: no
checkpoint is locked or changed.
"""

from __future__ import annotations

import os

from batchlog.errors import BatchlogError
from batchlog.journal import line_hash, read_checkpoint, record_key
from batchlog.manifest import Boundary, ManifestReader
from batchlog.settings import EMULATED, EMULATOR_SITE, default_checkpoint
from batchlog.target import without_userinfo

MAX_DEPTH = 10  # dead letters of dead letters followed at most: never a loop
_BATCH = 512


def kind_of(identity: str) -> str:
    """The kind of a job bound to ``identity`` (a checkpoint's target), as its files are
    named: ``emulated`` for a rehearsal (settings._kind_of), else ""."""
    return EMULATED if identity.startswith(f"oci-aidp/{EMULATOR_SITE}/") else ""


def resolved_by(
    dead_letter: str, identity: str, added: int = 0, depth: int = MAX_DEPTH
) -> list[str]:
    """The checkpoints showing ``dead_letter`` fixed and uploaded to ``identity``: its own
    upload's first, then those of its dead letters when that one had failures; [] when it
    is not (not uploaded, not in full, a line failing still, another target, edited since).
    ``added``: its last that many records do not count (the run asking added them)."""
    if depth <= 0 or not dead_letter or not os.path.isfile(dead_letter):
        return []
    try:
        checkpoint = default_checkpoint([dead_letter], kind_of(identity))
        if not os.path.isfile(checkpoint):
            return []
        header, point = read_checkpoint(checkpoint, repair=False)
        manifests = header.get("manifests")
        if (
            without_userinfo(str(header.get("target", ""))) != without_userinfo(identity)
            or not isinstance(manifests, list)
            or not manifests
            or os.path.basename(str(manifests[0])) != os.path.basename(dead_letter)
            or not point.marks
        ):
            return []  # a rehearsal never resolves a real job, nor the other way round
        if not _all_finished(dead_letter, point.marks[0], point.done, added):
            return []
    except (BatchlogError, OSError, ValueError):  # unreadable: not shown to be resolved
        return []
    if point.counts.unsuccessful == 0 and not point.doubt:
        return [checkpoint]
    own = header.get("dead_letter")
    deeper = resolved_by(own, identity, 0, depth - 1) if isinstance(own, str) else []
    return [checkpoint, *deeper] if deeper else []


def _all_finished(path: str, mark: Boundary, done: dict[int, str], added: int) -> bool:
    """Whether the upload job finished every record of ``path`` but its last ``added``, as
    the file is now: the part below its mark unchanged, every line after it finished with
    the same content."""
    reader = ManifestReader(path, 0, mark, wait=True)
    reader.keep_partial = True
    first_open: int | None = None  # the first record not finished
    try:
        reader.check_prefix()  # ManifestChanged: edited after its upload
        while not reader.ended:
            lines, _ = reader.batch(_BATCH)
            if not lines and not reader.ended:
                return False  # nothing more to read, yet not at its end: not shown
            for line in lines:
                if first_open is None and done.get(record_key(0, line.record)) != line_hash(
                    line.raw
                ):
                    first_open = line.record
        total = reader.records_read
    finally:
        reader.close()
    return first_open is None or first_open >= total - added


def edited(dead_letter: str, size: int) -> bool:
    """Whether the dead letter was taken over by the user since this job wrote ``size``
    bytes of it: uploaded (it has an upload checkpoint, of either kind), or no longer a
    line end at ``size``. Then it is theirs: never cut back (found by review: a rerun cut a
    fixed dead letter, longer than the one written, in the middle of a line)."""
    if any(os.path.exists(default_checkpoint([dead_letter], k)) for k in ("", EMULATED)):
        return True
    if size <= 0:
        return False
    try:
        with open(dead_letter, "rb") as f:
            f.seek(size - 1)
            return f.read(1) != b"\n"
    except OSError:
        return False
