"""Credentials from OCI configuration, through the `oci` package (the only module importing it).

Every auth type ends as a ``KeySource``: a key id and an RSA key, refreshed for principals.
"""

from __future__ import annotations

import configparser
import logging
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from batchlog.errors import ConfigurationError
from batchlog.signing import KeySource, StaticKey

log = logging.getLogger("batchlog")

AUTH_TYPES = ("api_key", "security_token", "instance_principal", "resource_principal")


@dataclass(frozen=True, slots=True)
class Credentials:
    keys: KeySource
    region: str | None  # from the profile or the principal, for the default endpoint


def default_config_file() -> str:
    return os.environ.get("OCI_CONFIG_FILE") or "~/.oci/config"


def default_profile() -> str:
    return os.environ.get("OCI_CLI_PROFILE") or "DEFAULT"


def load_credentials(auth: str, config_file: str | None, profile: str | None) -> Credentials:
    """Build the key source for ``auth``; raise ConfigurationError naming what to fix."""
    if auth not in AUTH_TYPES:
        raise ConfigurationError(f"--auth {auth!r}: expected one of {', '.join(AUTH_TYPES)}")
    if auth in ("api_key", "security_token"):
        return _from_config(
            auth, config_file or default_config_file(), profile or default_profile()
        )
    return _principal(auth)


def _from_config(auth: str, config_file: str, profile: str) -> Credentials:
    import oci

    path = os.path.expanduser(config_file)
    if not os.path.isfile(path):
        raise ConfigurationError(
            f"OCI config file {config_file} not found: set --config-file or OCI_CONFIG_FILE, "
            "or run 'oci setup config' (or use --emulate to try batchlog without an account)"
        )
    try:
        config = oci.config.from_file(path, profile)
    except oci.exceptions.ProfileNotFound:
        raise ConfigurationError(
            f"profile {profile!r} not found in {config_file}: set --profile or OCI_CLI_PROFILE"
        ) from None
    except oci.exceptions.ClientError as exc:  # the oci package's own: names, no values
        raise ConfigurationError(f"OCI config {config_file} [{profile}]: {exc}") from None
    except Exception as exc:  # configparser's errors quote the lines: a pasted key, say
        raise ConfigurationError(
            f"OCI config {config_file} [{profile}]: {_unreadable(exc)}"
        ) from None
    key_file = config.get("key_file")
    if key_file:
        _warn_if_open(os.path.expanduser(key_file))
    try:
        if auth == "api_key":
            for field in ("user", "fingerprint", "tenancy"):
                if not config.get(field):
                    raise ConfigurationError(
                        f"OCI config {config_file} [{profile}]: {field} is missing"
                    )
            signer = oci.signer.Signer.from_config(config)
            return Credentials(StaticKey(signer.api_key, signer.private_key), config.get("region"))
        token_file = config.get("security_token_file")
        if not token_file:
            raise ConfigurationError(
                f"OCI config {config_file} [{profile}]: security_token_file is missing "
                "(run 'oci session authenticate')"
            )
        token_path = os.path.expanduser(token_file)
        token = _read_token(token_path)
        if not token:
            raise ConfigurationError(
                f"OCI config {config_file} [{profile}]: the security token file {token_file} "
                "is empty (run 'oci session authenticate')"
            )
        key = oci.signer.load_private_key_from_file(key_file, config.get("pass_phrase"))
        return Credentials(SessionTokenKeys(token_path, token, key), config.get("region"))
    except ConfigurationError:
        raise
    except oci.exceptions.InvalidConfig as exc:  # names the bad fields, never their values
        raise ConfigurationError(f"OCI config {config_file} [{profile}]: {exc}") from None
    except Exception as exc:  # the oci package raises many kinds; name the cause, not secrets
        raise ConfigurationError(
            f"OCI config {config_file} [{profile}]: cannot load the signing key "
            f"({type(exc).__name__})"
        ) from None


