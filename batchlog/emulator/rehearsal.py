"""A throwaway identity for rehearsing against the emulator: an RSA key and an OCI config
naming it, written where ``batchlog upload --config-file`` can use them as it would a real
one, so that a rehearsal exercises the same path (config, key, signatures) as the real run.

Nothing here is a credential: the key is made on the spot and trusted only by the emulator
that made it. The files are written 0600 (the directory 0700 when made here), and never over
a file this module did not write.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from batchlog.errors import ConfigurationError

MARKER = "# written by batchlog emulator: a throwaway key, trusted by nothing but the emulator"
CONFIG = "config"
KEY = "key.pem"
TENANCY = "ocid1.tenancy.oc1..emulator"
USER = "ocid1.user.oc1..emulator"
# the platform the printed command names: no real one has this id, and an upload to it
# names its checkpoint and dead letter as --emulate does, beside the manifest, apart from the
# real upload's (x.emulated.batchlog-checkpoint), for any manifest
PLATFORM = "ocid1.aidataplatform.oc1..emulator"
WORKSPACE = "emulator"
REGION = "us-ashburn-1"  # any: the upload command names the emulator as --endpoint


@dataclass(frozen=True)
class Identity:
    """A throwaway API key: the key and the keyId its signatures carry."""

    key_id: str  # tenancy/user/fingerprint, as a real API key's
    key: rsa.RSAPrivateKey = field(repr=False)

    @staticmethod
    def new() -> Identity:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return Identity(f"{TENANCY}/{USER}/{fingerprint(key.public_key())}", key)


@dataclass(frozen=True)
class Files:
    """What ``write`` wrote."""

    directory: str
    config: str
    key_file: str


def fingerprint(key: rsa.RSAPublicKey) -> str:
    """The key's fingerprint as OCI shows it: MD5 of the DER public key, aa:bb:..."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ":".join(f"{b:02x}" for b in hashlib.md5(der, usedforsecurity=False).digest())


def write(directory: str, identity: Identity) -> Files:
    """Write ``identity``'s key and an OCI config for it into ``directory`` (made if
    missing). A ConfigurationError naming --write-config if that cannot be done."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigurationError(f"--write-config {directory}: not a directory")
    config, key_file = os.path.join(directory, CONFIG), os.path.join(directory, KEY)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _check_ours(directory, config, key_file)
        pem = identity.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_private(key_file, pem)
        text = (
            f"{MARKER}\n[DEFAULT]\nuser={USER}\nfingerprint={identity.key_id.rsplit('/', 1)[1]}\n"
            f"tenancy={TENANCY}\nregion={REGION}\nkey_file={key_file}\n"
        )
        _write_private(config, text.encode())
    except OSError as exc:
        raise ConfigurationError(
            f"--write-config {directory}: cannot write there: {exc.strerror or exc}"
        ) from None
    return Files(directory, config, key_file)


def _check_ours(directory: str, config: str, key: str) -> None:
    """Refuse to write over a config or key this module did not write: ~/.oci, say."""
    if not os.path.lexists(config) and not os.path.lexists(key):
        return
    try:
        with open(config, "rb") as f:
            ours = f.read(len(MARKER)) == MARKER.encode()
    except OSError:
        ours = False
    if not ours or os.path.islink(config) or os.path.islink(key):
        raise ConfigurationError(
            f"--write-config {directory}: it holds a {CONFIG} or {KEY} not written by batchlog "
            "emulator: give a new or empty directory"
        )


def _write_private(path: str, data: bytes) -> None:
    """Write ``data`` readable by the owner only, whatever the umask or an earlier mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
