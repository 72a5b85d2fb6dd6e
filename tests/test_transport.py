"""One attempt over real loopback HTTP: redirects, connections never made, unique conflicts,
read-back on both targets, model identity against a real mlflow server, session tokens, and
what the targets say about themselves."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from batchlog.auth import load_credentials
from batchlog.emulator import EmulatorThread
from batchlog.plan import Call, make_call
from batchlog.records import Record
from batchlog.retry import NO_ANSWER, Answer, RetryPolicy
from batchlog.signing import KeySource, StaticKey, sign_get
from batchlog.target import MlflowTarget, OciTarget, Target
from batchlog.transport import Transport, logged_models, model_identity
from batchlog.validate import parse_line
from tests.conftest import KEY_ID, PLATFORM, WORKSPACE, Oci, inputs_record, model_record
from tests.test_mlflow import mlflow_uri, new_runs

__all__ = ["mlflow_uri"]  # the fixture, imported for this module's own server

T = TypeVar("T")
StartEmulator = Callable[..., EmulatorThread]
POLICY = RetryPolicy()


# ---- helpers --------------------------------------------------------------------------------


def record(doc: dict[str, Any], seq: int = 0) -> Record:
    item = parse_line(orjson.dumps(doc), seq, f"m.jsonl:{seq + 1}")
    assert isinstance(item, Record), item
    return item


def call_for(target: Target, doc: dict[str, Any]) -> Call:
    return make_call(target, (record(doc),))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: web.Application, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """An aiohttp app on a free loopback port, for the length of the block."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def transport(target: Target, keys: KeySource | None = None, **options: Any) -> Transport:
    return Transport(target, keys, concurrency=4, timeout=options.pop("timeout", 10.0), **options)


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


def oci_target(emu: EmulatorThread) -> OciTarget:
    return OciTarget(emu.url, PLATFORM, WORKSPACE)


def oci_keys(oci: Oci) -> StaticKey:
    return StaticKey(KEY_ID, oci.key)


# ---- 1. redirects -----------------------------------------------------------------------


