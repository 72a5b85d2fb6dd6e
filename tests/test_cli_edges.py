"""Edges of the command line found by a newcomer review: a signal before the job watches for
signals (or after it), a second signal while the built-in emulator holds answers, what
--log-format json writes around --emulate, `validate` and `--dry-run`, and errors found once
--emulate set things up. Everything as a user runs it: the CLI as a subprocess, against the
emulator on loopback."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlog.emulator import EmulatorThread
from batchlog.journal import read_checkpoint
from tests.conftest import (
    Oci,
    inputs_record,
    mixed_records,
    run_cli,
    upload_args,
    write_manifest,
)
from tests.test_console import events
from tests.test_crash import start_cli
from tests.test_upload import assert_exactly_once, report

StartEmulator = Callable[..., EmulatorThread]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def one_per_run(n: int) -> list[dict[str, object]]:
    """n records, each its own call (no merging)."""
    return [inputs_record(f"run{i:05d}", f"ds{i:08d}") for i in range(n)]


def read_until(proc: subprocess.Popen[str], text: str, within: float = 30) -> str:
    """What the process wrote on stderr up to and including the line holding ``text``."""
    assert proc.stderr is not None
    fd, seen = proc.stderr.fileno(), b""
    deadline = time.monotonic() + within
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, seen.decode()
        if select.select([fd], [], [], min(left, 0.5))[0]:
            seen += os.read(fd, 65536)
    return seen.decode()


# ---- item 4: a signal in the first tenths of a second ----------------------------------------


def in_python_s_own_start(err: str) -> bool:
    """A KeyboardInterrupt raised while the interpreter itself starts (site, runpy finding
    the package: the first 20-30 ms here, longer on a loaded machine), before any line of
    batchlog ran: Python's doing, which batchlog cannot answer."""
    files = re.findall(r'File "([^"]+)"', err)
    # runpy importing the package and its __main__ up to `from batchlog import interrupts`
    # (seen under load): no handler can be in place before that import has run
    before_hold = ("/batchlog/__init__.py", "/batchlog/__main__.py")
    ours = [f for f in files if "/batchlog/" in f]
    return (
        err.endswith("KeyboardInterrupt\n")
        and all(f.endswith(before_hold) for f in ours)
        and ("hold()" not in err and "main()" not in err)
    )


