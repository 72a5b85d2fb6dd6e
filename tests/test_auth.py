"""A malformed OCI config is a usage error that names the file, the profile and the line
numbers at fault, and never echoes the config's text: a private key pasted into it, a stray
passphrase line or a duplicated option's value must not reach the terminal or a CI log."""

from __future__ import annotations

import builtins
import configparser
import errno
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from batchlog.auth import _ranges, load_credentials
from batchlog.errors import ConfigurationError
from tests.conftest import (
    FINGERPRINT,
    KEY_ID,
    TENANCY,
    USER,
    Oci,
    model_record,
    run_cli,
    write_manifest,
)

PASSPHRASE = "hunter2-correct-horse-battery-staple"


def upload(tmp_path: Path, config: Path, *extra: str, timeout: float = 120) -> tuple[int, str, str]:
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
        ],
        timeout=timeout,
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


# ---- every config, key and passphrase problem: exit 2, the line, the reason, no content ----


def rsa_pem(key: rsa.RSAPrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = serialization.NoEncryption()
    if passphrase is not None:
        encryption = serialization.BestAvailableEncryption(passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def api_key_config(tmp_path: Path, key_file: str, *more: str) -> Path:
    """An api_key profile: user (line 2), fingerprint (3), tenancy (4), region (5),
    key_file (6), then ``more`` from line 7 on."""
    config = tmp_path / "config"
    config.write_text(
        f"[DEFAULT]\nuser={USER}\nfingerprint={FINGERPRINT}\ntenancy={TENANCY}\n"
        f"region=us-ashburn-1\nkey_file={key_file}\n" + "".join(line + "\n" for line in more)
    )
    return config


def config_error(config: Path, *extra: str, timeout: float = 120) -> str:
    """The one line an upload prints for a broken OCI config (exit 2, no traceback)."""
    rc, stdout, stderr = upload(config.parent, config, *extra, timeout=timeout)
    assert rc == 2, stderr
    assert "Traceback" not in stderr and stdout == ""
    errors = [line for line in stderr.splitlines() if line.startswith("batchlog: error: ")]
    assert len(errors) == 1, stderr
    return errors[0].removeprefix("batchlog: error: ")


def test_a_passphrase_on_a_line_without_equals_is_not_shown(oci: Oci, tmp_path: Path) -> None:
    config = api_key_config(tmp_path, "/nonexistent", f"pass_phrase  {PASSPHRASE}")
    message = config_error(config)
    assert message == (
        f"OCI config {config} [DEFAULT]: line 7 is not a 'key = value' line "
        "(a key pasted into the config?)"
    )


def test_key_content_in_a_config_file_names_its_line_not_its_value(
    oci: Oci, tmp_path: Path
) -> None:
    key_file = tmp_path / "oci_api_key.pem"
    config = api_key_config(tmp_path, str(key_file), "key_content=" + PASSPHRASE)
    message = config_error(config)
    assert message == (
        f"OCI config {config} [DEFAULT]: line 7: key_content cannot be given in a config "
        "file: give key_file"
    )


def test_a_key_file_that_is_not_a_key(oci: Oci, tmp_path: Path) -> None:
    key_file = tmp_path / "not_a_key.pem"
    key_file.write_text(f"just some text {PASSPHRASE}\n")
    message = config_error(api_key_config(tmp_path, str(key_file)))
    assert message.endswith(f"line 6: key_file {key_file} is not a PEM private key")
    assert PASSPHRASE not in message


def test_a_public_key_given_as_the_key_file(oci: Oci, tmp_path: Path) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(
        oci.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    message = config_error(api_key_config(tmp_path, str(key_file)))
    assert message.endswith(f"line 6: key_file {key_file} is a public key: give the private key"), (
        message
    )


def test_an_encrypted_key_without_a_passphrase(oci: Oci, tmp_path: Path) -> None:
    key_file = tmp_path / "encrypted.pem"
    key_file.write_bytes(rsa_pem(oci.key, PASSPHRASE.encode()))
    key_file.chmod(0o600)
    message = config_error(api_key_config(tmp_path, str(key_file)))
    assert message.endswith(
        f"line 6: key_file {key_file} is encrypted: set pass_phrase in the profile"
    ), message


def test_an_encrypted_key_with_the_wrong_passphrase(oci: Oci, tmp_path: Path) -> None:
    key_file = tmp_path / "encrypted.pem"
    key_file.write_bytes(rsa_pem(oci.key, PASSPHRASE.encode()))
    key_file.chmod(0o600)
    config = api_key_config(tmp_path, str(key_file), f"pass_phrase = wrong-{PASSPHRASE}")
    message = config_error(config)
    assert message == (
        f"OCI config {config} [DEFAULT]: line 7: pass_phrase does not decrypt key_file {key_file}"
    ), message
    assert_nothing_leaked(PASSPHRASE, message, "")


def test_an_encrypted_key_with_the_right_passphrase_loads(oci: Oci, tmp_path: Path) -> None:
    key_file = tmp_path / "encrypted.pem"
    key_file.write_bytes(rsa_pem(oci.key, PASSPHRASE.encode()))
    key_file.chmod(0o600)
    config = api_key_config(tmp_path, str(key_file), f"pass_phrase = {PASSPHRASE}")
    keys = load_credentials("api_key", str(config), None).keys
    snapshot = keys.snapshot()
    assert snapshot.key_id == KEY_ID
    assert snapshot.private_key.private_numbers() == oci.key.private_numbers()


@pytest.mark.parametrize("field", ["user", "fingerprint", "tenancy", "key_file"])
def test_a_missing_field_is_named(oci: Oci, tmp_path: Path, field: str) -> None:
    config = api_key_config(tmp_path, str(tmp_path / "oci_api_key.pem"))
    config.write_text(
        "".join(
            line + "\n"
            for line in config.read_text().splitlines()
            if "=" not in line or not line.startswith(field + "=")
        )
    )
    message = config_error(config)
    assert message == f"OCI config {config} [DEFAULT]: {field} is missing", message


def test_a_malformed_fingerprint_names_its_line(oci: Oci, tmp_path: Path) -> None:
    config = api_key_config(tmp_path, str(tmp_path / "oci_api_key.pem"))
    config.write_text(config.read_text().replace(FINGERPRINT, "aa:bb"))
    message = config_error(config)
    assert message == (
        f"OCI config {config} [DEFAULT]: line 3: fingerprint is malformed (expected 16 "
        "pairs of hex digits, aa:bb:...)"
    ), message


def test_a_key_file_that_does_not_exist_is_named_by_its_line_only(oci: Oci, tmp_path: Path) -> None:
    # a value that is no file may be anything pasted there: it is not echoed
    config = api_key_config(tmp_path, f"/no/such/dir/{PASSPHRASE}.pem")
    message = config_error(config)
    assert message == f"OCI config {config} [DEFAULT]: line 6: key_file: no such file"


def test_a_key_file_that_is_a_directory(oci: Oci, tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    directory.mkdir()
    config = api_key_config(tmp_path, str(directory))
    message = config_error(config)
    assert message == (
        f"OCI config {config} [DEFAULT]: line 6: key_file {directory} is a directory"
    ), message


def unreadable(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000; as root (who reads anything) opening it fails the same way."""
    path.chmod(0)
    if os.geteuid() == 0:
        real_open = builtins.open

        def refusing_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if os.fspath(file) == str(path):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)


def test_an_unreadable_config(oci: Oci, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unreadable(oci.config, monkeypatch)
    with pytest.raises(ConfigurationError) as raised:
        load_credentials("api_key", str(oci.config), None)
    assert str(raised.value) == (
        f"OCI config {oci.config} [DEFAULT]: cannot be read (Permission denied)"
    )


def test_an_unreadable_key_file(oci: Oci, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "oci_api_key.pem"
    unreadable(key_file, monkeypatch)
    with pytest.raises(ConfigurationError) as raised:
        load_credentials("api_key", str(oci.config), None)
    assert str(raised.value) == (
        f"OCI config {oci.config} [DEFAULT]: line 6: key_file {key_file} cannot be read "
        "(Permission denied)"
    )
    assert raised.value.__suppress_context__


def test_a_config_that_is_not_utf8_names_the_line(oci: Oci, tmp_path: Path) -> None:
    bad = tmp_path / "bad_config"
    bad.write_bytes(oci.config.read_bytes() + b"pass_phrase = caf\xe9-" + PASSPHRASE.encode())
    message = config_error(bad)
    assert message == f"OCI config {bad} [DEFAULT]: cannot be read: line 7 is not UTF-8 text"


def test_a_config_that_is_a_directory(oci: Oci, tmp_path: Path) -> None:
    directory = tmp_path / "configdir"
    directory.mkdir()
    message = config_error(directory)
    assert message.startswith(f"OCI config {directory}: is a directory"), message


def test_a_session_token_profile_without_a_key_file(oci: Oci, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok")
    config = tmp_path / "config"
    config.write_text(f"[DEFAULT]\ntenancy={TENANCY}\nsecurity_token_file={token}\n")
    message = config_error(config, "--auth", "security_token")
    assert message == f"OCI config {config} [DEFAULT]: key_file is missing", message


def test_a_field_on_an_indented_line_names_the_line(oci: Oci, tmp_path: Path) -> None:
    """configparser reads an indented line as part of the value above it: the field it
    holds is missing, and the message says why."""
    key_file = tmp_path / "oci_api_key.pem"
    config = tmp_path / "config"
    lines = [f"user={USER}", f"fingerprint={FINGERPRINT}", f"tenancy={TENANCY}"]
    config.write_text(
        "[DEFAULT]\n" + "\n".join(lines) + f"\nregion=us-ashburn-1\n\tkey_file = {key_file}\n"
    )
    message = config_error(config)
    assert message == (
        f"OCI config {config} [DEFAULT]: key_file is missing: line 6 is indented, so it is "
        "read as part of line 5 (region): remove the indentation"
    ), message
    assert str(key_file) not in message
    config.write_text(  # below an option that is checked first: its line is named too
        f"[DEFAULT]\nuser={USER}\n  fingerprint={FINGERPRINT}\ntenancy={TENANCY}\n"
        f"key_file={key_file}\n"
    )
    message = config_error(config)
    assert message == (
        f"OCI config {config} [DEFAULT]: line 2: user is malformed (expected an OCID, "
        "ocid1.user.oc1...): line 3 is indented, so it is read as part of line 2 (user): "
        "remove the indentation"
    ), message
    assert FINGERPRINT not in message


# ---- what must be a small regular file: never a FIFO, a device or a huge file --------------

NOT_REGULAR = "is not a regular file (a pipe or a device?)"


def no_files(tmp_path: Path, limit: str, what: str) -> dict[str, tuple[Path, str]]:
    """A FIFO with no writer (opening it would wait forever), /dev/zero (reading it never
    ends) and a sparse file one byte over ``limit`` ("1 MiB")."""
    fifo = tmp_path / f"fifo-{what.replace(' ', '-')}"
    os.mkfifo(fifo)
    huge = tmp_path / f"huge-{what.replace(' ', '-')}"
    number, unit = limit.split()
    with open(huge, "wb") as f:
        f.truncate(int(number) * {"KiB": 1 << 10, "MiB": 1 << 20}[unit] + 1)
    return {
        "fifo": (fifo, NOT_REGULAR),
        "device": (Path("/dev/zero"), NOT_REGULAR),
        "huge": (huge, f"is larger than {limit}: not {what}"),
    }


def test_a_config_file_that_is_a_fifo_a_device_or_huge(oci: Oci, tmp_path: Path) -> None:
    for case, (path, reason) in no_files(tmp_path, "1 MiB", "an OCI config").items():
        message = config_error(path, timeout=30)
        assert message == f"OCI config {path} [DEFAULT]: {reason}", (case, message)


def test_a_key_file_that_is_a_fifo_a_device_or_huge(oci: Oci, tmp_path: Path) -> None:
    for case, (path, reason) in no_files(tmp_path, "64 KiB", "a key").items():
        config = api_key_config(tmp_path, str(path))
        message = config_error(config, timeout=30)
        assert message == f"OCI config {config} [DEFAULT]: line 6: key_file {path} {reason}", (
            case,
            message,
        )


def test_a_token_file_that_is_a_fifo_a_device_or_huge(oci: Oci, tmp_path: Path) -> None:
    config = session_profile(tmp_path, "tok")
    for case, (path, reason) in no_files(tmp_path, "64 KiB", "a token").items():
        config.write_text(config.read_text().replace(str(tmp_path / "token"), str(path)))
        message = config_error(config, "--auth", "security_token", timeout=30)
        assert message == (
            f"OCI config {config} [DEFAULT]: line 5: the security token file {path} {reason}"
        ), (case, message)
        config.write_text(config.read_text().replace(str(path), str(tmp_path / "token")))


def test_a_token_file_replaced_by_a_fifo_keeps_the_token_without_waiting(
    oci: Oci, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = load_credentials("security_token", str(session_profile(tmp_path, "tok-A")), None).keys
    token = tmp_path / "token"
    for case, (path, reason) in no_files(tmp_path, "64 KiB", "a token").items():
        token.unlink()
        token.symlink_to(path)
        refresher = threading.Thread(target=keys.refresh, daemon=True)
        refresher.start()
        refresher.join(20)
        hung = refresher.is_alive()
        if hung and case == "fifo":  # let it go: end the test, not hang
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            refresher.join(10)
        assert not hung, case
        assert keys.snapshot().key_id == "ST$tok-A", case
        assert reason in caplog.text, (case, caplog.text)


# ---- session tokens: a token that cannot be a header is a configuration error -------------


def session_profile(tmp_path: Path, token: str) -> Path:
    (tmp_path / "token").write_text(token)
    config = tmp_path / "session_config"
    config.write_text(
        f"[DEFAULT]\ntenancy={TENANCY}\nregion=us-ashburn-1\n"
        f"key_file={tmp_path / 'oci_api_key.pem'}\nsecurity_token_file={tmp_path / 'token'}\n"
    )
    return config


@pytest.mark.parametrize("token", ["tok-SECRET-1\ninjected: yes", "tok-SECRET-2\r\x00x"])
def test_a_token_with_control_characters_is_refused_unseen(
    oci: Oci, tmp_path: Path, token: str
) -> None:
    config = session_profile(tmp_path, token)
    message = config_error(config, "--auth", "security_token")
    assert message == (
        f"OCI config {config} [DEFAULT]: line 5: the security token file "
        f"{tmp_path / 'token'} holds line breaks, spaces or control characters: it is not "
        "a token (run 'oci session authenticate')"
    ), message
    assert "tok-SECRET" not in message


def test_a_refreshed_token_with_control_characters_keeps_the_token(
    oci: Oci, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = load_credentials("security_token", str(session_profile(tmp_path, "tok-A")), None).keys
    (tmp_path / "token").write_text("tok-B-SECRET\nx")
    keys.refresh()
    assert keys.snapshot().key_id == "ST$tok-A"
    assert "control characters" in caplog.text and "tok-B-SECRET" not in caplog.text


# ---- nothing holding a secret shows it --------------------------------------------------


def test_no_repr_or_str_shows_a_secret(oci: Oci, tmp_path: Path) -> None:
    from batchlog.auth import _PrincipalKeys
    from batchlog.settings import Settings
    from batchlog.signing import KeySnapshot, StaticKey
    from batchlog.target import MlflowTarget

    token = "tok-REPR-SECRET"
    creds = load_credentials("security_token", str(session_profile(tmp_path, token)), None)
    principal = _PrincipalKeys(FakeSigner())
    mlflow = MlflowTarget("https://mlflow.example", authorization=f"Bearer {token}")
    objects: list[object] = [
        creds,
        creds.keys,
        creds.keys.snapshot(),
        StaticKey(f"ST${token}", oci.key),
        KeySnapshot(f"ST${token}", oci.key, 3),
        principal,
        principal.snapshot(),
        mlflow,
        Settings(target=mlflow, keys=creds.keys),
    ]
    for obj in objects:
        for text in (repr(obj), str(obj), f"{obj}"):
            assert token not in text and "SECRET" not in text, text
            assert "PRIVATE KEY" not in text and "BEGIN" not in text, text


# ---- principals: one snapshot, one refresh per burst ----------------------------------------


class FakeSigner:
    """Like oci's token signers: ``api_key`` and ``private_key`` attributes, re-read by
    ``_reset_signers``; ``refresh_security_token`` fetches a new token and a new session key
    one after the other (the two attributes are never changed together). ``pause`` holds a
    refresh between the two until ``proceed`` is set."""

    def __init__(self) -> None:
        self.keys = [object() for _ in range(20)]  # key n belongs to token n
        self.refreshes = 0
        self.api_key = "ST$token-0"
        self.private_key: object = self.keys[0]
        self.pause = False
        self.halfway = threading.Event()
        self.proceed = threading.Event()

    def _reset_signers(self) -> None:
        return None

    def refresh_security_token(self) -> None:
        self.refreshes += 1
        n = self.refreshes
        self.api_key = f"ST$token-{n}"
        if self.pause:
            self.halfway.set()
            assert self.proceed.wait(10)
        self.private_key = self.keys[n]

    def matches(self, key_id: str, key: object) -> bool:
        return key is self.keys[int(key_id.rsplit("-", 1)[1])]


def test_a_principal_never_hands_out_a_token_with_another_token_s_key() -> None:
    from batchlog.auth import _PrincipalKeys

    signer = FakeSigner()
    keys = _PrincipalKeys(signer)
    signer.pause = True
    refresher = threading.Thread(target=keys.refresh, args=(0,))
    refresher.start()
    assert signer.halfway.wait(10)  # the new token is in, its key not yet
    seen: list[Any] = []
    reader = threading.Thread(target=lambda: seen.append(keys.snapshot()))
    reader.start()
    reader.join(0.5)  # room for a reader that does not wait for the refresh to finish
    signer.proceed.set()
    refresher.join(10)
    reader.join(10)
    assert not refresher.is_alive() and not reader.is_alive()
    (snapshot,) = seen
    assert signer.matches(snapshot.key_id, snapshot.private_key), snapshot.key_id
    assert keys.snapshot().generation == 1


def test_one_refresh_serves_a_burst_of_401s() -> None:
    from batchlog.auth import _PrincipalKeys

    signer = FakeSigner()
    keys = _PrincipalKeys(signer)
    callers = 8
    start = threading.Barrier(callers, timeout=10)

    def signed_then_refused() -> None:
        seen = keys.snapshot().generation  # the request was signed with this
        start.wait()  # ... and every request got its 401 at about the same time
        keys.refresh(seen)

    threads = [threading.Thread(target=signed_then_refused) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert signer.refreshes == 1
    snapshot = keys.snapshot()
    assert snapshot.generation == 1 and signer.matches(snapshot.key_id, snapshot.private_key)
    keys.refresh(1)  # a 401 on the new token: refreshed again
    assert signer.refreshes == 2 and keys.snapshot().generation == 2


def test_one_session_token_read_serves_a_burst_of_401s(
    oci: Oci, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batchlog")
    keys = load_credentials("security_token", str(session_profile(tmp_path, "tok-1")), None).keys
    (tmp_path / "token").write_text("tok-2")  # 'oci session refresh' in another terminal
    callers = 8
    start = threading.Barrier(callers, timeout=10)

    def signed_then_refused() -> None:
        seen = keys.snapshot().generation
        start.wait()
        keys.refresh(seen)

    threads = [threading.Thread(target=signed_then_refused) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert caplog.text.count("security token read again") == 1, caplog.text
    assert keys.snapshot().key_id == "ST$tok-2" and keys.snapshot().generation == 1


def test_one_refresh_serves_a_burst_of_401s_in_an_upload(
    oci: Oci, tmp_path: Path, emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Every request of the first wave is signed with a token the server no longer takes:
    each gets a 401, and the token file is read again once, not once per request."""
    import anyio

    import batchlog
    from tests.conftest import PLATFORM, WORKSPACE, mixed_records

    caplog.set_level(logging.INFO, logger="batchlog")
    keys = load_credentials("security_token", str(session_profile(tmp_path, "tok-1")), None).keys
    (tmp_path / "token").write_text("tok-2")
    emu = emulator(key_id="ST$tok-2", latency=0.05)
    records = mixed_records(40, runs=40)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    settings = batchlog.Settings(
        target=batchlog.OciTarget(emu.url, PLATFORM, WORKSPACE),
        keys=keys,
        concurrency=8,
        adaptive=False,  # eight requests out at once, all with the stale token
    )
    report = anyio.run(batchlog.upload, [str(manifest)], settings)
    assert report.exit_code == 0 and report.succeeded == 40
    assert emu.state.statuses[401] >= 2  # a burst of refusals ...
    assert caplog.text.count("security token read again") == 1  # ... one refresh
