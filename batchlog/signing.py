"""OCI HTTP request signatures (draft-cavage, rsa-sha256), made directly with `cryptography`.

No `requests.Request` is built: the signing string is formatted from the parts batchlog
already has, and the key, key id and header list are reused for every request.

A key source crosses to another process (a Spark executor) only as how to load it again
(``batchlog.auth``'s recipes): one holding key material alone refuses to pickle.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from batchlog.errors import ConfigurationError

SIGNED_HEADERS = "date (request-target) host content-length content-type x-content-sha256"
GET_SIGNED_HEADERS = "date (request-target) host"  # OCI signs a GET (no body) with these
_PADDING = padding.PKCS1v15()
_HASH = hashes.SHA256()
# what a key id may hold: printable ASCII, no space, quote or backslash (it is quoted in a header)
_HEADER_SAFE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def no_recipe(kind: str) -> ConfigurationError:
    """Why the key source ``kind`` cannot be pickled: it holds key material and no way to
    load it again, and key material never leaves the process that loaded it."""
    return ConfigurationError(
        f"{kind} holds key material, which never leaves this process: load the key with "
        "batchlog.auth.load_credentials(...) so that executors can load it again"
    )


def header_safe(value: str) -> bool:
    """Whether ``value`` can go into a quoted header field as it is (a key id, a token)."""
    return _HEADER_SAFE.fullmatch(value) is not None


class KeySnapshot:
    """A key id and the key that goes with it, read together, and the generation they
    belong to: a signer takes one snapshot and never mixes one token with another's key.
    Neither the key nor the id (a session token, "ST$<token>") is ever shown."""

    __slots__ = ("generation", "key_id", "private_key")

    def __init__(self, key_id: str, private_key: RSAPrivateKey, generation: int = 0) -> None:
        if not header_safe(key_id):  # it goes into the Authorization header
            raise ValueError("the key id holds characters a header cannot carry")
        self.key_id = key_id
        self.private_key = private_key
        self.generation = generation

    def __repr__(self) -> str:
        return f"KeySnapshot(generation={self.generation})"


class KeySource(Protocol):
    """Where the signing key and its id come from (an API key, or a principal's token)."""

    @property
    def refreshable(self) -> bool:
        """True for token-based principals, which can fetch a fresh token after a 401."""
        ...

    def snapshot(self) -> KeySnapshot:
        """The key id and key to sign with now, as one value. May block (a token refresh):
        call in a thread."""
        ...

    def refresh(self, seen: int | None = None) -> None:
        """Fetch a fresh token (principals only), unless the generation has moved past
        ``seen`` (the generation a refused request was signed with): another caller already
        refreshed, and one refresh serves a whole burst of 401s. Blocking."""
        ...


@dataclass(frozen=True, slots=True)
class StaticKey:
    """An API key, or any key whose id does not change."""

    key_id: str
    private_key: RSAPrivateKey

    @property
    def refreshable(self) -> bool:
        return False

    def snapshot(self) -> KeySnapshot:
        return KeySnapshot(self.key_id, self.private_key)

    def refresh(self, seen: int | None = None) -> None:
        return None

    def __reduce__(self) -> str | tuple[Any, ...]:
        raise no_recipe(type(self).__name__)

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


def post_headers(
    keys: KeySnapshot, path: str, host: str, length: int, body_sha256: str
) -> dict[str, str]:
    """The date and authorization headers for a JSON POST, stamped now. Blocking (RSA)."""
    date = http_date()
    signed = signing_string(date, path, host, length, body_sha256)
    return {"date": date, "authorization": _authorization(keys, SIGNED_HEADERS, signed)}


def get_headers(keys: KeySnapshot, path_and_query: str, host: str) -> dict[str, str]:
    """The date and authorization headers for a GET of ``path_and_query`` (already
    percent-encoded, exactly as sent), stamped now. Blocking (RSA)."""
    date = http_date()
    signed = get_signing_string(date, path_and_query, host)
    return {"date": date, "authorization": _authorization(keys, GET_SIGNED_HEADERS, signed)}


def sign_post(
    keys: KeySource, path: str, host: str, length: int, body_sha256: str
) -> dict[str, str]:
    """``post_headers`` with the source's key as it is now."""
    return post_headers(keys.snapshot(), path, host, length, body_sha256)


def sign_get(keys: KeySource, path_and_query: str, host: str) -> dict[str, str]:
    """``get_headers`` with the source's key as it is now."""
    return get_headers(keys.snapshot(), path_and_query, host)


def _authorization(keys: KeySnapshot, headers: str, signed: bytes) -> str:
    signature = base64.b64encode(keys.private_key.sign(signed, _PADDING, _HASH)).decode()
    return (
        f'Signature version="1",headers="{headers}",keyId="{keys.key_id}",'
        f'algorithm="rsa-sha256",signature="{signature}"'
    )
