"""Where calls go: Oracle AI Data Platform or an MLflow server (URL layout and identity), and
what a target says about itself in messages."""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal
from urllib.parse import SplitResult, quote, unquote, urlsplit

from batchlog.errors import ConfigurationError
from batchlog.operations import OPERATIONS
from batchlog.retry import NO_ANSWER, Answer

API_VERSION = "20260430"
_SCHEME = re.compile(r"(?:^|/)[A-Za-z][A-Za-z0-9+.-]*://")  # "https://", "mlflow/https://"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a header value cannot hold these
# MLflow's credentials variables, and which of them an Authorization value came from
TOKEN = "MLFLOW_TRACKING_TOKEN"
USERNAME = "MLFLOW_TRACKING_USERNAME"
PASSWORD = "MLFLOW_TRACKING_PASSWORD"
EnvKind = Literal["", "token", "basic"]

log = logging.getLogger("batchlog")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a URL's hostname) is this machine: localhost, 127.0.0.0/8, ::1."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def without_userinfo(text: str) -> str:
    """``text`` (a URI, or a checkpoint's target naming one, as written by a version that
    kept its credentials) as every message must show it: anything from the authority's
    start (after ``scheme://``, else the text's start) to the text's last ``@`` replaced by
    ``***``. A password may hold an unencoded '/', '?', '#' or '@', which would end a
    parser's idea of the userinfo early: this hides more rather than less."""
    scheme = _SCHEME.search(text)
    start = scheme.end() if scheme else 0
    end = text.rfind("@")
    return text if end < start else f"{text[:start]}***{text[end:]}"


def _shown(url: str) -> str:
    """``url`` as a message shows it: no userinfo, and nothing from a '?' or '#' on (a
    query may hold a token: found by review, ``?access_token=...`` was echoed)."""
    shown = without_userinfo(url)  # first: a password may hold a '?' or '#'
    cut = min((i for i in (shown.find("?"), shown.find("#")) if i >= 0), default=len(shown))
    return shown[:cut] + (" (query not shown)" if cut < len(shown) else "")


