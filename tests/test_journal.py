"""The checkpoint journal: watermarks, completions above them, doubts, snapshots, damage."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlog import journal as journal_module
from batchlog.emulator import EmulatorThread
from batchlog.emulator.server import http_response
from batchlog.errors import CheckpointError
from batchlog.journal import (
    REJECTED,
    Journal,
    ResumePoint,
    header_doc,
    open_journal,
    read_checkpoint,
    record_key,
)
from batchlog.manifest import Boundary
from tests.conftest import (
    Oci,
    inputs_record,
    mixed_records,
    run_cli,
    upload_args,
    write_manifest,
)
from tests.test_crash import start_cli, wait_applied
from tests.test_upload import assert_exactly_once, report

StartEmulator = Callable[..., EmulatorThread]

GROUPING = {"max_datasets": 100, "max_body": 1 << 20}


def header(target: str = "t1", manifests: int = 1) -> dict[str, object]:
    return header_doc(target, [f"m{i}.jsonl" for i in range(manifests)], GROUPING)


def after(n: int) -> Boundary:
    """The boundary after record n-1 when every line is 10 bytes and a record."""
    return Boundary(n, n * 10, n + 1, f"digest-{n}")


def open_(path: Path, target: str = "t1", manifests: int = 1) -> tuple[Journal, ResumePoint]:
    return open_journal(str(path), header(target, manifests), restart=False)


def read_all(journal: Journal, point: ResumePoint, upto: int = 10, m: int = 0) -> None:
    """The producer reads records from the watermark to ``upto``, one boundary per line."""
    for n in range(point.marks[m].records, upto):
        key = record_key(m, n)
        if key in point.done:
            journal.skip(key)
        else:
            journal.read(key, f"h{n}")
        journal.boundary(m, after(n + 1))


def fill(path: Path, finished: list[int], status: int | str = 200, target: str = "t1") -> None:
    journal, point = open_(path, target)
    read_all(journal, point)
    for n in finished:
        journal.finish([record_key(0, n)], status, "RID", "ETAG")
    journal.write(journal.pending_bytes())
    journal.close()


def test_watermark_and_finished_above(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0, 1, 2, 5, 7])
    _, point = read_checkpoint(str(path))
    assert point.marks == [after(3)]
    assert point.done == {5: "h5", 7: "h7"}
    assert point.counts.succeeded == 5


def test_resume_appends_and_advances(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0, 2])
    fill(path, [1, 3])
    _, point = read_checkpoint(str(path))
    assert point.marks == [after(4)] and point.done == {}
    assert (point.counts.succeeded, point.counts.failed) == (4, 0)


def test_failures_and_rejections_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal, point = open_(path)
    read_all(journal, point, upto=3)
    journal.finish([0], 200)
    journal.finish([1], 404)
    journal.finish([2], REJECTED)
    journal.write(journal.pending_bytes())
    journal.close()
    _, point = read_checkpoint(str(path))
    c = point.counts
    assert (c.succeeded, c.failed, c.rejected, point.marks[0].records) == (1, 1, 1, 3)


def test_manifests_have_watermarks_of_their_own(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal, point = open_(path, manifests=2)
    read_all(journal, point, upto=3, m=0)
    read_all(journal, point, upto=2, m=1)
    for key in (record_key(0, 0), record_key(1, 0), record_key(1, 1)):
        journal.finish([key], 200)
    journal.write(journal.pending_bytes())
    journal.close()
    _, point = read_checkpoint(str(path))
    assert point.marks == [after(1), after(2)]


def test_torn_tail_is_cut_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A whole line without the commit line that closes its group counts for nothing (found
    by review: a full disk cut a group after some whole lines, a resume counted their
    records as finished and cut their dead-letter lines, which the commit never covered)."""
    path = tmp_path / "c"
    fill(path, [0, 1])
    good = path.read_bytes()
    entry = journal_module.seal({"f": [2], "h": ["h2"], "st": 200})
    with open(path, "ab") as f:
        f.write(entry + b'{"w": 0, "at": [3, 30')  # kill -9 or a full disk mid-write
    with caplog.at_level(logging.WARNING, logger="batchlog"):
        _, point = read_checkpoint(str(path), repair=True)
    assert "cut off an unfinished or damaged tail" in caplog.text
    assert point.marks == [after(2)] and point.done == {}
    assert path.read_bytes() == good


