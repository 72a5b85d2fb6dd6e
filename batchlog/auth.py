"""Credentials from OCI configuration; the `oci` package only for principals.

Every auth type ends as a ``KeySource``: a key id and an RSA key, refreshed for principals.
Each one pickles as its ``Recipe`` (auth type, config file, profile), never as the key, and
is loaded again where it is unpickled (a Spark executor): ``load_keys``.
The config file, the key file and the passphrase are read here, so that every problem with
them is told by file, line and reason, never by the text of a line or of a key.
"""

from __future__ import annotations

import configparser
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from batchlog.errors import ConfigurationError
from batchlog.files import KIB, MIB, UnusableFile, read_capped
from batchlog.signing import KeySnapshot, KeySource, StaticKey, header_safe, no_recipe

log = logging.getLogger("batchlog")

AUTH_TYPES = ("api_key", "security_token", "instance_principal", "resource_principal")
_OCID = re.compile(r"^([0-9a-zA-Z-_]+[.:])([0-9a-zA-Z-_]*[.:]){3,}([0-9a-zA-Z-_]+)$")
_SHAPES = {  # what oci.config.PATTERNS checks, and how to say it
    "user": (_OCID, "an OCID, ocid1.user.oc1..."),
    "fingerprint": (
        re.compile(r"^([0-9a-f]{2}:){15}[0-9a-f]{2}$"),
        "16 pairs of hex digits, aa:bb:...",
    ),
    "tenancy": (_OCID, "an OCID, ocid1.tenancy.oc1..."),
}
_SECTION = re.compile(r"\[(?P<header>.+)\]")  # configparser's SECTCRE
_OPTION = re.compile(r"(?P<option>.*?)\s*[=:]")  # configparser's OPTCRE, as far as needed
CONFIG_LIMIT = MIB  # an OCI config is a few hundred bytes
KEY_LIMIT = 64 * KIB  # a 16384-bit PEM key is under 13 KiB
TOKEN_LIMIT = 64 * KIB  # a session token is a few KiB


@dataclass(frozen=True, slots=True)
class Credentials:
    keys: KeySource
    region: str | None  # from the profile or the principal, for the default endpoint


class Recipe(NamedTuple):
    """How a key source was loaded: what crosses to another process instead of the key.
    The defaults are resolved where the key was first loaded (its environment's
    OCI_CONFIG_FILE and OCI_CLI_PROFILE); paths stay as given ("~" and relative paths are
    expanded where the key is loaded again)."""

    auth: str
    config_file: str | None  # None for principals
    profile: str | None


def load_keys(auth: str, config_file: str | None, profile: str | None) -> KeySource:
    """The key source ``load_credentials`` gives, loaded here: what an unpickled key source
    becomes. Raises the ConfigurationError ``load_credentials`` raises."""
    return load_credentials(auth, config_file, profile).keys


def _reduce(recipe: Recipe | None, kind: str) -> tuple[Any, ...]:
    """The pickled form of a key source: its recipe; refused when it has none."""
    if recipe is None:
        raise no_recipe(kind)
    return load_keys, tuple(recipe)


@dataclass(frozen=True, slots=True, repr=False)
class ApiKey(StaticKey):
    """An API key read from an OCI config: it pickles as its recipe, never as the key."""

    recipe: Recipe

    def __reduce__(self) -> tuple[Any, ...]:
        return _reduce(self.recipe, "ApiKey")


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
    return _principal(Recipe(auth, None, None))


@dataclass(frozen=True)
class _Layout:
    """Where a profile's options are in the file, as configparser reads it."""

    lines: dict[str, int] = field(default_factory=dict)  # option -> its line
    # an option on an indented line, which configparser reads as part of the value above:
    # option -> (its line, the line of the option whose value it joined, that option)
    indented: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    joined: dict[str, int] = field(default_factory=dict)  # option -> first line joined to it