def test_a_redirect_is_reported_not_followed() -> None:
    """An SSO proxy answering 302 to a login page: aiohttp would follow it as a GET and the
    login page's 200 would pass for a success."""
    seen: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        await request.read()
        seen.append(f"{request.method} {request.path}")
        return web.Response(status=302, headers={"Location": "https://sso.example/login"})

    async def login(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(text="<html>please log in</html>")

    async def no_location(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=307)

    async def go() -> tuple[Answer, Answer, Answer, dict[str, Any] | None]:
        app = web.Application()
        app.router.add_post("/api/2.0/mlflow/runs/log-model", redirect)
        app.router.add_post("/api/2.0/mlflow/runs/log-inputs", no_location)
        app.router.add_get("/api/2.0/mlflow/runs/get", redirect)
        app.router.add_get("/login", login)
        async with serve(app) as url:
            target = MlflowTarget(url)
            relative = web.Application()

            async def rel(request: web.Request) -> web.Response:
                await request.read()
                return web.Response(status=301, headers={"Location": "/login?next=/x&state=s3"})

            relative.router.add_post("/api/2.0/mlflow/runs/log-model", rel)
            async with transport(target) as t:
                model = await t.send(call_for(target, model_record("r1", 1)))
                inputs = await t.send(call_for(target, inputs_record("r1", "ds1")))
                got = await t.get_run("r1")
            async with serve(relative) as url2, transport(MlflowTarget(url2)) as t2:
                rel_answer = await t2.send(call_for(MlflowTarget(url2), model_record("r1", 1)))
        return model, inputs, rel_answer, got

    model, inputs, rel_answer, got = run(go)
    assert seen == ["POST /api/2.0/mlflow/runs/log-model", "GET /api/2.0/mlflow/runs/get"]
    assert (model.status, model.code) == (302, "Redirect")
    assert model.message == "redirected to https://sso.example/login"
    assert (inputs.status, inputs.code, inputs.message) == (
        307,
        "Redirect",
        "redirected to (no Location)",
    )
    # the query of a login URL (state, nonces) is left out of messages
    assert (rel_answer.status, rel_answer.message) == (301, "redirected to /login?…")
    assert got is None
    for answer in (model, inputs, rel_answer):
        assert POLICY.verdict(answer) == "redirect"
        assert not answer.in_doubt
        assert answer.sent


def test_redirect_verdict_covers_every_3xx() -> None:
    for status in (300, 301, 302, 303, 304, 307, 308, 399):
        assert POLICY.verdict(Answer(status, "Redirect")) == "redirect"
    assert POLICY.verdict(Answer(200)) == "ok"
    assert POLICY.verdict(Answer(400)) == "permanent"


LOGIN_PAGE = "<!DOCTYPE html><html><body><form action=/sso>please log in</form></body></html>"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "shown"),
    [
        (200, LOGIN_PAGE, "text/html", "text/html; charset=utf-8"),  # a login page, served
        (200, "OK", "text/plain", "text/plain; charset=utf-8"),  # a proxy's health page
        (201, "[]", "application/json", "application/json; charset=utf-8"),
        (200, '"done"', "application/json", "application/json; charset=utf-8"),
        (202, "{not json", "application/json", "application/json; charset=utf-8"),
    ],
)
def test_a_2xx_that_is_not_a_json_object_is_not_the_api(
    status: int, body: str, content_type: str, shown: str
) -> None:
    """A 2xx whose body is not a JSON object did not come from the API (which answers
    ``{}``): counting it as a success would journal records done that were never applied."""
    from batchlog.retry import NOT_THE_API

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, text=body, content_type=content_type)

    async def go() -> Answer:
        app = web.Application()
        app.router.add_post("/api/2.0/mlflow/runs/log-model", handler)
        async with serve(app) as url:
            target = MlflowTarget(url)
            async with transport(target) as t:
                return await t.send(call_for(target, model_record("r1", 1)))

    answer = run(go)
    assert NOT_THE_API == "NotTheApi"
    assert (answer.status, answer.code, answer.sent) == (status, "NotTheApi", True)
    assert answer.message == (
        f"answered {status} with {shown}, not a JSON object: "
        "not the API (a login page, or a proxy?)"
    )
    assert LOGIN_PAGE not in answer.message
    assert POLICY.verdict(answer) == "redirect"
    assert not answer.in_doubt


def test_a_2xx_with_a_json_object_or_nothing_is_a_success() -> None:
    bodies = [b"{}", b"", b" {} \n", b'{"run_id": "r1"}', b'\t{ "a" : [1, {"b": 2}] }']
    seen: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        body = bodies[len(seen)]
        seen.append(body)
        return web.Response(status=200, body=body, content_type="application/json")

    async def go() -> list[Answer]:
        app = web.Application()
        app.router.add_post("/api/2.0/mlflow/runs/log-model", handler)
        async with serve(app) as url:
            target = MlflowTarget(url)
            async with transport(target) as t:
                return [await t.send(call_for(target, model_record("r1", 1))) for _ in bodies]

    answers = run(go)
    assert seen == bodies
    for answer in answers:
        assert (answer.status, answer.code) == (200, ""), answer
        assert POLICY.verdict(answer) == "ok"


def test_a_2xx_without_a_content_type_says_so() -> None:
    from batchlog.transport import _answer

    answer = _answer(200, {}, b"<html>login</html>", "rid")
    assert (answer.code, answer.request_id) == ("NotTheApi", "rid")
    assert answer.message.startswith("answered 200 with no content type, not a JSON object")
    assert _answer(204, {}, b"", "rid").code == ""


# ---- 2. nothing sent ----------------------------------------------------------------------