def _split(url: str, name: str) -> SplitResult:
    """The parts of ``url``; a ConfigurationError, never showing its userinfo, if it is
    none. An '@' after the authority is refused: RFC 3986 allows no unencoded '/', '?' or
    '#' in a user name or password, and a password holding one ends the authority inside
    it (``https://alice:12#pw@host`` is host alice, port 12), sending elsewhere."""
    shown = _shown(url)
    not_a_url = ConfigurationError(f"{name} {shown!r}: not a URL (expected http(s)://HOST[:PORT])")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise not_a_url from None
    if not parts.netloc:
        raise not_a_url
    if "@" in parts.path + parts.query + parts.fragment:
        raise ConfigurationError(
            f"{name} {shown!r}: an '@' after the host: a user name or password holding '/', "
            "'?' or '#' must have them percent-encoded (%2F, %3F, %23)"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise not_a_url from None
    return parts


def _check_site(url: str, name: str, credentials: bool) -> SplitResult:
    """Refuse what must never be contacted: no http(s) URL with a host, credentials written
    into it, or credentials (a signature, a token) over plain http beyond loopback."""
    parts = _split(url, name)
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(  # never echo it: it holds credentials
            f"{name}: give only scheme, host and port (no user or password)"
        )
    shown = _shown(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"{name} {shown!r}: expected http(s)://HOST[:PORT]")
    if credentials and parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigurationError(
            f"{name} {shown!r}: plain http is refused except on loopback (credentials would "
            "cross the network in the clear); use https"
        )
    return parts


@dataclass(frozen=True, slots=True)
class OciTarget:
    """An AI Data Platform workspace reached through one endpoint."""

    endpoint: str  # scheme://host[:port], no trailing slash
    platform_id: str  # the AI Data Platform OCID
    workspace: str  # the workspace key
    datasets_field: str = "dataset_inputs"  # the name of the datasets array in log-inputs
    site: str = ""  # where the calls go, for the checkpoint: "" means the endpoint itself
    # ("emulator" for --emulate, whose port changes from run to run)
    # every write carries an opc-retry-token (24 h): a call that may have been applied is
    # sent again as it was; without them, it is read back first (MlflowTarget)
    retry_tokens: ClassVar[bool] = True
    signed: ClassVar[bool] = True  # requests signed with an OCI key, with opc-* headers
    takes_user_id: ClassVar[bool] = False  # runs/create has no user_id (the user is a tag)

    def __post_init__(self) -> None:  # every request is signed: never over plain http
        _check_site(self.endpoint, "endpoint", credentials=True)

    @property
    def identity(self) -> str:
        """What the checkpoint is bound to: the workspace and where the calls go. A job run
        against one site never resumes from a checkpoint written against another."""
        return f"oci-aidp/{self.site or self.endpoint}/{self.platform_id}/{self.workspace}"

    @property
    def token_scope(self) -> str:
        """What retry tokens are derived from: the workspace only, as it always was (the
        same workspace reached through another host name gets the same tokens)."""
        return f"oci-aidp/{self.platform_id}/{self.workspace}"

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).netloc

    @property
    def where(self) -> str:
        """Where the calls go, for messages."""
        return self.endpoint

    def headers(self) -> dict[str, str]:
        """Headers of every request beyond the signature's."""
        return {}

    def run_status(self, status: str) -> str:
        """A run status as this target keeps it (AI Data Platform has all of MLflow's and
        INTERNAL_ERROR)."""
        return status

    def path(self, op: str) -> str:
        """The path of an operation: a call's op ("log-inputs", "create-run", ...) or "get"."""
        return self.api_path(OPERATIONS[op].rel if op in OPERATIONS else f"runs/{op}")

    def api_path(self, rel: str) -> str:
        """The path of ``rel`` (e.g. "experiments/get-by-name") under the MLflow prefix."""
        return (
            f"/{API_VERSION}/aiDataPlatforms/{quote(self.platform_id, safe='')}"
            f"/workspaces/{quote(self.workspace, safe='')}/mlops/api/2.0/mlflow/{rel}"
        )

    def in_doubt_note(self) -> str:
        return "may have been applied: re-sending within 24 h is safe, same retry token"

    def systemic_hint(self, status: int) -> str:
        """Why every request so far got ``status`` (401, 404, 3xx, a 2xx that is not the
        API's answer, NO_ANSWER), in OCI terms."""
        if 200 <= status < 300:  # held only when it is not the API's JSON
            return (
                f"{self.endpoint} answered {status} with something that is not the AI Data "
                "Platform API (a login page or a proxy?): check --endpoint"
            )
        if status in (401, 403):
            return (
                f"every request was refused as unauthenticated ({status}): check the key, "
                "its fingerprint, user and tenancy in the OCI config (for --auth "
                "security_token, run 'oci session refresh' or 'oci session authenticate'), "
                "and that this machine's clock is right (OCI refuses a date more than "
                "5 minutes off)"
            )
        if status == 404:
            return (
                "every request answered 404 before any succeeded: the platform id "
                f"({self.platform_id}) or the workspace key ({self.workspace}) is likely "
                "wrong, or the identity lacks permission on the workspace (OCI answers "
                "NotAuthorizedOrNotFound for all three)"
            )
        if 300 <= status < 400:
            return (
                f"{self.endpoint} answered with a redirect ({status}), which the AI Data "
                "Platform API never does: check --endpoint (a proxy or a web page may sit "
                "at that address)"
            )
        if status == NO_ANSWER:
            return (
                f"no connection could be made to {self.endpoint}: check --endpoint and the "
                "region, the network, proxy and firewall, and --ca-bundle for a private CA"
            )
        return f"every request answered {status} before any succeeded"

    def is_record_404(self, answer: Answer) -> bool:
        """Whether a 404 is about the record (its run) rather than the job: never known on
        OCI, whose NotAuthorizedOrNotFound also means a wrong platform, workspace or
        permission."""
        return False


