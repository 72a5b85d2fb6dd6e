"""OCI HTTP request signatures (draft-cavage, rsa-sha256), made directly with `cryptography`.

No `requests.Request` is built: the signing string is formatted from the parts batchlog
already has, and the key, key id and header list are reused for every request.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from email.utils import formatdate
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

SIGNED_HEADERS = "date (request-target) host content-length content-type x-content-sha256"
GET_SIGNED_HEADERS = "date (request-target) host"  # OCI signs a GET (no body) with these
_PADDING = padding.PKCS1v15()
_HASH = hashes.SHA256()


class KeySource(Protocol):
    """Where the signing key and its id come from (an API key, or a principal's token)."""

    @property
    def refreshable(self) -> bool:
        """True for token-based principals, which can fetch a fresh token after a 401."""
        ...

    def current(self) -> tuple[str, RSAPrivateKey]:
        """The key id and key to sign with now. May block (a token refresh): call in a thread."""
        ...

    def refresh(self) -> None:
        """Fetch a fresh token (principals only). Blocking."""
        ...


@dataclass(frozen=True, slots=True)
class StaticKey:
    """An API key, or any key whose id does not change."""

    key_id: str
    private_key: RSAPrivateKey

    @property
    def refreshable(self) -> bool:
        return False

    def current(self) -> tuple[str, RSAPrivateKey]:
        return self.key_id, self.private_key

    def refresh(self) -> None:
        return None

    def __repr__(self) -> str:  # never show the key, nor a security token ("ST$<token>")
        if self.key_id.startswith("ST$"):
            return "StaticKey(key_id='ST$...')"
        return f"StaticKey(key_id={self.key_id.split('/')[-1]!r}...)"


def http_date() -> str:
    return formatdate(usegmt=True)


def signing_string(date: str, path: str, host: str, length: int, body_sha256: str) -> bytes:
    return (
        f"date: {date}\n(request-target): post {path}\nhost: {host}\n"
        f"content-length: {length}\ncontent-type: application/json\n"
        f"x-content-sha256: {body_sha256}"
    ).encode()


def get_signing_string(date: str, path_and_query: str, host: str) -> bytes:
    return f"date: {date}\n(request-target): get {path_and_query}\nhost: {host}".encode()


def sign_post(
    keys: KeySource, path: str, host: str, length: int, body_sha256: str
) -> dict[str, str]:
    """The date and authorization headers for a JSON POST, stamped now. Blocking (RSA)."""
    key_id, key = keys.current()
    date = http_date()
    signature = key.sign(signing_string(date, path, host, length, body_sha256), _PADDING, _HASH)
    return {
        "date": date,
        "authorization": (
            f'Signature version="1",headers="{SIGNED_HEADERS}",keyId="{key_id}",'
            f'algorithm="rsa-sha256",signature="{base64.b64encode(signature).decode()}"'
        ),
    }


def sign_get(keys: KeySource, path_and_query: str, host: str) -> dict[str, str]:
    """The date and authorization headers for a GET of ``path_and_query`` (already
    percent-encoded, exactly as sent), stamped now. Blocking (RSA)."""
    key_id, key = keys.current()
    date = http_date()
    signature = key.sign(get_signing_string(date, path_and_query, host), _PADDING, _HASH)
    return {
        "date": date,
        "authorization": (
            f'Signature version="1",headers="{GET_SIGNED_HEADERS}",keyId="{key_id}",'
            f'algorithm="rsa-sha256",signature="{base64.b64encode(signature).decode()}"'
        ),
    }