def test_a_refused_connection_was_never_sent() -> None:
    port = free_port()  # nothing listens there any more
    mlflow = MlflowTarget(f"http://127.0.0.1:{port}")
    oci = OciTarget(f"http://127.0.0.1:{port}", PLATFORM, WORKSPACE)
    keys = StaticKey(KEY_ID, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    async def go() -> tuple[Answer, Answer]:
        async with transport(mlflow) as t1, transport(oci, keys) as t2:
            return (
                await t1.send(call_for(mlflow, model_record("r1", 1))),
                await t2.send(call_for(oci, model_record("r1", 1))),
            )

    plain, signed = run(go)
    assert plain == Answer(
        NO_ANSWER, "CannotConnect", f"connection refused to 127.0.0.1:{port}", "", sent=False
    )
    assert (signed.code, signed.message, signed.sent) == (
        "CannotConnect",
        f"connection refused to 127.0.0.1:{port}",
        False,
    )
    assert len(signed.request_id) == 32  # the id that was to be sent, for the logs
    for answer in (plain, signed):
        assert not answer.in_doubt
        assert POLICY.verdict(answer) == "retry"


def test_an_unknown_host_was_never_sent() -> None:
    target = MlflowTarget("http://batchlog-test.invalid:5000")

    async def go() -> Answer:
        async with transport(target) as t:
            return await t.send(call_for(target, model_record("r1", 1)))

    answer = run(go)
    assert (answer.status, answer.code, answer.sent) == (NO_ANSWER, "CannotConnect", False)
    assert answer.message.startswith("cannot resolve batchlog-test.invalid"), answer.message
    assert not answer.in_doubt


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return ctx


def test_a_failed_tls_handshake_was_never_sent(tmp_path: Path) -> None:
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({})

    async def go() -> tuple[Answer, Answer]:
        app = web.Application()
        app.router.add_post("/api/2.0/mlflow/runs/log-model", handler)
        async with serve(app, _self_signed(tmp_path)) as tls_url, serve(app) as plain_url:
            untrusted = MlflowTarget(tls_url)  # a certificate no CA vouches for
            wrong = MlflowTarget(plain_url.replace("http://", "https://"))  # TLS to plain HTTP
            async with transport(untrusted) as t1, transport(wrong) as t2:
                return (
                    await t1.send(call_for(untrusted, model_record("r1", 1))),
                    await t2.send(call_for(wrong, model_record("r1", 1))),
                )

    cert, handshake = run(go)
    assert hits == []
    for answer in (cert, handshake):
        assert (answer.status, answer.code, answer.sent) == (NO_ANSWER, "CannotConnect", False)
        assert not answer.in_doubt
    assert "certificate" in cert.message and "127.0.0.1:" in cert.message
    assert "TLS" in handshake.message and "127.0.0.1:" in handshake.message


def test_a_reset_keep_alive_connection_stays_in_doubt() -> None:
    """A reused connection reset after the request went out may have been applied: not a
    connection that could not be made."""
    applied: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        applied.append(await request.read())
        if len(applied) == 2:  # applied, then the connection is reset before any answer
            transport_ = request.transport
            assert transport_ is not None
            sock = transport_.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport_.abort()
            raise asyncio.CancelledError
        return web.json_response({})

    async def go() -> tuple[Answer, Answer]:
        app = web.Application()
        app.router.add_post("/api/2.0/mlflow/runs/log-model", handler)
        async with serve(app) as url:
            target = MlflowTarget(url)
            async with transport(target) as t:
                first = await t.send(call_for(target, model_record("r1", 1)))
                second = await t.send(call_for(target, model_record("r1", 2)))
        return first, second

    first, second = run(go)
    assert first.status == 200
    assert len(applied) == 2
    assert second.status == NO_ANSWER and second.code != "CannotConnect"
    assert second.sent and second.in_doubt
    assert POLICY.verdict(second) == "retry"


def test_a_signing_failure_was_never_sent() -> None:
    class Broken:
        refreshable = False

        def snapshot(self) -> Any:
            raise OSError("token endpoint unreachable")

        def refresh(self, seen: int | None = None) -> None:
            return None

    target = OciTarget(f"http://127.0.0.1:{free_port()}", PLATFORM, WORKSPACE)

    async def go() -> Answer:
        async with transport(target, Broken()) as t:
            return await t.send(call_for(target, model_record("r1", 1)))

    answer = run(go)
    assert (answer.code, answer.sent, answer.in_doubt) == ("SigningFailed", False, False)


def test_in_doubt_depends_on_whether_it_was_sent() -> None:
    assert Answer(NO_ANSWER, "Timeout").in_doubt
    assert Answer(503).in_doubt
    assert not Answer(NO_ANSWER, "CannotConnect", sent=False).in_doubt
    assert not Answer(400, "InvalidParameter").in_doubt
    assert Answer(400, "UniqueConflict").in_doubt


# ---- 3. unique-constraint races --------------------------------------------------------

SQLITE = (
    "(sqlite3.IntegrityError) UNIQUE constraint failed: tags.key, tags.run_uuid\n"
    "[SQL: INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)]"
)
POSTGRES = (
    '(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "tag_pk"'
)
MYSQL = "(pymysql.err.IntegrityError) (1062, \"Duplicate entry 'x-y' for key 'PRIMARY'\")"


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (500, "INTERNAL_ERROR", SQLITE),
        (400, "INVALID_PARAMETER_VALUE", SQLITE),
        (400, "INVALID_PARAMETER_VALUE", POSTGRES),
        (500, "INTERNAL_ERROR", MYSQL),
        (500, "INTERNAL_ERROR", "API request failed: " + "x" * 600 + " " + SQLITE),
    ],
)
def test_a_unique_constraint_race_is_a_conflict_to_read_back(
    status: int, code: str, message: str
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error_code": code, "message": message}, status=status)

    async def go() -> Answer:
        app = web.Application()
        app.router.add_post("/api/2.0/mlflow/runs/log-inputs", handler)
        async with serve(app) as url:
            target = MlflowTarget(url)
            async with transport(target) as t:
                return await t.send(call_for(target, inputs_record("r1", "ds1")))

    answer = run(go)
    assert (answer.status, answer.code) == (status, "UniqueConflict")
    assert code in answer.message  # the server's own code is kept for the logs
    assert POLICY.verdict(answer) == "retry"
    assert answer.in_doubt


def test_an_ordinary_400_stays_permanent() -> None:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"error_code": "INVALID_PARAMETER_VALUE", "message": "Model json is missing fields"},
            status=400,
        )

    async def go() -> Answer:
        app = web.Application()
        app.router.add_post("/api/2.0/mlflow/runs/log-model", handler)
        async with serve(app) as url:
            target = MlflowTarget(url)
            async with transport(target) as t:
                return await t.send(call_for(target, model_record("r1", 1)))

    answer = run(go)
    assert (answer.status, answer.code) == (400, "INVALID_PARAMETER_VALUE")
    assert POLICY.verdict(answer) == "permanent" and not answer.in_doubt