@dataclass(frozen=True, slots=True)
class MlflowTarget:
    """An open-source MLflow tracking server."""

    endpoint: str  # scheme://host[:port] of the tracking URI
    prefix: str = ""  # the tracking URI's path, if the server sits under one
    authorization: str = field(default="", repr=False)  # Authorization header value, or ""
    datasets_field: str = "datasets"  # MLflow's name for the datasets array in log-inputs
    uri_credentials: bool = False  # the authorization is the tracking URI's user:password@
    # the MLflow variables the authorization was read from ("": the URI, or given as a
    # value): a pickle carries these names, never the value (issue 13)
    env: EnvKind = field(default="", repr=False, compare=False)
    retry_tokens: ClassVar[bool] = False  # none: what may have been applied is read back
    signed: ClassVar[bool] = False  # an Authorization header (MLflow's variables), if any
    takes_user_id: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_site(self.endpoint, "tracking URI", credentials=bool(self.authorization))
        _split(self.uri, "tracking URI")  # no '@' in the prefix either
        if _CONTROL.search(self.authorization):
            raise ConfigurationError(  # never echo it
                "the MLflow credentials hold line breaks or control characters: they cannot "
                "be sent in a header"
            )

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        """Pickled (sent to a Spark executor) without the credentials: as the MLflow
        variables to read them from again there; refused when they came from elsewhere."""
        if not self.authorization:
            return MlflowTarget, (self.endpoint, self.prefix, "", self.datasets_field)
        if self.env:
            return _read_again, (self.endpoint, self.prefix, self.datasets_field, self.env)
        if self.uri_credentials:
            raise ConfigurationError(
                "the tracking URI's user name and password never leave this process: take "
                f"them out of the URI and set {USERNAME} and {PASSWORD} (or {TOKEN}), "
                "on the driver and on the executors"
            )
        raise ConfigurationError(
            "MLflow credentials given as a value never leave this process: set "
            f"{TOKEN} (or {USERNAME} and {PASSWORD}) on the driver and the executors, "
            "and build the target with batchlog.target.mlflow_target_from_env(...)"
        )

    def __copy__(self) -> MlflowTarget:  # immutable: a copy stays in this process
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> MlflowTarget:
        return self

    @property
    def identity(self) -> str:
        """What the checkpoint is bound to."""
        return f"mlflow/{self.endpoint}{self.prefix}"

    @property
    def token_scope(self) -> str:
        """What request tokens are derived from (MLflow ignores them: its identity)."""
        return self.identity

    @property
    def uri(self) -> str:
        """The tracking URI, as the user gave it (without credentials)."""
        return f"{self.endpoint}{self.prefix}"

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).netloc

    @property
    def where(self) -> str:
        """Where the calls go, for messages: the tracking URI."""
        return self.uri

    def headers(self) -> dict[str, str]:
        """Headers of every request: the credentials from MLflow's variables, if any."""
        return {"authorization": self.authorization} if self.authorization else {}

    def run_status(self, status: str) -> str:
        """MLflow has no INTERNAL_ERROR: it answers 200 and keeps the status it had."""
        return "FAILED" if status == "INTERNAL_ERROR" else status

    def path(self, op: str) -> str:
        """The path of an operation: a call's op ("log-inputs", "create-run", ...) or "get"."""
        return self.api_path(OPERATIONS[op].rel if op in OPERATIONS else f"runs/{op}")

    def api_path(self, rel: str) -> str:
        """The path of ``rel`` (e.g. "experiments/get-by-name") under the MLflow prefix."""
        return f"{self.prefix}/api/2.0/mlflow/{rel}"

    def in_doubt_note(self) -> str:
        # only log-inputs gets here: a log-model that may have been applied is read back
        # until it is confirmed, never dead-lettered
        return (
            "may have been applied: uploading it again is safe, MLflow stores a dataset once "
            "per run"
        )

    def systemic_hint(self, status: int) -> str:
        """Why every request so far got ``status`` (401, 404, 3xx, a 2xx that is not the
        API's answer, NO_ANSWER), in MLflow terms."""
        if 200 <= status < 300:  # held only when it is not the API's JSON
            return (
                f"the tracking URI {self.uri} answered {status} with something that is not "
                "the MLflow API (a login page or a proxy?): use a URI that reaches the MLflow "
                "server directly, or credentials the proxy accepts (MLFLOW_TRACKING_TOKEN)"
            )
        if status in (401, 403) and self.uri_credentials:
            return (
                f"the MLflow server refused the user name and password in the tracking URI "
                f"({status}): correct them in --tracking-uri (or MLFLOW_TRACKING_URI), with "
                "any '/', '?', '#', '@' or '%' in them percent-encoded; while the URI holds "
                "credentials, MLFLOW_TRACKING_USERNAME/PASSWORD and MLFLOW_TRACKING_TOKEN "
                "are not used"
            )
        if status in (401, 403):
            return (
                f"the MLflow server refused the credentials ({status}): set "
                "MLFLOW_TRACKING_TOKEN (bearer), or MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (basic), to credentials this server accepts"
            )
        if status == 404:
            return (
                f"every request answered 404 before any succeeded: the tracking URI "
                f"{self.uri} does not seem to point at an MLflow server (check its host, "
                "port and path prefix)"
            )
        if 300 <= status < 400:
            return (
                f"the tracking URI {self.uri} answered with a redirect ({status}): an SSO "
                "or authentication proxy is probably sending batchlog to a login page; use "
                "a URI that reaches the MLflow server directly, or credentials the proxy "
                "accepts (MLFLOW_TRACKING_TOKEN)"
            )
        if status == NO_ANSWER:
            return (
                f"nothing is listening at {self.uri}, or no connection could be made: "
                "check --tracking-uri (or MLFLOW_TRACKING_URI) and that the server is "
                "running; for https, MLFLOW_TRACKING_SERVER_CERT_PATH for a private CA"
            )
        return f"every request answered {status} before any succeeded"

    def is_record_404(self, answer: Answer) -> bool:
        """A 404 about the record: MLflow's RESOURCE_DOES_NOT_EXIST (a run that does not
        exist), not a 404 from a path that is not an MLflow API."""
        return answer.status == 404 and answer.code == "RESOURCE_DOES_NOT_EXIST"