@dataclass(frozen=True)
class _Profile:
    """One profile of an OCI config file, and the line each of its options is on."""

    file: str  # as the user named it
    name: str
    values: dict[str, str] = field(repr=False)  # holds pass_phrase
    layout: _Layout

    def at(self, option: str) -> str:
        number = self.layout.lines.get(option)
        return f"line {number}: " if number else ""

    def joined(self, option: str) -> str:
        """Why the value of ``option`` is not what the file seems to say, if an indented
        line was read as part of it ("" if none was)."""
        number = self.layout.joined.get(option)
        if number is None:
            return ""
        return _indented(number, self.layout.lines.get(option, number - 1), option)

    def error(self, reason: str) -> ConfigurationError:
        return ConfigurationError(f"OCI config {self.file} [{self.name}]: {reason}")

    def require(self, option: str, hint: str = "") -> str:
        value = self.values.get(option)
        if not value:
            if option in self.layout.indented:
                hint = _indented(*self.layout.indented[option])
            raise self.error(f"{option} is missing{hint}")
        return value


def _indented(line: int, joined: int, option: str) -> str:
    return (
        f": line {line} is indented, so it is read as part of line {joined} ({option}): "
        "remove the indentation"
    )


def _from_config(auth: str, config_file: str, profile_name: str) -> Credentials:
    recipe = Recipe(auth, config_file, profile_name)  # as given: "~" expands where loaded
    profile = _read_profile(config_file, profile_name)
    region = profile.values.get("region") or os.environ.get("OCI_REGION")
    if auth == "api_key":
        ids = []
        for option, (shape, expected) in _SHAPES.items():
            value = profile.require(option)
            if not shape.match(value):
                raise profile.error(
                    f"{profile.at(option)}{option} is malformed (expected {expected})"
                    + profile.joined(option)
                )
            ids.append(value)
        user, fingerprint, tenancy = ids
        key = _load_key(profile)
        return Credentials(ApiKey(f"{tenancy}/{user}/{fingerprint}", key, recipe), region)
    token_file = profile.require("security_token_file", " (run 'oci session authenticate')")
    token = _first_token(profile, token_file)
    key = _load_key(profile)
    keys = SessionTokenKeys(os.path.expanduser(token_file), token, key, recipe)
    return Credentials(keys, region)


def _read_profile(config_file: str, name: str) -> _Profile:
    """The profile, read as UTF-8 and parsed as the oci package does (configparser, no
    interpolation, [DEFAULT] inherited)."""
    path = os.path.expanduser(config_file)
    if not os.path.exists(path):
        raise ConfigurationError(
            f"OCI config file {config_file} not found: set --config-file or OCI_CONFIG_FILE, "
            "or run 'oci setup config' (or use --emulate to try batchlog without an account)"
        )
    if os.path.isdir(path):
        raise ConfigurationError(f"OCI config {config_file}: is a directory: give the file")
    try:
        data = read_capped(path, CONFIG_LIMIT, "an OCI config")
    except UnusableFile as exc:
        raise ConfigurationError(f"OCI config {config_file} [{name}]: {exc}") from None
    failed = f"OCI config {config_file} [{name}]: cannot be read"
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigurationError(f"{failed}: line {line} is not UTF-8 text") from None
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error as exc:  # its messages quote the lines: a pasted key, say
        raise ConfigurationError(f"OCI config {config_file} [{name}]: {_unreadable(exc)}") from None
    if name not in parser:
        raise ConfigurationError(
            f"profile {name!r} not found in {config_file} ({_profiles(parser)}): "
            "set --profile or OCI_CLI_PROFILE"
        )
    profile = _Profile(config_file, name, dict(parser[name]), _layout(text, name))
    if "key_content" in profile.values:  # as the oci package: a key belongs in its own file
        raise profile.error(
            f"{profile.at('key_content')}key_content cannot be given in a config file: "
            "give key_file"
        )
    return profile


def _profiles(parser: configparser.ConfigParser, shown: int = 20) -> str:
    """The profiles a config has, by name only (never a value), for a profile not found."""
    names = (["DEFAULT"] if parser.defaults() else []) + parser.sections()
    if not names:
        return "it has no profiles"
    listed = [n if n.isprintable() and len(n) <= 64 else repr(n[:64]) for n in names[:shown]]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"profiles in it: {', '.join(listed)}{more}"


