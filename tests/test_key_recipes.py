"""Settings cross to another process (a Spark executor) with their credentials as how to load
them: the key source pickles as (auth, config file, profile), is loaded again where it is
unpickled, and the pickle holds no key, passphrase or token. A key given as key material
refuses to pickle, saying how to load it instead."""

from __future__ import annotations

import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from batchlog.auth import load_credentials
from batchlog.emulator import EmulatorThread
from batchlog.errors import ConfigurationError
from batchlog.plan import GroupLimits
from batchlog.retry import RetryPolicy
from batchlog.settings import Settings
from batchlog.signing import KeySource, StaticKey
from batchlog.target import OciTarget
from tests.conftest import (
    KEY_ID,
    PLATFORM,
    WORKSPACE,
    Oci,
    mixed_records,
    write_manifest,
    write_oci_config,
)
from tests.test_auth import FakeSigner, session_profile
from tests.test_upload import StartEmulator, assert_exactly_once

PASSPHRASE = "pickle-passphrase-SECRET-4711"

# What an executor does with the settings it is given: unpickle them, upload, tell the counts.
EXECUTOR = """
import pickle, sys, anyio, orjson, batchlog
settings = pickle.loads(open(sys.argv[1], "rb").read())
report = anyio.run(batchlog.upload, [sys.argv[2]], settings)
print(orjson.dumps({"succeeded": report.succeeded, "exit": report.exit_code}).decode())
"""


@dataclass
class Locked:
    """An OCI config naming a passphrase-encrypted copy of the test's key."""

    config: Path
    key_file: Path
    key_pem: bytes  # the encrypted file's content


@pytest.fixture
def locked(tmp_path: Path, oci: Oci) -> Locked:
    pem = oci.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSPHRASE.encode()),
    )
    config, key_file = write_oci_config(tmp_path, pem, "locked.pem", "locked_config", PASSPHRASE)
    return Locked(config, key_file, pem)


def secrets_in(data: bytes, oci: Oci, locked: Locked) -> list[bytes]:
    """The pieces of key material, passphrase or key file content found in ``data``."""
    pieces = [PASSPHRASE.encode()]
    for pem in (oci.key_pem, locked.key_pem):
        pieces += [line for line in pem.splitlines() if line and b"-----" not in line]
    der = oci.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pieces.append(der[-64:])  # the raw key, however it would be serialized
    return [piece for piece in pieces if piece in data]


def oci_settings(emu: EmulatorThread, tmp_path: Path, keys: KeySource) -> Settings:
    return Settings(
        target=OciTarget(emu.url, PLATFORM, WORKSPACE),
        keys=keys,
        concurrency=4,
        retry=RetryPolicy(max_attempts=3),
        grouping=GroupLimits(max_datasets=7),
        checkpoint=str(tmp_path / "job.batchlog-checkpoint"),
        dead_letter=str(tmp_path / "job.dead-letter.jsonl"),
    )