Target = OciTarget | MlflowTarget


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _bearer(token: str) -> str:
    if _CONTROL.search(token):  # never echoed
        raise ConfigurationError(
            f"{TOKEN} holds line breaks or control characters: it cannot be sent in a header "
            "(check how it was set)"
        )
    return f"Bearer {token}"


def env_authorization() -> tuple[str, EnvKind]:
    """The Authorization value MLflow's variables give, in MLflow's order (basic auth from
    the user name and password, else a bearer token; "" for none), and which gave it."""
    token, user, password = (os.environ.get(name) for name in (TOKEN, USERNAME, PASSWORD))
    if user and password:
        return _basic(user, password), "basic"
    if token:
        return _bearer(token), "token"
    if user or password:
        raise ConfigurationError(f"set both {USERNAME} and {PASSWORD}, or neither")
    return "", ""


def _read_again(endpoint: str, prefix: str, datasets_field: str, env: EnvKind) -> MlflowTarget:
    """An MLflow target unpickled (on a Spark executor): its credentials read again from the
    MLflow variables they came from, in this process's environment."""
    names = (USERNAME, PASSWORD) if env == "basic" else (TOKEN,)
    values = [os.environ.get(name, "") for name in names]
    if not all(values):  # one line naming what to set, never a value
        both = len(names) > 1
        them = "them" if both else "it"
        raise ConfigurationError(
            f"{' and '.join(names)} {'are not both' if both else 'is not'} set in this "
            "process: the MLflow target sent here (to a Spark executor) reads its "
            f"credentials again from {them}; set {them} on the executors too "
            f"(spark.executorEnv.{names[0]}=..., or the cluster's environment settings)"
        )
    authorization = _basic(*values) if env == "basic" else _bearer(values[0])
    return MlflowTarget(endpoint, prefix, authorization, datasets_field, env=env)


