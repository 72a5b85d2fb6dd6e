"""Usage errors are exit 2 with one line naming the flag or the file and why, never an
internal error (exit 3): every numeric flag of every command has a documented range, which
the library's Settings enforces too, and `batchlog status` names a checkpoint that is not
one (a directory, a FIFO, a foreign file), reading it without changing it."""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import batchlog
from batchlog.cli import build_parser, main
from batchlog.emulator import EmulatorThread
from batchlog.errors import ConfigurationError
from batchlog.plan import GroupLimits
from batchlog.retry import RetryPolicy
from batchlog.signing import StaticKey
from batchlog.target import OciTarget
from tests.conftest import (
    KEY_ID,
    PLATFORM,
    WORKSPACE,
    Oci,
    inputs_record,
    mixed_records,
    run_cli,
    upload_args,
    write_manifest,
)

StartEmulator = Callable[..., EmulatorThread]

# ---- numeric flags -------------------------------------------------------------------------

# command, flag, lowest, highest, whole numbers only: the ranges --help documents
RANGES = [
    ("upload", "--concurrency", 1, 4096, True),
    ("upload", "--rate", 0.01, 1_000_000, False),
    ("upload", "--max-attempts", 1, 1000, True),
    ("upload", "--timeout", 0.1, 86_400, False),
    ("upload", "--max-datasets-per-request", 1, 10_000, True),
    ("upload", "--grace", 0, 86_400, False),
    ("verify", "--concurrency", 1, 4096, True),
    ("emulator", "--port", 0, 65_535, True),
    ("emulator", "--rate-limit", 0.01, 1_000_000, False),
    ("emulator", "--latency-ms", 0, 600_000, False),
    ("emulator", "--fail-before", 0, 1, False),
    ("emulator", "--fail-after", 0, 1, False),
    ("emulator", "--reset-after", 0, 1, False),
    ("emulator", "--throttle-once", 0, 1, False),
    ("emulator", "--seed", 0, 2**32 - 1, True),
]
EXTREMES = [
    "0",
    "-1",
    "1",
    "0.5",
    "1e-300",
    "-1e-300",
    "1e300",
    "inf",
    "-inf",
    "nan",
    str(2**63),
    str(2**64),
    "9" * 5000,  # more digits than int() reads
    "1" + "0" * 400,  # an int too large for a float
    "0x10",
    "abc",
    "",
]


def command_line(command: str, flag: str, value: str, tmp_path: Path) -> list[str]:
    manifest = str(tmp_path / "m.jsonl")
    before = {
        "upload": ["upload", manifest, "--emulate", "--dry-run"],
        "verify": [
            "verify",
            manifest,
            "--target",
            "mlflow",
            "--tracking-uri",
            "http://127.0.0.1:1",
        ],
        "emulator": ["emulator"],
    }[command]
    return [*before, f"{flag}={value}"]  # "=": a value such as -1 is not taken for a flag


def shown(x: float) -> str:
    return str(int(x)) if x == int(x) else str(x)


def accepted(text: str, low: float, high: float, whole: bool) -> float | None:
    """The value ``text`` stands for if the flag must take it, else None."""
    try:
        value: float = int(text) if whole else float(text)
    except ValueError:
        return None
    return value if low <= value <= high else None  # nan: never


@pytest.mark.parametrize(("command", "flag", "low", "high", "whole"), RANGES)
def test_every_numeric_flag_takes_its_range_and_refuses_the_rest(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    flag: str,
    low: float,
    high: float,
    whole: bool,
) -> None:
    edges = [str(low), str(high), repr(float(high) * 1.0000001), repr(low - 1e-9)]
    for text in [*EXTREMES, *edges]:
        argv = command_line(command, flag, text, tmp_path)
        value = accepted(text, low, high, whole)
        if value is not None:
            parsed = getattr(build_parser().parse_args(argv), flag[2:].replace("-", "_"))
            assert parsed == value and isinstance(parsed, int if whole else float), text
            continue
        assert main(argv) == 2, (flag, text)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("batchlog: error:")]
        assert len(lines) == 1, err
        assert f"argument {flag}:" in lines[0], err
        assert f"{shown(low)} to {shown(high)}" in lines[0] or f"up to {shown(high)}" in lines[0]
        assert len(lines[0]) < 200, err  # a 5000-digit value is not echoed whole
        assert "internal error" not in err and "Traceback" not in err