# ---- 4. model identity ---------------------------------------------------------------------


def base_model(**extra: Any) -> dict[str, Any]:
    return {
        "artifact_path": "model",
        "flavors": {"python_function": {"loader_module": "mlflow.sklearn"}},
        "utc_time_created": "2024-05-01 10:00:00.000000",
        "run_id": "r1",
        **extra,
    }


def test_model_identity_is_the_whole_model() -> None:
    a = base_model()
    # same artifact path and creation time, another model: not the same
    b = base_model(flavors={"sklearn": {"pickled_model": "model.pkl"}})
    c = base_model(run_id="r2")
    assert len({model_identity(a), model_identity(b), model_identity(c)}) == 3
    # key order does not matter, at any depth
    shuffled = dict(reversed(list(a.items())))
    shuffled["flavors"] = {"python_function": {"loader_module": "mlflow.sklearn"}}
    assert model_identity(shuffled) == model_identity(a)
    # a model_uuid is the identity
    assert model_identity(base_model(model_uuid="abc123")) == "abc123"
    assert model_identity(base_model(model_uuid="abc123", artifact_path="x")) == "abc123"


def test_model_identity_survives_values_orjson_cannot_write() -> None:
    big = base_model(flavors={"python_function": {"n": 2**70}})
    other = base_model(flavors={"python_function": {"n": 2**70 + 1}})
    assert model_identity(big) == model_identity(dict(big))
    assert model_identity(big) != model_identity(other)


