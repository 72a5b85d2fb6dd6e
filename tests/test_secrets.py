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
from functools import partial
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
    ``missing*``), runs/get answers 404. A recorder that ``refuses`` answers every
    request 401, as a server that does not take the credentials."""

    def __init__(self, tls: ssl.SSLContext | None = None, refuses: bool = False) -> None:
        self.headers: list[dict[str, str]] = []
        self.refuses = refuses
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.headers.append({k.lower(): v for k, v in self.headers.items()})
                if recorder.refuses:
                    self.answer(401, {"error_code": "UNAUTHENTICATED", "message": "no"})
                elif str(orjson.loads(body).get("run_id", "")).startswith("echo"):
                    # a server (or a proxy) whose error quotes the request's headers
                    message = f"bad request with headers {dict(self.headers.items())}"
                    self.answer(400, {"error_code": "INVALID_PARAMETER_VALUE", "message": message})
                elif str(orjson.loads(body).get("run_id", "")).startswith("missing"):
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

    def start(tls: ssl.SSLContext | None = None, refuses: bool = False) -> Recorder:
        started.append(Recorder(tls, refuses))
        return started[-1]

    yield start
    for r in started:
        r.close()


def cli(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """batchlog in its own process, with MLflow's and OCI's variables as given only."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OCI_"))}
    return subprocess.run(
        [sys.executable, "-m", "batchlog", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
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
    assert f"mlflow/http://***@127.0.0.1:{server.port}" in shown.stdout, shown.stdout
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


# A password with an unencoded '/', '?' or '#' (RFC 3986 forbids them in userinfo) ends the
# URI's authority inside it: parsed as written, the password is a port, a path or a fragment
# and the host is the user name. Such a URI is refused, and no message shows its userinfo.
MALFORMED = ["pa/ss-SECRET", "pa?ss-SECRET", "pa#ss-SECRET", "12#SECRET", "12/SECRET", "12?SECRET"]
# '@', '%' and ':' leave the host where it is (the last '@' ends the userinfo): accepted.
WELL_FORMED = ["pa@ss-SECRET", "pa%ss-SECRET", "pa:ss-SECRET", "pa%2Fss-SECRET"]
URI_SHAPES = [
    "https://uzer7:{}@host.example",
    "https://uzer7:{}@host.example:8443/prefix",
    "http://uzer7:{}@10.1.1.1:5000",  # plain http beyond loopback
    "ftp://uzer7:{}@host.example",  # no http(s)
    "uzer7:{}@host.example",  # no scheme
    "https://uzer7:{}@",  # no host
]


def assert_refused_unseen(rc: int, text: str, what: object) -> None:
    assert rc == 2, (what, text)
    errors = [line for line in text.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("batchlog: error: "), (what, text)
    assert "SECRET" not in text and "uzer7" not in text and "ss-" not in text, (what, text)
    assert "Traceback" not in text and "internal error" not in text, (what, text)


@pytest.mark.parametrize("password", MALFORMED + WELL_FORMED)
def test_no_message_about_a_tracking_uri_shows_its_credentials(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    password: str,
) -> None:
    from batchlog.cli import main

    manifest = str(write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")]))
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    for shape in URI_SHAPES:
        uri = shape.format(password)
        accepted = password in WELL_FORMED and shape.startswith("https://uzer7:{}@host")
        for how in ("flag", "env"):
            monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
            args = ["--target", "mlflow", manifest]
            if how == "flag":
                args += ["--tracking-uri", uri]
            else:
                monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            for command in (["upload", "--dry-run"], ["verify"]):
                if accepted and command == ["verify"]:
                    continue  # it would go to host.example: the recorder test below does
                rc = main([*command, *args])
                text = capsys.readouterr().err + caplog.text
                caplog.clear()
                if accepted:
                    assert rc == 0, (uri, text)
                    assert "SECRET" not in text and "uzer7" not in text, (uri, text)
                else:
                    assert_refused_unseen(rc, text, (uri, how, command))
        # the library: the same refusals, in the same words
        refusals: list[Callable[[], object]] = [
            partial(mlflow_target, uri),
            partial(mlflow_target, uri, "Bearer x"),
            partial(MlflowTarget, uri),
            partial(OciTarget, uri, PLATFORM, WORKSPACE),
        ]
        if accepted:
            refusals = refusals[2:]  # the URI's credentials are taken out: the target is fine
        for n, build in enumerate(refusals):
            with pytest.raises(ConfigurationError) as raised:
                build()
            assert_refused_unseen(2, f"batchlog: error: {raised.value}", (uri, n))


@pytest.mark.parametrize("password", MALFORMED + WELL_FORMED)
def test_no_message_about_an_endpoint_shows_credentials(
    tmp_path: Path, oci: Oci, password: str
) -> None:
    from batchlog.cli import main
    from batchlog.target import check_endpoint

    manifest = str(write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")]))
    for shape in URI_SHAPES:
        uri = shape.format(password)
        args = ["upload", manifest, "--dry-run", "--config-file", str(oci.config)]
        rc = main([*args, "--platform-id", PLATFORM, "--workspace", WORKSPACE, "--endpoint", uri])
        assert_refused_unseen(rc, "batchlog: error: refused", uri)
        with pytest.raises(ConfigurationError) as raised:
            check_endpoint(uri)
        assert_refused_unseen(2, f"batchlog: error: {raised.value}", uri)


def test_a_malformed_uri_is_refused_and_shown_without_its_userinfo(tmp_path: Path) -> None:
    """The cases the review found, as a user meets them."""
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    for password in MALFORMED:
        uri = f"https://alice:{password}@host.example"
        done = cli(
            ["upload", str(manifest), "--target", "mlflow", "--dry-run"],
            {"MLFLOW_TRACKING_URI": uri},
        )
        assert done.returncode == 2, (uri, done.stderr)
        assert "SECRET" not in done.stderr and "alice" not in done.stderr, done.stderr
        assert "https://***@host.example" in done.stderr, done.stderr
        assert "percent-encode" in done.stderr, done.stderr


def test_well_formed_uri_credentials_with_reserved_characters_are_sent(
    tmp_path: Path, recorder: Callable[..., Recorder]
) -> None:
    from urllib.parse import unquote

    server = recorder()
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    runs = []
    for password in WELL_FORMED:
        uri = server.url(f"uzer7:{password}@")
        up = cli(
            ["upload", str(manifest), "--target", "mlflow", "--restart", "--tracking-uri", uri]
        )
        assert up.returncode == 0, (password, up.stderr)
        assert server.headers[-1]["authorization"] == basic("uzer7", unquote(password))
        assert server.headers[-1]["host"] == f"127.0.0.1:{server.port}"
        check = cli(["verify", str(manifest), "--target", "mlflow", "--tracking-uri", uri])
        assert check.returncode == 1, check.stderr  # the recorder knows no run: missing
        runs += [up, check]
    runs.append(status(tmp_path / "m.batchlog-checkpoint"))
    secrets = [*WELL_FORMED, *(unquote(p) for p in WELL_FORMED), "uzer7"]
    assert_absent(secrets, everything_written(tmp_path, runs, set()))


@pytest.mark.parametrize("password", MALFORMED + WELL_FORMED)
def test_a_checkpoint_naming_a_target_with_any_userinfo_is_shown_without_it(
    password: str,
) -> None:
    from batchlog.target import without_userinfo

    for shape in URI_SHAPES:
        shown = without_userinfo("mlflow/" + shape.format(password) + "/x")
        assert "SECRET" not in shown and "uzer7" not in shown and "ss-" not in shown, shown
        assert "***" in shown, shown
    assert without_userinfo("mlflow/https://host.example:5000/p") == (
        "mlflow/https://host.example:5000/p"
    )


def test_a_401_names_the_credentials_that_were_used(
    tmp_path: Path, recorder: Callable[..., Recorder]
) -> None:
    server = recorder(refuses=True)
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record(f"r{i}", "d") for i in range(9)])
    args = ["upload", str(manifest), "--target", "mlflow", "--restart", "--tracking-uri"]
    in_uri = cli([*args, server.url(userinfo())], {"MLFLOW_TRACKING_TOKEN": BEARER})
    assert in_uri.returncode == 3, in_uri.stderr
    assert "user name and password in the tracking URI" in in_uri.stderr, in_uri.stderr
    in_env = cli([*args, server.url()], {"MLFLOW_TRACKING_TOKEN": BEARER})
    assert in_env.returncode == 3, in_env.stderr
    assert "MLFLOW_TRACKING_TOKEN" in in_env.stderr, in_env.stderr
    assert "in the tracking URI" not in in_env.stderr, in_env.stderr
    assert_absent(
        [BEARER, URI_PASSWORD, URI_USER], everything_written(tmp_path, [in_uri, in_env], set())
    )


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
    fifo = tmp_path / "ca-fifo"  # no writer: opening it waits forever
    os.mkfifo(fifo)
    huge = tmp_path / "huge.pem"
    with open(huge, "wb") as f:
        f.truncate((16 << 20) + 1)
    return {
        "missing": (tmp_path / "nope.pem", "no such file"),
        "directory": (directory, "is a directory"),
        "not PEM": (not_pem, "no PEM certificate in it"),
        "fifo": (fifo, "is not a regular file (a pipe or a device?)"),
        "device": (Path("/dev/zero"), "is not a regular file (a pipe or a device?)"),
        "huge": (huge, "is larger than 16 MiB: not a CA bundle"),
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
                timeout=30,
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
        args = [*upload_args(oci, emu, str(manifest)), "--ca-bundle", str(path)]
        done = run_cli(args, timeout=30)
        assert done.returncode == 2, (case, done.stderr)
        assert done.stderr == f"batchlog: error: --ca-bundle {path}: {reason}\n", case
    assert sum(emu.state.statuses.values()) == 0


def _writer_comes_and_goes(fifo: Path) -> None:
    """Let a reader waiting on ``fifo`` go (it reads the end of the file)."""
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_the_library_refuses_a_ca_file_that_is_no_ca_file(tmp_path: Path, oci: Oci) -> None:
    target = OciTarget("https://datalake.example", PLATFORM, WORKSPACE)
    for path, reason in bad_ca_files(tmp_path).values():
        # a FIFO would hold this test forever: after 20 s a writer comes and goes
        unblock = threading.Timer(20, _writer_comes_and_goes, [path])
        unblock.start()
        try:
            with pytest.raises(ConfigurationError) as raised:
                batchlog.Settings(
                    target=target, keys=StaticKey(KEY_ID, oci.key), ca_bundle=str(path)
                )
        finally:
            unblock.cancel()
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


@pytest.mark.parametrize("auth", ["basic", "bearer"])
def test_a_server_error_quoting_the_request_headers_never_shows_the_credentials(
    tmp_path: Path, recorder: Callable[..., Recorder], auth: str
) -> None:
    """Found by review: an echoing server's 400 put the Authorization header into stderr
    and into every dead-letter line."""
    server = recorder()
    password, token = "S3CR3TPW-echo", "tok-SECRET-echo-0123456789"
    env = (
        {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": password}
        if auth == "basic"
        else {"MLFLOW_TRACKING_TOKEN": token}
    )
    manifest = write_manifest(
        tmp_path / "m.jsonl", [inputs_record(f"echo{i}", f"ds{i:08d}") for i in range(3)]
    )
    done = cli(
        ["upload", str(manifest), "--target", "mlflow", "--tracking-uri", server.url(), "-v"],
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert "INVALID_PARAMETER_VALUE" in done.stderr
    secrets = [password, token, basic("alice", password).split()[1]]
    assert_absent(secrets, everything_written(tmp_path, [done], {manifest}))
