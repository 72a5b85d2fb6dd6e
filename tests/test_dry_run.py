"""--dry-run (issue 10, item 2): no credentials, no network, the checkpoint honoured and left
alone, and exactly the requests the next real run sends (the emulator counts them)."""

from __future__ import annotations

import signal
import socket
import sys
import time
from collections.abc import Callable
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
from tests.test_crash import kill, start_cli, wait_applied
from tests.test_integrity import jsonl, start_and_kill_in_flight
from tests.test_journal import THROTTLED, interrupt_while_throttled
from tests.test_upload import assert_exactly_once, report

StartEmulator = Callable[..., EmulatorThread]


@pytest.fixture(autouse=True)
def no_oci_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.oci/config and no BATCHLOG_* ids: a dry run must need none of them."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("BATCHLOG_PLATFORM_ID", "BATCHLOG_WORKSPACE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the home made above excepted) and its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "home" not in p.parts
    }


def dry_run(args: list[str], report_to: Path, **kwargs: Any) -> dict[str, Any]:
    """Run ``upload ARGS --dry-run --report`` and return the report it wrote."""
    out = run_cli([*args, "--dry-run", "--report", str(report_to)], **kwargs)
    assert out.returncode in (0, 1), out.stderr
    assert "Traceback" not in out.stderr
    assert "nothing was sent" in out.stderr, out.stderr
    return report(report_to)


def sends(emu: EmulatorThread, args: list[str], **kwargs: Any) -> int:
    """Run the real upload to completion; how many requests the emulator received."""
    before = len(emu.state.retry_tokens)
    out = run_cli(args, **kwargs)
    assert out.returncode == 0, out.stderr
    return len(emu.state.retry_tokens) - before