def test_model_identity_sees_through_what_mlflow_keeps() -> None:
    """MLflow stores Model.get_tags_dict(): run_id, utc_time_created, artifact_path,
    model_uuid (null when none was sent) and flavors without their "config" entries."""
    sent = base_model(
        flavors={"python_function": {"loader_module": "m", "config": {"a": 1}}},
        signature={"inputs": "[]"},
        mlflow_version="2.9.0",
        metadata={"k": "v"},
    )
    stored = {
        "run_id": "r1",
        "utc_time_created": "2024-05-01 10:00:00.000000",
        "artifact_path": "model",
        "model_uuid": None,
        "flavors": {"python_function": {"loader_module": "m"}},
    }
    assert model_identity(stored) == model_identity(sent)
    assert model_identity(stored) != model_identity(base_model())


# ---- 4 and 5. read-back against a real mlflow server ----------------------------------------


def test_read_back_from_mlflow_recognises_what_was_sent(mlflow_uri: str) -> None:
    run_id, other_run = new_runs(mlflow_uri, 2)
    target = MlflowTarget(mlflow_uri)
    minimal = {**model_record(run_id, 1)}
    rich = {
        "op": "log-model",
        "run_id": run_id,
        "model_json": {
            "artifact_path": "modèle",
            "flavors": {
                "python_function": {
                    "loader_module": "mlflow.sklearn",
                    "config": {"temperature": 0.5},
                    "env": {"conda": "conda.yaml"},
                },
                "sklearn": {"pickled_model": "model.pkl", "sklearn_version": "1.4.0"},
            },
            "utc_time_created": "2024-05-01 10:00:00.123456",
            "run_id": run_id,
            "mlflow_version": "2.9.0",
            "signature": {"inputs": '[{"type": "double"}]', "outputs": '[{"type": "long"}]'},
            "metadata": {"owner": "team-a", "n": 12345678901234567890},
            "saved_input_example_info": {"artifact_path": "input_example.json"},
            "model_size_bytes": 1234,
        },
    }
    with_uuid = {
        **model_record(run_id, 3),
        "model_json": {**model_record(run_id, 3)["model_json"], "model_uuid": "0123abcd"},
    }
    # the same artifact path and time as `minimal`, another flavor: a different model
    lookalike = {
        **model_record(run_id, 1),
        "model_json": {**model_record(run_id, 1)["model_json"], "flavors": {"onnx": {}}},
    }
    sent = [minimal, rich, with_uuid]
    datasets = {"run_id": run_id, "datasets": inputs_record(run_id, "ds-a")["dataset_inputs"]}

    async def go() -> dict[str, Any]:
        async with transport(target) as t:
            calls = [call_for(target, m) for m in sent]
            inputs_call = call_for(target, datasets)
            before = [await t.is_applied(c) for c in [*calls, inputs_call]]
            answers = [await t.send(c) for c in [*calls, inputs_call]]
            after = [await t.is_applied(c) for c in [*calls, inputs_call]]
            elsewhere = await t.is_applied(call_for(target, {**minimal, "run_id": other_run}))
            return {
                "before": before,
                "answers": answers,
                "after": after,
                "lookalike": await t.is_applied(call_for(target, lookalike)),
                "elsewhere": elsewhere,
                "run": await t.get_run(run_id),
                "unknown": await t.get_run("f" * 32),
                "unknown_applied": await t.is_applied(call_for(target, model_record("f" * 32, 1))),
            }

    got = run(go)
    assert [a.status for a in got["answers"]] == [200] * 4, got["answers"]
    assert got["before"] == [False] * 4
    assert got["after"] == [True] * 4
    assert got["lookalike"] is False
    assert got["elsewhere"] is False
    assert got["unknown"] is None and got["unknown_applied"] is None

    stored = logged_models(got["run"])
    assert len(stored) == 3
    # MLflow re-serialises what it keeps: the stored models are not what was sent...
    stored_rich = next(m for m in stored if m["artifact_path"] == "modèle")
    assert "signature" not in stored_rich and "metadata" not in stored_rich
    assert stored_rich["model_uuid"] is None
    assert "config" not in stored_rich["flavors"]["python_function"]
    # ...yet each is recognised as the model sent
    for doc in sent:
        model = doc["model_json"]
        assert isinstance(model, dict)
        assert sum(model_identity(m) == model_identity(model) for m in stored) == 1