def test_a_group_counts_once_its_commit_line_is_written(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0, 1])
    entry = journal_module.seal({"f": [2], "h": ["h2"], "st": 200})
    commit = journal_module.seal({"commit": [3, 0, 0], "dl": 0})
    with open(path, "ab") as f:
        f.write(entry + commit)
    _, point = read_checkpoint(str(path), repair=True)
    assert point.marks == [after(2)] and point.done == {2: "h2"}


def test_zero_filled_tail_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0])
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)  # what some file systems leave after a power cut
    _, point = read_checkpoint(str(path), repair=True)
    assert point.marks == [after(1)]
    assert path.read_bytes() == good


def test_one_damaged_byte_in_the_last_snapshot_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 10: a damaged last watermark used to reset the resume to zero."""
    monkeypatch.setattr(journal_module, "SNAPSHOT_EVERY", 0)  # a snapshot every flush
    path = tmp_path / "c"
    journal, point = open_(path)
    read_all(journal, point)
    journal.sent(record_key(0, 9), 1000.0, 1060.0, 1, "tok")
    for n in range(9):
        journal.finish([record_key(0, n)], 200)
        journal.write(journal.pending_bytes())
    journal.close()
    _, intact = read_checkpoint(str(path))
    data = bytearray(path.read_bytes())
    last = data.rindex(b'{"snap":')
    digit = data.index(b"digest-", last) + len(b"digest-")
    data[digit] = ord("7") if data[digit] != ord("7") else ord("8")  # still valid JSON
    path.write_bytes(bytes(data))
    _, point = read_checkpoint(str(path))
    assert point.marks == intact.marks == [after(9)]
    assert point.counts == intact.counts
    assert point.doubt == intact.doubt


def test_a_damaged_line_in_the_middle_is_skipped_not_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c"
    fill(path, [0, 1])
    fill(path, [2, 3])
    data = bytearray(path.read_bytes())
    second = data.index(b'{"f":[1]')  # the entry of record 1: damaged
    data[second + 3] = ord("9")
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="batchlog"):
        _, point = read_checkpoint(str(path), repair=True)
    assert "damaged line" in caplog.text
    # the lines after it still count: the watermark restates record 1 as done, and each
    # group commit restates the counts, so a damaged entry does not turn into a lie
    assert point.marks == [after(4)] and point.counts.succeeded == 4
    assert path.read_bytes() == bytes(data)  # good lines after it are never cut


def test_doubts_survive_runs_that_never_reach_them(tmp_path: Path) -> None:
    """Item 4: a run stopping before an earlier run's in-doubt call used to forget it."""
    path = tmp_path / "c"
    journal, point = open_(path)
    read_all(journal, point)
    journal.sent(record_key(0, 9), 1000.0, 1060.0, 1, "tok")
    journal.write(journal.pending_bytes())
    journal.close()
    for _ in range(3):  # later runs finish other records, with snapshots in between
        journal, point = open_(path)
        read_all(journal, point, upto=9)
        for n in range(9):
            if record_key(0, n) not in point.done and n >= point.marks[0].records:
                journal.finish([record_key(0, n)], 200)
                break
        journal._snapshot_due = True
        journal.write(journal.pending_bytes())
        journal.close()
    _, point = read_checkpoint(str(path))
    doubt = point.doubt[record_key(0, 9)]
    assert (doubt.first_sent, doubt.until) == (1000.0, 1060.0)