def test_a_signal_before_the_job_watches_is_exit_130_in_one_line_and_a_rerun_finishes(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """While Python imports batchlog and the command sets up, SIGINT or SIGTERM ends the
    command with exit 130 and one line (a JSON event with --log-format json), never a
    traceback; nothing is recorded, and the same command then sends every record once.
    Before batchlog's first line runs, Python's own behaviour applies (killed by the signal,
    or a KeyboardInterrupt in the interpreter's start)."""
    emu = emulator(latency=0.2)
    records = one_per_run(24)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    checkpoint = tmp_path / "m.batchlog-checkpoint"
    args = upload_args(oci, emu, str(manifest), "--concurrency", "4")
    cases = [(delay, signal.SIGINT, n % 2 == 1) for n, delay in enumerate((0, 0.05, 0.1, 0.2, 0.3))]
    cases += [(0.1, signal.SIGTERM, False), (0.2, signal.SIGTERM, True)]
    for delay, signum, json in cases:
        sent = len(emu.state.retry_tokens)
        proc = start_cli([*args, *(["--log-format", "json"] if json else [])])
        time.sleep(delay)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        case = (delay, signum.name, json, err)
        if in_python_s_own_start(err):
            continue
        assert proc.returncode in (130, -signum), case
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, case
        if proc.returncode == -signum:  # before Python set its own handler: nothing ran
            assert err == "", case
        elif json:
            got = events(err)  # every line an event
            assert [e["signal"] for e in got if e["event"] == "signal"][:1] == [signum.name]
        else:
            said = [line for line in err.splitlines() if "interrupted" in line]
            assert len(said) == 1, case
        if "before any request was sent" in err:
            assert len(emu.state.retry_tokens) == sent, case  # and true
        if checkpoint.exists():
            read_checkpoint(str(checkpoint))  # a valid checkpoint, whatever it holds
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


# ---- item 5: the summary is the last event ---------------------------------------------------


def test_with_emulate_every_line_is_an_event_and_the_summary_comes_last(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(10))
    out = run_cli(["upload", str(manifest), "--emulate", "--log-format", "json"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    got = events(out.stderr)
    assert [e["event"] for e in got].count("summary") == 1
    assert got[-1]["event"] == "summary", got[-1]
    assert any(e.get("message", "").startswith("emulator applied") for e in got), got

    out = run_cli(["upload", str(manifest), "--emulate", "--restart"], cwd=tmp_path)
    lines = out.stderr.splitlines()
    said = [n for n, line in enumerate(lines) if "emulator applied" in line]
    first = next(n for n, line in enumerate(lines) if line.startswith("batchlog: completed:"))
    assert said and said[0] < first, out.stderr  # the summary ends the text too


# ---- item 6: a second signal while the emulator holds answers --------------------------------


@pytest.mark.parametrize(
    "signals",
    [
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT, signal.SIGTERM),
    ],
    ids=lambda s: "-".join(x.name for x in s),
)
def test_a_second_signal_ends_an_emulated_upload_at_once_whatever_its_latency(
    tmp_path: Path, signals: tuple[signal.Signals, ...]
) -> None:
    """The built-in emulator answers 5 s late: the second signal must not wait for those
    answers, and a signal after it must not change the exit code (130, interrupted)."""
    records = one_per_run(40)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = ["upload", str(manifest), "--emulate", "--concurrency", "8", "--grace", "60"]
    proc = start_cli([*args, "--emulate-latency-ms", "5000"], cwd=tmp_path)
    try:
        read_until(proc, "dead letter")  # the job starts sending now
        time.sleep(0.3)
        proc.send_signal(signals[0])
        time.sleep(0.2)
        t0 = time.monotonic()
        for signum in signals[1:]:
            proc.send_signal(signum)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert took < 2.5, (took, err)  # not the 5 s the emulator holds its answers
    assert "Traceback" not in err
    read_checkpoint(str(tmp_path / "m.emulated.batchlog-checkpoint"))
    out = run_cli([*args, "--report", str(tmp_path / "r.json")], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    r = report(tmp_path / "r.json")
    assert r["succeeded"] + r["already_done"] == len(records), r  # type: ignore[operator]


# ---- item 12: errors found once --emulate set things up; invalid lines as events -------------


def test_errors_of_an_emulated_upload_come_before_the_emulator_starts(tmp_path: Path) -> None:
    manifest = str(write_manifest(tmp_path / "m.jsonl", mixed_records(4)))
    other = str(tmp_path / "other")
    cases = {
        "missing manifest": [str(tmp_path / "missing.jsonl")],
        "a manifest twice": [manifest, manifest],
        "report is a manifest": [manifest, "--report", manifest],
        "dead letter is a manifest": [manifest, "--dead-letter", manifest],
        "checkpoint is the dead letter": [manifest, "--checkpoint", other, "--dead-letter", other],
    }
    for name, argv in cases.items():
        for json in (False, True):
            fmt = ["--log-format", "json"] if json else []
            out = run_cli(["upload", *argv, "--emulate", *fmt], cwd=tmp_path, timeout=60)
            assert out.returncode == 2, (name, out.stderr)
            assert "listening" not in out.stderr, (name, out.stderr)
            if json:
                assert [e["event"] for e in events(out.stderr)] == ["error"], (name, out.stderr)
            else:
                assert out.stderr.startswith("batchlog: error: "), (name, out.stderr)
                assert out.stderr.count("\n") == 1, (name, out.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]


@pytest.mark.parametrize(
    "command",
    [["validate"], ["upload", "--dry-run", "--emulate"], ["upload", "--dry-run"]],
    ids=lambda c: " ".join(c),
)
def test_invalid_lines_are_failure_events_under_json(tmp_path: Path, command: list[str]) -> None:
    manifest = tmp_path / "with-errors.jsonl"
    shutil.copy(EXAMPLES / "with-errors.jsonl", manifest)
    text = run_cli([*command, str(manifest)], cwd=tmp_path, timeout=60)
    assert text.returncode == 1, text.stderr
    shown = text.stdout.splitlines()  # as text: FILE:LINE: field: reason, on stdout
    assert len(shown) == 3 and all(line.startswith(f"{manifest}:") for line in shown), shown
    for quiet in ([], ["-q"]):
        out = run_cli([*command, str(manifest), "--log-format", "json", *quiet], cwd=tmp_path)
        assert out.returncode == 1, out.stderr
        assert out.stdout == "", out.stdout
        failures = [e for e in events(out.stderr) if e["event"] == "failure"]
        assert [f"{e['source']}: {e['field']}: {e['message']}" for e in failures] == shown
        for e in failures:
            assert (e["status"], e["code"]) == ("rejected", "InvalidRecord"), e


# ---- second newcomer review: errors, reports and summaries a scheduler reads ------------------


def without_target_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BATCHLOG_PLATFORM_ID", "BATCHLOG_WORKSPACE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_usage_error_reaches_the_log_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Item A: a variable missing from cron's environment is a usage error; it must be in
    the --log-file the scheduler reads, as a JSON error event under --log-format json."""
    without_target_ids(monkeypatch)
    manifest = write_manifest(tmp_path / "runs.jsonl", mixed_records(4))
    log = tmp_path / "lf.log"
    cases = {
        "missing ids": ["upload", str(manifest)],
        "unknown flag": ["upload", str(manifest), "--emulate", "--bogus"],
        "no command": [],
    }
    for name, argv in cases.items():
        log.unlink(missing_ok=True)
        out = run_cli([*argv, "--log-format", fmt, "--log-file", str(log), "-q"], cwd=tmp_path)
        assert out.returncode == 2, (name, out.stderr)
        assert log.exists(), (name, out.stderr)
        logged = log.read_text()
        if fmt == "json":
            got = events(logged)
            assert got[0]["event"] == "error", (name, logged)
            assert events(out.stderr)[0]["event"] == "error", (name, out.stderr)
        else:
            assert logged.startswith("batchlog: error: "), (name, logged)
        assert logged.splitlines()[0] in out.stderr or fmt == "json", (name, logged)
    assert manifest.read_bytes().count(b"\n") == 4  # the manifest never got a line


def test_a_log_file_that_is_a_manifest_stays_untouched_on_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    without_target_ids(monkeypatch)
    manifest = write_manifest(tmp_path / "runs.jsonl", mixed_records(4))
    before = manifest.read_bytes()
    out = run_cli(["upload", str(manifest), "--log-file", str(manifest)], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert manifest.read_bytes() == before
    assert out.stderr.startswith("batchlog: error: "), out.stderr


def stale_report(path: Path) -> None:
    path.write_text('{"version": 1, "status": "completed", "exit_code": 0}\n')


def assert_stopped_report(path: Path, stderr: str, reason: str) -> None:
    r = report(path)
    assert r["exit_code"] == 3 and r["status"] in ("stopped", "failed"), r
    assert reason in str(r["message"]), r
    assert (r["succeeded"], r["failed"], r["requests"]) == (0, 0, 0), r
    got = events(stderr)
    assert got[-1]["event"] == "summary" and got[-1]["exit_code"] == 3, got[-1]
    assert got[-1]["message"] == r["message"]


def test_a_checkpoint_in_use_replaces_a_stale_report(tmp_path: Path) -> None:
    """Item B: an overlapping cron run exits 3; last night's report must not say 0."""
    import fcntl

    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(4))
    checkpoint = tmp_path / "m.emulated.batchlog-checkpoint"
    stale_report(tmp_path / "r.json")
    with open(str(checkpoint) + ".lock", "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        argv = ["upload", str(manifest), "--emulate", "--report", "r.json", "--log-format", "json"]
        out = run_cli(argv, cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert_stopped_report(tmp_path / "r.json", out.stderr, "in use")


def test_a_changed_manifest_replaces_a_stale_report(tmp_path: Path) -> None:
    records = mixed_records(6)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    argv = ["upload", str(manifest), "--emulate", "--report", "r.json", "--log-format", "json"]
    assert run_cli(argv, cwd=tmp_path).returncode == 0
    assert report(tmp_path / "r.json")["exit_code"] == 0
    records[0] = inputs_record("changed", "ds")
    write_manifest(manifest, records)
    out = run_cli(argv, cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert_stopped_report(tmp_path / "r.json", out.stderr, "nothing was sent")
    quiet = run_cli([*argv, "-q"], cwd=tmp_path)  # -q: a run that did not succeed says so
    assert quiet.returncode == 3 and events(quiet.stderr)[-1]["event"] == "summary"


def test_a_dry_run_ends_with_a_summary_event_holding_the_plan(tmp_path: Path) -> None:
    """Item C."""
    manifest = tmp_path / "with-errors.jsonl"
    shutil.copy(EXAMPLES / "with-errors.jsonl", manifest)
    argv = ["upload", str(manifest), "--dry-run", "--log-format", "json"]
    out = run_cli([*argv, "--report", "plan.json"], cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    got = events(out.stderr)
    assert [e["event"] for e in got].count("summary") == 1 and got[-1]["event"] == "summary"
    plan = report(tmp_path / "plan.json")
    assert {k: v for k, v in got[-1].items() if k not in ("event", "time")} == plan
    assert plan["dry_run"] is True and plan["invalid"] == 3 and plan["exit_code"] == 1


def test_a_dry_run_that_would_stop_replaces_a_stale_plan(tmp_path: Path) -> None:
    records = mixed_records(6)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    assert run_cli(["upload", str(manifest), "--emulate"], cwd=tmp_path).returncode == 0
    records[0] = inputs_record("changed", "ds")
    write_manifest(manifest, records)
    stale_report(tmp_path / "plan.json")
    argv = ["upload", str(manifest), "--dry-run", "--emulate", "--log-format", "json"]
    out = run_cli([*argv, "--report", "plan.json"], cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    plan = report(tmp_path / "plan.json")
    assert plan["exit_code"] == 3 and "--restart" in str(plan["message"]), plan
    assert events(out.stderr)[-1]["event"] == "summary"


@pytest.mark.parametrize("env_first", [False, True])
def test_ids_in_the_environment_do_not_bind_a_rehearsal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env_first: bool
) -> None:
    """Item D: the real job's ids in the environment; rehearsals with and without them
    resume one another."""
    without_target_ids(monkeypatch)
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(6))
    argv = ["upload", str(manifest), "--emulate", "--report", "r.json"]
    for with_env in (env_first, not env_first):
        if with_env:
            monkeypatch.setenv("BATCHLOG_PLATFORM_ID", "ocid1.aidataplatform.oc1.iad.x")
            monkeypatch.setenv("BATCHLOG_WORKSPACE", "prod")
        else:
            without_target_ids(monkeypatch)
        out = run_cli(argv, cwd=tmp_path)
        assert out.returncode == 0, (with_env, out.stderr)
    assert report(tmp_path / "r.json")["already_done"] == 6
    for dry in ([], ["--dry-run"]):  # the dry run plans the same rehearsal
        out = run_cli([*argv, *dry], cwd=tmp_path)
        assert out.returncode == 0, out.stderr


def test_the_emulator_s_count_has_thousands_separators(tmp_path: Path) -> None:
    """Item E."""
    manifest = write_manifest(tmp_path / "m.jsonl", one_per_run(1000))
    out = run_cli(["upload", str(manifest), "--emulate", "--concurrency", "64"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "emulator applied 1,000 calls" in out.stderr, out.stderr