def test_mlflow_404s_about_a_record_and_about_the_server(mlflow_uri: str) -> None:
    (run_id,) = new_runs(mlflow_uri, 1)
    good = MlflowTarget(mlflow_uri)
    wrong_prefix = MlflowTarget(mlflow_uri, "/not-mlflow")

    async def go() -> tuple[Answer, Answer, Answer]:
        async with transport(good) as t1, transport(wrong_prefix) as t2:
            return (
                await t1.send(call_for(good, model_record("f" * 32, 1))),
                await t2.send(call_for(wrong_prefix, model_record(run_id, 1))),
                await t1.send(call_for(good, model_record(run_id, 1))),
            )

    missing_run, no_api, ok = run(go)
    assert ok.status == 200
    assert missing_run.status == 404 and good.is_record_404(missing_run)
    assert no_api.status == 404 and not wrong_prefix.is_record_404(no_api)


# ---- 5. read-back on AI Data Platform --------------------------------------------------------


def test_sign_get_signs_date_request_target_and_host(session_key: rsa.RSAPrivateKey) -> None:
    keys = StaticKey(KEY_ID, session_key)
    headers = sign_get(keys, "/20260430/x/runs/get?run_id=r%C3%A91", "h.example:443")
    assert set(headers) == {"date", "authorization"}
    auth = headers["authorization"]
    assert 'headers="date (request-target) host"' in auth and f'keyId="{KEY_ID}"' in auth
    signature = base64.b64decode(auth.split('signature="')[1].rstrip('"'))
    text = (
        f"date: {headers['date']}\n(request-target): get /20260430/x/runs/get?run_id=r%C3%A91\n"
        "host: h.example:443"
    ).encode()
    session_key.public_key().verify(signature, text, padding.PKCS1v15(), hashes.SHA256())


