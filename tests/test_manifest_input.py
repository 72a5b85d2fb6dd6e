"""Hostile manifests (issue 9): corrupt or disguised gzip, directories, unreadable files,
enormous lines and slow stdin. One clear line, the documented exit code, no traceback,
nothing lost; the CLI runs as a separate process against the emulator.
"""

from __future__ import annotations

import bz2
import gzip
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import orjson
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
from tests.test_crash import start_cli
from tests.test_integrity import dead_lines, jsonl
from tests.test_upload import assert_exactly_once

StartEmulator = Callable[..., EmulatorThread]
MAX_LINE = 32 << 20  # the documented maximum line size (README, manifest format)


def one_line_error(stderr: str, *words: str) -> None:
    """The failure is told in one line naming it, never with a traceback."""
    assert "Traceback" not in stderr, stderr
    assert any(all(w in line for w in words) for line in stderr.splitlines()), stderr


def lines_before_cut(data: bytes) -> int:
    """How many whole lines a cut-short gzip stream holds."""
    d = zlib.decompressobj(wbits=31)
    return d.decompress(data).count(b"\n")


# ---- 11. gzip: truncated, corrupt, disguised ---------------------------------------------------


def test_a_truncated_gzip_sends_what_is_before_the_cut_then_stops_and_resumes(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = mixed_records(3000, runs=3000)
    whole = gzip.compress(jsonl(records).encode())
    cut = whole[: len(whole) * 2 // 3]
    before = lines_before_cut(cut)
    assert 1000 < before < 3000
    manifest = tmp_path / "m.jsonl.gz"
    manifest.write_bytes(cut)
    args = upload_args(oci, emu, str(manifest))
    out = run_cli(args)
    assert out.returncode == 3, out.stderr
    one_line_error(out.stderr, "m.jsonl.gz", "truncated gzip")
    assert_exactly_once(emu, records[:before])  # the records before the cut went
    _, point = read_checkpoint(str(tmp_path / "m.batchlog-checkpoint"))
    assert point.finished == before  # and are checkpointed
    assert dead_lines(tmp_path / "m.dead-letter.jsonl") == []

    manifest.write_bytes(whole)  # the file is completed: the same command goes on
    out = run_cli(args)
    assert out.returncode == 0, out.stderr
    assert f"{before:,} already done" in out.stderr, out.stderr
    assert_exactly_once(emu, records)


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_truncated_or_corrupt_gzip_is_named_in_one_line_by_validate_and_dry_run(
    tmp_path: Path, oci: Oci, dry_run: bool
) -> None:
    whole = gzip.compress(jsonl(mixed_records(2000, runs=50)).encode())
    bad = bytearray(whole)
    bad[len(bad) // 2 : len(bad) // 2 + 64] = b"\xff" * 64
    for name, data, problem in (
        ("cut.jsonl.gz", whole[: len(whole) // 2], "truncated gzip"),
        ("bad.jsonl.gz", bytes(bad), "corrupt gzip"),
        ("header.gz", b"\x1f\x8b" + b"\x00" * 40, "gzip"),
    ):
        manifest = tmp_path / name
        manifest.write_bytes(data)
        cmd = ["validate", str(manifest)]
        if dry_run:
            cmd = ["upload", str(manifest), "--emulate", "--dry-run"]
        out = run_cli(cmd, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        one_line_error(out.stderr, name, problem)
        assert "not valid UTF-8" not in out.stdout + out.stderr


def test_gzip_is_sniffed_whatever_the_name(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = mixed_records(300, runs=60)
    zipped = tmp_path / "m.jsonl"  # gzip, named as plain JSON Lines
    zipped.write_bytes(gzip.compress(jsonl(records).encode()))
    out = run_cli(["validate", str(zipped)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "300 records, 0 invalid" in out.stderr
    out = run_cli(["upload", str(zipped), "--emulate", "--dry-run"], cwd=tmp_path)
    assert out.returncode == 0 and "300 records, 0 invalid" in out.stderr, out.stderr
    out = run_cli(upload_args(oci, emu, str(zipped)))
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


def test_plain_text_named_gz_is_read_as_plain_text(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = mixed_records(50, runs=10)
    plain = write_manifest(tmp_path / "m.jsonl.gz", records)
    out = run_cli(["validate", str(plain)])
    assert out.returncode == 0 and "50 records, 0 invalid" in out.stderr, out.stderr
    out = run_cli(upload_args(oci, emu, str(plain)))
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)
    out = run_cli(upload_args(oci, emu, str(plain)))  # and resumes as such
    assert out.returncode == 0 and "50 already done" in out.stderr, out.stderr


def test_gzip_on_stdin_is_read_as_gzip(tmp_path: Path, oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator()
    records = mixed_records(200, runs=40)
    data = gzip.compress(jsonl(records).encode())
    out = subprocess.run(
        [sys.executable, "-m", "batchlog", *upload_args(oci, emu, "-")],
        input=data,
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


def test_another_compression_is_refused_by_name(tmp_path: Path, oci: Oci) -> None:
    manifest = tmp_path / "m.jsonl.bz2"
    manifest.write_bytes(bz2.compress(jsonl(mixed_records(20, runs=5)).encode()))
    for cmd in (["validate", str(manifest)], ["upload", str(manifest), "--emulate"]):
        out = run_cli(cmd, cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        one_line_error(out.stderr, "m.jsonl.bz2", "bzip2")
        assert "not valid UTF-8" not in out.stdout + out.stderr


# ---- 12. directories and unreadable files --------------------------------------------------


def test_a_directory_is_named_as_one_before_any_request(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    folder = tmp_path / "runs.jsonl"
    folder.mkdir()
    for cmd in (
        ["validate", str(folder)],
        ["upload", str(folder), "--emulate", "--dry-run"],
        upload_args(oci, emu, str(folder)),
        upload_args(oci, emu, str(write_manifest(tmp_path / "ok.jsonl", [])), str(folder)),
    ):
        out = run_cli(cmd, cwd=tmp_path)
        assert out.returncode == 2, (cmd, out.stderr)
        one_line_error(out.stderr, str(folder), "is a directory")
    assert emu.state.retry_tokens == []


def without_root_reading_everything() -> None:
    """Root reads a chmod 000 file anyway: the child drops that power (CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, from its bounding set, so its exec does not get them back)."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_unreadable_manifest_is_permission_denied_before_any_request(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(20, runs=5))
    manifest.chmod(0)
    for cmd in (
        ["validate", str(manifest)],
        ["upload", str(manifest), "--emulate", "--dry-run"],
        ["upload", str(manifest), "--emulate"],
        upload_args(oci, emu, str(manifest)),
    ):
        out = run_cli(cmd, cwd=tmp_path, preexec_fn=without_root_reading_everything)
        assert out.returncode == 2, (cmd, out.stderr)
        one_line_error(out.stderr, str(manifest), "permission denied")
    assert emu.state.retry_tokens == []
    assert not (tmp_path / "m.batchlog-checkpoint").exists()


# ---- 13. enormous lines ------------------------------------------------------------------


def test_a_line_over_the_maximum_is_rejected_by_number_and_the_rest_goes(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    good = [inputs_record(f"r{i}", f"huge{i:04d}") for i in range(6)]
    manifest = tmp_path / "m.jsonl"
    huge = b'{"run_id": "big", "datasets": [{"dataset": {"name": "' + b"x" * (50 << 20)
    huge += b'"}}]}'
    with open(manifest, "wb") as f:
        f.write(jsonl(good[:3]).encode() + huge + b"\n" + jsonl(good[3:]).encode())
    out = run_cli(["validate", str(manifest)])
    assert out.returncode == 1, out.stderr
    assert f"m.jsonl:4: (line): line longer than {MAX_LINE:,} bytes" in out.stdout, out.stdout

    out = run_cli(upload_args(oci, emu, str(manifest)))
    assert out.returncode == 1, out.stderr
    assert f"m.jsonl:4: (line): line longer than {MAX_LINE:,} bytes" in out.stderr
    assert_exactly_once(emu, good)  # every good line before and after it went
    [dead] = dead_lines(tmp_path / "m.dead-letter.jsonl")
    assert dead["_error"]["source"].endswith("m.jsonl:4")
    assert dead["_raw"].encode() == huge[:1024]  # a bounded prefix, not 50 MB
    out = run_cli(upload_args(oci, emu, str(manifest)))  # resumes past it, sends nothing
    assert out.returncode == 1 and "7 already done" in out.stderr, out.stderr
    assert_exactly_once(emu, good)


# the peak of this process alone: getrusage's ru_maxrss also counts the forking parent's
PEAK_RSS = """
import sys
import batchlog.manifest
batchlog.manifest.MAX_LINE = 1 << 20  # a lowered limit: the line is 200 times longer
from batchlog.cli import main
rc = main(sys.argv[1:])
with open("/proc/self/status") as status:
    print(*[line for line in status if line.startswith("VmHWM")], file=sys.stderr)
sys.exit(rc)
"""


def peak_rss_mb(stderr: str) -> float:
    [kb] = [line.split()[1] for line in stderr.splitlines() if line.startswith("VmHWM")]
    return int(kb) / 1024


def test_reading_a_line_far_over_the_maximum_holds_a_bounded_amount(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    good = [inputs_record(f"m{i}", f"memory{i:04d}") for i in range(4)]
    manifest = tmp_path / "m.jsonl"
    with open(manifest, "wb") as f:
        f.write(jsonl(good[:2]).encode())
        f.write(b'{"run_id": "big", "model_json": "')
        chunk = b"y" * (1 << 20)
        for _ in range(200):  # 200 MB on one line
            f.write(chunk)
        f.write(b'"}\n' + jsonl(good[2:]).encode())
    base = [sys.executable, "-c", PEAK_RSS]
    for cmd in (["validate", str(manifest)], upload_args(oci, emu, str(manifest))):
        out = subprocess.run(
            [*base, *cmd], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )
        assert out.returncode == 1, out.stderr
        assert "line longer than 1,048,576 bytes" in out.stdout + out.stderr
        assert peak_rss_mb(out.stderr) < 150, out.stderr  # far below the line's 200 MB
    assert_exactly_once(emu, good)


# ---- 14. stdin: slow producers and signals ----------------------------------------------------


def wait_applied(emu: EmulatorThread, proc: subprocess.Popen[str], n: int, within: float) -> None:
    deadline = time.monotonic() + within
    while emu.state.applied < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{emu.state.applied} applied, {n} expected"
        time.sleep(0.02)


def slow_stdin_job(
    tmp_path: Path, oci: Oci, emu: EmulatorThread
) -> tuple[subprocess.Popen[str], list[str]]:
    args = upload_args(oci, emu, "-", "--checkpoint", str(tmp_path / "c"))
    return start_cli(args, stdin=subprocess.PIPE, cwd=tmp_path), args


def test_records_piped_slowly_go_out_as_they_arrive(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    # one run: nothing but time tells the job to stop waiting for more of its datasets
    records = [inputs_record("slow", f"slow{i:04d}") for i in range(3)]
    proc, _ = slow_stdin_job(tmp_path, oci, emu)
    assert proc.stdin is not None
    for n, record in enumerate(records, 1):
        proc.stdin.write(orjson.dumps(record).decode() + "\n")
        proc.stdin.flush()
        wait_applied(emu, proc, n, within=3)  # within about a second, generously
        time.sleep(1)
    _, err = proc.communicate(timeout=60)  # stdin closed: the end of the stream
    assert proc.returncode == 0, err
    assert_exactly_once(emu, records)


def test_sigint_while_stdin_waits_stops_at_once_and_resumes(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = [inputs_record(f"s{i % 2}", f"sig{i:04d}") for i in range(6)]
    proc, args = slow_stdin_job(tmp_path, oci, emu)
    assert proc.stdin is not None
    proc.stdin.write(jsonl(records[:2]))
    proc.stdin.flush()
    wait_applied(emu, proc, 2, within=5)
    time.sleep(0.5)  # blocked on stdin now
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)  # stop reading; nothing in flight: done
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 5, err
    assert "Traceback" not in err, err

    out = run_cli(args, input=jsonl(records), cwd=tmp_path)  # the same stream, grown
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


def test_a_second_sigint_stops_at_once_with_stdin_blocked_and_a_call_in_flight(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    records = [inputs_record(f"t{i}", f"twice{i:04d}") for i in range(6)]
    proc, args = slow_stdin_job(tmp_path, oci, emu)
    assert proc.stdin is not None
    proc.stdin.write(jsonl(records[:2]))
    proc.stdin.flush()
    wait_applied(emu, proc, 2, within=5)
    emu.emulator.config.latency = 60
    proc.stdin.write(jsonl(records[2:3]))  # its call is held by the server
    proc.stdin.flush()
    deadline = time.monotonic() + 10
    while len(emu.state.retry_tokens) < 3:  # sent (after the pipe's idle moment)
        assert time.monotonic() < deadline and proc.poll() is None, "the call was not sent"
        time.sleep(0.02)
    time.sleep(0.3)  # stdin blocked again
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)  # would wait --grace (10 s) for the call in flight
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # stops now
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    assert time.monotonic() - started < 5, err
    assert "stopping now" in err and "Traceback" not in err, err

    emu.emulator.config.latency = 0
    out = run_cli(args, input=jsonl(records), cwd=tmp_path)  # the same stream, grown
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


# ---- 15. what Windows editors and double compression leave --------------------------------

BOM = b"\xef\xbb\xbf"


def test_a_manifest_with_a_utf8_bom_uploads_and_resumes(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """``bom.jsonl:1: (line): invalid JSON: Expecting value``: a BOM (as Windows editors
    write one, or files concatenated) is read past; the bytes are kept as they are."""
    emu = emulator()
    good = [inputs_record(f"b{i}", f"bom{i:04d}") for i in range(4)]
    bad = BOM + b'{"run_id": "bad", "datasets": [], "x": 1}'
    manifest = tmp_path / "bom.jsonl"
    manifest.write_bytes(
        BOM + orjson.dumps(good[0]) + b"\r\n" + orjson.dumps(good[1]) + b"\r\n" + bad + b"\r\n"
    )
    out = run_cli(["validate", str(manifest)])
    assert out.returncode == 1, out.stdout + out.stderr
    assert "bom.jsonl:3: x: unknown field" in out.stdout, out.stdout
    assert "invalid JSON" not in out.stdout
    args = upload_args(oci, emu, str(manifest))
    out = run_cli(args)
    assert out.returncode == 1, out.stderr
    assert_exactly_once(emu, good[:2])
    dead = (tmp_path / "bom.dead-letter.jsonl").read_bytes()
    assert dead.startswith(bad[:-1] + b',"_error":'), dead  # the line byte for byte

    with open(manifest, "ab") as f:  # appended: another BOM, the last line unterminated
        f.write(BOM + orjson.dumps(good[2]) + b"\r\n" + BOM + orjson.dumps(good[3]))
    out = run_cli(args)
    assert out.returncode == 1 and "3 already done" in out.stderr, out.stderr
    assert_exactly_once(emu, good)
    out = run_cli(args)  # nothing more to send: the checkpoint matched the bytes read
    assert out.returncode == 1 and "5 already done" in out.stderr, out.stderr
    assert_exactly_once(emu, good)


def test_gzip_inside_gzip_is_named(tmp_path: Path, oci: Oci, emulator: StartEmulator) -> None:
    """It said ``gzgz.jsonl.gz:1: (line): not valid UTF-8 at byte 1``."""
    emu = emulator()
    manifest = tmp_path / "gzgz.jsonl.gz"
    manifest.write_bytes(gzip.compress(gzip.compress(jsonl(mixed_records(20, runs=5)).encode())))
    for cmd in (
        ["validate", str(manifest)],
        ["upload", str(manifest), "--emulate", "--dry-run"],
        upload_args(oci, emu, str(manifest)),
    ):
        out = run_cli(cmd, cwd=tmp_path)
        assert out.returncode == 2, (cmd, out.stderr)
        one_line_error(out.stderr, "gzgz.jsonl.gz", "gzip inside gzip: decompress it once first")
        assert "not valid UTF-8" not in out.stdout + out.stderr
    assert emu.state.retry_tokens == []
    piped = subprocess.run(  # on stdin: found as it is read, exit 3 as for other formats there
        [sys.executable, "-m", "batchlog", *upload_args(oci, emu, "-")],
        input=manifest.read_bytes(),
        capture_output=True,
        cwd=tmp_path,
        timeout=120,
    )
    err = piped.stderr.decode()
    assert piped.returncode == 3, err
    one_line_error(err, "<stdin>", "gzip inside gzip: decompress it once first")
    assert emu.state.retry_tokens == []