def test_settings_with_an_api_key_cross_as_a_recipe_and_upload_from_another_process(
    tmp_path: Path, oci: Oci, locked: Locked, emulator: StartEmulator
) -> None:
    emu = emulator()
    creds = load_credentials("api_key", str(locked.config), None)
    settings = oci_settings(emu, tmp_path, creds.keys)
    data = pickle.dumps(settings)
    assert secrets_in(data, oci, locked) == []
    assert str(locked.config).encode() in data  # the recipe: where to load the key from
    (tmp_path / "settings.pickle").write_bytes(data)
    records = mixed_records(30)
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    done = subprocess.run(
        [sys.executable, "-c", EXECUTOR, str(tmp_path / "settings.pickle"), str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"succeeded": 30, "exit": 0}
    assert emu.state.statuses[401] == 0  # every signature verified by the emulator
    assert_exactly_once(emu, records)


def test_the_whole_settings_round_trip(tmp_path: Path, locked: Locked) -> None:
    creds = load_credentials("api_key", str(locked.config), None)
    settings = Settings(
        target=OciTarget("http://127.0.0.1:9", PLATFORM, WORKSPACE),
        keys=creds.keys,
        concurrency=3,
        rate=12.5,
        retry=RetryPolicy(max_attempts=4),
        grouping=GroupLimits(max_datasets=9, max_body=1 << 16),
        timeout=5.0,
        restart=True,
    )
    again = pickle.loads(pickle.dumps(settings))
    assert again.keys is not settings.keys  # loaded again, not carried
    assert again.keys is not None and settings.keys is not None
    assert again.keys.snapshot().key_id == KEY_ID
    public = again.keys.snapshot().private_key.public_key().public_numbers()
    assert public == settings.keys.snapshot().private_key.public_key().public_numbers()
    assert [getattr(again, f) for f in Settings.__dataclass_fields__ if f != "keys"] == [
        getattr(settings, f) for f in Settings.__dataclass_fields__ if f != "keys"
    ]


def test_a_home_relative_config_is_expanded_where_it_is_loaded(
    tmp_path: Path, oci: Oci, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver, executor = tmp_path / "driver", tmp_path / "executor"
    for home in (driver, executor):
        home.mkdir()
        (home / "config").write_text(oci.config.read_text())
    monkeypatch.setenv("HOME", str(driver))
    data = pickle.dumps(load_credentials("api_key", "~/config", None).keys)
    assert b"~/config" in data and str(driver).encode() not in data
    (driver / "config").unlink()  # only the executor's copy is left
    monkeypatch.setenv("HOME", str(executor))
    assert pickle.loads(data).snapshot().key_id == KEY_ID


def test_the_default_config_and_profile_are_named_as_the_driver_resolved_them(
    tmp_path: Path, oci: Oci, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OCI_CONFIG_FILE", str(oci.config))
    monkeypatch.setenv("OCI_CLI_PROFILE", "DEFAULT")
    data = pickle.dumps(load_credentials("api_key", None, None).keys)
    monkeypatch.delenv("OCI_CONFIG_FILE")  # an executor without the driver's environment
    monkeypatch.delenv("OCI_CLI_PROFILE")
    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))
    assert pickle.loads(data).snapshot().key_id == KEY_ID


def test_a_key_given_as_key_material_refuses_to_pickle_saying_what_to_do(
    tmp_path: Path, oci: Oci
) -> None:
    settings = Settings(target=OciTarget("http://127.0.0.1:9", PLATFORM, WORKSPACE), keys=None)
    pickle.loads(pickle.dumps(settings))  # no keys: nothing to load
    keyed = Settings(target=settings.target, keys=StaticKey(KEY_ID, oci.key))
    with pytest.raises(ConfigurationError) as raised:
        pickle.dumps(keyed)
    message = str(raised.value)
    assert "\n" not in message
    assert "StaticKey" in message
    assert "batchlog.auth.load_credentials(" in message
    assert "executors can load it again" in message
    assert KEY_ID not in message


@pytest.mark.parametrize("change", ["config-removed", "key-removed", "wrong-passphrase"])
def test_a_config_changed_before_loading_gives_load_credentials_own_error(
    locked: Locked, change: str
) -> None:
    data = pickle.dumps(load_credentials("api_key", str(locked.config), None).keys)
    if change == "config-removed":
        locked.config.unlink()
    elif change == "key-removed":
        locked.key_file.unlink()
    else:
        locked.config.write_text(locked.config.read_text().replace(PASSPHRASE, "not-it"))
    with pytest.raises(ConfigurationError) as direct:
        load_credentials("api_key", str(locked.config), None)
    with pytest.raises(ConfigurationError) as loaded:
        pickle.loads(data)
    assert str(loaded.value) == str(direct.value)
    assert PASSPHRASE not in str(loaded.value)


def test_a_session_token_crosses_as_a_recipe_and_is_read_again(tmp_path: Path, oci: Oci) -> None:
    config = session_profile(tmp_path, "tok-PICKLE-SECRET-1")
    keys = load_credentials("security_token", str(config), None).keys
    data = pickle.dumps(keys)
    assert b"tok-PICKLE-SECRET" not in data
    assert not [line for line in oci.key_pem.splitlines()[1:-1] if line in data]
    (tmp_path / "token").write_text("tok-PICKLE-SECRET-2")  # refreshed in the meantime
    again = pickle.loads(data)
    assert again.refreshable
    assert again.snapshot().key_id == "ST$tok-PICKLE-SECRET-2"


@pytest.mark.parametrize("auth", ["instance_principal", "resource_principal"])
def test_a_principal_crosses_as_its_kind_and_asks_for_a_token_again(
    monkeypatch: pytest.MonkeyPatch, auth: str
) -> None:
    import oci.auth.signers

    made: list[FakeSigner] = []

    def signer() -> FakeSigner:
        made.append(FakeSigner())
        return made[-1]

    monkeypatch.setattr(oci.auth.signers, "InstancePrincipalsSecurityTokenSigner", signer)
    monkeypatch.setattr(oci.auth.signers, "get_resource_principals_signer", signer)
    keys = load_credentials(auth, None, None).keys
    data = pickle.dumps(keys)
    assert b"token-0" not in data
    again = pickle.loads(data)
    assert len(made) == 2  # asked the principal again
    assert again.snapshot().key_id == "ST$token-0"


def test_a_principal_without_a_recipe_refuses_to_pickle() -> None:
    from batchlog.auth import SessionTokenKeys, _PrincipalKeys

    for keys in (_PrincipalKeys(FakeSigner()), SessionTokenKeys("t", "tok", None)):  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"load_credentials\("):
            pickle.dumps(keys)


def test_a_relative_config_stays_relative(
    tmp_path: Path, locked: Locked, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the recipe names the config as given: relative to the executor's working directory
    monkeypatch.chdir(tmp_path)
    keys = load_credentials("api_key", "locked_config", None).keys
    data = pickle.dumps(keys)
    assert b"locked_config" in data and str(tmp_path).encode() not in data
