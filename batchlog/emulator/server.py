"""An emulator of the AI Data Platform MLflow endpoints, for tests and demos: log-inputs and
log-model, and (issue 11) experiments/create, get-by-name, get and search, runs/create,
search, get, log-batch and update, metrics/get-history, with MLflow's limits and replay rules
(``tracking.Store``).

It verifies OCI request signatures, enforces the field limits, honours retry tokens (same
token and body: the first answer is replayed without applying again; same token, other
body: 409), rate-limits with a token bucket (429), and injects faults on request: latency,
500s before or after applying, connection resets after applying, one 429 per new token, a
302 to every POST (an SSO proxy), 401 to everything while ``unauthorized`` is set, canned
raw answers for chosen runs (``canned``: a proxy's HTML page, odd Retry-After values, bytes
that are not text); the expected ``key_id`` may change while it serves (a rotated session
token).
Everything it applied is in ``state.effects`` and at ``GET /_emulator/applied``; every
experiment and run it holds at ``GET /_emulator/runs``; the runs are read back MLflow-style
with a signed ``GET .../runs/get?run_id=``.

The creates, log-* and update take a retry token; searches (POSTs that change nothing) and
GETs ignore it. Every POST gets the faults above; GETs get latency, the signature check, the
rate limit and ``unauthorized`` always, and the other faults only with ``faults_on_get``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import orjson
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from batchlog.emulator.tracking import ApiError, Effect, Store
from batchlog.limits import (
    DATASET_LIMITS,
    DATASET_REQUIRED,
    MODEL_JSON_REQUIRED,
    RUN_ID_PATTERN,
    TAG_KEY_MAX,
    TAG_VALUE_MAX,
)
from batchlog.signing import (
    GET_SIGNED_HEADERS,
    SIGNED_HEADERS,
    get_signing_string,
    signing_string,
)
from batchlog.target import API_VERSION

ROUTE = (
    f"/{API_VERSION}/aiDataPlatforms/{{platform}}/workspaces/{{workspace}}"
    "/mlops/api/2.0/mlflow/{group:runs|experiments|metrics}/{op}"
)
WRITES = frozenset(  # POSTs that change state: retry tokens honoured, effects recorded
    {
        "runs/log-inputs",
        "runs/log-model",
        "runs/log-batch",
        "runs/update",
        "runs/create",
        "experiments/create",
    }
)
SEARCHES = frozenset({"runs/search", "experiments/search"})  # POSTs that only read
READS = frozenset({"runs/get", "experiments/get-by-name", "experiments/get", "metrics/get-history"})
_SIG_FIELD = re.compile(r'(\w+)="([^"]*)"')
MAX_CLOCK_SKEW = 300.0
STOP_GRACE = 0.2  # seconds answers still being written get when the emulator stops; answers
# held back (latency) are dropped, as a server going down drops them: never waited out


@dataclass
class EmulatorConfig:
    """The emulator's behaviour. Read on every request: a test may change ``key_id``,
    ``unauthorized`` or ``redirect_to`` while the emulator serves."""

    public_key: RSAPublicKey | None = None  # verify signatures with it; None accepts any
    key_id: str | None = None  # the keyId expected, when set (may change at run time)
    platform_id: str | None = None  # the only platform that exists, when set (others: 404)
    workspace: str | None = None  # the only workspace that exists, when set
    known_runs: frozenset[str] | None = None  # runs that exist; None: every run exists
    enforce_limits: bool = True
    idempotency: bool = True
    rate_limit: float | None = None  # requests per second, token bucket; None: unlimited
    burst: float | None = None  # bucket size; default: a tenth of a second's worth, >= 1
    latency: float = 0.0  # seconds added to every answer
    fail_before: float = 0.0  # chance of a 500 before applying
    fail_after: float = 0.0  # chance of a 500 after applying
    reset_after: float = 0.0  # chance of a connection reset after applying
    throttle_once: float = 0.0  # chance that a new retry token gets one 429 first
    keep_effects: bool = True  # keep every applied effect (memory grows with the job);
    # without it, runs/get answers runs with no models and no inputs
    seed: int | None = None
    redirect_to: str | None = None  # answer every POST with a 302 to this Location
    unauthorized: bool = False  # answer 401 NotAuthenticated to everything while True
    canned: dict[str, list[bytes]] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)  # run id -> seconds added to its POSTs
    # run id -> raw HTTP answers (``http_response``), the next one written as it is to each
    # POST for that run, before anything is applied (then the connection is closed)
    faults_on_get: bool = False  # fail_before, fail_after, reset_after, throttle_once and
    # redirect_to also hit GETs (off: read-backs stay reliable, as they always were)


@dataclass
class EmulatorState:
    effects: list[dict[str, Any]] = field(default_factory=list)  # what was applied, in order
    applied: int = 0  # calls applied
    statuses: Counter[int] = field(default_factory=Counter)  # answers sent, by status
    tokens_seen: set[str] = field(default_factory=set)  # for throttle_once: token or body hash
    replies: dict[str, tuple[str, int, bytes, str]] = field(default_factory=dict)
    # token -> (body sha256, status, body, etag) of the applied call
    request_ids: set[str] = field(default_factory=set)  # opc-request-id values received
    retry_tokens: list[str] = field(default_factory=list)  # token of every request, in order
    headers_seen: list[dict[str, str]] = field(default_factory=list)  # last few requests
    runs: dict[str, tuple[list[Any], list[Any]]] = field(default_factory=dict)
    # run id -> (models logged, dataset inputs logged), in order, for runs/get
    op_applied: Counter[str] = field(default_factory=Counter)  # calls applied, by path
    # ("runs/create", "runs/log-batch", ...); replays answered from a token are not counted
    tracking: Store = field(init=False, repr=False)  # experiments, runs, params, metrics

    def __post_init__(self) -> None:
        self.tracking = Store(self.runs)

    def applied_counts(self) -> Counter[tuple[str, str, str]]:
        """How many times each (op, run, item) was applied: exactly-once means all are 1."""
        return Counter((e["op"], e["run_id"], e["item"]) for e in self.effects)


class _Bucket:
    """Token bucket: ``rate`` tokens a second, at most ``size`` stored."""

    def __init__(self, rate: float, size: float) -> None:
        self.rate = rate
        self.size = size
        self.level = size
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.size, self.level + (now - self.last) * self.rate)
        self.last = now
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        return False


class Emulator:
    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self.state = EmulatorState()
        self._rng = random.Random(self.config.seed)
        rate = self.config.rate_limit
        self._bucket = _Bucket(rate, self.config.burst or max(1.0, rate / 10)) if rate else None
        self._runner: web.AppRunner | None = None
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post(ROUTE, self._handle)
        app.router.add_get(ROUTE, self._handle_get)
        app.router.add_get("/_emulator/applied", self._applied)
        app.router.add_get("/_emulator/stats", self._stats)
        app.router.add_get("/_emulator/runs", self._runs)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, shutdown_timeout=STOP_GRACE
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server: Any = site._server
        bound = server.sockets[0].getsockname()
        self.url = f"http://{host}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- endpoints ---------------------------------------------------------------------

    async def _applied(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"applied": self.state.applied, "effects": self.state.effects},
            dumps=lambda d: orjson.dumps(d).decode(),
        )

    async def _runs(self, request: web.Request) -> web.Response:
        """Every experiment and run held, with every metric point, and the calls applied
        by operation (for tests: "created exactly once", "each point logged once")."""
        doc = self.state.tracking.dump()
        doc["applied_by_op"] = dict(self.state.op_applied)
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "applied": self.state.applied,
                "statuses": {str(k): v for k, v in self.state.statuses.items()},
            }
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        cfg, st = self.config, self.state
        body = await request.read()
        rid = request.headers.get("opc-request-id") or uuid.uuid4().hex.upper()
        st.request_ids.add(rid)
        token = request.headers.get("opc-retry-token", "")
        st.retry_tokens.append(token)
        if len(st.headers_seen) < 50:
            st.headers_seen.append(dict(request.headers))
        if cfg.latency:
            await asyncio.sleep(cfg.latency)
        if cfg.slow:
            await asyncio.sleep(self._slow(body))
        canned = self._canned(body)
        if canned is not None:
            _write_raw(request, canned)
            raise asyncio.CancelledError  # the answer is written: nothing more on it
        if cfg.redirect_to is not None:
            self.state.statuses[302] += 1
            return web.Response(status=302, headers={"Location": cfg.redirect_to})
        refused = self._refuse(request, body, rid)
        if refused is not None:
            return refused
        once_key = token or hashlib.sha256(body).hexdigest()  # clients that send no token
        if cfg.throttle_once and once_key not in st.tokens_seen:
            st.tokens_seen.add(once_key)
            if self._rng.random() < cfg.throttle_once:
                return self._error(429, "TooManyRequests", "User-rate limit exceeded.", rid)
        platform = request.match_info["platform"]
        workspace = request.match_info["workspace"]
        op = f"{request.match_info['group']}/{request.match_info['op']}"
        if op not in WRITES and op not in SEARCHES:
            return self._error(404, "NotFound", f"unknown operation {op}", rid)
        if (cfg.platform_id and platform != cfg.platform_id) or (
            cfg.workspace and workspace != cfg.workspace
        ):
            return self._error(
                404,
                "NotAuthorizedOrNotFound",
                "Authorization failed or requested resource not found.",
                rid,
            )
        if len(token) > 64:
            return self._error(400, "InvalidParameter", "opc-retry-token longer than 64", rid)
        write = op in WRITES  # a search takes no retry token: never replayed from one
        digest = hashlib.sha256(body).hexdigest()
        if write and cfg.idempotency and token and token in st.replies:
            seen_digest, status, payload, etag = st.replies[token]
            if seen_digest != digest:
                return self._error(
                    409,
                    "InvalidatedRetryToken",
                    "The retry token was used with another request body.",
                    rid,
                )
            return self._answer(status, payload, rid, etag)
        if cfg.fail_before and self._rng.random() < cfg.fail_before:
            return self._error(500, "InternalServerError", "injected fault before apply", rid)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._error(400, "InvalidParameter", "body is not JSON", rid)
        # decided and applied with no await in between: a concurrent request with the same
        # token finds the reply stored below
        if op in ("runs/log-inputs", "runs/log-model"):
            short = op.removeprefix("runs/")
            problem = _check_body(short, doc, cfg.enforce_limits)
            if problem:
                return self._error(400, "InvalidParameter", problem, rid)
            try:
                st.tracking.check_writable(doc["run_id"], cfg.known_runs)
            except ApiError as exc:
                return self._error(exc.status, exc.code, exc.message, rid)
            self._apply(short, doc, token)
            st.op_applied[op] += 1
            payload = b"{}"
        else:
            if not isinstance(doc, dict):
                return self._error(400, "INVALID_PARAMETER_VALUE", "body is not an object", rid)
            try:
                payload = self._tracking(op, doc, len(body), token)
            except ApiError as exc:
                return self._error(exc.status, exc.code, exc.message, rid)
        etag = uuid.uuid4().hex if write else ""
        if write and cfg.idempotency and token:
            st.replies[token] = (digest, 200, payload, etag)
        if cfg.reset_after and self._rng.random() < cfg.reset_after:
            _reset(request)
            raise asyncio.CancelledError  # nothing more is written on this connection
        if cfg.fail_after and self._rng.random() < cfg.fail_after:
            return self._error(500, "InternalServerError", "injected fault after apply", rid)
        return self._answer(200, payload, rid, etag)

    def _tracking(self, op: str, doc: dict[str, Any], size: int, token: str) -> bytes:
        """Answer (and apply) one of the experiments and runs POSTs; raises ApiError."""
        store, cfg = self.state.tracking, self.config
        effects: list[Effect] = []
        answer: dict[str, Any] = {}
        if op == "experiments/create":
            answer, effects = store.create_experiment(doc)
        elif op == "experiments/search":
            answer = store.search_experiments(doc)
        elif op == "runs/create":
            answer, effects = store.create_run(doc)
        elif op == "runs/search":
            answer = store.search_runs(doc)
        elif op == "runs/log-batch":
            effects = store.log_batch(doc, size, cfg.known_runs, cfg.enforce_limits)
        else:
            answer, effects = store.update_run(doc, cfg.known_runs)
        if op in WRITES:
            self.state.applied += 1
            self.state.op_applied[op] += 1
            if cfg.keep_effects:
                self.state.effects.extend({**e.as_json(), "token": token} for e in effects)
        return orjson.dumps(answer)

    async def _handle_get(self, request: web.Request) -> web.StreamResponse:
        """The reads: runs/get (the run as MLflow answers it, built from what was applied to
        it), experiments/get-by-name and get, metrics/get-history."""
        cfg, st = self.config, self.state
        rid = request.headers.get("opc-request-id") or uuid.uuid4().hex.upper()
        st.request_ids.add(rid)
        if len(st.headers_seen) < 50:
            st.headers_seen.append(dict(request.headers))
        if cfg.latency:
            await asyncio.sleep(cfg.latency)
        faults = cfg.faults_on_get
        if faults and cfg.redirect_to is not None:
            self.state.statuses[302] += 1
            return web.Response(status=302, headers={"Location": cfg.redirect_to})
        refused = self._refuse(request, None, rid)
        if refused is not None:
            return refused
        once_key = "GET " + request.raw_path
        if faults and cfg.throttle_once and once_key not in st.tokens_seen:
            st.tokens_seen.add(once_key)
            if self._rng.random() < cfg.throttle_once:
                return self._error(429, "TooManyRequests", "User-rate limit exceeded.", rid)
        op = f"{request.match_info['group']}/{request.match_info['op']}"
        if op not in READS:
            return self._error(
                404, "NotFound", f"unknown operation {request.match_info['op']}", rid
            )
        if (cfg.platform_id and request.match_info["platform"] != cfg.platform_id) or (
            cfg.workspace and request.match_info["workspace"] != cfg.workspace
        ):
            return self._error(
                404,
                "NotAuthorizedOrNotFound",
                "Authorization failed or requested resource not found.",
                rid,
            )
        query = dict(request.query)
        if op == "runs/get" and not query.get("run_id"):
            return self._error(400, "InvalidParameter", "run_id is required", rid)
        if faults and cfg.fail_before and self._rng.random() < cfg.fail_before:
            return self._error(500, "InternalServerError", "injected fault before apply", rid)
        store = st.tracking
        try:
            if op == "runs/get":
                answer = store.get_run(query["run_id"], cfg.known_runs)
            elif op == "experiments/get-by-name":
                answer = store.experiment_by_name(query.get("experiment_name", ""))
            elif op == "experiments/get":
                answer = store.experiment_by_id(query.get("experiment_id", ""))
            else:
                answer = store.metric_history(query, cfg.known_runs)
        except ApiError as exc:
            return self._error(exc.status, exc.code, exc.message, rid)
        if faults and cfg.reset_after and self._rng.random() < cfg.reset_after:
            _reset(request)
            raise asyncio.CancelledError
        if faults and cfg.fail_after and self._rng.random() < cfg.fail_after:
            return self._error(500, "InternalServerError", "injected fault after apply", rid)
        return self._answer(200, orjson.dumps(answer), rid, "")

    # ---- helpers -----------------------------------------------------------------------

    def _apply(self, op: str, doc: dict[str, Any], token: str) -> None:
        st = self.state
        st.applied += 1
        if not self.config.keep_effects:
            return
        run_id = doc["run_id"]
        models, inputs = st.runs.setdefault(run_id, ([], []))
        if op == "log-inputs":
            for item in doc.get("dataset_inputs") or []:
                inputs.append(item)
                ds = item["dataset"]
                st.effects.append(
                    {
                        "op": op,
                        "run_id": run_id,
                        "item": f"{ds['name']}@{ds['digest']}",
                        "token": token,
                        "input": item,
                    }
                )
        else:
            model = orjson.loads(doc["model_json"])
            models.append(model)
            st.effects.append(
                {
                    "op": op,
                    "run_id": run_id,
                    "item": f"{model['artifact_path']}@{model['utc_time_created']}",
                    "token": token,
                    "model_json": doc["model_json"],
                }
            )

    def _slow(self, body: bytes) -> float:
        """Seconds the run this body names waits for its answer (``slow``)."""
        try:
            run_id = orjson.loads(body).get("run_id")
        except (orjson.JSONDecodeError, AttributeError):
            return 0.0
        return self.config.slow.get(run_id, 0.0) if isinstance(run_id, str) else 0.0

    def _canned(self, body: bytes) -> bytes | None:
        """The next canned answer for the run this body names, if any is left."""
        if not self.config.canned:
            return None
        try:
            run_id = orjson.loads(body).get("run_id")
        except (orjson.JSONDecodeError, AttributeError):
            return None
        answers = self.config.canned.get(run_id) if isinstance(run_id, str) else None
        if not answers:
            return None
        answer = answers.pop(0)
        status = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
        self.state.statuses[int(status[1]) if status else -1] += 1
        return answer

    def _refuse(self, request: web.Request, body: bytes | None, rid: str) -> web.Response | None:
        """401 (switched on, or a signature that does not verify) or 429 (the bucket)."""
        if self.config.unauthorized:
            return self._error(
                401,
                "NotAuthenticated",
                "The required information to complete authentication was not provided.",
                rid,
            )
        problem = self._authenticate(request, body)
        if problem:
            return self._error(401, "NotAuthenticated", problem, rid)
        if self._bucket is not None and not self._bucket.take():
            return self._error(429, "TooManyRequests", "User-rate limit exceeded.", rid)
        return None

    def _authenticate(self, request: web.Request, body: bytes | None) -> str:
        """Why the request's signature is refused ("" when it verifies). ``body`` is None
        for a GET, signed over ``date (request-target) host`` only."""
        key = self.config.public_key
        if key is None:
            return ""
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Signature "):
            return "missing Signature authorization"
        fields = dict(_SIG_FIELD.findall(auth))
        if fields.get("algorithm") != "rsa-sha256" or fields.get("version") != "1":
            return "unsupported signature algorithm or version"
        if body is None:
            if fields.get("headers") != GET_SIGNED_HEADERS:
                return "signed headers of a GET are not date (request-target) host"
        elif fields.get("headers") != SIGNED_HEADERS:
            return "signed headers are not date (request-target) host content-length ..."
        expected_key_id = self.config.key_id  # read now: it may change while serving
        if expected_key_id and fields.get("keyId") != expected_key_id:
            return "unknown keyId"
        sha = ""
        if body is not None:
            sha = base64.b64encode(hashlib.sha256(body).digest()).decode()
            if request.headers.get("x-content-sha256") != sha:
                return "x-content-sha256 does not match the body"
            if request.headers.get("content-length") != str(len(body)):
                return "content-length does not match the body"
            if request.headers.get("content-type") != "application/json":
                return "content-type is not application/json"
        date = request.headers.get("date", "")
        try:
            skew = abs(time.time() - parsedate_to_datetime(date).timestamp())
        except (TypeError, ValueError):
            return "missing or malformed date"
        if skew > MAX_CLOCK_SKEW:
            return "date is more than 5 minutes off"
        host = request.headers.get("host", "")
        if body is None:
            text = get_signing_string(date, request.raw_path, host)
        else:
            text = signing_string(date, request.raw_path, host, len(body), sha)
        try:
            key.verify(
                base64.b64decode(fields.get("signature", "")),
                text,
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError):
            return "signature does not verify"
        return ""

    def _error(self, status: int, code: str, message: str, rid: str) -> web.Response:
        return self._answer(status, orjson.dumps({"code": code, "message": message}), rid, "")

    def _answer(self, status: int, payload: bytes, rid: str, etag: str) -> web.Response:
        self.state.statuses[status] += 1
        headers = {"opc-request-id": rid, "content-type": "application/json"}
        if etag:
            headers["etag"] = etag
        return web.Response(status=status, body=payload, headers=headers)


def _reset(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def http_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A raw HTTP/1.1 answer for ``EmulatorConfig.canned``: any status, headers repeated or
    odd (written as UTF-8), any body; the connection closes after it."""
    lines = [f"HTTP/1.1 {status:03d} Canned"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def _write_raw(request: web.Request, answer: bytes) -> None:
    transport = request.transport
    if transport is not None:
        transport.write(answer)
        transport.close()  # after what is buffered is written


def _check_body(op: str, doc: Any, enforce: bool) -> str:
    if not isinstance(doc, dict):
        return "body is not a JSON object"
    run_id = doc.get("run_id")
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        return "run_id is missing or malformed"
    if op == "log-model":
        model_json = doc.get("model_json")
        if not isinstance(model_json, str):
            return "model_json must be a string"
        try:
            model = orjson.loads(model_json)
        except orjson.JSONDecodeError:
            return "model_json is not JSON"
        if not isinstance(model, dict) or any(k not in model for k in MODEL_JSON_REQUIRED):
            return "model_json lacks artifact_path, flavors, utc_time_created or run_id"
        return ""
    inputs = doc.get("dataset_inputs", [])
    if not isinstance(inputs, list):
        return "dataset_inputs must be an array"
    for i, item in enumerate(inputs):
        ds = item.get("dataset") if isinstance(item, dict) else None
        if not isinstance(ds, dict):
            return f"dataset_inputs[{i}].dataset is required"
        if not enforce:
            continue
        for key in DATASET_REQUIRED:
            if not isinstance(ds.get(key), str):
                return f"dataset_inputs[{i}].dataset.{key} is required"
        for key, limit in DATASET_LIMITS.items():
            value = ds.get(key)
            if isinstance(value, str) and len(value) > limit:
                return f"dataset_inputs[{i}].dataset.{key} exceeds {limit} characters"
        for tag in item.get("tags") or []:
            if len(str(tag.get("key", ""))) > TAG_KEY_MAX:
                return f"dataset_inputs[{i}] tag key exceeds {TAG_KEY_MAX} characters"
            if len(str(tag.get("value", ""))) > TAG_VALUE_MAX:
                return f"dataset_inputs[{i}] tag value exceeds {TAG_VALUE_MAX} characters"
    return ""


class EmulatorThread:
    """An emulator serving on loopback from a thread of its own (for tests and benchmarks)."""

    def __init__(self, config: EmulatorConfig | None = None, port: int = 0) -> None:
        self.emulator = Emulator(config)
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    @property
    def state(self) -> EmulatorState:
        return self.emulator.state

    @property
    def config(self) -> EmulatorConfig:
        """The live configuration: ``unauthorized``, ``key_id`` and ``redirect_to`` may be
        changed from the test's thread while the emulator serves."""
        return self.emulator.config

    @property
    def url(self) -> str:
        return self.emulator.url

    def __enter__(self) -> EmulatorThread:
        self._thread = threading.Thread(target=self._serve, name="emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("emulator did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        loop.run_until_complete(self.emulator.start(port=self._port))
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.emulator.stop())
            loop.close()
