"""The checkpoint journal: watermark, completions above it, torn tails, foreign checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from batchlog.errors import CheckpointError
from batchlog.journal import REJECTED, Mark, header_doc, open_journal, read_checkpoint

GROUPING = {"max_datasets": 100, "max_body": 1 << 20}


def header(target: str = "t1") -> dict[str, object]:
    return header_doc(target, [{"path": "m.jsonl", "head_len": 0, "head": None}], GROUPING)


def fill(path: Path, finished: list[int], status: int | str = 200, target: str = "t1") -> None:
    journal, point = open_journal(str(path), header(target), restart=False)
    for seq in range(point.watermark, 10):
        journal.read(seq, Mark(0, seq * 10, seq * 10 + 10, seq + 1, f"h{seq}"))
    for seq in finished:
        journal.finish([seq], status, "RID", "ETAG")
    journal.write(journal.pending_bytes())
    journal.close()


def test_watermark_and_finished_above(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0, 1, 2, 5, 7])
    _, point = read_checkpoint(str(path))
    assert point.watermark == 3
    assert point.at == (0, 30, 4)  # after line 3 (seq 2)
    assert point.check == (20, 30, "h2")
    assert point.done_above == {5: "h5", 7: "h7"}
    assert point.counts.succeeded == 5


def test_resume_appends_and_advances(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0, 2])
    fill(path, [1, 3])
    _, point = read_checkpoint(str(path))
    assert point.watermark == 4 and point.done_above == {}
    assert (point.counts.succeeded, point.counts.failed) == (4, 0)


def test_failures_and_rejections_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal, _ = open_journal(str(path), header(), restart=False)
    for seq in range(3):
        journal.read(seq, Mark(0, seq, seq + 1, seq + 1, "h"))
    journal.finish([0], 200)
    journal.finish([1], 404)
    journal.finish([2], REJECTED)
    journal.write(journal.pending_bytes())
    journal.close()
    _, point = read_checkpoint(str(path))
    c = point.counts
    assert (c.succeeded, c.failed, c.rejected, point.watermark) == (1, 1, 1, 3)


def test_torn_tail_is_cut_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "c"
    fill(path, [0, 1])
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"s": [2], "h": ["h2"], "st": 200}\n{"wm": 3, "at": [0, 3')  # kill -9 mid-write
    with caplog.at_level(logging.WARNING, logger="batchlog"):
        _, point = read_checkpoint(str(path), repair=True)
    assert "torn or corrupt tail" in caplog.text
    # the complete entry survives, the torn watermark is cut
    assert point.watermark == 2 and point.done_above == {2: "h2"}
    assert path.read_bytes() == good + b'{"s": [2], "h": ["h2"], "st": 200}\n'


def test_garbage_tail_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0])
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x00garbage\n")
    _, point = read_checkpoint(str(path), repair=True)
    assert point.watermark == 1
    fill(path, [1])  # and the job goes on
    _, point = read_checkpoint(str(path))
    assert point.watermark == 2


def test_checkpoint_of_another_target_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0])
    with pytest.raises(CheckpointError, match="another target"):
        open_journal(str(path), header("t2"), restart=False)
    journal, point = open_journal(str(path), header("t2"), restart=True)
    journal.close()
    assert point.watermark == 0


def test_target_may_change_while_nothing_reached_it(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0], status=REJECTED)  # only a rejected line: no request was ever answered
    journal, point = open_journal(str(path), header("t2"), restart=False)
    journal.close()
    assert point.watermark == 0


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_text('{"run_id": "x"}\n')
    with pytest.raises(CheckpointError, match="not a batchlog checkpoint"):
        open_journal(str(path), header(), restart=False)


def test_resume_reads_only_the_tail(tmp_path: Path) -> None:
    """Many flushes: the resume point comes from the last watermark, and is right."""
    path = tmp_path / "c"
    journal, _ = open_journal(str(path), header(), restart=False)
    n = 20_000
    for seq in range(n):
        journal.read(seq, Mark(0, seq, seq + 1, seq + 1, "h"))
        journal.finish([seq], 200)
        if seq % 100 == 0:
            journal.write(journal.pending_bytes())
    journal.write(journal.pending_bytes())
    journal.close()
    _, point = read_checkpoint(str(path))
    assert point.watermark == n and point.counts.succeeded == n


def test_a_merged_call_is_one_line(tmp_path: Path) -> None:
    """A torn write drops a whole call or none of it: never part of a merged call."""
    path = tmp_path / "c"
    journal, _ = open_journal(str(path), header(), restart=False)
    for seq in range(3):
        journal.read(seq, Mark(0, seq, seq + 1, seq + 1, f"h{seq}"))
    journal.finish([0, 1, 2], 200, "RID")
    data = journal.pending_bytes()
    journal.close()
    lines = data.splitlines()
    assert len(lines) == 2 and lines[0].startswith(b'{"s":[0,1,2]')
    # torn inside that line: nothing of the call counts as done
    path.write_bytes(path.read_bytes() + data[: len(lines[0]) // 2])
    _, point = read_checkpoint(str(path), repair=True)
    assert point.finished == 0