def test_a_dry_run_needs_no_credentials_no_ids_and_writes_nothing(tmp_path: Path) -> None:
    records = mixed_records(200, runs=30)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    before = files(tmp_path)
    out = run_cli(["upload", str(manifest), "--dry-run"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "200 records, 0 invalid" in out.stderr, out.stderr
    assert "required" not in out.stderr and "config" not in out.stderr.lower(), out.stderr
    assert files(tmp_path) == before  # no checkpoint, no lock, no dead letter


def test_a_dry_run_imports_nothing_of_oci_and_opens_no_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import batchlog.auth
    from batchlog.cli import main

    def no_connection(*_: object) -> None:
        raise AssertionError("a dry run opened a connection")

    def no_credentials(*_: object) -> None:
        raise AssertionError("a dry run loaded credentials")

    monkeypatch.setitem(sys.modules, "oci", None)  # importing it raises ImportError
    monkeypatch.setattr(socket.socket, "connect", no_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", no_connection)
    monkeypatch.setattr(batchlog.auth, "load_credentials", no_credentials)
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(20, runs=5))
    for auth in ("api_key", "instance_principal", "resource_principal", "security_token"):
        rc = main(["upload", str(manifest), "--dry-run", "--auth", auth])
        err = capsys.readouterr().err
        assert rc == 0, (auth, err)
        assert "20 records" in err, err


def test_a_dry_run_plans_what_a_fresh_run_sends_merging_included(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records: list[Any] = mixed_records(400, runs=40)
    records.insert(7, {"run_id": "run00001", "dataset_input": []})  # invalid: never sent
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    for limit in ("1", "3", "100"):
        flags = ["--max-datasets-per-request", limit, "--checkpoint", str(tmp_path / limit)]
        plan = dry_run(["upload", str(manifest), *flags], tmp_path / f"dry{limit}.json")
        assert (plan["records"], plan["invalid"], plan["to_send"]) == (401, 1, 400)
        assert plan["already_done"] == 0
        before = len(emu.state.retry_tokens)
        out = run_cli(upload_args(oci, emu, str(manifest), *flags))
        assert out.returncode == 1, out.stderr  # the invalid line
        assert plan["requests"] == len(emu.state.retry_tokens) - before
    one, three = (int(str(report(tmp_path / f"dry{n}.json")["requests"])) for n in (1, 3))
    assert one > three  # merging made a difference


def test_after_a_finished_upload_a_dry_run_plans_nothing_and_leaves_the_checkpoint_alone(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = mixed_records(300, runs=50)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    checkpoint = tmp_path / "m.batchlog-checkpoint"
    with open(checkpoint, "ab") as f:  # a torn tail: a real run would cut it off
        f.write(b'{"f": [1')
    before = files(tmp_path)
    for args in (
        upload_args(oci, emu, str(manifest)),  # as the real command
        ["upload", str(manifest)],  # no credentials, no ids, no endpoint
    ):
        plan = dry_run(args, tmp_path.parent / f"{tmp_path.name}-dry.json")
        assert (plan["requests"], plan["to_send"], plan["already_done"]) == (0, 0, 300)
        assert files(tmp_path) == before  # byte for byte, torn tail included
    out = run_cli(["upload", str(manifest), "--dry-run"])
    assert "0 requests" in out.stderr and "300 already done" in out.stderr, out.stderr
    assert str(checkpoint) in out.stderr


def test_after_a_kill_and_an_append_the_dry_run_counts_what_the_next_run_sends(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=0.05)
    records = mixed_records(1200, runs=150)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    merge = ["--max-datasets-per-request", "3"]
    args = [*upload_args(oci, emu, str(manifest)), *merge, "--concurrency", "8"]
    proc = start_cli(args)
    wait_applied(emu, proc, 100)
    kill(proc)  # calls in flight are journaled as sent, never answered
    # more datasets for the last run: the call that ended the manifest is formed again
    more = [inputs_record(records[-1]["run_id"], f"late{i}") for i in range(4)]
    with open(manifest, "ab") as f:
        f.write(jsonl(more).encode())
    checkpoint = tmp_path / "m.batchlog-checkpoint"
    journal = checkpoint.read_bytes()

    with_creds = dry_run(args, tmp_path / "dry1.json")
    bare = dry_run(["upload", str(manifest), *merge], tmp_path / "dry2.json")
    assert checkpoint.read_bytes() == journal
    assert bare["requests"] == with_creds["requests"] > 0
    assert with_creds["requests_in_doubt"] > 0  # the calls the kill left unanswered
    assert with_creds["already_done"] + with_creds["to_send"] == 1204
    assert with_creds["already_done"] > 0
    emu.emulator.config.latency = 0.0
    assert sends(emu, args) == with_creds["requests"]
    assert_exactly_once(emu, records + more)
    assert dry_run(args, tmp_path / "dry3.json")["requests"] == 0


def test_a_call_left_in_doubt_is_counted_as_it_was_formed_whatever_was_appended(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=1.5)
    first = [inputs_record("runX", f"ds{i}") for i in range(2)]
    manifest = write_manifest(tmp_path / "m.jsonl", first)
    args = upload_args(oci, emu, str(manifest))
    start_and_kill_in_flight(emu, args)  # the one call of both records, never answered
    appended = [inputs_record("runX", "ds2")]  # merged with them, were it not in doubt
    with open(manifest, "ab") as f:
        f.write(jsonl(appended).encode())
    plan = dry_run(["upload", str(manifest)], tmp_path / "dry.json")
    assert (plan["requests"], plan["requests_in_doubt"], plan["to_send"]) == (2, 1, 3)
    emu.emulator.config.latency = 0.0
    assert sends(emu, args) == 2
    assert_exactly_once(emu, first + appended)


def test_a_stdin_job_is_planned_from_its_checkpoint_too(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    first = mixed_records(100, runs=20)
    args = upload_args(oci, emu, "-")
    assert run_cli(args, input=jsonl(first), cwd=tmp_path).returncode == 0
    more = [inputs_record(f"more{i // 4}", f"more{i}") for i in range(12)]
    plan = dry_run(["upload", "-"], tmp_path / "dry.json", input=jsonl(first + more), cwd=tmp_path)
    assert (plan["already_done"], plan["to_send"]) == (100, 12)
    assert sends(emu, args, input=jsonl(first + more), cwd=tmp_path) == plan["requests"] == 3


def test_a_dry_run_says_when_the_checkpoint_belongs_to_another_job(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(50, runs=10))
    other = write_manifest(tmp_path / "other.jsonl", mixed_records(5, runs=5))
    args = upload_args(oci, emu, str(manifest))
    assert run_cli(args).returncode == 0
    checkpoint = (tmp_path / "m.batchlog-checkpoint").read_bytes()
    cases = {
        "written for manifests": ["upload", str(manifest), str(other)],
        "another target": ["upload", str(manifest), "--platform-id", "ocid1.other"],
        "grouping": ["upload", str(manifest), "--max-datasets-per-request", "1"],
    }
    for words, command in cases.items():
        out = run_cli([*command, "--dry-run"])
        assert out.returncode == 3, (words, out.stderr)
        assert words in out.stderr and "m.batchlog-checkpoint" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    real = run_cli([*args, "--platform-id", "ocid1.other"])  # the run says the same
    assert real.returncode == 3 and "another target" in real.stderr, real.stderr
    assert (tmp_path / "m.batchlog-checkpoint").read_bytes() == checkpoint

    out = run_cli(["upload", str(manifest), "--dry-run", "--restart"])
    assert out.returncode == 0 and "50 to send" in out.stderr, out.stderr


def test_a_dry_run_refuses_a_changed_manifest_as_the_run_does(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = mixed_records(50, runs=10)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    data = manifest.read_bytes()
    manifest.write_bytes(data.replace(b"ds00000003", b"dsEDITED03"))  # the same length
    out = run_cli(["upload", str(manifest), "--dry-run"])
    assert out.returncode == 3, out.stderr
    assert "not what they were" in out.stderr and "--restart" in out.stderr, out.stderr
    real = run_cli(upload_args(oci, emu, str(manifest)))
    assert real.returncode == 3 and "not what they were" in real.stderr, real.stderr


def test_a_dry_run_report_names_its_figures(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r", "d"), {"run_id": 1}])
    out = run_cli(["upload", str(manifest), "--dry-run", "--report", str(tmp_path / "r.json")])
    assert out.returncode == 1, out.stderr  # a real run would exit 1: one invalid line
    doc = orjson.loads((tmp_path / "r.json").read_bytes())
    assert doc["dry_run"] is True and doc["exit_code"] == 1 and doc["version"] == 1
    assert {k: doc[k] for k in ("records", "invalid", "to_send", "already_done", "requests")} == {
        "records": 2,
        "invalid": 1,
        "to_send": 1,
        "already_done": 0,
        "requests": 1,
    }
    assert doc["checkpoint"] == str(tmp_path / "m.batchlog-checkpoint")


def test_a_dry_run_of_an_empty_manifest_is_nothing_to_upload(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_bytes(b"\n\n")
    out = run_cli(["upload", "m.jsonl", "--dry-run"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "nothing to upload: m.jsonl holds no records" in out.stderr, out.stderr  # as upload says


def test_calls_answered_429_are_not_counted_as_sent_and_never_answered(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Interrupted while two calls wait on a Retry-After: one was answered 429 (not applied:
    not in doubt), the other 500 (it may have been applied: in doubt)."""
    error = http_response(500, [("Retry-After", "300")], b'{"code": "InternalServerError"}')
    emu = emulator(canned={"held": [THROTTLED], "doubt": [error]})
    records = [
        inputs_record("held", "ds0"),
        inputs_record("doubt", "ds1"),
        *(inputs_record(f"r{i}", f"ds{i}") for i in range(2, 8)),
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest))
    interrupt_while_throttled(emu, args, {500: 1, 429: 1})
    plan = dry_run(["upload", str(manifest)], tmp_path / "dry.json")
    assert plan["requests_in_doubt"] == 1 and plan["requests"] >= 2, plan
    out = run_cli(["upload", str(manifest), "--dry-run"])
    assert "(1 sent before and never answered)" in out.stderr, out.stderr
    assert sends(emu, args) == plan["requests"]  # the others waited on the shared pacer
    assert_exactly_once(emu, records)


def test_a_checkpoint_of_another_job_is_named_in_plain_words(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """The run and the dry run name the manifests and the merge setting as a user types
    them, not as Python lists and dicts (newcomer review, item 12)."""
    emu = emulator()
    a = write_manifest(tmp_path / "a.jsonl", mixed_records(10, runs=2))
    b = write_manifest(tmp_path / "b.jsonl", mixed_records(10, runs=2))
    checkpoint = str(tmp_path / "job.batchlog-checkpoint")
    assert run_cli(upload_args(oci, emu, str(a), "--checkpoint", checkpoint)).returncode == 0
    cases = {
        f"was written for manifests {a} (this job names {a}, {b});": [str(a), str(b)],
        "was written with another grouping (--max-datasets-per-request 100, not 3): ": [
            str(a),
            "--max-datasets-per-request",
            "3",
        ],
    }
    for said, extra in cases.items():
        for command in (
            upload_args(oci, emu, *extra, "--checkpoint", checkpoint),
            ["upload", *extra, "--checkpoint", checkpoint, "--dry-run"],
        ):
            out = run_cli(command)
            assert out.returncode == 3, out.stderr
            assert f"checkpoint {checkpoint} {said}" in out.stderr, out.stderr
            assert not any(c in out.stderr for c in "[]{}'"), out.stderr


def test_calls_stopped_before_they_went_out_are_not_counted_as_sent(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by newcomer review: a double SIGINT while 4 calls were held by the server and
    the rest waited for a free slot left all of them journaled as "sent and never
    answered" (the journal line was written before the slot was taken): the dry run said 64
    in doubt for 32 sent, and an MLflow resume would wait --timeout to read back calls that
    never left."""
    emu = emulator(latency=30.0)
    records = [inputs_record(f"r{i}", f"ds{i}") for i in range(40)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest), "--concurrency", "4")
    proc = start_cli(args)
    deadline = time.monotonic() + 30
    while len(emu.state.retry_tokens) < 4:  # four held by the server, the rest waiting
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.5)
    received = len(emu.state.retry_tokens)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # stopping now: the held calls stay in doubt
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    plan = dry_run(["upload", str(manifest)], tmp_path / "dry.json")
    assert plan["requests_in_doubt"] <= received, (plan, received)
    emu.emulator.config.latency = 0
    assert run_cli(args).returncode == 0
    assert_exactly_once(emu, records)
