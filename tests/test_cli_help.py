"""Errors that help (issue 10, item 7): a usage error is the one line that matters and where
the help is, every missing required flag is named at once, every flag's help says its
default, a profile that is not in the config lists those that are (names only), and an empty
manifest is "nothing to upload" (exit 0), not a summary of zeros. The CLI runs as a user
runs it: a separate process."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from batchlog.cli import build_parser
from batchlog.emulator import EmulatorThread
from tests.conftest import Oci, mixed_records, run_cli, upload_args, write_manifest

StartEmulator = Callable[..., EmulatorThread]


@pytest.fixture(autouse=True)
def _no_target_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BATCHLOG_PLATFORM_ID", "BATCHLOG_WORKSPACE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# ---- usage errors: one line, and where the help is ----------------------------------------


@pytest.mark.parametrize(
    ("argv", "message", "command"),
    [
        (["upload", "m.jsonl", "--bogus"], "unrecognized arguments: --bogus", "upload"),
        (["-v", "upload", "m.jsonl", "--bogus"], "unrecognized arguments: --bogus", "upload"),
        (["upload", "m.jsonl", "--concurrency", "0"], "argument --concurrency:", "upload"),
        (["upload", "m.jsonl", "--auth", "nope"], "argument --auth: invalid choice", "upload"),
        (["verify", "--concurrency", "x"], "argument --concurrency:", "verify"),
        (["validate"], "MANIFEST", "validate"),
        (["status"], "CHECKPOINT", "status"),
        (["emulator", "--port", "-5"], "argument --port:", "emulator"),
        (["frob"], "invalid choice: 'frob'", ""),
        ([], "give a command: upload, verify, validate, status, emulator or export", ""),
    ],
)
def test_a_usage_error_is_one_line_and_where_the_help_is(
    tmp_path: Path, argv: list[str], message: str, command: str
) -> None:
    out = run_cli(argv, cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = lines_of(out.stderr)
    assert len(lines) == 2, out.stderr  # no usage block above them
    assert lines[0].startswith("batchlog: error: ") and message in lines[0], out.stderr
    where = f"batchlog {command} --help" if command else "batchlog --help"
    assert lines[1] == f"see '{where}'", out.stderr
    assert out.stdout == ""
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_misspelt_flag_is_named_with_the_flag_it_resembles(tmp_path: Path) -> None:
    out = run_cli(["upload", "m.jsonl", "--plaform-id", "p"], cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    first = lines_of(out.stderr)[0]
    assert "unrecognized arguments: --plaform-id (and 1 value)" in first
    assert "did you mean --platform-id?" in first, out.stderr


def test_the_value_of_a_misspelt_flag_is_never_echoed(tmp_path: Path) -> None:
    secret = "hunter2-never-shown"
    for argv in (
        ["upload", "m.jsonl", "--emulate", "--pass-phrase", secret],
        ["upload", "m.jsonl", "--emulate", f"--tracking-url=https://alice:{secret}@h"],
        ["status", "c", f"https://alice:{secret}@h"],
    ):
        out = run_cli(argv, cwd=tmp_path, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "unrecognized arguments: " in out.stderr and secret not in out.stderr, argv


# ---- every missing required flag at once --------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "named", "command"),
    [
        (["upload", "m.jsonl"], ["--platform-id", "--workspace"], "upload"),
        (["upload"], ["MANIFEST", "--platform-id", "--workspace"], "upload"),
        (["upload", "--emulate"], ["MANIFEST"], "upload"),
        (["upload", "m.jsonl", "--target", "mlflow"], ["--tracking-uri"], "upload"),
        (["verify", "--target", "mlflow"], ["MANIFEST", "--tracking-uri"], "verify"),
        (["upload", "m.jsonl", "--emulate-latency-ms", "5"], ["--emulate"], "upload"),
    ],
)
def test_every_missing_required_flag_is_named_in_one_line(
    tmp_path: Path, argv: list[str], named: list[str], command: str
) -> None:
    write_manifest(tmp_path / "m.jsonl", mixed_records(3))
    out = run_cli(argv, cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stderr
    lines = lines_of(out.stderr)
    assert len(lines) == 2, out.stderr
    for name in named:
        assert name in lines[0], (name, out.stderr)
    assert lines[1] == f"see 'batchlog {command} --help'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # nothing written


def test_a_required_flag_from_the_environment_is_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHLOG_PLATFORM_ID", "ocid1.aidataplatform.oc1..x")
    out = run_cli(["upload", str(tmp_path / "m.jsonl")], cwd=tmp_path, timeout=60)
    assert out.returncode == 2
    first = lines_of(out.stderr)[0]
    assert "--workspace" in first and "--platform-id" not in first, out.stderr


# ---- help texts ----------------------------------------------------------------------------


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_flag_has_a_help_text_and_every_value_flag_its_default() -> None:
    for command, parser in subparsers().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, (command, name)
            if action.dest == "log_file":  # the output flags' own help (issue 10, item 5)
                continue
            takes_value = action.option_strings and action.nargs != 0
            if takes_value:  # a value flag says what happens without it
                assert "default" in action.help, (command, name, action.help)
            if takes_value and action.default not in (None, False, argparse.SUPPRESS):
                # the default shown is the default used: argparse fills it in
                assert "%(default)" in action.help, (command, name, action.help)


@pytest.mark.parametrize(
    ("command", "flag", "shown"),
    [
        ("upload", "--max-attempts", "default: 8"),
        ("upload", "--auth", "default: api_key"),
        ("upload", "--dead-letter", "default:"),
        ("upload", "--concurrency", "default: 32; 1 to 4096"),
        ("upload", "--timeout", "default: 60;"),
        ("verify", "--concurrency", "default: 16;"),
        ("emulator", "--port", "default: 8080;"),
        ("emulator", "--latency-ms", "default: 0;"),
    ],
)
def test_help_shows_the_default(command: str, flag: str, shown: str) -> None:
    out = run_cli([command, "--help"], timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    after = text[text.index(f" {flag} ") :]
    assert shown in after[:400], after[:400]


def test_upload_help_starts_with_a_short_usage() -> None:
    out = run_cli(["upload", "--help"], timeout=60)
    assert out.stdout.startswith("usage: batchlog upload [options] MANIFEST [MANIFEST ...]\n")


# ---- a profile that is not there -----------------------------------------------------------


def test_a_profile_that_is_not_there_lists_the_profiles_that_are(tmp_path: Path, oci: Oci) -> None:
    secret = "hunter2-never-shown"
    config = tmp_path / "config"
    config.write_text(
        oci.config.read_text()
        + f"\n[dev]\npass_phrase={secret}\nregion=eu-frankfurt-1\n[prod-ashburn]\nregion=x\n"
    )
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(3))
    out = run_cli(
        [
            "upload",
            str(manifest),
            "--config-file",
            str(config),
            "--profile",
            "NOPE",
            "--platform-id",
            "p",
            "--workspace",
            "w",
            "--endpoint",
            "http://127.0.0.1:1",
        ]
    )
    assert out.returncode == 2, out.stderr
    lines = lines_of(out.stderr)
    assert len(lines) == 1, out.stderr
    assert "profile 'NOPE' not found" in lines[0]
    assert "profiles in it: DEFAULT, dev, prod-ashburn" in lines[0], out.stderr
    for value in (secret, "eu-frankfurt-1", "us-ashburn-1", "ocid1"):
        assert value not in out.stderr


def test_a_config_without_profiles_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("# nothing yet\n")
    out = run_cli(
        [
            "upload",
            "m.jsonl",
            "--config-file",
            str(config),
            "--profile",
            "dev",
            "--platform-id",
            "p",
            "--workspace",
            "w",
            "--endpoint",
            "http://127.0.0.1:1",
        ],
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "it has no profiles" in out.stderr, out.stderr


# ---- an empty manifest ---------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\r\n"])
def test_an_empty_manifest_is_nothing_to_upload(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, content: bytes
) -> None:
    emu = emulator()
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(content)
    for argv in (upload_args(oci, emu, str(manifest)), ["upload", str(manifest), "--emulate"]):
        out = run_cli(argv)
        assert out.returncode == 0, out.stderr
        assert "nothing to upload" in out.stderr, out.stderr
        assert f"{manifest} holds no records" in out.stderr, out.stderr
        assert "0 records" not in out.stderr and "0 succeeded" not in out.stderr, out.stderr
    assert sum(emu.state.statuses.values()) == 0


def test_an_empty_stdin_is_nothing_to_upload(tmp_path: Path) -> None:
    out = run_cli(["upload", "-", "--emulate"], input="\n", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "nothing to upload: <stdin> holds no records" in out.stderr, out.stderr
    assert "0 succeeded" not in out.stderr


def test_validate_of_an_empty_manifest_says_no_records(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"\n \n")
    (tmp_path / "b.jsonl").write_bytes(b"")
    out = run_cli(["validate", "a.jsonl", "b.jsonl"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert lines_of(out.stderr) == ["batchlog: no records in a.jsonl, b.jsonl"], out.stderr


def test_a_manifest_with_records_still_gets_its_summary(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(3))
    out = run_cli(["upload", str(manifest), "--emulate"])
    assert out.returncode == 0, out.stderr
    assert "nothing to upload" not in out.stderr