def mlflow_target_from_env(tracking_uri: str | None) -> MlflowTarget:
    """The MLflow target of ``tracking_uri`` with the credentials of MLflow's variables (or
    of the URI, as ``mlflow_target``): what the command line and executors use."""
    return mlflow_target(tracking_uri, *env_authorization())


def mlflow_target(
    tracking_uri: str | None, authorization: str = "", env: EnvKind = ""
) -> MlflowTarget:
    """The MLflow target of ``tracking_uri``, sending ``authorization`` (read from MLflow's
    variables ``env``, read again where the target is unpickled), or, as MLflow's client
    does, the ``user:password@`` written into the URI as basic auth in its place
    (percent-decoded). Those credentials are taken out of the URI: never in the target's
    identity, a message, the checkpoint or a report, and never pickled."""
    if not tracking_uri:
        raise ConfigurationError(
            "--tracking-uri is required with --target mlflow (or set MLFLOW_TRACKING_URI)"
        )
    parts = _split(tracking_uri, "--tracking-uri")
    shown = _shown(tracking_uri)
    if parts.query or parts.fragment:  # would be dropped without a word
        # never echoed: a query may hold a token (found by review: ?access_token=...)
        cut = without_userinfo(f"{parts.scheme}://{parts.netloc}{parts.path}")
        raise ConfigurationError(
            f"--tracking-uri {cut!r} followed by a '?' or '#' part (not shown): give only "
            "scheme, host, port and path; credentials go in MLFLOW_TRACKING_TOKEN"
        )
    from_uri = parts.password is not None
    if parts.password is not None:  # user:password@ (MLflow ignores a user alone, as here)
        if authorization:
            log.warning(
                "the tracking URI holds credentials: they are used, and MLFLOW_TRACKING_TOKEN "
                "or MLFLOW_TRACKING_USERNAME/PASSWORD ignored, as MLflow does"
            )
        authorization, env = _basic(unquote(parts.username or ""), unquote(parts.password)), ""
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"--tracking-uri {shown!r}: expected http(s)://HOST[:PORT][/PATH]")
    if authorization and parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigurationError(
            f"--tracking-uri {shown!r}: credentials are not sent over plain http except on "
            "loopback; use https"
        )
    netloc = parts.netloc.rpartition("@")[2]
    return MlflowTarget(
        f"{parts.scheme}://{netloc}",
        parts.path.rstrip("/"),
        authorization,
        uri_credentials=from_uri,
        env=env if authorization else "",
    )


def region_endpoint(region: str) -> str:
    return f"https://datalake.{region}.oci.oraclecloud.com"


def check_endpoint(endpoint: str) -> str:
    """Normalise an endpoint; refuse plain http to anything but loopback."""
    parts = _check_site(endpoint, "--endpoint", credentials=True)
    if parts.path not in ("", "/") or parts.query:
        raise ConfigurationError(
            f"--endpoint {_shown(endpoint)!r}: give only scheme, host and port; "
            "batchlog adds the path"
        )
    return f"{parts.scheme}://{parts.netloc}"


def check_ids(platform_id: str | None, workspace: str | None) -> tuple[str, str]:
    if not platform_id:
        raise ConfigurationError("--platform-id is required (the AI Data Platform OCID)")
    if not workspace:
        raise ConfigurationError("--workspace is required (the workspace key)")
    return platform_id, workspace
