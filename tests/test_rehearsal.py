"""Rehearsing for real (issue 10, item 8): `--emulate` takes the emulator's faults (a rate
limit, latency, 500s) and the job still lands every record; `batchlog emulator` writes a
throwaway key and OCI config and prints the exact upload command that works against it,
which is run here as printed. Everything on loopback, signatures verified."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import stat
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from batchlog.emulator import EmulatorThread
from tests.conftest import (
    Oci,
    expected_items,
    inputs_record,
    mixed_records,
    run_cli,
    upload_args,
    write_manifest,
)
from tests.test_crash import start_cli

StartEmulator = Callable[..., EmulatorThread]
APPLIED = re.compile(r"emulator applied (\d+) calls; answered (\d+) with 429, (\d+) with 500")


def one_per_run(n: int) -> list[dict[str, object]]:
    """n records, each its own call (no merging)."""
    return [inputs_record(f"run{i:05d}", f"ds{i:08d}") for i in range(n)]


def emulated(out: subprocess.CompletedProcess[str]) -> tuple[int, int, int]:
    found = APPLIED.search(out.stderr)
    assert found, out.stderr
    applied, throttled, failed = (int(g) for g in found.groups())
    return applied, throttled, failed


# ---- --emulate with faults -----------------------------------------------------------------


def test_emulate_with_a_rate_limit_is_throttled_and_lands_every_record(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", one_per_run(100))
    report = tmp_path / "r.json"
    out = run_cli(
        [
            "upload",
            str(manifest),
            "--emulate",
            "--emulate-rate-limit",
            "20",
            "--report",
            str(report),
        ]
    )
    assert out.returncode == 0, out.stderr
    assert "rate limit 20/s" in out.stderr, out.stderr  # the rehearsal says what it emulates
    applied, throttled, _ = emulated(out)
    assert applied == 100 and throttled > 0, out.stderr
    doc = orjson.loads(report.read_bytes())
    assert doc["records"] == doc["succeeded"] == 100, doc
    assert doc["failed"] == doc["rejected"] == 0, doc
    throttled_in_report = [v for k, v in doc.items() if "throttl" in k]
    assert throttled_in_report and throttled_in_report[0] > 0, doc


def test_emulate_latency_delays_every_answer(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", one_per_run(4))
    started = time.monotonic()
    out = run_cli(
        ["upload", str(manifest), "--emulate", "--emulate-latency-ms", "400", "--concurrency", "1"]
    )
    elapsed = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    assert "latency 400 ms" in out.stderr, out.stderr
    assert emulated(out)[0] == 4
    assert elapsed >= 4 * 0.4  # one call at a time, each answered 400 ms late at least


def test_emulate_fail_rate_answers_500s_that_are_retried(tmp_path: Path) -> None:
    # 30% of 30 calls: some fail (all pass with odds 0.7**30, 2e-5), none waits out many back-offs
    manifest = write_manifest(tmp_path / "m.jsonl", one_per_run(30))
    out = run_cli(
        ["upload", str(manifest), "--emulate", "--emulate-fail-rate", "0.3", "--max-attempts", "20"]
    )
    assert out.returncode == 0, out.stderr
    assert "30% of calls answered 500" in out.stderr, out.stderr
    applied, _, failed = emulated(out)
    assert applied == 30 and failed > 0, out.stderr


@pytest.mark.parametrize(
    ("flag", "bad"),
    [("--emulate-rate-limit", "0"), ("--emulate-latency-ms", "-1"), ("--emulate-fail-rate", "2")],
)
def test_emulate_options_have_ranges(tmp_path: Path, flag: str, bad: str) -> None:
    out = run_cli(["upload", "m.jsonl", "--emulate", f"{flag}={bad}"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    assert f"argument {flag}:" in out.stderr, out.stderr
    helped = run_cli(["upload", "--help"], timeout=60)
    assert flag in helped.stdout


# ---- batchlog emulator: a key, a config, and the command -----------------------------------


class Served:
    """`batchlog emulator` as a subprocess; its stderr lines, read on a thread."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = start_cli(["emulator", "--port", "0", *args], cwd=cwd)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def command(self, within: float = 60) -> list[str]:
        """The upload command it printed, split as a shell would."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, "".join(self.seen)
                continue
            self.seen.append(line)
            if line.strip().startswith("batchlog upload "):
                return shlex.split(line)
        raise AssertionError("no upload command printed: " + "".join(self.seen))

    def stop(self, signum: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(10)
            self._reader.join(10)
            while not self.lines.empty():
                self.seen.append(self.lines.get())
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()


def run_printed(command: list[str], manifest: Path) -> subprocess.CompletedProcess[str]:
    assert command[:3] == ["batchlog", "upload", "MANIFEST"], command
    return run_cli(["upload", str(manifest), *command[3:]])


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def applied_items(url: str) -> list[tuple[str, str, str]]:
    with urllib.request.urlopen(url + "/_emulator/applied", timeout=30) as answer:
        doc = orjson.loads(answer.read())
    return [(e["op"], e["run_id"], e["item"]) for e in doc["effects"]]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_command_printed_by_emulator_write_config_uploads(tmp_path: Path, oci: Oci) -> None:
    rehearsal = tmp_path / "rehearsal"
    served = Served("--write-config", str(rehearsal), cwd=tmp_path)
    try:
        command = served.command()
        for name in ("--config-file", "--endpoint", "--platform-id", "--workspace"):
            assert name in command, command
        url = flag(command, "--endpoint")
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url  # loopback only
        config = Path(flag(command, "--config-file"))
        assert config.parent == rehearsal and mode(config) == 0o600
        key_file = Path(re.findall(r"^key_file\s*=\s*(.+)$", config.read_text(), re.M)[0])
        assert key_file.parent == rehearsal and mode(key_file) == 0o600
        assert b"PRIVATE KEY" in key_file.read_bytes()

        records = mixed_records(60, runs=12)
        manifest = write_manifest(tmp_path / "m.jsonl", records)
        out = run_printed(command, manifest)
        assert out.returncode == 0, out.stderr
        applied = applied_items(url)
        assert set(applied) == expected_items(records) and len(applied) == len(set(applied))
        again = run_printed(command, manifest)  # a resume, as for real: nothing sent again
        assert again.returncode == 0, again.stderr
        assert len(applied_items(url)) == len(applied)
        # the rehearsal's checkpoint is not the one the real upload will look for
        assert not (tmp_path / "m.batchlog-checkpoint").exists(), list(tmp_path.iterdir())

        # signatures are verified: another key is refused, as the real service would
        stranger = run_cli(
            [
                "upload",
                str(manifest),
                "--config-file",
                str(oci.config),
                "--endpoint",
                url,
                "--platform-id",
                flag(command, "--platform-id"),
                "--workspace",
                flag(command, "--workspace"),
                "--checkpoint",
                str(tmp_path / "stranger-checkpoint"),
                "--dead-letter",
                str(tmp_path / "stranger-dead-letter"),
            ]
        )
        assert stranger.returncode == 3, stranger.stderr[-2000:]
    finally:
        assert served.stop() == 0, "".join(served.seen)
    assert config.exists() and key_file.exists()  # kept: it was asked for


def test_the_printed_command_works_for_any_manifest_again_and_again(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """Found by review: the printed command named one --checkpoint for every manifest, so a
    second manifest was refused (exit 3), and an empty one run first bound it. Each
    manifest now gets the rehearsal checkpoint --emulate gives it, beside it."""
    rehearsal = tmp_path / "rehearsal"
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    first, second = mixed_records(20, runs=4), [inputs_record("other", f"o{i}") for i in range(5)]
    a = write_manifest(tmp_path / "a.jsonl", first)
    b = write_manifest(tmp_path / "b.jsonl", second)
    served = Served("--write-config", str(rehearsal), cwd=tmp_path)
    try:
        command = served.command()
        url = flag(command, "--endpoint")
        for manifest in (empty, a, b, a, b):  # the second time round: resumed, nothing sent
            out = run_printed(command, manifest)
            assert out.returncode == 0, (manifest.name, out.stderr)
        applied = applied_items(url)
        assert sorted(applied) == sorted(expected_items(first) | expected_items(second))
        dry = run_printed([*command, "--dry-run"], a)  # plans from the same checkpoint
        assert dry.returncode == 0 and "0 to send" in dry.stderr, dry.stderr
        assert str(tmp_path / "a.emulated.batchlog-checkpoint") in dry.stderr, dry.stderr
    finally:
        assert served.stop() == 0, "".join(served.seen)
    # a new session (a new port, a new key): the same command, for old and new manifests
    later = Served("--write-config", str(rehearsal), cwd=tmp_path)
    try:
        command = later.command()
        c = write_manifest(tmp_path / "c.jsonl", [inputs_record("third", "t1")])
        for manifest in (a, c):
            out = run_printed(command, manifest)
            assert out.returncode == 0, (manifest.name, out.stderr)
        third = expected_items([inputs_record("third", "t1")])
        assert sorted(applied_items(flag(command, "--endpoint"))) == sorted(third)
    finally:
        assert later.stop() == 0, "".join(later.seen)
    # none of it is the real upload's checkpoint: that one sends every record
    emu = emulator()
    out = run_cli(upload_args(oci, emu, str(a)))
    assert out.returncode == 0, out.stderr
    assert sorted(applied_items(emu.url)) == sorted(expected_items(first))
    assert (tmp_path / "a.batchlog-checkpoint").exists()


def test_emulator_without_write_config_uses_a_temporary_directory_it_removes(
    tmp_path: Path,
) -> None:
    served = Served(cwd=tmp_path)
    try:
        command = served.command()
        where = Path(flag(command, "--config-file")).parent
        assert where.is_dir() and mode(where) == 0o700
        assert any(str(where) in line for line in served.seen[:-1])  # it says where
        manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(10))
        out = run_printed(command, manifest)
        assert out.returncode == 0, out.stderr
    finally:
        assert served.stop(signal.SIGTERM) == 0, "".join(served.seen)
    assert not where.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # a rehearsal's, as --emulate's
        "m.emulated.batchlog-checkpoint",
        "m.emulated.batchlog-checkpoint.lock",
        "m.jsonl",
    ]


def test_write_config_never_overwrites_a_config_it_did_not_write(tmp_path: Path) -> None:
    theirs = tmp_path / "config"
    theirs.write_text("[DEFAULT]\nuser=ocid1.user.oc1..mine\n")
    out = run_cli(["emulator", "--port", "0", "--write-config", str(tmp_path)], timeout=60)
    assert out.returncode == 2, out.stderr
    assert "--write-config" in out.stderr and "not written by batchlog" in out.stderr
    assert theirs.read_text() == "[DEFAULT]\nuser=ocid1.user.oc1..mine\n"
    # its own, from an earlier session, it writes again (a new key, a new port)
    mine = tmp_path / "mine"
    first = Served("--write-config", str(mine), cwd=tmp_path)
    try:
        old = first.command()
    finally:
        first.stop()
    second = Served("--write-config", str(mine), cwd=tmp_path)
    try:
        new = second.command()
        manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(5))
        assert run_printed(new, manifest).returncode == 0
    finally:
        second.stop()
    assert flag(old, "--config-file") == flag(new, "--config-file")


def test_write_config_and_public_key_do_not_go_together(tmp_path: Path, oci: Oci) -> None:
    out = run_cli(
        ["emulator", "--write-config", str(tmp_path / "d"), "--public-key", str(oci.config)],
        timeout=60,
    )
    assert out.returncode == 2 and "--public-key" in out.stderr, out.stderr
    assert not (tmp_path / "d").exists()


def listening_addresses(port: int) -> list[str]:
    """Local addresses listening on ``port``, from /proc/net/tcp and tcp6 (hex, as there)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            pytest.skip("no /proc/net here")
        with open(table) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.append(address)
    return found


def test_the_emulator_listens_on_loopback_only(tmp_path: Path) -> None:
    served = Served(cwd=tmp_path)
    try:
        url = flag(served.command(), "--endpoint")
        addresses = listening_addresses(int(url.rsplit(":", 1)[1]))
        assert addresses == ["0100007F"], addresses  # 127.0.0.1, little-endian hex
    finally:
        served.stop()


def test_nothing_of_the_key_is_printed(tmp_path: Path) -> None:
    served = Served("--write-config", str(tmp_path / "k"), cwd=tmp_path)
    try:
        served.command()
    finally:
        served.stop()
    key = next((tmp_path / "k").glob("*.pem")).read_text()
    body = "".join(key.splitlines()[1:-1])
    printed = "".join(served.seen)
    assert body[:40] not in printed and "PRIVATE KEY" not in printed, printed
