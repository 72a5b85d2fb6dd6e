"""A bug in batchlog itself (an exception nobody expected) ends the job cleanly (issue 9.3).

Exit 3, one line naming the exception (its traceback only with -v), the checkpoint flushed,
and a rerun of the same command finishes the job exactly once. The bug is planted by
patching one function in the CLI's own process (a subprocess started for the test).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlog.emulator import EmulatorThread
from tests.conftest import Oci, mixed_records, run_cli, upload_args, write_manifest
from tests.test_upload import assert_exactly_once

StartEmulator = Callable[..., EmulatorThread]

# Each plants a bug: the patched function raises on its n-th call (n counted from 1).
BUGS = {
    "worker": ("batchlog.job", "Job._succeed", 30),  # in a worker, after 29 successes
    "producer": ("batchlog.plan", "Grouper.add", 100),  # while reading the manifest
    "opening": ("batchlog.job", "Job.open", 1),  # before any request
}

PLANT = """
import importlib, os, sys
from batchlog.cli import main
module, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module)
cls, attr = name.split(".")
cls = getattr(owner, cls)
real = getattr(cls, attr)
calls = [0]
def planted(*args, **kwargs):
    calls[0] += 1
    if calls[0] >= nth:
        raise RuntimeError(os.environ.get("PLANTED", "planted bug number 7"))
    return real(*args, **kwargs)
setattr(cls, attr, planted)
sys.exit(main(sys.argv[4:]))
"""


def run_with_bug(
    bug: str, args: list[str], cwd: Path, message: str = ""
) -> subprocess.CompletedProcess[str]:
    module, name, nth = BUGS[bug]
    env = dict(os.environ, PLANTED=message) if message else None
    return subprocess.run(
        [sys.executable, "-c", PLANT, module, name, str(nth), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_an_unexpected_exception_is_exit_3_in_one_line_and_a_rerun_finishes(
    bug: str, tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = mixed_records(400, runs=100)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest), "--concurrency", "4")

    out = run_with_bug(bug, args, tmp_path)
    assert out.returncode == 3, out.stderr
    assert "Traceback" not in out.stderr
    named = [line for line in out.stderr.splitlines() if "planted bug number 7" in line]
    assert len(named) == 1, out.stderr
    assert "RuntimeError" in named[0] and "internal error" in named[0], named

    again = run_cli(args, cwd=tmp_path)  # the same command, without the bug
    assert again.returncode == 0, again.stderr
    assert_exactly_once(emu, records)


def test_the_traceback_of_an_unexpected_exception_is_shown_with_verbose(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(100, runs=50))
    out = run_with_bug("worker", [*upload_args(oci, emu, str(manifest)), "-v"], tmp_path)
    assert out.returncode == 3, out.stderr
    assert "Traceback" in out.stderr and "planted bug number 7" in out.stderr


def test_the_emulator_command_names_a_bad_flag_value_instead_of_a_traceback(
    tmp_path: Path,
) -> None:
    import socket

    (tmp_path / "not-a-key.pem").write_text("hello\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = {
            "--public-key": [str(tmp_path / "missing.pem"), str(tmp_path), "not-a-key.pem"],
            "--known-runs": [str(tmp_path / "missing.txt")],
            "--port": [str(port)],
        }
        for flag, values in cases.items():
            for value in values:
                out = run_cli(["emulator", flag, value], cwd=tmp_path, timeout=30)
                assert out.returncode == 2, (flag, value, out.stderr)
                assert out.stderr.count("\n") == 1 and flag in out.stderr, out.stderr


def test_an_unexpected_exception_quoting_a_credential_never_shows_it(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(50, runs=25))
    secrets = ["sekrit-bearer-value", "hunter2-password", "My-S3cret-phrase"]
    message = (
        f"Invalid header value b'Bearer {secrets[0]}\\n' for http://alice:{secrets[1]}@h/x "
        f"and pass_phrase  {secrets[2]}"
    )
    for n, verbose in enumerate(([], ["-v"])):
        checkpoint = str(tmp_path / f"c{n}")
        args = [*upload_args(oci, emu, str(manifest)), "--checkpoint", checkpoint, *verbose]
        out = run_with_bug("worker", args, tmp_path, message)
        assert out.returncode == 3, out.stderr
        assert "internal error: RuntimeError" in out.stderr
        for secret in secrets:
            assert secret not in out.stderr + out.stdout


def test_arguments_that_are_not_utf8_are_named_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """Found by review: a file name in Latin-1 was an internal error, exit 3, and left a
    stray checkpoint file."""
    import os as _os

    name = _os.fsencode(str(tmp_path)) + b"/caf\xe9.jsonl"
    with open(name, "wb") as f:
        f.write(b'{"run_id": "r1", "dataset_inputs": []}\n')
    for args in (
        [name, b"--emulate"],
        [str(tmp_path / "m.jsonl").encode(), b"--emulate", b"--dead-letter", b"d\xe9.jsonl"],
    ):
        done = subprocess.run(
            [sys.executable.encode(), b"-m", b"batchlog", b"upload", *args],
            capture_output=True,
            timeout=60,
            cwd=tmp_path,
        )
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 2, err
        assert "not valid UTF-8" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caf\udce9.jsonl"]


def test_a_device_is_not_a_manifest(tmp_path: Path) -> None:
    """Found by review: /dev/zero was read for ever, deaf to signals."""
    outputs = ["--checkpoint", str(tmp_path / "c"), "--dead-letter", str(tmp_path / "d")]
    for command in (["upload", "/dev/zero", "--emulate", *outputs], ["validate", "/dev/zero"]):
        done = run_cli(command, cwd=tmp_path, timeout=30)
        assert done.returncode == 2, done.stderr
        assert "is a device" in done.stderr
    assert run_cli(["validate", "/dev/null"], cwd=tmp_path, timeout=30).returncode == 0


def test_outputs_that_are_devices_or_pipes_are_refused_and_left_alone(tmp_path: Path) -> None:
    """Found by review, as root: a dead letter named /dev/full was set aside (renamed) and
    /dev/null replaced by a regular file; a FIFO as --dead-letter or --report hung."""
    import stat as _stat

    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(4))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    odd = [fifo]
    if os.geteuid() == 0:  # a null device of the test's own, never the system's
        device = tmp_path / "null"
        os.mknod(device, _stat.S_IFCHR | 0o666, os.makedev(1, 3))
        odd.append(device)
    for path in odd:
        for flag in ("--dead-letter", "--checkpoint", "--report"):
            done = run_cli(
                ["upload", str(manifest), "--emulate", flag, str(path)], cwd=tmp_path, timeout=30
            )
            assert done.returncode == 2, (flag, path, done.stderr)
            assert "not a regular file" in done.stderr, done.stderr
            mode = os.stat(path).st_mode
            assert _stat.S_ISFIFO(mode) or _stat.S_ISCHR(mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("fifo.", "null."))]
