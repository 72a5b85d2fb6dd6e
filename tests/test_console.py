"""What a user and a scheduler see (issue 10): the progress line, an interrupt explained,
the report and its schema, and the output for schedulers (--log-format json, -q, --log-file).

Each test runs the CLI as a user does (a subprocess, under a real pseudo-terminal where the
live line matters) against the emulator on loopback.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchlog.emulator import EmulatorThread
from batchlog.emulator.server import http_response
from tests.conftest import (
    Oci,
    inputs_record,
    mixed_records,
    run_cli,
    upload_args,
    write_manifest,
)
from tests.test_crash import start_cli, wait_applied
from tests.test_internal_errors import run_with_bug
from tests.test_upload import assert_exactly_once, report

StartEmulator = Callable[..., EmulatorThread]
README = Path(__file__).resolve().parent.parent / "README.md"
EVENTS = {"progress", "failure", "warning", "info", "message", "error", "signal", "summary"}


# ---- helpers -----------------------------------------------------------------------------


def run_in_terminal(args: list[str], timeout: float = 90, columns: int = 200) -> tuple[int, str]:
    """batchlog with stdout and stderr on a real pseudo-terminal (``columns`` wide, COLUMNS
    set to match): its exit code and every byte it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCI_")}
    env["COLUMNS"] = str(columns)
    proc = subprocess.Popen(
        [sys.executable, "-m", "batchlog", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: every writer of the terminal has gone
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait(30)
        os.close(master)
    return rc, b"".join(chunks).decode()


def screen(raw: str) -> list[str]:
    """The rows a terminal shows after ``raw``: \\r goes back to the row's start, ESC[K
    erases from the cursor to the end of the row."""
    rows, col = [""], 0
    i = 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            rows[-1] = rows[-1][:col]
            i += 3
            continue
        ch = raw[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            rows.append("")
            col = 0
        else:
            row = rows[-1].ljust(col)
            rows[-1] = row[:col] + ch + row[col + 1 :]
            col += 1
        i += 1
    return rows


def events(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON event (each must be one)."""
    out = []
    for line in text.splitlines():
        doc = orjson.loads(line)
        assert isinstance(doc, dict) and doc["event"] in EVENTS, line
        assert datetime.fromisoformat(doc["time"].replace("Z", "+00:00")).tzinfo is not None
        out.append(doc)
    return out


def documented_report_fields() -> dict[str, str]:
    """The report's fields and types as README's report schema table gives them."""
    text = README.read_text()
    start = text.index("<!-- report schema -->")
    end = text.index("<!-- end of report schema -->", start)
    fields = {}
    for line in text[start:end].splitlines():
        m = re.match(r"^\| `(\w+)` \| ([a-z ,()0-9]+?) \|", line)
        if m:
            fields[m[1]] = m[2]
    assert len(fields) > 10, fields
    return fields


def type_ok(value: object, kind: str) -> bool:
    if kind.endswith(" or null") and value is None:
        return True
    kind = kind.removesuffix(" or null")
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "timestamp":
        return (
            isinstance(value, str)
            and value.endswith("Z")
            and bool(datetime.fromisoformat(value.replace("Z", "+00:00")))
        )
    raise AssertionError(f"README names an unknown type {kind!r}")


def failing_job(tmp_path: Path, emulator: StartEmulator) -> tuple[EmulatorThread, Path, int]:
    """A manifest of 40 records that land, 1 invalid line and 3 records of a run the server
    does not know (after the others: not taken for a wrong workspace)."""
    good = [inputs_record(f"g{i}", f"ds{i}") for i in range(40)]
    emu = emulator(known_runs=frozenset(r["run_id"] for r in good), latency=0.002)
    lost = [inputs_record("nosuchrun", f"lost{i}") for i in range(3)]
    lines: list[object] = [*good, b'{"run_id": "g1", "dataset_inputs": [', *lost]
    return emu, write_manifest(tmp_path / "m.jsonl", lines), 4


# ---- 1. progress -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_the_live_line_shows_the_percentage_and_is_cleared_before_the_summary(
    gz: bool, tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=0.04)
    records = mixed_records(400, runs=400)  # one request each: about 4 s at 4 in flight
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    if gz:  # the ETA of a .gz comes from the compressed offset read so far
        manifest = tmp_path / "m.jsonl.gz"
        manifest.write_bytes(gzip.compress((tmp_path / "m.jsonl").read_bytes()))
    rc, raw = run_in_terminal(upload_args(oci, emu, str(manifest), "--concurrency", "4"))
    assert rc == 0, raw
    assert_exactly_once(emu, records)
    live = re.findall(r"\r\x1b\[K([^\r\n]*)", raw)
    shown = [line for line in live if re.search(r"of ~?[\d,]+ records \(\d+%\)", line)]
    assert shown, raw
    assert any("records/s" in line and "rate limit" in line for line in shown), shown
    assert any("ETA" in line for line in shown), shown
    rows = [row for row in screen(raw) if row.strip()]
    [at] = [n for n, row in enumerate(rows) if row.startswith("batchlog: completed:")]
    assert rows[at].startswith("batchlog: completed: 400 records: 400 succeeded"), rows[at]
    assert "%" not in "".join(rows[:at]) and "ETA" not in "".join(rows), rows  # no stale line
    assert "\x1b" not in "".join(rows[at:]), rows


def test_at_80_columns_the_live_line_keeps_the_eta_and_a_retry_after_wait(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by review: at 80 columns the line was cut before the ETA. Done of total,
    percent, records/s and ETA come first, then the wait on a server's Retry-After (one
    record is answered 429 with Retry-After: 3 in the middle of the job)."""
    slow = http_response(429, [("Retry-After", "3")], b'{"code": "TooManyRequests"}')
    emu = emulator(latency=0.04, canned={"run00150": [slow]})
    records = mixed_records(300, runs=300)  # one request each: about 3 s at 4 in flight
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    # a fixed rate: shown as the limit, and only the record waits on the Retry-After
    args = upload_args(
        oci, emu, str(manifest), "--concurrency", "4", "--rate", "1000", "--no-adaptive"
    )
    rc, raw = run_in_terminal(args, columns=80)
    assert rc == 0, raw
    assert_exactly_once(emu, records)
    drawn = re.findall(r"\r\x1b\[K([^\r\n]*)", raw)
    live = [line for line in drawn if line and not line.startswith("batchlog: ")]
    assert live and all(len(line) < 80 for line in live), live  # never wrapped
    head = r"^[\d,]+ of ~?[\d,]+ records \(\d+%\), [\d,]+ records/s, ETA \d+s"
    assert any(re.match(head, line) for line in live), live
    waits = [line for line in live if re.search(r"Retry-After \ds\b", line)]
    assert waits and any(re.match(head, line) for line in waits), live


def test_progress_lines_every_5_s_when_stderr_is_not_a_terminal(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """stderr a pipe (text) and a --log-file in JSON: the same facts every 5 s."""
    emu = emulator(latency=0.05)
    records = mixed_records(560, runs=560)  # about 7 s at 4 in flight
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    log = tmp_path / "log.jsonl"
    out = run_cli(
        [
            *upload_args(oci, emu, str(manifest), "--concurrency", "4"),
            "--log-file",
            str(log),
            "--log-format",
            "text",
        ]
    )
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "\x1b" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "%)" in line]
    assert lines, out.stderr
    assert re.match(
        r"batchlog: [\d,]+ of ~?[\d,]+ records \(\d+%\), [\d,]+ records/s, ETA \d+s, "
        r"(.*, )?[\d,]+ requests/s, rate limit [\d,]+ requests/s, [\d,]+ in flight$",
        lines[0],
    ), lines
    assert log.read_text() == out.stderr  # --log-file: the same events, in the same format


# ---- 3. interrupts explained ---------------------------------------------------------------


def test_an_interrupt_says_what_is_pending_once_and_the_rerun_sends_it(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=1.0)  # 8 requests in flight for a second at any moment
    records = mixed_records(120, runs=120)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest), "--concurrency", "8", "--grace", "0.2")
    proc = start_cli([*args, "--report", str(tmp_path / "r.json")])
    wait_applied(emu, proc, 16)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    r = report(tmp_path / "r.json")
    finished = int(r["succeeded"]) + int(r["failed"]) + int(r["rejected"])  # type: ignore[call-overload]
    pending = int(r["records"]) - finished - int(r["already_done"])  # type: ignore[call-overload]
    assert r["pending"] == pending > 0, r
    assert r["status"] == "interrupted" and r["message"] == "interrupted"
    assert len(re.findall(r"\binterrupted\b", err)) == 1, err  # said once
    assert f"{pending:,} pending" in err, err
    [why] = [line for line in err.splitlines() if "in flight or waiting" in line]
    assert f"{pending:,} records" in why and "run the same command again" in why, why

    emu.config.latency = 0.0  # the rerun only has to finish: no need to wait a second a call
    out = run_cli([*args, "--report", str(tmp_path / "r2.json")])
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)
    again = report(tmp_path / "r2.json")
    assert again["already_done"] == finished and again["pending"] == 0


# ---- 4. the report ---------------------------------------------------------------------------


def test_the_report_has_every_documented_field_and_the_text_uses_its_words(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu, manifest, _ = failing_job(tmp_path, emulator)
    out = run_cli([*upload_args(oci, emu, str(manifest)), "--report", str(tmp_path / "r.json")])
    assert out.returncode == 1, out.stderr
    r = report(tmp_path / "r.json")
    fields = documented_report_fields()
    assert set(r) == set(fields), set(r) ^ set(fields)  # documented, and nothing else
    for name, kind in fields.items():
        assert type_ok(r[name], kind), (name, kind, r[name])
    assert r["version"] == 1
    assert (r["records"], r["succeeded"], r["failed"], r["rejected"]) == (44, 40, 3, 1)
    assert (r["already_done"], r["pending"]) == (0, 0)
    assert r["started_at"] <= r["finished_at"]  # type: ignore[operator]
    assert r["records_per_s"] > 0  # type: ignore[operator]
    summary = "\n".join(line for line in out.stderr.splitlines() if "batchlog: " in line)
    for name in (
        "records",
        "succeeded",
        "failed",
        "rejected",
        "already_done",
        "pending",
        "requests",
        "retries",
        "throttled",
        "read_backs",
    ):
        word = name.replace("_", " ")
        assert f"{r[name]:,} {word}" in summary, (name, summary)
    assert "records/s" in summary and "requests/s" in summary and "rate limit" in summary
    assert "skipped" not in out.stderr

    # a rerun sends nothing: no throughput to speak of, and the limit is named as a limit
    out = run_cli([*upload_args(oci, emu, str(manifest)), "--report", str(tmp_path / "r.json")])
    r = report(tmp_path / "r.json")
    assert (r["requests"], r["records_per_s"], r["already_done"]) == (0, 0, 44), r
    assert "rate" not in r and isinstance(r["rate_limit"], float)


def test_a_rerun_says_how_many_of_the_records_already_done_did_not_succeed(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by review: a rerun of a job whose first run rejected lines said "0 rejected, 9
    already done" and then "3 records ... did not succeed", while `status` said "6
    succeeded, 3 rejected". "already done" is what earlier runs finished (README's schema):
    the summary says how many of them did not succeed, as `status` counts them."""
    emu, manifest, _ = failing_job(tmp_path, emulator)
    args = upload_args(oci, emu, str(manifest))
    assert run_cli(args).returncode == 1
    out = run_cli([*args, "--report", str(tmp_path / "r.json")])
    assert out.returncode == 1, out.stderr
    status = run_cli(["status", str(tmp_path / "m.batchlog-checkpoint")])
    assert "40 succeeded, 3 failed, 1 rejected" in status.stdout, status.stdout
    [counts] = [line for line in out.stderr.splitlines() if line.startswith("batchlog: completed")]
    assert counts.endswith(
        "0 failed, 0 rejected, 44 already done (by earlier runs: 40 succeeded, 3 failed, "
        "1 rejected), 0 pending"
    ), counts
    r = report(tmp_path / "r.json")
    assert (r["already_done"], r["failed_total"], r["rejected_total"]) == (44, 3, 1), r
    assert "4 records of this job did not succeed (0 in this run, 4 in earlier runs)" in (
        out.stderr
    ), out.stderr


# ---- 5. output for schedulers ----------------------------------------------------------------


def test_json_log_format_writes_one_event_per_line_and_the_summary_is_the_report(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu, manifest, failures = failing_job(tmp_path, emulator)
    log = tmp_path / "batchlog.log"
    args = [
        *upload_args(oci, emu, str(manifest)),
        "--log-format",
        "json",
        "--log-file",
        str(log),
        "--report",
        str(tmp_path / "r.json"),
    ]
    out = run_cli(args)
    assert out.returncode == 1, out.stderr  # exit codes unchanged
    got = events(out.stderr)
    failed = [e for e in got if e["event"] == "failure"]
    assert len(failed) == failures, got
    for e in failed:
        assert re.fullmatch(r".*m\.jsonl:\d+", e["source"]), e
        assert e["status"] in (404, "rejected") and e["code"] and e["message"], e
    assert {e["source"].rsplit(":", 1)[1] for e in failed} == {"41", "42", "43", "44"}
    [summary] = [e for e in got if e["event"] == "summary"]
    assert got[-1] is summary
    fields = {k: v for k, v in summary.items() if k not in ("event", "time")}
    assert fields == report(tmp_path / "r.json")
    assert events(log.read_text()) == got  # the same events in the log file

    again = run_cli(args)  # --log-file appends
    assert again.returncode == 1, again.stderr
    assert len(events(log.read_text())) == len(got) + len(events(again.stderr))


def test_json_progress_events_every_5_s(tmp_path: Path, oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator(latency=0.05)
    records = mixed_records(560, runs=560)  # about 7 s at 4 in flight
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    log = tmp_path / "log.txt"
    out = run_cli(
        [
            *upload_args(oci, emu, str(manifest), "--concurrency", "4"),
            "--log-format",
            "json",
            "--log-file",
            str(log),
        ]
    )
    assert out.returncode == 0, out.stderr
    progress = [e for e in events(out.stderr) if e["event"] == "progress"]
    assert progress, out.stderr
    p = progress[0]
    assert 0 < p["percent"] < 100 and p["records_total"] >= p["finished"] > 0, p
    assert p["records_per_s"] > 0 and p["rate_limit"] > 0 and p["eta_s"] >= 0, p
    assert {"succeeded", "failed", "rejected", "already_done", "pending", "in_flight"} <= set(p)
    assert events(log.read_text()) == events(out.stderr)


def test_quiet_prints_errors_only(tmp_path: Path, oci: Oci, emulator: StartEmulator) -> None:
    emu, manifest, failures = failing_job(tmp_path, emulator)
    good = write_manifest(tmp_path / "good.jsonl", [inputs_record("g0", "fine")])
    out = run_cli([*upload_args(oci, emu, str(good)), "-q"])
    assert out.returncode == 0 and out.stderr == "", out.stderr  # nothing failed: silence

    log = tmp_path / "log.txt"
    out = run_cli([*upload_args(oci, emu, str(manifest)), "-q", "--log-file", str(log)])
    assert out.returncode == 1, out.stderr
    assert "m.jsonl:4" not in out.stderr  # no line per failure...
    assert f"{failures - 1:,} failed, 1 rejected" in out.stderr  # ... but their count
    assert "batchlog: checkpoint" not in out.stderr, out.stderr
    assert "m.jsonl:42" in log.read_text()  # the log file has every event

    out = run_cli([*upload_args(oci, emu, str(manifest)), "-q", "--concurrency", "0"])
    assert out.returncode == 2 and out.stderr.startswith("batchlog: error: "), out.stderr

    out = run_cli(
        [*upload_args(oci, emu, str(manifest)), "-q", "--log-format", "json", "--restart"]
    )
    assert out.returncode == 1
    assert [e["event"] for e in events(out.stderr)] == ["summary"], out.stderr


def test_json_errors_and_tracebacks_never_show_a_secret(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(50, runs=25))
    secret = "hunter2-password"
    message = f"failed for http://alice:{secret}@h/x"
    args = [*upload_args(oci, emu, str(manifest)), "-v", "--log-format", "json"]
    out = run_with_bug("worker", args, tmp_path, message)
    assert out.returncode == 3, out.stderr
    got = events(out.stderr)
    assert secret not in out.stderr
    assert any("Traceback" in e.get("traceback", "") for e in got), got
    assert got[-1]["event"] in ("summary", "error")

    out = run_cli([*upload_args(oci, emu, str(manifest)), "--log-format", "json", "--timeout", "x"])
    assert out.returncode == 2
    [error] = [e for e in events(out.stderr) if e["event"] == "error"]  # and where help is
    assert "--timeout" in error["message"], error


def test_an_unusable_log_file_is_a_usage_error(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(5))
    for where in (tmp_path, manifest, tmp_path / "no" / "such" / "dir.log"):
        out = run_cli([*upload_args(oci, emu, str(manifest)), "--log-file", str(where)])
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("batchlog: error: --log-file"), out.stderr
        assert out.stderr.count("\n") == 1, out.stderr
    assert sum(emu.state.statuses.values()) == 0
    assert manifest.read_bytes().count(b"\n") == 5


def test_a_json_event_naming_a_file_that_is_not_utf8_is_still_json() -> None:
    import io

    from batchlog.console import Console

    stream = io.StringIO()
    console = Console(stream, json=True)
    name = os.fsdecode(b"caf\xe9.jsonl")  # as Python gives a Latin-1 file name
    print(f"batchlog: error: {name}: cannot be read", file=console.out)
    console.warning(f"{name} has no newline")
    console.close()
    got = events(stream.getvalue())
    assert [e["event"] for e in got] == ["error", "warning"]
    assert got[0]["message"] == "caf\\xe9.jsonl: cannot be read"