def test_help_documents_each_range(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("upload", "verify", "emulator"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for cmd, flag, low, high, _ in RANGES:
            if cmd == command:
                assert f"{flag} " in text and f"{shown(low)} to {shown(high)}" in text, flag


def test_the_ends_of_every_range_work_in_a_real_upload(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = [inputs_record("r1", "a"), inputs_record("r1", "b"), inputs_record("r2", "c")]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    one = write_manifest(tmp_path / "one.jsonl", records[:1])
    runs = {
        "highs": [
            *upload_args(oci, emu, str(manifest), "--checkpoint", str(tmp_path / "c1")),
            *("--concurrency", "4096", "--rate", "1e6", "--max-attempts", "1000"),
            *("--timeout", "86400", "--max-datasets-per-request", "10000", "--grace", "86400"),
        ],
        "lows": [
            *upload_args(oci, emu, str(manifest), "--checkpoint", str(tmp_path / "c2")),
            *("--concurrency", "1", "--max-attempts", "1", "--max-datasets-per-request", "1"),
            *("--grace", "0"),
        ],
        "lowest rate": [*upload_args(oci, emu, str(one)), "--rate", "0.01"],
        "shortest timeout": [
            *upload_args(oci, emu, str(manifest), "--checkpoint", str(tmp_path / "c3")),
            *("--timeout", "0.1", "--max-attempts", "1000"),
        ],
    }
    for name, args in runs.items():
        done = run_cli(args, timeout=60)
        assert done.returncode == 0, (name, done.stderr)
        assert "internal error" not in done.stderr, (name, done.stderr)


def test_the_library_refuses_what_the_flags_refuse(oci: Oci) -> None:
    base = batchlog.Settings(
        target=OciTarget("https://datalake.example", PLATFORM, WORKSPACE),
        keys=StaticKey(KEY_ID, oci.key),
    )
    bad: dict[str, list[Any]] = {
        "concurrency": [0, -1, 4097, 2**64, 10**400, 1.5, True, "8"],
        "rate": [0.0, 1e-300, -1.0, 1e300, math.inf, math.nan, "10"],
        "timeout": [0.0, 0.01, -1.0, math.inf, math.nan, 86_401.0],
        "grace": [-1.0, math.inf, math.nan, 86_401.0],
        "retry": [RetryPolicy(max_attempts=0), RetryPolicy(max_attempts=1001)],
        "grouping": [GroupLimits(max_datasets=0), GroupLimits(max_datasets=2**64)],
    }
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ConfigurationError) as raised:
                dataclasses.replace(base, **{name: value})
            message = str(raised.value)
            assert "\n" not in message and "expected" in message, message
            assert name in message or "max_attempts" in message or "max_datasets" in message
    ends: dict[str, Any] = {"rate": 0.01, "grace": 0.0, "concurrency": 4096, "timeout": 0.1}
    for name, value in ends.items():
        dataclasses.replace(base, **{name: value})  # the ends of the ranges are fine


# ---- batchlog status on what is no checkpoint ------------------------------------------------


def status(path: Path, timeout: float = 30) -> tuple[int, str, str]:
    done = run_cli(["status", str(path)], timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def test_status_names_a_directory_a_fifo_and_a_missing_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        tmp_path / "missing": "no such file",
        tmp_path: "is a directory",
        fifo: "is not a regular file (a pipe or a device?)",
    }
    for path, reason in cases.items():
        rc, stdout, stderr = status(path)
        assert (rc, stdout) == (2, ""), stderr
        assert stderr == f"batchlog: error: checkpoint {path}: {reason}\n"


def test_status_on_a_file_that_is_no_checkpoint_is_a_usage_error(tmp_path: Path) -> None:
    files = {
        "empty": b"",
        "binary": bytes(range(256)) * 64,
        "manifest": orjson.dumps(inputs_record("r1", "ds")) + b"\n",
        "json": b'{"batchlog_checkpoint": "x"}\n',
        "one huge line": b"x" * (9 << 20),  # no newline: the header is never this long
    }
    for name, data in files.items():
        path = tmp_path / name.replace(" ", "-")
        path.write_bytes(data)
        rc, stdout, stderr = status(path)
        assert (rc, stdout) == (2, ""), (name, stderr)
        assert stderr.count("\n") == 1 and str(path) in stderr, (name, stderr)
        assert stderr.startswith("batchlog: error: ") and "internal error" not in stderr, name
        assert path.read_bytes() == data, name


def test_status_reads_a_torn_checkpoint_without_changing_it(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(10, runs=2))
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    checkpoint = tmp_path / "m.batchlog-checkpoint"
    with open(checkpoint, "ab") as f:
        f.write(b'{"torn":')
    before = checkpoint.read_bytes()
    rc, stdout, stderr = status(checkpoint)
    assert rc == 0, stderr
    assert "10 succeeded" in stdout
    assert "cut off" not in stderr and "tail of 8 bytes" in stderr, stderr
    assert checkpoint.read_bytes() == before


def test_status_never_opens_a_manifest_that_is_a_fifo(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """The checkpoint of a job fed through a named pipe: status must not wait for a writer."""
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(4, runs=1))
    assert run_cli(upload_args(oci, emu, str(manifest))).returncode == 0
    checkpoint = tmp_path / "m.batchlog-checkpoint"
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    first, rest = checkpoint.read_bytes().split(b"\n", 1)
    header = first.rsplit(b"|", 1)[0].replace(str(manifest).encode(), str(fifo).encode())
    checkpoint.write_bytes(b"%s|%08x\n" % (header, zlib.crc32(header)) + rest)
    unblock = threading.Timer(20, lambda: os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)))
    try:
        rc, stdout, stderr = status(checkpoint)
    finally:
        unblock.cancel()
    assert rc == 0, stderr
    assert "not finished: unknown" in stdout, stdout


