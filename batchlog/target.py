"""Where calls go: Oracle AI Data Platform or an MLflow server (URL layout and identity)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from batchlog.errors import ConfigurationError
from batchlog.records import Op

API_VERSION = "20260430"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass(frozen=True, slots=True)
class OciTarget:
    """An AI Data Platform workspace reached through one endpoint."""

    endpoint: str  # scheme://host[:port], no trailing slash
    platform_id: str  # the AI Data Platform OCID
    workspace: str  # the workspace key
    datasets_field: str = "dataset_inputs"  # the name of the datasets array in log-inputs

    @property
    def identity(self) -> str:
        """What the retry tokens and the checkpoint are bound to."""
        return f"oci-aidp/{self.platform_id}/{self.workspace}"

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).netloc

    def path(self, op: Op) -> str:
        return (
            f"/{API_VERSION}/aiDataPlatforms/{quote(self.platform_id, safe='')}"
            f"/workspaces/{quote(self.workspace, safe='')}/mlops/api/2.0/mlflow/runs/{op}"
        )


@dataclass(frozen=True, slots=True)
class MlflowTarget:
    """An open-source MLflow tracking server."""

    endpoint: str  # scheme://host[:port] of the tracking URI
    prefix: str = ""  # the tracking URI's path, if the server sits under one
    authorization: str = field(default="", repr=False)  # Authorization header value, or ""
    datasets_field: str = "datasets"  # MLflow's name for the datasets array in log-inputs

    @property
    def identity(self) -> str:
        return f"mlflow/{self.endpoint}{self.prefix}"

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).netloc

    def path(self, op: str) -> str:
        return f"{self.prefix}/api/2.0/mlflow/runs/{op}"


Target = OciTarget | MlflowTarget


def mlflow_target(tracking_uri: str | None, authorization: str = "") -> MlflowTarget:
    if not tracking_uri:
        raise ConfigurationError(
            "--tracking-uri is required with --target mlflow (or set MLFLOW_TRACKING_URI)"
        )
    parts = urlsplit(tracking_uri)
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