def test_a_finished_call_is_no_longer_in_doubt(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal, point = open_(path)
    read_all(journal, point, upto=2)
    journal.sent(record_key(0, 0), 1.0, 2.0, 1, "tok")
    journal.sent(record_key(0, 1), 1.0, 2.0, 1, "tok")
    journal.finish([record_key(0, 0)], 500)
    journal.settled(record_key(0, 1))
    journal.write(journal.pending_bytes())
    journal.close()
    _, point = read_checkpoint(str(path))
    assert point.doubt == {}


def test_one_slow_record_keeps_the_checkpoint_linear(tmp_path: Path) -> None:
    """Item 11: every watermark restated all records above it: quadratic growth."""
    n = 20_000
    path = tmp_path / "c"
    journal, point = open_(path)
    for i in range(n):
        journal.read(record_key(0, i), f"{i:016x}")
        journal.boundary(0, after(i + 1))
    for i in range(1, n):  # record 0 is held by a slow server the whole time
        journal.finish([record_key(0, i)], 200)
        if i % 50 == 0:  # a flush every 50 completions
            journal.write(journal.pending_bytes())
    journal.finish([record_key(0, 0)], 200)
    journal.write(journal.pending_bytes())
    journal.close()
    size = os.path.getsize(path)
    assert size < 4 * n * 60, size  # about 60 bytes a record, and snapshots of bounded cost
    _, point = read_checkpoint(str(path))
    assert point.marks == [after(n)] and point.done == {}


def test_resume_reads_only_the_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many flushes: the resume point comes from the last snapshot on, and is right."""
    monkeypatch.setattr(journal_module, "SNAPSHOT_EVERY", 1 << 16)
    path = tmp_path / "c"
    journal, point = open_(path)
    n = 30_000
    for i in range(n):
        journal.read(record_key(0, i), "h")
        journal.boundary(0, after(i + 1))
        journal.finish([record_key(0, i)], 200)
        if i % 100 == 0:
            journal.write(journal.pending_bytes())
    journal.write(journal.pending_bytes())
    journal.close()
    size = os.path.getsize(path)
    read_bytes = 0
    real_read = journal_module._read

    def counting(p: str, repair: bool) -> object:
        nonlocal read_bytes
        out = real_read(p, repair)
        read_bytes = out[2]
        return out

    monkeypatch.setattr(journal_module, "_read", counting)
    _, point = read_checkpoint(str(path))
    assert point.marks == [after(n)] and point.counts.succeeded == n
    assert read_bytes < 3 * journal_module.SNAPSHOT_EVERY < size


def test_a_snapshot_in_a_resumed_run_keeps_the_dead_letter_it_accounts_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review of the full-disk loss: a resumed run's journal started without the
    dead letter's size and identity, so a snapshot written before its first dead-letter
    line restated neither; a later resume, finding the file longer than that, set the
    whole dead letter aside (lines of records counted as finished with it) instead of
    cutting it back."""
    path = tmp_path / "c"
    journal, point = open_(path)
    read_all(journal, point, upto=2)
    journal.finish([0], REJECTED)
    journal.write(journal.pending_bytes(500, [7, 8]))
    journal.close()
    monkeypatch.setattr(journal_module, "SNAPSHOT_EVERY", 0)  # the next flush snapshots
    journal, point = open_(path)
    assert (point.dead_letter_size, point.dead_letter_id) == (500, [7, 8])
    read_all(journal, point, upto=2)
    journal.finish([1], 200)  # no dead-letter line in this flush
    data = journal.pending_bytes()
    assert b'{"snap":' in data
    journal.write(data)
    journal.close()
    _, point = read_checkpoint(str(path))
    assert (point.dead_letter_size, point.dead_letter_id) == (500, [7, 8])


def test_another_target_or_manifest_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0])
    with pytest.raises(CheckpointError, match="another target"):
        open_(path, target="t2")
    with pytest.raises(CheckpointError, match="manifests"):
        open_(path, manifests=2)


def test_another_target_with_nothing_sent_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "c"
    fill(path, [0], status=REJECTED)
    journal, point = open_(path, target="t2")
    journal.close()
    assert point.finished == 0


def test_an_older_format_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_bytes(b'{"batchlog_checkpoint": 1, "target": "t1"}\n')
    with pytest.raises(CheckpointError, match="another version of batchlog"):
        read_checkpoint(str(path))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "c"
    path.write_bytes(b"hello\n")
    with pytest.raises(CheckpointError, match="not a batchlog checkpoint"):
        read_checkpoint(str(path))


def test_creating_files_syncs_their_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 16: the journal and dead letter were fsync'ed, their directory never."""
    from batchlog import durable
    from batchlog.deadletter import DeadLetter

    synced: list[str] = []
    real = durable.sync_directory

    def spy(path: str) -> None:
        synced.append(os.path.abspath(path))
        real(path)

    monkeypatch.setattr(durable, "sync_directory", spy)
    journal, _ = open_(tmp_path / "sub" / "c")
    journal.close()
    dead = DeadLetter(str(tmp_path / "dl" / "d.jsonl"), set_aside=True)
    dead.write(b"{}\n")  # the file, and its directory, are created by the first line
    dead.close()
    assert synced == [str(tmp_path / "sub"), str(tmp_path / "dl")]


def test_two_processes_never_run_one_job_at_once(tmp_path: Path) -> None:
    """A cron run overlapping the last one would send the same records twice."""
    path = tmp_path / "c"
    journal, _ = open_(path)
    with pytest.raises(CheckpointError, match="in use by another batchlog process"):
        open_(path)
    journal.close()
    again, _ = open_(path)  # released on close
    again.close()