# ---- --emulate and the flags of a real target (newcomer review, item 2) ----------------------

# flags that choose or reach a real target, and how the refusal names each
REAL_TARGET = [
    (["--target", "mlflow", "--tracking-uri", "http://127.0.0.1:5000"], ["--target mlflow"]),
    (["--tracking-uri", "http://127.0.0.1:5000"], ["--tracking-uri"]),
    (["--endpoint", "https://datalake.example.com"], ["--endpoint"]),
    (["--auth", "security_token"], ["--auth security_token"]),
    (["--config-file", "oci_config"], ["--config-file"]),
    (["--profile", "OTHER"], ["--profile"]),
    (["--ca-bundle", "ca.pem"], ["--ca-bundle"]),
]


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(("flags", "named"), REAL_TARGET)
def test_emulate_refuses_the_flags_of_a_real_target_before_anything_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    named: list[str],
    dry_run: bool,
) -> None:
    """A rehearsal of an MLflow job must not run under AI Data Platform rules unnoticed."""
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(4))
    argv = ["upload", str(manifest), "--emulate", *flags, *(["--dry-run"] if dry_run else [])]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 2, captured.err  # the line that matters, then where help is
    assert lines[0].startswith("batchlog: error: ") and "--emulate" in lines[0], lines
    for flag in named:
        assert flag in lines[0], lines
    assert lines[1] == "see 'batchlog upload --help'", lines
    assert captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # nothing started


def test_emulate_names_every_real_target_flag_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(4))
    argv = ["upload", str(manifest), "--emulate", "--endpoint", "https://h.example"]
    argv += ["--config-file", "c", "--profile", "P", "--target", "mlflow"]
    assert main(argv) == 2
    first = capsys.readouterr().err.splitlines()[0]
    for flag in ("--target mlflow", "--endpoint", "--config-file", "--profile"):
        assert flag in first, first


