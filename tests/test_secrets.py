"""No secret reaches an output: keys, passphrases, session tokens, bearer tokens, basic-auth
passwords and credentials written into a tracking URI never appear on stdout or stderr
(with -v), in the checkpoint, the dead letter, the --report file or `batchlog status`, for
both targets. And the hostile configurations around them (credentials over plain http, TLS
verification off, a CA file that is not one, a token that cannot be a header) stop with a
one-line configuration error before anything is sent."""

from __future__ import annotations

import base64
import os
import ssl
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import orjson
import pytest

import batchlog
from batchlog.emulator import EmulatorThread
from batchlog.errors import ConfigurationError
from batchlog.signing import StaticKey
from batchlog.target import MlflowTarget, OciTarget, mlflow_target
from tests.conftest import (
    FINGERPRINT,
    KEY_ID,
    PLATFORM,
    TENANCY,
    USER,
    WORKSPACE,
    Oci,
    free_loopback_port,
    inputs_record,
    mixed_records,
    run_cli,
    upload_args,
    write_manifest,
)
from tests.test_auth import rsa_pem, session_profile
from tests.test_transport import _self_signed

StartEmulator = Callable[..., EmulatorThread]


# ---- helpers -------------------------------------------------------------------------------


class Recorder:
    """A stand-in MLflow server on loopback that keeps every request's headers (names in
    lower case): log calls answer 200 ``{}`` (404 RESOURCE_DOES_NOT_EXIST for runs named
    ``missing*``), runs/get answers 404."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.headers: list[dict[str, str]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.headers.append({k.lower(): v for k, v in self.headers.items()})
                if str(orjson.loads(body).get("run_id", "")).startswith("missing"):
                    self.answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"})
                else:
                    self.answer(200, {})

            def do_GET(self) -> None:
                recorder.headers.append({k.lower(): v for k, v in self.headers.items()})
                self.answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"})

            def answer(self, status: int, doc: dict[str, Any]) -> None:
                body = orjson.dumps(doc)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, userinfo: str = "") -> str:
        return f"{self.scheme}://{userinfo}127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


@pytest.fixture
def recorder() -> Iterator[Callable[..., Recorder]]:
    started: list[Recorder] = []

    def start(tls: ssl.SSLContext | None = None) -> Recorder:
        started.append(Recorder(tls))
        return started[-1]

    yield start
    for r in started:
        r.close()


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """batchlog in its own process, with MLflow's and OCI's variables as given only."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OCI_"))}
    return subprocess.run(
        [sys.executable, "-m", "batchlog", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, **(env or {})},
    )


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def everything_written(
    tmp_path: Path, runs: list[subprocess.CompletedProcess[str]], keep_out: set[Path]
) -> dict[str, bytes]:
    """stdout and stderr of every run, and every file batchlog wrote under tmp_path."""
    blobs: dict[str, bytes] = {}
    for i, done in enumerate(runs):
        blobs[f"run {i} {done.args[3:5]} stdout"] = done.stdout.encode()
        blobs[f"run {i} {done.args[3:5]} stderr"] = done.stderr.encode()
    for path in tmp_path.rglob("*"):
        if path.is_file() and path not in keep_out:
            blobs[str(path)] = path.read_bytes()
    return blobs


def assert_absent(secrets: list[str], blobs: dict[str, bytes]) -> None:
    assert blobs
    forms: set[bytes] = set()
    for secret in secrets:
        forms |= {secret.encode(), quote(secret, safe="").encode()}
        forms.add(base64.b64encode(secret.encode()))
    for name, blob in blobs.items():
        for form in forms:
            assert form not in blob, f"{form!r} is in {name}"
        assert b"Traceback" not in blob, name


def status(checkpoint: Path) -> subprocess.CompletedProcess[str]:
    done = cli(["status", str(checkpoint), "-v"])
    assert done.returncode == 0, done.stderr
    return done


# ---- OCI ---------------------------------------------------------------------------------

PASSPHRASE = "pass-SECRET-phrase-0042"


