"""Shared fixtures: a key made in the test, an OCI config pointing at it, emulators, manifests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from batchlog.emulator import EmulatorConfig, EmulatorThread

TENANCY = "ocid1.tenancy.oc1..test"
USER = "ocid1.user.oc1..test"
FINGERPRINT = "12:34:56:78:90:ab:cd:ef:12:34:56:78:90:ab:cd:ef"
KEY_ID = f"{TENANCY}/{USER}/{FINGERPRINT}"
PLATFORM = "ocid1.aidataplatform.oc1.iad.test"
WORKSPACE = "ws-1"


@dataclass
class Oci:
    key: rsa.RSAPrivateKey
    key_pem: bytes
    config: Path


@pytest.fixture(scope="session")
def session_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def oci(tmp_path: Path, session_key: rsa.RSAPrivateKey) -> Oci:
    pem = session_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    config, _ = write_oci_config(tmp_path, pem, "oci_api_key.pem", "oci_config")
    return Oci(session_key, pem, config)


def write_oci_config(
    folder: Path, pem: bytes, key_name: str, config_name: str, passphrase: str | None = None
) -> tuple[Path, Path]:
    """An OCI config naming a key file holding ``pem`` (mode 0600), both in ``folder``;
    ``passphrase``: the config's pass_phrase. Returns (config, key file)."""
    key_file = folder / key_name
    key_file.write_bytes(pem)
    key_file.chmod(0o600)
    config = folder / config_name
    config.write_text(
        f"[DEFAULT]\nuser={USER}\nfingerprint={FINGERPRINT}\ntenancy={TENANCY}\n"
        f"region=us-ashburn-1\nkey_file={key_file}\n"
        + (f"pass_phrase={passphrase}\n" if passphrase is not None else "")
    )
    return config, key_file


@pytest.fixture
def emulator(oci: Oci) -> Iterator[Callable[..., EmulatorThread]]:
    """Start emulators that verify signatures with the test's key; stopped after the test."""
    started: list[EmulatorThread] = []

    def start(**options: Any) -> EmulatorThread:
        options.setdefault("public_key", oci.key.public_key())
        options.setdefault("key_id", KEY_ID)
        options.setdefault("platform_id", PLATFORM)
        options.setdefault("workspace", WORKSPACE)
        emu = EmulatorThread(EmulatorConfig(**options)).__enter__()
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.__exit__(None, None, None)


def inputs_record(run: str, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "run_id": run,
        "dataset_inputs": [
            {
                "dataset": {
                    "name": name,
                    "digest": "d" + name[-8:],
                    "source": f"s3://b/{name}",
                    "source_type": "s3",
                },
                "tags": [{"key": "mlflow.data.context", "value": "training"}],
            }
        ],
        **extra,
    }


def model_record(run: str, n: int) -> dict[str, Any]:
    return {
        "op": "log-model",
        "run_id": run,
        "model_json": {
            "artifact_path": f"model{n}",
            "flavors": {"python_function": {}},
            "utc_time_created": f"2025-01-01 00:00:{n:02d}.000000",
            "run_id": run,
        },
    }


def mixed_records(n: int, runs: int | None = None) -> list[dict[str, Any]]:
    """n records over runs: mostly log-inputs (several per run), a model every 5th."""
    runs = runs or max(1, n // 4)
    out = []
    for i in range(n):
        run = f"run{i * runs // n:05d}"
        out.append(model_record(run, i) if i % 5 == 4 else inputs_record(run, f"ds{i:08d}"))
    return out


def write_manifest(path: Path, records: list[Any]) -> Path:
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else orjson.dumps(r))
            f.write(b"\n")
    return path


def expected_items(records: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    out = set()
    for r in records:
        if "model_json" in r:
            m = r["model_json"]
            out.add(("log-model", r["run_id"], f"{m['artifact_path']}@{m['utc_time_created']}"))
        else:
            for d in r.get("dataset_inputs") or r.get("datasets"):
                ds = d["dataset"]
                out.add(("log-inputs", r["run_id"], f"{ds['name']}@{ds['digest']}"))
    return out


def upload_args(oci: Oci, emu: EmulatorThread, *extra: str) -> list[str]:
    return [
        "upload",
        "--config-file",
        str(oci.config),
        "--endpoint",
        emu.url,
        "--platform-id",
        PLATFORM,
        "--workspace",
        WORKSPACE,
        *extra,
    ]


def run_cli(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """batchlog as a user runs it: a separate process."""
    env = dict(os.environ)
    env.pop("OCI_CONFIG_FILE", None)
    env.pop("OCI_CLI_PROFILE", None)
    return subprocess.run(
        [sys.executable, "-m", "batchlog", *args],
        capture_output=True,
        text=True,
        timeout=kwargs.pop("timeout", 120),
        env=env,
        **kwargs,
    )


# ---- shared helpers appended for the stateful, proxy and in-flight tests -----------------


def free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mlflow_server(root: Path, workers: int = 1) -> tuple[subprocess.Popen[bytes], str]:
    """A real `mlflow server` (sqlite under ``root``, loopback, a free port); waits for /health.

    The caller stops it with ``stop_mlflow_server``. Started as tests/test_mlflow.py does.
    """
    import time
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'db.sqlite'}",
                "--default-artifact-root",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its uvicorn and huey children are stopped with it
        )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_mlflow_server(proc)
            raise RuntimeError("mlflow server did not start: " + log_path.read_text()[-3000:])
        time.sleep(0.5)


def stop_mlflow_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and its children (its own process group) at once: a test server's
    sqlite file is thrown away, and MLflow 3's waits several seconds on SIGTERM."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)