def test_emulate_takes_the_ids_and_leaves_the_target_variables_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--platform-id and --workspace name the rehearsal's paths and retry tokens; variables
    of a real target in the environment are not flags given to --emulate."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(4))
    ids = ["--platform-id", "ocid1.aidataplatform.oc1..mine", "--workspace", "mine"]
    for extra in ([], ids, ["--target", "oci", "--auth", "api_key"]):
        out = run_cli(["upload", str(manifest), "--emulate", *extra, "--restart"], cwd=tmp_path)
        assert out.returncode == 0, (extra, out.stderr)


# ---- common options before or after the command (newcomer review, item 13) -------------------

COMMON = [
    (["-v"], "verbose", True, False),
    (["--verbose"], "verbose", True, False),
    (["-q"], "quiet", True, False),
    (["--log-format", "json"], "log_format", "json", "text"),
    (["--log-file", "x.log"], "log_file", "x.log", None),
]
COMMANDS = [
    ["upload", "m.jsonl", "--emulate"],
    ["validate", "m.jsonl"],
    ["status", "c"],
    ["verify", "m.jsonl", "--target", "mlflow", "--tracking-uri", "http://127.0.0.1:1"],
    ["emulator"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(("flag", "name", "given", "default"), COMMON)
def test_a_common_option_works_before_or_after_the_command(
    command: list[str], flag: list[str], name: str, given: object, default: object
) -> None:
    for argv in ([*flag, *command], [*command, *flag]):
        assert getattr(build_parser().parse_args(argv), name) == given, argv
    assert getattr(build_parser().parse_args(command), name) == default


def test_verbose_before_the_command_shows_an_internal_error_s_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def planted(*args: object, **kwargs: object) -> None:
        raise RuntimeError("planted bug")

    monkeypatch.setattr("batchlog.check.plan_upload", planted)  # cli imports it when run
    manifest = str(write_manifest(tmp_path / "m.jsonl", mixed_records(4)))
    for argv in (["-v", "upload", manifest, "--dry-run"], ["upload", manifest, "--dry-run", "-v"]):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert "Traceback" in err and "internal error: RuntimeError: planted bug" in err, argv
    assert main(["upload", manifest, "--dry-run"]) == 3
    assert "Traceback" not in capsys.readouterr().err  # without -v, one line


# ---- second newcomer review, item E --------------------------------------------------------


def test_a_misspelt_command_gets_the_one_it_resembles(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["uplod", "m.jsonl"]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("batchlog: error: ") and "did you mean upload?" in first, first


@pytest.mark.parametrize(
    ("argv", "meant"),
    [
        (["upload", "m.jsonl", "--emulate", "--max-attempt", "3"], "--max-attempts"),
        (["upload", "m.jsonl", "--emulate", "--emulate-latency", "5"], "--emulate-latency-ms"),
        (["upload", "m.jsonl", "--emul"], None),
        (["validate", "m.jsonl", "--log-form", "json"], "--log-format"),
        (["emulator", "--por", "0"], "--port"),
    ],
)
def test_abbreviated_flags_are_refused(tmp_path: Path, argv: list[str], meant: str | None) -> None:
    """A prefix is not the flag: what it stands for changes when a flag is added. (A
    subprocess: an accepted `emulator --por 0` would serve until stopped.)"""
    out = run_cli(argv, cwd=tmp_path, timeout=30)
    assert out.returncode == 2, out.stderr
    first = out.stderr.splitlines()[0]
    assert "unrecognized arguments" in first, first
    if meant:
        assert f"did you mean {meant}?" in first, first


def test_status_on_a_manifest_names_its_checkpoint(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "runs.jsonl", mixed_records(4))
    rc, stdout, stderr = status(manifest)
    assert (rc, stdout) == (2, ""), stderr
    assert "runs.batchlog-checkpoint" in stderr and stderr.count("\n") == 1, stderr
    assert run_cli(["upload", str(manifest), "--emulate"], cwd=tmp_path).returncode == 0
    rc, stdout, stderr = status(manifest)
    assert rc == 2 and stderr.count("\n") == 1, stderr
    assert str(tmp_path / "runs.emulated.batchlog-checkpoint") in stderr, stderr