# ---- a call answered 429 is not in doubt (newcomer review, item 9) ---------------------------

THROTTLED = http_response(429, [("Retry-After", "300")], b'{"code": "TooManyRequests"}')
ERROR_500 = http_response(500, [], b'{"code": "InternalServerError"}')  # before applying


def interrupt_while_throttled(
    emu: EmulatorThread, args: list[str], answers: dict[int, int]
) -> None:
    """Run the upload until the emulator has given ``answers`` (status -> how many), let a
    group commit journal them, then SIGINT it: calls waiting on a Retry-After stay
    unfinished."""
    proc = start_cli(args)
    try:
        deadline = time.monotonic() + 30
        while any(emu.state.statuses[status] < n for status, n in answers.items()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, emu.state.statuses
            time.sleep(0.02)
        time.sleep(0.5)  # a group commit (every 0.2 s) journals the answers
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err


def test_a_call_answered_429_is_not_left_in_doubt_and_its_line_may_still_be_edited(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """A 429 says the call was not applied: the journal must not keep it in doubt (a resume
    would refuse its edited line as "sent and never answered", and read it back when old)."""
    emu = emulator(canned={"held": [THROTTLED]})
    records = [inputs_record("held", "ds0"), *(inputs_record(f"r{i}", f"ds{i}") for i in range(4))]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest))
    interrupt_while_throttled(emu, args, {429: 1})
    _, point = read_checkpoint(str(tmp_path / "m.batchlog-checkpoint"))
    assert point.doubt == {}, point.doubt
    edited = [inputs_record("held", "ds0-fixed"), *records[1:]]
    write_manifest(manifest, edited)  # a line not finished may be edited before the rerun
    out = run_cli([*args, "--report", str(tmp_path / "r.json")])
    assert out.returncode == 0, out.stderr
    assert report(tmp_path / "r.json")["read_backs"] == 0
    assert_exactly_once(emu, edited)


def test_a_call_that_got_no_answer_before_its_429_stays_in_doubt(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """A 500 first: that attempt may have landed, whatever the next one was answered."""
    emu = emulator(canned={"doubt": [ERROR_500, THROTTLED]})
    records = [inputs_record("doubt", "ds0"), *(inputs_record(f"r{i}", f"ds{i}") for i in range(4))]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest))
    interrupt_while_throttled(emu, args, {500: 1, 429: 1})
    _, point = read_checkpoint(str(tmp_path / "m.batchlog-checkpoint"))
    assert list(point.doubt) == [record_key(0, 0)], point.doubt
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


# ---- what status and the report call pending (newcomer review, item 11) ----------------------


def test_status_counts_what_a_rerun_processes_and_the_report_what_was_read(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """After an interrupt the report's ``pending`` counts the records read and not finished;
    ``status`` counts every record not finished, those not read yet included: what the
    rerun goes on with. Two facts, two names."""
    emu = emulator(latency=0.3)
    records = mixed_records(1000, runs=1000)  # one request per record
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest), "--concurrency", "8", "--grace", "0.5")
    proc = start_cli([*args, "--report", str(tmp_path / "r1.json")])
    wait_applied(emu, proc, 16)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    first = report(tmp_path / "r1.json")
    shown = run_cli(["status", str(tmp_path / "m.batchlog-checkpoint")])
    assert shown.returncode == 0, shown.stderr
    [line] = [line for line in shown.stdout.splitlines() if line.startswith("records ")]
    left = re.search(r"([\d,]+) not finished \(read or not: the same upload command", line)
    assert left is not None and "pending" not in shown.stdout, shown.stdout
    not_finished = int(left[1].replace(",", ""))
    assert 0 < first["pending"] < not_finished  # type: ignore[operator]
    assert not_finished == 1000 - int(first["succeeded"])  # type: ignore[call-overload]

    emu.emulator.config.latency = 0.0
    out = run_cli([*args, "--report", str(tmp_path / "r2.json")])
    assert out.returncode == 0, out.stderr
    again = report(tmp_path / "r2.json")
    assert again["succeeded"] == not_finished  # what status said the rerun goes on with
    assert_exactly_once(emu, records)
    shown = run_cli(["status", str(tmp_path / "m.batchlog-checkpoint")])
    assert "1,000 succeeded, 0 failed, 0 rejected, 0 not finished" in shown.stdout, shown.stdout