def test_oci_keys_passphrases_and_signatures_never_appear(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    key_file = tmp_path / "encrypted.pem"
    key_file.write_bytes(rsa_pem(oci.key, PASSPHRASE.encode()))
    key_file.chmod(0o600)
    config = tmp_path / "oci_config"
    config.write_text(
        f"[DEFAULT]\nuser={USER}\nfingerprint={FINGERPRINT}\ntenancy={TENANCY}\n"
        f"region=us-ashburn-1\nkey_file={key_file}\npass_phrase={PASSPHRASE}\n"
    )
    emu = emulator(fail_before=0.3, known_runs=frozenset({"run00000", "run00001"}), seed=3)
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(20, runs=4))
    out = run_cli(
        [*upload_args(oci, emu, str(manifest)), "-v", "--report", str(tmp_path / "r.json")]
    )
    assert out.returncode == 1, out.stderr
    runs = [out, status(tmp_path / "m.batchlog-checkpoint")]
    signature = emu.state.headers_seen[0]["Authorization"].split('signature="')[1][:40]
    key_lines = [line.decode() for line in oci.key_pem.splitlines()[1:-1]]
    blobs = everything_written(tmp_path, runs, {key_file, tmp_path / "oci_api_key.pem", config})
    assert_absent([PASSPHRASE, signature, "Signature version", *key_lines], blobs)
    assert (tmp_path / "r.json").exists() and (tmp_path / "m.dead-letter.jsonl").read_bytes()


def test_oci_session_tokens_never_appear(tmp_path: Path, oci: Oci, emulator: StartEmulator) -> None:
    token = "tok-SESSION-SECRET-0001"
    config = session_profile(tmp_path, token)
    emu = emulator(key_id="ST$tok-the-server-wants", known_runs=frozenset({"run00000"}))
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(12, runs=3))
    args = [
        *upload_args(oci, emu, str(manifest)),
        "--config-file",
        str(config),
        "--auth",
        "security_token",
        "-v",
        "--report",
        str(tmp_path / "r.json"),
    ]
    refused = run_cli(args)  # every request refused: 401, read again, 401, stop
    assert refused.returncode == 3, refused.stderr
    assert "401" in refused.stderr
    emu.config.key_id = f"ST${token}"
    accepted = run_cli(args)  # now accepted; the runs the server does not know fail
    assert accepted.returncode == 1, accepted.stderr
    runs = [refused, accepted, status(tmp_path / "m.batchlog-checkpoint")]
    keep_out = {config, tmp_path / "token", tmp_path / "oci_api_key.pem", tmp_path / "oci_config"}
    assert_absent([token], everything_written(tmp_path, runs, keep_out))


def test_an_old_checkpoint_holding_uri_credentials_is_shown_without_them(
    tmp_path: Path, recorder: Callable[..., Recorder]
) -> None:
    """Checkpoints written before credentials were taken out of the tracking URI name the
    target with them: `batchlog status` shows it without them."""
    server = recorder()
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    done = cli(["upload", "--target", "mlflow", "--tracking-uri", server.url(), str(manifest)])
    assert done.returncode == 0, done.stderr
    checkpoint = tmp_path / "m.batchlog-checkpoint"
    first, rest = checkpoint.read_bytes().split(b"\n", 1)
    header = first.rsplit(b"|", 1)[0].replace(b"//127.0.0.1", b"//old-user:old-SECRET-pw@127.0.0.1")
    checkpoint.write_bytes(b"%s|%08x\n" % (header, zlib.crc32(header)) + rest)
    shown = cli(["status", str(checkpoint)])
    assert shown.returncode == 0, shown.stderr
    assert "old-SECRET-pw" not in shown.stdout + shown.stderr
    assert "old-user" not in shown.stdout + shown.stderr
    assert f"mlflow/http://127.0.0.1:{server.port}" in shown.stdout, shown.stdout
    again = cli(["upload", "--target", "mlflow", "--tracking-uri", server.url(), str(manifest)])
    assert again.returncode == 3 and "belongs to another target" in again.stderr
    assert "old-SECRET-pw" not in again.stderr and "old-user" not in again.stderr


# ---- MLflow credentials ------------------------------------------------------------------

BEARER = "bearer-SECRET-token-0007"
USERNAME, PASSWORD = "env-user", "basic-SECRET-pw-0008"
URI_USER, URI_PASSWORD = "uri@user", "uri:SECRET/pw%0009"  # reserved characters, encoded