def _unreadable(exc: Exception) -> str:
    """Why the config file could not be read, by line numbers and option names only: the
    text of a line that is not ``key = value`` may be a private key or a passphrase."""
    pasted = "(a key pasted into the config?)"
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"line {exc.lineno} comes before any [section] header {pasted}"
    if isinstance(exc, configparser.ParsingError):
        numbers = sorted({n for n, _ in exc.errors or () if isinstance(n, int)})
        lineno = getattr(exc, "lineno", None)  # newer Pythons' kinds of ParsingError
        if not numbers and isinstance(lineno, int):
            numbers = [lineno]
        if len(numbers) == 1:
            return f"line {numbers[0]} is not a 'key = value' line {pasted}"
        if numbers:
            return f"lines {_ranges(numbers)} are not 'key = value' lines {pasted}"
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"line {exc.lineno}: {exc.option} is given twice in [{exc.section}]"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"line {exc.lineno}: section [{exc.section}] is given twice"
    if isinstance(exc, ValueError) and str(exc).startswith("'key_content'"):
        return "key_content cannot be given in a config file: give key_file"
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    return f"cannot be read ({type(exc).__name__})"  # its message might quote the file


def _ranges(numbers: list[int]) -> str:
    """Sorted line numbers as ranges: 7-33, 35."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and spans[-1][1] == n - 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _read_token(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


class SessionTokenKeys:
    """A session token (``oci session authenticate``) and its key, seen as a KeySource.

    ``oci session refresh`` rewrites the token file with a new token (same key): after a
    401, ``refresh()`` reads the file again. The token never appears in a message or repr.
    """

    def __init__(self, token_file: str, token: str, key: RSAPrivateKey) -> None:
        self._token_file = token_file
        self._key_id = f"ST${token}"
        self._key = key
        self._lock = threading.Lock()  # one refresh at a time

    @property
    def refreshable(self) -> bool:
        return True

    def current(self) -> tuple[str, RSAPrivateKey]:
        return self._key_id, self._key

    def refresh(self) -> None:
        """Read the token file again; keep the current token if it cannot be read (missing,
        or empty while the CLI rewrites it)."""
        with self._lock:
            try:
                token = _read_token(self._token_file)
            except (OSError, UnicodeError) as exc:
                log.warning(
                    "cannot read the security token file %s again (%s): keeping the token "
                    "read before",
                    self._token_file,
                    type(exc).__name__,
                )
                return
            if not token:
                log.warning(
                    "the security token file %s is empty: keeping the token read before",
                    self._token_file,
                )
                return
            self._key_id = f"ST${token}"
        log.info("security token read again from %s", self._token_file)

    def __repr__(self) -> str:
        return "SessionTokenKeys(...)"


class _PrincipalKeys:
    """A token-based oci signer seen as a KeySource."""

    def __init__(self, signer: Any) -> None:
        self._signer = signer  # an oci X509FederationClientBasedSecurityTokenSigner or similar
        self._lock = threading.Lock()  # one refresh at a time

    @property
    def refreshable(self) -> bool:
        return True

    def current(self) -> tuple[str, RSAPrivateKey]:
        reset = getattr(self._signer, "_reset_signers", None)
        if reset is not None:
            reset()  # re-reads the token, fetching a new one when it has expired
        return self._signer.api_key, self._signer.private_key

    def refresh(self) -> None:
        with self._lock:
            self._signer.refresh_security_token()

    def __repr__(self) -> str:
        return "PrincipalKeys(...)"


def _principal(auth: str) -> Credentials:
    import oci

    try:
        if auth == "instance_principal":
            signer = oci.auth.signers.InstancePrincipalsSecurityTokenSigner()
        else:
            signer = oci.auth.signers.get_resource_principals_signer()
    except Exception as exc:
        raise ConfigurationError(
            f"--auth {auth}: cannot obtain a principal token ({type(exc).__name__}); "
            "is this running inside OCI with the right dynamic group and policy?"
        ) from None
    return Credentials(_PrincipalKeys(signer), getattr(signer, "region", None))


def _warn_if_open(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "key file %s is readable by others (mode %o): run 'chmod 600 %s'",
            path,
            stat.S_IMODE(mode),
            path,
        )
