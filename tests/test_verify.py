"""`batchlog verify` tells "missing on the server" from "could not read the server" (issue 9).

A server that cannot be reached, refuses the credentials or answers garbage is no proof
that records are missing: exit 3 with one line naming the server and the reason, not a
list of every record as missing (exit 1).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import free_loopback_port, inputs_record, run_cli, write_manifest


@pytest.fixture
def answering() -> Iterator[Callable[..., str]]:
    """Start loopback servers answering every request with one status and body."""
    servers: list[ThreadingHTTPServer] = []

    def start(status: int, body: str, content_type: str = "application/json") -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def verify(manifest: Path, uri: str) -> tuple[int, str]:
    out = run_cli(["verify", "--target", "mlflow", "--tracking-uri", uri, str(manifest)])
    return out.returncode, out.stderr + out.stdout


def manifest_of(tmp_path: Path, n: int = 20) -> Path:
    records = [inputs_record(f"run{i:04d}", f"ds{i:08d}") for i in range(n)]
    return write_manifest(tmp_path / "m.jsonl", records)


def test_verify_against_nothing_listening_is_exit_3_not_missing(tmp_path: Path) -> None:
    rc, text = verify(manifest_of(tmp_path), f"http://127.0.0.1:{free_loopback_port()}")
    assert rc == 3, text
    assert "not found" not in text and "Traceback" not in text
    assert "cannot read runs back" in text


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (401, '{"error_code": "UNAUTHENTICATED", "message": "who are you"}', "401"),
        (403, '{"error_code": "PERMISSION_DENIED", "message": "no"}', "403"),
        (200, "<html><title>Sign in</title></html>", "not the API"),
        (502, "<html><title>502 Bad Gateway</title></html>", "502"),
    ],
)
def test_verify_that_cannot_read_the_server_says_so(
    tmp_path: Path, answering: Callable[..., str], status: int, body: str, why: str
) -> None:
    ctype = "text/html" if body.startswith("<") else "application/json"
    uri = answering(status, body, ctype)
    rc, text = verify(manifest_of(tmp_path), uri)
    assert rc == 3, text
    lines = [line for line in text.splitlines() if "cannot read runs back" in line]
    assert len(lines) == 1 and why in lines[0], text
    assert "not found" not in text and "Traceback" not in text


def test_verify_names_runs_the_server_says_do_not_exist(
    tmp_path: Path, answering: Callable[..., str]
) -> None:
    uri = answering(404, '{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "Run not found"}')
    rc, text = verify(manifest_of(tmp_path, 5), uri)
    assert rc == 1, text
    assert text.count("not found") == 5, text