def _layout(text: str, profile: str) -> _Layout:
    """Where the options of ``profile`` are: its own section's, else [DEFAULT]'s. Lines are
    told apart as configparser does (with its defaults): an indented line below an option
    continues that option's value, whatever it looks like."""
    sections: dict[str, _Layout] = {}
    here: _Layout | None = None
    option: str | None = None  # the option whose value an indented line would continue
    option_line = indent = 0
    for number, line in enumerate(text.split("\n"), 1):  # numbered as configparser does
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue  # blank or a comment: an indented line after it still continues
        level = len(line) - len(line.lstrip())
        if here is not None and option is not None and level > indent:
            here.joined.setdefault(option, number)
            looks = _OPTION.match(stripped)
            if looks:
                name = looks.group("option").strip().lower()
                here.indented.setdefault(name, (number, option_line, option))
            continue
        indent = level
        header = _SECTION.match(stripped)
        if header:
            here = sections.setdefault(header.group("header"), _Layout())
            option = None
        elif here is not None:
            looks = _OPTION.match(stripped)
            if looks:
                option = looks.group("option").strip().lower()
                option_line = number
                here.lines.setdefault(option, number)
    base, own = sections.get("DEFAULT", _Layout()), sections.get(profile, _Layout())
    return _Layout(
        {**base.lines, **own.lines},
        {**base.indented, **own.indented},
        {**base.joined, **own.joined},
    )


def _load_key(profile: _Profile) -> RSAPrivateKey:
    """The profile's private key, decrypted with its pass_phrase if it has one."""
    key_file = profile.require("key_file")
    at = profile.at("key_file")
    path = os.path.expanduser(key_file)
    if not os.path.exists(path):  # the value is named only once it is known to be a path
        raise profile.error(f"{at}key_file: no such file{profile.joined('key_file')}")
    try:
        data = read_capped(path, KEY_LIMIT, "a key")
    except UnusableFile as exc:
        raise profile.error(f"{at}key_file {key_file} {exc}") from None
    _warn_if_open(path)
    pass_phrase = profile.values.get("pass_phrase") or None
    password = pass_phrase.encode() if pass_phrase else None
    try:
        try:
            key = load_pem_private_key(data, password)
        except TypeError:  # encrypted without a pass_phrase, or one for a key without any
            if password is None:
                raise profile.error(
                    f"{at}key_file {key_file} is encrypted: set pass_phrase in the profile"
                ) from None
            key = load_pem_private_key(data, None)  # as the oci package: the pass_phrase
            # may come from [DEFAULT] and belong to another profile's key
    except (ValueError, TypeError, UnsupportedAlgorithm):
        if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
            reason = "is a public key: give the private key"
        elif password is not None and b"ENCRYPTED" in data:
            raise profile.error(
                f"{profile.at('pass_phrase')}pass_phrase does not decrypt key_file {key_file}"
            ) from None
        else:
            reason = "is not a PEM private key"
        raise profile.error(f"{at}key_file {key_file} {reason}") from None
    if not isinstance(key, RSAPrivateKey):
        raise profile.error(f"{at}key_file {key_file} is not an RSA key (OCI signs with RSA)")
    return key


def _first_token(profile: _Profile, token_file: str) -> str:
    at = profile.at("security_token_file")
    path = os.path.expanduser(token_file)
    if not os.path.exists(path):
        raise profile.error(
            f"{at}security_token_file: no such file (run 'oci session authenticate')"
            + profile.joined("security_token_file")
        )
    try:
        token = _read_token(path)
    except UnusableFile as exc:
        raise profile.error(f"{at}the security token file {token_file} {exc}") from None
    except UnicodeError:
        raise profile.error(
            f"{at}the security token file {token_file} is not UTF-8 text: it is not a token"
        ) from None
    problem = _token_problem(token)
    if problem:
        raise profile.error(
            f"{at}the security token file {token_file} {problem} (run 'oci session authenticate')"
        )
    return token


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
    return read_capped(path, TOKEN_LIMIT, "a token").decode("utf-8").strip()


def _token_problem(token: str) -> str:
    """Why a security token file's content is no token ("" when it may be one): it goes
    into a header, and is never shown."""
    if not token:
        return "is empty"
    if not header_safe(token):
        return "holds line breaks, spaces or control characters: it is not a token"
    return ""