def test_oci_read_back_is_a_signed_get(oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator(known_runs=frozenset({"r1", "r2", "rün3"}))
    target = oci_target(emu)
    model = model_record("r1", 1)
    inputs = inputs_record("r1", "ds-1")
    other_model = model_record("r1", 2)
    odd = inputs_record("rün3", "ds-9")

    async def go() -> dict[str, Any]:
        async with transport(target, oci_keys(oci)) as t:
            calls = [call_for(target, d) for d in (model, inputs, odd)]
            before = [await t.is_applied(c) for c in calls]
            answers = [await t.send(c) for c in calls]
            return {
                "before": before,
                "answers": answers,
                "after": [await t.is_applied(c) for c in calls],
                "other": await t.is_applied(call_for(target, other_model)),
                "run": await t.get_run("r1"),
                "empty": await t.get_run("r2"),
                "unknown": await t.get_run("r4"),
                "unknown_applied": await t.is_applied(call_for(target, model_record("r4", 1))),
            }

    got = run(go)
    assert [a.status for a in got["answers"]] == [200, 200, 200]
    assert got["before"] == [False, False, False]
    assert got["after"] == [True, True, True]
    assert got["other"] is False
    assert got["unknown"] is None and got["unknown_applied"] is None
    assert got["run"]["info"]["run_id"] == "r1"
    assert logged_models(got["run"]) == [model["model_json"]]
    assert got["run"]["inputs"]["dataset_inputs"] == inputs["dataset_inputs"]
    assert got["empty"]["info"]["run_id"] == "r2" and logged_models(got["empty"]) == []
    assert emu.state.statuses[401] == 0  # every GET signature verified
    seen = [{k.lower(): v for k, v in h.items()} for h in emu.state.headers_seen]
    gets = [h for h in seen if "content-length" not in h]
    assert len(gets) == len(seen) - 3  # everything but the three posts
    assert gets and all(len(h["opc-request-id"]) == 32 for h in gets)
    assert all('headers="date (request-target) host"' in h["authorization"] for h in gets)


def test_oci_read_back_with_the_wrong_key_is_unreadable(oci: Oci, emulator: StartEmulator) -> None:
    emu = emulator()
    target = oci_target(emu)
    stranger = StaticKey(KEY_ID, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    async def go() -> bool | None:
        async with transport(target, stranger) as t:
            return await t.is_applied(call_for(target, model_record("r1", 1)))

    assert run(go) is None
    assert emu.state.statuses[401] == 1


# ---- 7. session tokens ---------------------------------------------------------------------


def session_config(tmp_path: Path, oci: Oci, token: str) -> Path:
    key_file = tmp_path / "oci_api_key.pem"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    config = tmp_path / "session_config"
    config.write_text(
        f"[DEFAULT]\nfingerprint=aa:bb\ntenancy=ocid1.tenancy.oc1..t\nregion=us-ashburn-1\n"
        f"key_file={key_file}\nsecurity_token_file={token_file}\n"
    )
    return config


def test_a_refreshed_session_token_is_read_again(
    tmp_path: Path, oci: Oci, emulator: StartEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first, second = "tok-FIRST-secret-0001", "tok-SECOND-secret-0002"
    config = session_config(tmp_path, oci, first)
    creds = load_credentials("security_token", str(config), None)
    keys = creds.keys
    assert keys.refreshable
    emu = emulator(key_id=f"ST${first}")
    target = oci_target(emu)

    async def go() -> list[Answer]:
        answers = []
        async with transport(target, keys) as t:
            answers.append(await t.send(call_for(target, model_record("r1", 1))))
            # `oci session refresh` rewrites the token file; the server knows only the new one
            (tmp_path / "token").write_text(second + "\n")
            emu.config.key_id = f"ST${second}"
            answers.append(await t.send(call_for(target, model_record("r1", 2))))
            await t.refresh_credentials()
            answers.append(await t.send(call_for(target, model_record("r1", 2))))
        return answers

    answers = run(go)
    assert [a.status for a in answers] == [200, 401, 200]
    assert keys.current()[0] == f"ST${second}"
    for text in (repr(keys), str(keys), caplog.text, *(a.message for a in answers)):
        assert first not in text and second not in text


def test_a_session_token_file_that_cannot_be_read_again_keeps_the_token(
    tmp_path: Path, oci: Oci, caplog: pytest.LogCaptureFixture
) -> None:
    token = "tok-KEPT-secret-0003"
    config = session_config(tmp_path, oci, token)
    keys = load_credentials("security_token", str(config), None).keys
    (tmp_path / "token").write_text("")  # caught half-way through a rewrite
    keys.refresh()
    assert keys.current()[0] == f"ST${token}"
    (tmp_path / "token").unlink()
    keys.refresh()
    assert keys.current()[0] == f"ST${token}"
    assert "token" in caplog.text and token not in caplog.text


# ---- 8. targets ---------------------------------------------------------------------------


def test_checkpoint_identity_names_the_site_tokens_do_not() -> None:
    a = OciTarget("https://datalake.us-ashburn-1.oci.oraclecloud.com", "ocid1.p", "ws")
    alias = OciTarget("https://alias.example", "ocid1.p", "ws")
    emu1 = OciTarget("http://127.0.0.1:4001", "ocid1.p", "ws", site="emulator")
    emu2 = OciTarget("http://127.0.0.1:4002", "ocid1.p", "ws", site="emulator")
    assert a.identity == "oci-aidp/https://datalake.us-ashburn-1.oci.oraclecloud.com/ocid1.p/ws"
    assert a.identity != alias.identity
    assert emu1.identity == emu2.identity == "oci-aidp/emulator/ocid1.p/ws"
    assert emu1.identity != a.identity
    scopes = {t.token_scope for t in (a, alias, emu1, emu2)}
    assert scopes == {"oci-aidp/ocid1.p/ws"}
    # retry tokens are what they always were: a digest of scope, operation and body
    for doc in (model_record("r1", 1), inputs_record("r1", "ds1")):
        call = call_for(a, doc)
        expected = hashlib.sha256(f"oci-aidp/ocid1.p/ws\n{call.op}\n".encode() + call.body)
        assert call.token == expected.hexdigest()
        assert call_for(emu1, doc).token == call.token
    m = MlflowTarget("http://mlflow.internal:5000", "/prefix")
    assert m.token_scope == m.identity == "mlflow/http://mlflow.internal:5000/prefix"


def test_targets_explain_themselves() -> None:
    oci = OciTarget("https://datalake.example", "ocid1.p", "ws")
    ml = MlflowTarget("http://mlflow.internal:5000")
    assert oci.in_doubt_note() == (
        "may have been applied: re-sending within 24 h is safe, same retry token"
    )
    assert "retry token" not in ml.in_doubt_note()
    assert "once per run" in ml.in_doubt_note()
    hints = {status: oci.systemic_hint(status) for status in (401, 404, 302, NO_ANSWER)}
    assert "fingerprint" in hints[401] and "clock" in hints[401]
    assert "NotAuthorizedOrNotFound" in hints[404] and "workspace" in hints[404]
    assert "platform" in hints[404] and "permission" in hints[404]
    assert "redirect" in hints[302] and "https://datalake.example" in hints[302]
    assert "https://datalake.example" in hints[NO_ANSWER]
    hints = {status: ml.systemic_hint(status) for status in (401, 404, 302, NO_ANSWER)}
    assert "MLFLOW_TRACKING_TOKEN" in hints[401] and "MLFLOW_TRACKING_USERNAME" in hints[401]
    assert "MLFLOW_TRACKING_PASSWORD" in hints[401]
    assert "not" in hints[404] and "MLflow server" in hints[404]
    assert "login" in hints[302] and "SSO" in hints[302]
    assert "nothing" in hints[NO_ANSWER] and "http://mlflow.internal:5000" in hints[NO_ANSWER]
    assert all(h for h in hints.values())


def test_which_404s_are_about_the_record() -> None:
    oci = OciTarget("https://datalake.example", "ocid1.p", "ws")
    ml = MlflowTarget("http://mlflow.internal:5000")
    assert ml.is_record_404(Answer(404, "RESOURCE_DOES_NOT_EXIST", "Run 'x' not found"))
    assert not ml.is_record_404(Answer(404, "ENDPOINT_NOT_FOUND"))
    assert not ml.is_record_404(Answer(404, "", "<html>Not Found</html>"))
    assert not ml.is_record_404(Answer(400, "RESOURCE_DOES_NOT_EXIST"))
    assert not oci.is_record_404(Answer(404, "NotAuthorizedOrNotFound"))
    assert not oci.is_record_404(Answer(404, "RESOURCE_DOES_NOT_EXIST"))


def test_credentials_in_a_tracking_uri_are_taken_out_or_refused_without_echoing_them() -> None:
    from batchlog.errors import ConfigurationError
    from batchlog.target import check_endpoint, mlflow_target

    target = mlflow_target("https://alice:s3cret-pw@mlflow.example")  # basic auth, as MLflow
    assert "s3cret-pw" not in target.identity + repr(target)
    with pytest.raises(ConfigurationError) as err:
        mlflow_target("http://alice:s3cret-pw@mlflow.example")
    assert "s3cret-pw" not in str(err.value)
    with pytest.raises(ConfigurationError) as err:
        check_endpoint("https://alice:s3cret-pw@datalake.example")
    assert "s3cret-pw" not in str(err.value)


@pytest.mark.parametrize(
    "uri",
    [
        "https://mlflow.example.com/?access_token=SeCrEt123",
        "https://mlflow.example.com/mlflow#token=SeCrEt123",
        "https://mlflow.example.com?SeCrEt123",
    ],
)
def test_a_query_or_fragment_in_a_tracking_uri_is_refused_without_echoing_it(uri: str) -> None:
    """Found by hostile review: a token in the URI's query string was printed in the error
    (and in --log-file)."""
    from batchlog.errors import ConfigurationError
    from batchlog.target import mlflow_target

    with pytest.raises(ConfigurationError) as err:
        mlflow_target(uri)
    assert "SeCrEt123" not in str(err.value), err.value
    assert "mlflow.example.com" in str(err.value)
