"""Paths where a record was lost or applied twice, found by trying batchlog as users do.

Each test failed before its fix (issue 8); they run the CLI as a separate process against
the emulator, which verifies every signature.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchlog.emulator import EmulatorThread
from tests.conftest import (
    PLATFORM,
    WORKSPACE,
    Oci,
    free_loopback_port,
    inputs_record,
    mixed_records,
    run_cli,
    upload_args,
    write_manifest,
)
from tests.test_crash import kill, start_cli, wait_applied
from tests.test_upload import assert_exactly_once

StartEmulator = Callable[..., EmulatorThread]


def jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(orjson.dumps(r).decode() + "\n" for r in records)


def dead_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def wait_for(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# ---- 1. stdin ------------------------------------------------------------------------------


def test_stdin_resume_refuses_another_stream_and_continues_the_same_one(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    today = mixed_records(40, runs=10)
    tomorrow = [inputs_record(f"new{i:03d}", f"tomorrow{i:04d}") for i in range(40)]
    args = upload_args(oci, emu, "-")
    out = run_cli(args, input=jsonl(today), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "stdin.batchlog-checkpoint").exists()
    applied = emu.state.applied

    out = run_cli(args, input=jsonl(tomorrow), cwd=tmp_path)  # another stream, same default
    assert out.returncode == 3, out.stderr
    assert "not what they were" in out.stderr and "--restart" in out.stderr
    assert emu.state.applied == applied  # nothing sent, nothing skipped as "done"

    out = run_cli(args, input=jsonl(today)[:-30], cwd=tmp_path)  # a cut-short stream
    assert out.returncode == 3 and "shorter" in out.stderr, out.stderr

    more = [inputs_record("more", f"more{i:04d}") for i in range(5)]
    out = run_cli(args, input=jsonl(today + more), cwd=tmp_path)  # the same stream, grown
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, today + more)


def test_stdin_killed_job_resumes_exactly_once(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=0.02)
    records = mixed_records(1500, runs=1500)
    data = jsonl(records)
    args = [*upload_args(oci, emu, "-", "--checkpoint", str(tmp_path / "c")), "--concurrency", "16"]
    piped = tmp_path / "piped.jsonl"
    piped.write_text(data)
    with open(piped, "rb") as stdin:
        proc = start_cli(args, stdin=stdin, cwd=tmp_path)
        wait_applied(emu, proc, 300)
        kill(proc)
    out = run_cli(args, input=data, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


# ---- 2. a rehearsal and the real upload ------------------------------------------------------


def test_a_rehearsal_never_marks_the_real_upload_done(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu = emulator()
    records = mixed_records(60, runs=20)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    monkeypatch.setenv("BATCHLOG_PLATFORM_ID", PLATFORM)
    monkeypatch.setenv("BATCHLOG_WORKSPACE", WORKSPACE)
    out = run_cli(["upload", str(manifest), "--emulate"])
    assert out.returncode == 0, out.stderr
    real = [
        "upload",
        str(manifest),
        "--config-file",
        str(oci.config),
        "--endpoint",
        emu.url,
    ]
    out = run_cli(real)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)
    out = run_cli(["upload", str(manifest), "--emulate"])  # rehearsals resume each other
    assert out.returncode == 0 and "60 already done" in out.stderr, out.stderr


# ---- 3. redirects ----------------------------------------------------------------------------


def test_a_redirect_is_never_success(tmp_path: Path, oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator()
    login = f"{emu.url}/_emulator/stats"  # a page that answers a GET with 200, like a login
    emu.emulator.config.redirect_to = login  # type: ignore[attr-defined]
    records = mixed_records(30, runs=30)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest))
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    assert login in out.stderr
    assert emu.state.applied == 0 and dead_lines(tmp_path / "m.dead-letter.jsonl") == []
    emu.emulator.config.redirect_to = None  # type: ignore[attr-defined]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


# ---- 6. credentials that stop working --------------------------------------------------------


def test_credentials_expiring_mid_job_stop_it_with_nothing_failed(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=0.01)
    records = mixed_records(1200, runs=1200)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [*upload_args(oci, emu, str(manifest)), "--concurrency", "8"]
    proc = start_cli(args)
    wait_applied(emu, proc, 200)
    emu.emulator.config.unauthorized = True  # type: ignore[attr-defined]
    code, err = wait_for(proc)
    assert code == 3, err
    assert "401" in err and "Nothing was recorded as failed" in err
    assert dead_lines(tmp_path / "m.dead-letter.jsonl") == []
    emu.emulator.config.unauthorized = False  # type: ignore[attr-defined]
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


def test_a_session_token_refreshed_in_another_terminal_is_picked_up(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    token = tmp_path / "token"
    token.write_text("first-session-token")
    key_file = tmp_path / "oci_api_key.pem"
    config = tmp_path / "session_config"
    config.write_text(
        "[DEFAULT]\nregion=us-ashburn-1\ntenancy=ocid1.tenancy.oc1..test\n"
        f"fingerprint=12:34\nkey_file={key_file}\nsecurity_token_file={token}\n"
    )
    emu = emulator(latency=0.01, key_id="ST$first-session-token")
    records = mixed_records(1200, runs=1200)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [
        "upload",
        str(manifest),
        "--auth",
        "security_token",
        "--config-file",
        str(config),
        "--endpoint",
        emu.url,
        "--platform-id",
        PLATFORM,
        "--workspace",
        WORKSPACE,
        "--concurrency",
        "8",
    ]
    proc = start_cli(args)
    wait_applied(emu, proc, 200)
    token.write_text("second-session-token")  # what `oci session refresh` does
    emu.emulator.config.key_id = "ST$second-session-token"
    code, err = wait_for(proc)
    assert code == 0, err
    assert_exactly_once(emu, records)
    assert "session-token" not in err  # never printed


# ---- 7. nothing listening --------------------------------------------------------------------


def test_nothing_listening_stops_fast_with_nothing_failed(tmp_path: Path, oci: Oci) -> None:
    port = free_loopback_port()  # bound and closed again: nothing listens there
    records = mixed_records(300, runs=300)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [
        "upload",
        str(manifest),
        "--config-file",
        str(oci.config),
        "--endpoint",
        f"http://127.0.0.1:{port}",
        "--platform-id",
        PLATFORM,
        "--workspace",
        WORKSPACE,
    ]
    t0 = time.monotonic()
    out = run_cli(args, timeout=60)
    assert time.monotonic() - t0 < 20
    assert out.returncode == 3, out.stderr
    assert "may have been applied" not in out.stderr
    assert dead_lines(tmp_path / "m.dead-letter.jsonl") == []


# ---- 8. rerunning never turns a failure into success -----------------------------------------


def test_reruns_keep_exit_1_while_records_did_not_succeed(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records: list[Any] = [*mixed_records(10, runs=3), b'{"run_id": "bad run id!"}']
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest))
    for _ in range(2):
        out = run_cli(args)
        assert out.returncode == 1, out.stderr
        assert "m.dead-letter.jsonl" in out.stderr
    status = run_cli(["status", str(tmp_path / "m.batchlog-checkpoint")])
    assert "1 with failures" in status.stdout, status.stdout
    assert len(dead_lines(tmp_path / "m.dead-letter.jsonl")) == 1


# ---- 9. appends and edits --------------------------------------------------------------------


def test_lines_appended_to_any_manifest_are_sent(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    first = [inputs_record(f"a{i:03d}", f"first{i:04d}") for i in range(20)]
    second = [inputs_record(f"b{i:03d}", f"second{i:04d}") for i in range(20)]
    m1 = write_manifest(tmp_path / "m1.jsonl", first)
    m2 = write_manifest(tmp_path / "m2.jsonl", second)
    args = upload_args(oci, emu, str(m1), str(m2))
    assert run_cli(args).returncode == 0
    appended = [inputs_record(f"c{i:03d}", f"appended{i:04d}") for i in range(7)]
    with open(m1, "ab") as f:
        f.write(jsonl(appended).encode())
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, first + second + appended)
    status = run_cli(["status", str(tmp_path / "m1.batchlog-checkpoint")])
    assert "0 not finished" in status.stdout, status.stdout


def test_an_edited_processed_line_is_refused(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = [inputs_record(f"r{i:03d}", f"data{i:04d}") for i in range(30)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest))
    assert run_cli(args).returncode == 0
    applied = emu.state.applied
    data = manifest.read_bytes()
    manifest.write_bytes(data.replace(b"data0007", b"data7007"))  # same length, in place
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    assert "not what they were" in out.stderr
    assert emu.state.applied == applied


# ---- 12. OCI calls in doubt for more than 24 h are read back ---------------------------------


def age_doubts(checkpoint: Path, seconds: float) -> int:
    """Move every in-doubt mark of a checkpoint ``seconds`` into the past."""
    from batchlog.journal import seal, unseal

    aged = 0
    lines = checkpoint.read_bytes().splitlines(keepends=True)
    for i, line in enumerate(lines):
        doc = unseal(line)
        if isinstance(doc, dict) and "d" in doc:
            doc["t"] -= seconds
            doc["u"] -= seconds
            aged += 1
        elif isinstance(doc, dict) and "snap" in doc:
            doc["snap"]["doubt"] = [
                [k, t - seconds, u - seconds] for k, t, u in doc["snap"]["doubt"]
            ]
        else:
            continue
        lines[i] = seal(doc)
    checkpoint.write_bytes(b"".join(lines))
    return aged


def test_calls_in_doubt_for_over_24_hours_are_read_back(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=0.3)
    records = mixed_records(400, runs=400)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [*upload_args(oci, emu, str(manifest)), "--concurrency", "16"]
    proc = start_cli(args)
    wait_applied(emu, proc, 40)
    time.sleep(0.5)  # a flush with calls in flight
    kill(proc)
    time.sleep(0.4)  # the server finishes what it was handling
    assert age_doubts(tmp_path / "m.batchlog-checkpoint", 25 * 3600) > 0
    # a day later the server has forgotten the retry tokens, not what it applied
    emu.state.replies.clear()
    emu.emulator.config.latency = 0.0
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert "read back" in out.stderr
    assert_exactly_once(emu, records)


# ---- 13. one dead-letter line per record -----------------------------------------------------


def test_a_corrected_rerun_after_a_systemic_stop_keeps_one_line_per_record(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records: list[Any] = [b'{"run_id": "x", "op": "log-inputs", "dataset_inputs": 3}']
    records += mixed_records(20, runs=20)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    wrong = upload_args(oci, emu, str(manifest))
    wrong[wrong.index(WORKSPACE)] = "wrong-workspace"
    out = run_cli(wrong)
    assert out.returncode == 3, out.stderr
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    dead = dead_lines(tmp_path / "m.dead-letter.jsonl")
    assert [d["_error"]["source"] for d in dead] == [f"{manifest}:1"]
    assert_exactly_once(emu, records[1:])


# ---- found by a hostile review: calls in doubt, the dead letter at a crash, other answers ---


def start_and_kill_in_flight(
    emu: EmulatorThread, args: list[str], wait_requests: int = 1, **kwargs: Any
) -> None:
    """Start the CLI, and kill -9 it while its first requests are held by a slow server."""
    proc = start_cli(args, **kwargs)
    deadline = time.monotonic() + 30
    while len(emu.state.retry_tokens) < wait_requests:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.4)  # a group commit journals them as sent
    kill(proc)


def test_a_merged_call_in_doubt_is_sent_again_as_it_was_after_an_append(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=1.5)
    first = [inputs_record("runX", f"ds{i}") for i in range(2)]
    manifest = write_manifest(tmp_path / "m.jsonl", first)
    args = upload_args(oci, emu, str(manifest))
    start_and_kill_in_flight(emu, args)
    time.sleep(1.6)  # the server applies the call it was holding
    appended = [inputs_record("runX", "ds2")]
    with open(manifest, "ab") as f:
        f.write(jsonl(appended).encode())
    emu.emulator.config.latency = 0.0
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, first + appended)


def test_other_merge_settings_are_refused_while_calls_are_in_doubt(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=1.5)
    records = [inputs_record("runY", f"ds{i}") for i in range(8)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest))
    start_and_kill_in_flight(emu, args)
    out = run_cli([*args, "--max-datasets-per-request", "1"])
    assert out.returncode == 3 and "grouping" in out.stderr, out.stderr
    emu.emulator.config.latency = 0.0
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


def test_an_edited_line_of_a_call_in_doubt_is_refused(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=1.5)
    records = [inputs_record(f"run{i}", f"data{i:04d}") for i in range(5)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest))
    start_and_kill_in_flight(emu, args, wait_requests=5)
    time.sleep(1.6)
    applied = emu.state.applied
    manifest.write_bytes(manifest.read_bytes().replace(b"data0000", b"dataFIXD"))
    emu.emulator.config.latency = 0.0
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    assert "changed since an earlier run sent it" in out.stderr
    assert "run the same command again to resume" not in out.stderr
    assert emu.state.applied == applied


def test_a_crash_while_the_dead_letter_is_written_never_doubles_its_lines(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    bad = [
        f'{{"run_id": "r{i}", "op": "log-inputs", "datasets": {i}}}'.encode() for i in range(4000)
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", list(bad))
    args = upload_args(oci, emu, str(manifest))
    dead = tmp_path / "m.dead-letter.jsonl"
    for delay in (0.5, 0.7, 0.9):
        proc = start_cli(args)
        deadline = time.monotonic() + 30
        while not (dead.exists() and dead.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay * 0.1)
        kill(proc)
    out = run_cli(args)
    assert out.returncode == 1, out.stderr
    sources = [d["_error"]["source"] for d in dead_lines(dead)]
    assert len(sources) == len(set(sources)) == 4000


def test_forbidden_everywhere_is_systemic(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(key_id="another/key/id")  # every signature refused
    emu.emulator.config.unauthorized = False  # type: ignore[attr-defined]
    records = mixed_records(20, runs=20)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 3, out.stderr
    assert dead_lines(tmp_path / "m.dead-letter.jsonl") == []


def test_a_half_written_last_line_waits_for_its_writer(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = [inputs_record(f"w{i}", f"written{i:03d}") for i in range(5)]
    text = jsonl(records).encode()
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(text[:-40])  # a writer is in the middle of the last line
    args = upload_args(oci, emu, str(manifest))
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert "m.jsonl:5 has no newline" in out.stderr
    assert dead_lines(tmp_path / "m.dead-letter.jsonl") == []
    manifest.write_bytes(text)  # the writer finished the line
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


def test_files_batchlog_writes_never_replace_a_manifest(tmp_path: Path, oci: Oci) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(5, runs=5))
    data = manifest.read_bytes()
    base = ["upload", str(manifest), "--config-file", str(oci.config), "--endpoint"]
    base += ["http://127.0.0.1:1", "--platform-id", PLATFORM, "--workspace", WORKSPACE]
    for extra in (
        ["--dead-letter", str(manifest)],
        ["--report", str(manifest)],
        ["--dead-letter", str(tmp_path)],
        ["--checkpoint", str(tmp_path / "c"), "--dead-letter", str(tmp_path / "c")],
    ):
        out = run_cli([*base, *extra])
        assert out.returncode == 2, (extra, out.stderr)
    twice = [*base[:2], str(tmp_path / "." / "m.jsonl"), *base[2:]]  # the same file twice
    out = run_cli(twice)
    assert out.returncode == 2 and "twice" in out.stderr, out.stderr
    assert manifest.read_bytes() == data


def test_a_corrupt_gzip_manifest_is_named_not_a_traceback(tmp_path: Path, oci: Oci) -> None:
    import gzip

    whole = gzip.compress(jsonl(mixed_records(200, runs=50)).encode())
    manifest = tmp_path / "m.jsonl.gz"
    manifest.write_bytes(whole[: len(whole) // 2])
    out = run_cli(["validate", str(manifest)])
    assert "Traceback" not in out.stderr and "truncated gzip" in out.stderr, out.stderr


def test_an_edit_beyond_the_watermark_is_refused_before_any_request(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator(latency=1.0)
    records = [inputs_record(f"e{i:03d}", f"edit{i:04d}") for i in range(40)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [*upload_args(oci, emu, str(manifest)), "--concurrency", "40"]
    proc = start_cli(args)
    wait_applied(emu, proc, 1)
    time.sleep(0.5)
    kill(proc)  # the first record held back, the rest finished above the watermark
    time.sleep(1.1)
    manifest.write_bytes(manifest.read_bytes().replace(b"edit0039", b"edit9039"))
    requests = len(emu.state.retry_tokens)
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    assert "is not what it was" in out.stderr or "not what they were" in out.stderr
    assert len(emu.state.retry_tokens) == requests  # nothing sent
