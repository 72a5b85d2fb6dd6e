"""A malformed OCI config is a usage error that names the file, the profile and the line
numbers at fault, and never echoes the config's text: a private key pasted into it, a stray
passphrase line or a duplicated option's value must not reach the terminal or a CI log."""

from __future__ import annotations

import codecs
import configparser
import locale
from pathlib import Path

import pytest

from batchlog.auth import _ranges, load_credentials
from batchlog.errors import ConfigurationError
from tests.conftest import Oci, model_record, run_cli, write_manifest

PASSPHRASE = "hunter2-correct-horse-battery-staple"


def upload(tmp_path: Path, config: Path, *extra: str) -> tuple[int, str, str]:
    manifest = write_manifest(tmp_path / "m.jsonl", [model_record("r1", 1)])
    done = run_cli(
        [
            "upload",
            str(manifest),
            "--endpoint",
            "http://127.0.0.1:1",
            "--platform-id",
            "p",
            "--workspace",
            "w",
            "--config-file",
            str(config),
            *extra,
        ]
    )
    return done.returncode, done.stdout, done.stderr


def secret_lines(secret: str) -> list[str]:
    return [line.strip() for line in secret.splitlines() if line.strip()]


def assert_nothing_leaked(secret: str, stdout: str, stderr: str) -> None:
    for line in secret_lines(secret):
        assert line not in stdout and line not in stderr, f"{line!r} was shown"
    assert "Traceback" not in stderr


def unparsable_lines(text: str) -> list[int]:
    """The lines configparser reports as not being 'key = value' lines."""
    parser = configparser.ConfigParser(interpolation=None)
    with pytest.raises(configparser.ParsingError) as raised:
        parser.read_string(text)
    return [number for number, _ in raised.value.errors]


def test_a_private_key_pasted_into_the_config_is_not_shown(oci: Oci, tmp_path: Path) -> None:
    key = oci.key_pem.decode()
    text = oci.config.read_text() + key  # pasted below key_file, in [DEFAULT]
    bad = tmp_path / "bad_config"
    bad.write_text(text)
    numbers = unparsable_lines(text)
    assert numbers[0] == 7 and len(numbers) > 10  # the key's lines, most of them

    rc, stdout, stderr = upload(tmp_path, bad)

    assert rc == 2, stderr
    assert_nothing_leaked(key, stdout, stderr)
    assert stderr.strip() == (
        f"batchlog: error: OCI config {bad} [DEFAULT]: lines {_ranges(numbers)} are not "
        "'key = value' lines (a key pasted into the config?)"
    )


def test_a_stray_passphrase_line_is_not_shown(oci: Oci, tmp_path: Path) -> None:
    bad = tmp_path / "bad_config"
    bad.write_text(oci.config.read_text() + f"pass_phrase\n{PASSPHRASE}\n")

    rc, stdout, stderr = upload(tmp_path, bad)

    assert rc == 2, stderr
    assert_nothing_leaked(PASSPHRASE, stdout, stderr)
    assert "lines 7-8 are not 'key = value' lines" in stderr, stderr


def test_a_key_pasted_above_any_section_is_not_shown(oci: Oci, tmp_path: Path) -> None:
    key = oci.key_pem.decode()
    bad = tmp_path / "bad_config"
    bad.write_text(key + oci.config.read_text())

    rc, stdout, stderr = upload(tmp_path, bad)

    assert rc == 2, stderr
    assert_nothing_leaked(key, stdout, stderr)
    assert f"OCI config {bad} [DEFAULT]: line 1 comes before any [section] header" in stderr


def test_a_duplicated_option_names_the_option_not_its_values(oci: Oci, tmp_path: Path) -> None:
    bad = tmp_path / "bad_config"
    bad.write_text(
        oci.config.read_text() + f"pass_phrase = {PASSPHRASE}-one\npass_phrase = {PASSPHRASE}\n"
    )

    rc, stdout, stderr = upload(tmp_path, bad)

    assert rc == 2, stderr
    assert_nothing_leaked(PASSPHRASE, stdout, stderr)
    assert f"OCI config {bad} [DEFAULT]: line 8: pass_phrase is given twice" in stderr, stderr


def test_a_duplicated_section_names_its_line_in_the_chosen_profile(
    oci: Oci, tmp_path: Path
) -> None:
    bad = tmp_path / "bad_config"
    bad.write_text(
        oci.config.read_text()
        + f"[other]\nregion=x\npass_phrase = {PASSPHRASE}\n[other]\nregion=y\n"
    )

    rc, stdout, stderr = upload(tmp_path, bad, "--profile", "other")

    assert rc == 2, stderr
    assert_nothing_leaked(PASSPHRASE, stdout, stderr)
    assert f"OCI config {bad} [other]: line 10: section [other] is given twice" in stderr, stderr


@pytest.mark.skipif(
    codecs.lookup(locale.getpreferredencoding(False)).name != "utf-8",
    reason="configparser reads the config in the locale's encoding",
)
def test_a_config_that_is_not_text_is_a_configuration_error(oci: Oci, tmp_path: Path) -> None:
    bad = tmp_path / "bad_config"
    bad.write_bytes(oci.config.read_bytes() + b"pass_phrase = caf\xe9-" + PASSPHRASE.encode())

    with pytest.raises(ConfigurationError) as raised:
        load_credentials("api_key", str(bad), "DEFAULT")

    assert str(raised.value).startswith(f"OCI config {bad} [DEFAULT]: cannot be read")
    assert PASSPHRASE not in str(raised.value)
    assert raised.value.__suppress_context__
