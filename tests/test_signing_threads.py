"""BATCHLOG_SIGNING_THREADS sets how many threads sign (the benchmark's scaling curve)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlog.emulator import EmulatorThread
from batchlog.transport import signing_threads
from tests.conftest import Oci, inputs_record, run_cli, upload_args, write_manifest


def default_threads() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def test_signing_threads_default_is_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATCHLOG_SIGNING_THREADS", raising=False)
    assert signing_threads() == default_threads()


@pytest.mark.parametrize("value", ["1", "3", " 16 ", "64"])
def test_signing_threads_from_environment(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("BATCHLOG_SIGNING_THREADS", value)
    assert signing_threads() == int(value)


@pytest.mark.parametrize("value", ["0", "65", "-2", "four", "1.5", "\x1b[31m"])
def test_signing_threads_bad_value_warns_and_keeps_the_default(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv("BATCHLOG_SIGNING_THREADS", value)
    with caplog.at_level(logging.WARNING, logger="batchlog"):
        assert signing_threads() == default_threads()
    [message] = [r.getMessage() for r in caplog.records]
    assert "BATCHLOG_SIGNING_THREADS" in message and "1 to 64" in message
    assert "\n" not in message and "\x1b" not in message


def test_upload_with_bad_signing_threads_warns_once_and_succeeds(
    tmp_path: Path,
    oci: Oci,
    emulator: Callable[..., EmulatorThread],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emu = emulator()
    manifest = write_manifest(
        tmp_path / "m.jsonl", [inputs_record(f"run{i}", f"ds{i:08d}") for i in range(5)]
    )
    monkeypatch.setenv("BATCHLOG_SIGNING_THREADS", "lots")  # run_cli passes the environment on
    done = run_cli(upload_args(oci, emu, str(manifest)))
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "BATCHLOG_SIGNING_THREADS" in line]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