class SessionTokenKeys:
    """A session token (``oci session authenticate``) and its key, seen as a KeySource.

    ``oci session refresh`` rewrites the token file with a new token (same key): after a
    401, ``refresh()`` reads the file again, once for a whole burst of 401s. The token
    never appears in a message or repr.
    """

    def __init__(
        self, token_file: str, token: str, key: RSAPrivateKey, recipe: Recipe | None = None
    ) -> None:
        self._token_file = token_file
        self._snapshot = KeySnapshot(f"ST${token}", key)  # replaced whole: never torn
        self._lock = threading.Lock()  # one refresh at a time
        self._recipe = recipe

    def __reduce__(self) -> tuple[Any, ...]:  # the token is read again where it is loaded
        return _reduce(self._recipe, "SessionTokenKeys")

    @property
    def refreshable(self) -> bool:
        return True

    def snapshot(self) -> KeySnapshot:
        return self._snapshot

    def current(self) -> tuple[str, RSAPrivateKey]:
        snapshot = self._snapshot
        return snapshot.key_id, snapshot.private_key

    def refresh(self, seen: int | None = None) -> None:
        """Read the token file again, unless it was read again since the generation
        ``seen``; keep the current token if the file cannot be read (missing, or empty
        while the CLI rewrites it) or holds no token."""
        with self._lock:
            now = self._snapshot
            if seen is not None and seen != now.generation:
                return  # another 401 of the same burst refreshed already
            token = self._read_again()
            # a new generation even when the file could not be used: the burst of 401s
            # that asked for this read is served by it, the next burst reads again
            key_id = f"ST${token}" if token else now.key_id
            self._snapshot = KeySnapshot(key_id, now.private_key, now.generation + 1)
        if token:
            log.info("security token read again from %s", self._token_file)

    def _read_again(self) -> str:
        try:
            token = _read_token(self._token_file)
        except UnusableFile as exc:
            problem = str(exc)
        except UnicodeError:
            problem = "is not UTF-8 text"
        else:
            problem = _token_problem(token)
        if problem:
            log.warning(
                "the security token file %s %s: keeping the token read before",
                self._token_file,
                problem,
            )
            return ""
        return token

    def __repr__(self) -> str:
        return "SessionTokenKeys(...)"


class _PrincipalKeys:
    """A token-based oci signer seen as a KeySource.

    The oci signer replaces its token and its session key one after the other (when the
    token expires, inside ``_reset_signers``, and on refresh): every read and refresh here
    goes through one lock, so a snapshot never pairs a token with another token's key.
    """

    def __init__(self, signer: Any, recipe: Recipe | None = None) -> None:
        self._signer = signer  # an oci X509FederationClientBasedSecurityTokenSigner or similar
        self._lock = threading.Lock()
        self._snapshot = KeySnapshot(signer.api_key, signer.private_key)
        self._recipe = recipe

    def __reduce__(self) -> tuple[Any, ...]:  # each process asks the principal itself
        return _reduce(self._recipe, "PrincipalKeys")

    @property
    def refreshable(self) -> bool:
        return True

    def snapshot(self) -> KeySnapshot:
        with self._lock:
            return self._read(bump=False)

    def refresh(self, seen: int | None = None) -> None:
        with self._lock:
            if seen is not None and seen != self._snapshot.generation:
                return  # another 401 of the same burst refreshed already
            self._signer.refresh_security_token()
            self._read(bump=True)

    def _read(self, bump: bool) -> KeySnapshot:
        """The signer's token and key now (under the lock), as a snapshot: a new generation
        when they changed, or when ``bump`` (a refresh happened)."""
        reset = getattr(self._signer, "_reset_signers", None)
        if reset is not None:
            reset()  # re-reads the token, fetching a new one when it has expired
        key_id, key = self._signer.api_key, self._signer.private_key
        last = self._snapshot
        if not bump and last.key_id == key_id and last.private_key is key:
            return last
        self._snapshot = KeySnapshot(key_id, key, last.generation + 1)
        return self._snapshot

    def __repr__(self) -> str:
        return "PrincipalKeys(...)"


def _principal(recipe: Recipe) -> Credentials:
    import oci

    auth = recipe.auth
    try:
        if auth == "instance_principal":
            signer = oci.auth.signers.InstancePrincipalsSecurityTokenSigner()
        else:
            signer = oci.auth.signers.get_resource_principals_signer()
        keys = _PrincipalKeys(signer, recipe)
    except Exception as exc:  # names the kind only: a message could quote the token
        raise ConfigurationError(
            f"--auth {auth}: cannot obtain a principal token ({type(exc).__name__}); "
            "is this running inside OCI with the right dynamic group and policy?"
        ) from None
    return Credentials(keys, getattr(signer, "region", None))


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
