"""Where calls go: Oracle AI Data Platform or an MLflow server (URL layout and identity), and
what a target says about itself in messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from batchlog.errors import ConfigurationError
from batchlog.retry import NO_ANSWER, Answer

API_VERSION = "20260430"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True, slots=True)
class OciTarget:
    """An AI Data Platform workspace reached through one endpoint."""

    endpoint: str  # scheme://host[:port], no trailing slash
    platform_id: str  # the AI Data Platform OCID
    workspace: str  # the workspace key
    datasets_field: str = "dataset_inputs"  # the name of the datasets array in log-inputs
    site: str = ""  # where the calls go, for the checkpoint: "" means the endpoint itself
    # ("emulator" for --emulate, whose port changes from run to run)

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

    def path(self, op: str) -> str:
        """The path of ``runs/{op}``: "log-inputs", "log-model" or "get"."""
        return (
            f"/{API_VERSION}/aiDataPlatforms/{quote(self.platform_id, safe='')}"
            f"/workspaces/{quote(self.workspace, safe='')}/mlops/api/2.0/mlflow/runs/{op}"
        )

    def in_doubt_note(self) -> str:
        return "may have been applied: re-sending within 24 h is safe, same retry token"

    def systemic_hint(self, status: int) -> str:
        """Why every request so far got ``status`` (401, 404, 3xx, NO_ANSWER), in OCI terms."""
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

    def path(self, op: str) -> str:
        return f"{self.prefix}/api/2.0/mlflow/runs/{op}"

    def in_doubt_note(self) -> str:
        # only log-inputs gets here: a log-model that may have been applied is read back
        # until it is confirmed, never dead-lettered
        return (
            "may have been applied: uploading it again is safe, MLflow stores a dataset once "
            "per run"
        )

    def systemic_hint(self, status: int) -> str:
        """Why every request so far got ``status`` (401, 404, 3xx, NO_ANSWER), in MLflow
        terms."""
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


def mlflow_target(tracking_uri: str | None, authorization: str = "") -> MlflowTarget:
    if not tracking_uri:
        raise ConfigurationError(
            "--tracking-uri is required with --target mlflow (or set MLFLOW_TRACKING_URI)"
        )
    parts = urlsplit(tracking_uri)
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(  # never echo the URI: it holds a password
            "--tracking-uri: credentials in the URI are not supported; set "
            "MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"--tracking-uri {tracking_uri!r}: expected http(s)://HOST[:PORT][/PATH]"
        )
    if authorization and parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise ConfigurationError(
            f"--tracking-uri {tracking_uri!r}: credentials are not sent over plain http "
            "except on loopback; use https"
        )
    return MlflowTarget(f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/"), authorization)


def region_endpoint(region: str) -> str:
    return f"https://datalake.{region}.oci.oraclecloud.com"


def check_endpoint(endpoint: str) -> str:
    """Normalise an endpoint; refuse plain http to anything but loopback."""
    parts = urlsplit(endpoint)
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(  # never echo it: it holds credentials
            "--endpoint: give only scheme, host and port (no user or password)"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(f"--endpoint {endpoint!r}: expected https://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigurationError(
            f"--endpoint {endpoint!r}: give only scheme, host and port; batchlog adds the path"
        )
    if parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
        raise ConfigurationError(
            f"--endpoint {endpoint!r}: plain http is refused except on loopback; use https"
        )
    return f"{parts.scheme}://{parts.netloc}"


def check_ids(platform_id: str | None, workspace: str | None) -> tuple[str, str]:
    if not platform_id:
        raise ConfigurationError("--platform-id is required (the AI Data Platform OCID)")
    if not workspace:
        raise ConfigurationError("--workspace is required (the workspace key)")
    return platform_id, workspace