def userinfo() -> str:
    return f"{quote(URI_USER, safe='')}:{quote(URI_PASSWORD, safe='')}@"


@pytest.mark.parametrize("how", ["bearer", "basic", "uri"])
def test_mlflow_credentials_never_appear(
    tmp_path: Path, recorder: Callable[..., Recorder], how: str
) -> None:
    server = recorder()
    env: dict[str, str] = {}
    uri = server.url()
    if how == "bearer":
        env["MLFLOW_TRACKING_TOKEN"] = BEARER
        expected = f"Bearer {BEARER}"
    elif how == "basic":
        env |= {"MLFLOW_TRACKING_USERNAME": USERNAME, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
        expected = basic(USERNAME, PASSWORD)
    else:
        uri = server.url(userinfo())
        expected = basic(URI_USER, URI_PASSWORD)
    records = [inputs_record("r1", "ds1"), inputs_record("missing1", "ds2")]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    up = cli(
        [
            "upload",
            "--target",
            "mlflow",
            "--tracking-uri",
            uri,
            str(manifest),
            "-v",
            "--report",
            str(tmp_path / "r.json"),
        ],
        env,
    )
    assert up.returncode == 1, up.stderr
    check = cli(["verify", "--target", "mlflow", "--tracking-uri", uri, str(manifest), "-v"], env)
    assert check.returncode == 1, check.stderr
    runs = [up, check, status(tmp_path / "m.batchlog-checkpoint")]
    assert server.headers
    for headers in server.headers:
        assert headers["authorization"] == expected
        assert headers["host"] == f"127.0.0.1:{server.port}"
    secrets = [BEARER, PASSWORD, URI_PASSWORD, URI_USER, expected.split()[1]]
    assert_absent(secrets, everything_written(tmp_path, runs, set()))


def test_uri_credentials_and_nothing_listening(tmp_path: Path) -> None:
    port = free_loopback_port()
    uri = f"http://{userinfo()}127.0.0.1:{port}"
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    up = cli(["upload", "--target", "mlflow", "--tracking-uri", uri, str(manifest), "-v"])
    assert up.returncode == 3, up.stderr
    assert f"nothing is listening at http://127.0.0.1:{port}" in up.stderr
    runs = [up, status(tmp_path / "m.batchlog-checkpoint")]
    assert_absent([URI_USER, URI_PASSWORD], everything_written(tmp_path, runs, set()))


def test_uri_credentials_win_over_the_environment_as_in_mlflow(
    tmp_path: Path, recorder: Callable[..., Recorder]
) -> None:
    server = recorder()
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    env = {
        "MLFLOW_TRACKING_TOKEN": BEARER,
        "MLFLOW_TRACKING_USERNAME": USERNAME,
        "MLFLOW_TRACKING_PASSWORD": PASSWORD,
    }
    args = ["upload", "--target", "mlflow", str(manifest), "--restart", "--tracking-uri"]
    done = cli([*args, server.url(userinfo())], env)
    assert done.returncode == 0, done.stderr
    assert server.headers[-1]["authorization"] == basic(URI_USER, URI_PASSWORD)
    warnings = [line for line in done.stderr.splitlines() if "ignored" in line]
    assert len(warnings) == 1 and "MLFLOW_TRACKING_" in warnings[0], done.stderr
    # without credentials in the URI: basic before bearer, as MLflow's client does
    done = cli([*args, server.url()], env)
    assert done.returncode == 0, done.stderr
    assert server.headers[-1]["authorization"] == basic(USERNAME, PASSWORD)
    # a user name without a password is no credential (MLflow's client ignores it too)
    done = cli([*args, server.url("someone@")], {})
    assert done.returncode == 0, done.stderr
    assert "authorization" not in server.headers[-1]
    assert server.headers[-1]["host"] == f"127.0.0.1:{server.port}"
    assert_absent([BEARER, PASSWORD, URI_PASSWORD], everything_written(tmp_path, [done], set()))


def test_uri_credentials_over_plain_http_are_refused_unless_loopback(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    for uri in (
        f"http://{userinfo()}mlflow.invalid:5000",
        f"ftp://{userinfo()}mlflow.invalid",
        f"http://{userinfo()}",
    ):
        done = cli(["upload", "--target", "mlflow", "--tracking-uri", uri, str(manifest)])
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "batchlog: error: --tracking-uri" in done.stderr
        assert_absent([URI_USER, URI_PASSWORD], {"stderr": done.stderr.encode()})
    with pytest.raises(ConfigurationError) as raised:
        mlflow_target(f"http://{userinfo()}10.1.1.1:5000")
    assert "plain http" in str(raised.value) and "SECRET" not in str(raised.value)
    target = mlflow_target(f"https://{userinfo()}mlflow.example/prefix/")
    assert (target.endpoint, target.prefix) == ("https://mlflow.example", "/prefix")
    assert target.identity == "mlflow/https://mlflow.example/prefix"
    assert target.authorization == basic(URI_USER, URI_PASSWORD)
    assert "SECRET" not in repr(target)


def test_a_bearer_token_that_cannot_be_a_header_is_refused_unseen(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    env = {"MLFLOW_TRACKING_TOKEN": f"{BEARER}\r\nX-Injected: 1"}
    args = ["upload", "--target", "mlflow", "--tracking-uri", "http://127.0.0.1:1", str(manifest)]
    done = cli(args, env)
    assert done.returncode == 2, done.stderr
    assert "MLFLOW_TRACKING_TOKEN" in done.stderr and "control characters" in done.stderr
    assert_absent([BEARER], {"stderr": done.stderr.encode()})


# ---- TLS -----------------------------------------------------------------------------------


def test_tls_verification_off_is_said_once(
    tmp_path: Path, recorder: Callable[..., Recorder]
) -> None:
    server = recorder(_self_signed(tmp_path))
    manifest = write_manifest(
        tmp_path / "m.jsonl", [inputs_record(f"r{i}", "ds") for i in range(5)]
    )
    args = ["upload", "--target", "mlflow", "--tracking-uri", server.url(), str(manifest)]
    refused = cli(args, {"MLFLOW_TRACKING_TOKEN": BEARER})
    assert refused.returncode == 3, refused.stderr  # a certificate nobody vouches for
    assert not server.headers
    done = cli(args, {"MLFLOW_TRACKING_TOKEN": BEARER, "MLFLOW_TRACKING_INSECURE_TLS": "true"})
    assert done.returncode == 0, done.stderr
    assert len(server.headers) == 5
    warned = [line for line in done.stderr.splitlines() if "verification is off" in line]
    assert len(warned) == 1, done.stderr
    assert "MLFLOW_TRACKING_INSECURE_TLS" in warned[0]


@pytest.mark.parametrize("insecure", ["true", "1", "TRUE"])
def test_insecure_tls_and_a_server_certificate_together_are_refused(
    tmp_path: Path, insecure: str
) -> None:
    ca = tmp_path / "ca.pem"
    _self_signed(tmp_path)
    ca.write_bytes((tmp_path / "cert.pem").read_bytes())
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    env = {"MLFLOW_TRACKING_INSECURE_TLS": insecure, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(ca)}
    args = ["--target", "mlflow", "--tracking-uri", "https://127.0.0.1:1", str(manifest)]
    for command in ("upload", "verify"):
        done = cli([command, *args], env)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().startswith("batchlog: error: ")
        assert "MLFLOW_TRACKING_INSECURE_TLS" in done.stderr
        assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in done.stderr


def test_an_insecure_tls_value_that_is_not_a_boolean_is_refused(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    env = {"MLFLOW_TRACKING_INSECURE_TLS": "yes please"}
    args = ["upload", "--target", "mlflow", "--tracking-uri", "https://127.0.0.1:1", str(manifest)]
    done = cli(args, env)
    assert done.returncode == 2, done.stderr
    assert "MLFLOW_TRACKING_INSECURE_TLS" in done.stderr and "true" in done.stderr


def bad_ca_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    directory = tmp_path / "cadir"
    directory.mkdir()
    not_pem = tmp_path / "not-a-ca.pem"
    not_pem.write_text("this is not a certificate\n")
    return {
        "missing": (tmp_path / "nope.pem", "no such file"),
        "directory": (directory, "is a directory"),
        "not PEM": (not_pem, "no PEM certificate in it"),
    }


def test_a_server_certificate_path_that_is_no_ca_file(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    for case, (path, reason) in bad_ca_files(tmp_path).items():
        for command in ("upload", "verify"):
            done = cli(
                [
                    command,
                    "--target",
                    "mlflow",
                    "--tracking-uri",
                    "https://127.0.0.1:1",
                    str(manifest),
                ],
                {"MLFLOW_TRACKING_SERVER_CERT_PATH": str(path)},
            )
            assert done.returncode == 2, (case, done.stderr)
            assert done.stderr == (
                f"batchlog: error: MLFLOW_TRACKING_SERVER_CERT_PATH {path}: {reason}\n"
            ), case


def test_an_oci_ca_bundle_that_is_no_ca_file(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    for case, (path, reason) in bad_ca_files(tmp_path).items():
        done = run_cli([*upload_args(oci, emu, str(manifest)), "--ca-bundle", str(path)])
        assert done.returncode == 2, (case, done.stderr)
        assert done.stderr == f"batchlog: error: --ca-bundle {path}: {reason}\n", case
    assert sum(emu.state.statuses.values()) == 0


def test_the_library_refuses_a_ca_file_that_is_no_ca_file(tmp_path: Path, oci: Oci) -> None:
    target = OciTarget("https://datalake.example", PLATFORM, WORKSPACE)
    for path, reason in bad_ca_files(tmp_path).values():
        with pytest.raises(ConfigurationError) as raised:
            batchlog.Settings(target=target, keys=StaticKey(KEY_ID, oci.key), ca_bundle=str(path))
        assert str(raised.value) == f"CA file {path}: {reason}"
    with pytest.raises(ConfigurationError):
        batchlog.Settings(
            target=target, keys=None, ca_bundle=str(tmp_path / "x.pem"), verify_tls=False
        )


# ---- plain http: refused where targets are built -------------------------------------------


def test_the_library_never_signs_over_plain_http_to_another_host(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    for endpoint in ("http://10.1.1.1", "http://datalake.example:80", "http://127.0.0.1.nip.io"):
        with pytest.raises(ConfigurationError) as raised:
            OciTarget(endpoint, PLATFORM, WORKSPACE)
        assert "plain http is refused except on loopback" in str(raised.value)
    with pytest.raises(ConfigurationError) as raised:
        OciTarget("https://user:pw-SECRET@datalake.example", PLATFORM, WORKSPACE)
    assert "SECRET" not in str(raised.value)
    with pytest.raises(ConfigurationError):
        OciTarget("datalake.example", PLATFORM, WORKSPACE)
    with pytest.raises(ConfigurationError) as raised:
        MlflowTarget("http://10.1.1.1:5000", authorization=f"Bearer {BEARER}")
    assert "plain http" in str(raised.value) and BEARER not in str(raised.value)
    with pytest.raises(ConfigurationError) as raised:
        MlflowTarget("http://u:pw-SECRET@127.0.0.1:5000")
    assert "SECRET" not in str(raised.value)
    with pytest.raises(ConfigurationError) as raised:
        MlflowTarget("https://mlflow.example", authorization=f"Bearer {BEARER}\nX: y")
    assert BEARER not in str(raised.value)
    MlflowTarget("http://mlflow.example:5000")  # nothing to protect: allowed
    for loopback in (
        "http://127.0.0.1:1",
        "http://127.0.0.2",
        "http://localhost:8",
        "http://[::1]:9",
    ):
        OciTarget(loopback, PLATFORM, WORKSPACE)
        MlflowTarget(loopback, authorization=f"Bearer {BEARER}")

    emu = emulator()  # the emulator, on loopback, keeps working through the library
    manifest = write_manifest(tmp_path / "m.jsonl", mixed_records(6, runs=2))
    settings = batchlog.Settings(
        target=OciTarget(emu.url, PLATFORM, WORKSPACE), keys=StaticKey(KEY_ID, oci.key)
    )
    report = anyio.run(batchlog.upload, [str(manifest)], settings)
    assert report.exit_code == 0 and report.succeeded == 6


def test_a_user_principal_that_cannot_be_a_header_is_refused(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    emu = emulator()
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    done = run_cli([*upload_args(oci, emu, str(manifest)), "--user-principal", "al\r\nX-Evil: 1"])
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "batchlog: error: --user-principal holds line breaks or control characters\n"
    )
    assert sum(emu.state.statuses.values()) == 0
