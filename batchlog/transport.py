"""Sending one signed attempt over a kept-alive aiohttp session.

RSA signing runs on a small dedicated thread pool (the GIL is released while signing), so
it neither blocks the event loop nor waits behind anything else; retries sleep on the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import ssl
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from yarl import URL

from batchlog.plan import Call
from batchlog.retry import NO_ANSWER, Answer, parse_retry_after
from batchlog.signing import KeySource, sign_post
from batchlog.target import MlflowTarget, Target

_MAX_MESSAGE = 500


def signing_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class RequestIds:
    """opc-request-id values: 32 upper-case hex characters, unique, without a syscall each."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8).upper()  # random per process
        self._counter = itertools.count(secrets.randbelow(1 << 32))

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016X}"


class SigningPool:
    """Runs blocking signing calls on a few threads, handing them over in batches.

    A call queued while a thread is busy joins the next batch, and a batch's results come
    back to the event loop in one wake-up: the hand-off costs little however many requests
    are in flight, and RSA runs beside the event loop (the GIL is released while signing).
    """

    def __init__(self, threads: int) -> None:
        self._threads = threads  # threads draining the queue at most
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="batchlog-sign")
        self._queue: deque[tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]] = (
            deque()
        )  # calls waiting for a thread
        self._lock = threading.Lock()  # guards _active against the drain threads
        self._active = 0  # drain tasks running or submitted

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._queue.append((future, fn, args))
            start = self._active < self._threads
            if start:
                self._active += 1
        if start:
            self._executor.submit(self._drain, loop)
        return await future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._active -= 1
                    return
                batch = [self._queue.popleft() for _ in range(min(8, len(self._queue)))]
            done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            for future, fn, args in batch:
                try:
                    done.append((future, fn(*args), None))
                except Exception as exc:
                    done.append((future, None, exc))
            loop.call_soon_threadsafe(_deliver, done)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _deliver(done: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, exc in done:
        if future.cancelled():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)


class Transport:
    """One aiohttp session and one signing pool for a job."""

    def __init__(
        self,
        target: Target,
        keys: KeySource | None,
        *,
        concurrency: int,
        timeout: float,
        ca_bundle: str | None = None,
        verify_tls: bool = True,
        user_principal: str | None = None,
    ) -> None:
        self._target = target
        self._keys = keys
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 30.0))
        self._ca_bundle = ca_bundle
        self._verify_tls = verify_tls
        self._oci = isinstance(target, MlflowTarget) is False  # OCI: signed, with opc headers
        self._host = target.host  # the Host header, as signed
        self._fixed_headers = {  # sent with every request
            "content-type": "application/json",
            "accept": "application/json",
            "host": self._host,
            "user-agent": "batchlog/0.1",
        }
        if user_principal and self._oci:
            self._fixed_headers["dh-user-principal"] = user_principal
        if isinstance(target, MlflowTarget) and target.authorization:
            self._fixed_headers["authorization"] = target.authorization
        self._urls = {
            op: URL(target.endpoint + target.path(op), encoded=True)
            for op in ("log-inputs", "log-model")
        }
        self._paths = {op: target.path(op) for op in ("log-inputs", "log-model")}
        self._session: aiohttp.ClientSession | None = None
        self._signers: SigningPool | None = None
        self._ids = RequestIds()

    async def __aenter__(self) -> Transport:
        ssl_ctx: ssl.SSLContext | bool = True
        if not self._verify_tls:
            ssl_ctx = False
        elif self._ca_bundle:
            ssl_ctx = ssl.create_default_context(cafile=self._ca_bundle)
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, ssl=ssl_ctx, keepalive_timeout=60, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            skip_auto_headers=("User-Agent",),
        )
        self._signers = SigningPool(signing_threads())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
        if self._signers is not None:
            self._signers.close()

    async def refresh_credentials(self) -> None:
        assert self._signers is not None
        if self._keys is not None:
            await self._signers.run(self._keys.refresh)

    async def send(self, call: Call) -> Answer:
        """One attempt: sign now, post, and describe what came back. Never raises on HTTP."""
        assert self._session is not None and self._signers is not None
        headers = dict(self._fixed_headers)
        request_id = ""
        if self._keys is not None:
            request_id = self._ids.next()
            headers["opc-request-id"] = request_id
            headers["opc-retry-token"] = call.token
            try:
                signed = await self._signers.run(
                    sign_post,
                    self._keys,
                    self._paths[call.op],
                    self._host,
                    len(call.body),
                    call.body_sha256,
                )
            except Exception as exc:  # a principal token that cannot be fetched, a broken key
                return Answer(NO_ANSWER, "SigningFailed", type(exc).__name__, request_id)
            headers.update(signed)
            headers["x-content-sha256"] = call.body_sha256
        try:
            async with self._session.post(
                self._urls[call.op], data=call.body, headers=headers
            ) as resp:
                payload = await resp.read()
                rid = resp.headers.get("opc-request-id", request_id)
                if 200 <= resp.status < 300:
                    return Answer(resp.status, request_id=rid, etag=resp.headers.get("etag", ""))
                code, message = _error_body(payload)
                return Answer(
                    resp.status,
                    code,
                    message,
                    rid,
                    retry_after=parse_retry_after(resp.headers.get("retry-after")),
                )
        except asyncio.TimeoutError:
            return Answer(NO_ANSWER, "Timeout", "no answer within the timeout", request_id)
        except aiohttp.ClientError as exc:
            return Answer(NO_ANSWER, type(exc).__name__, str(exc)[:_MAX_MESSAGE], request_id)

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """An MLflow run as runs/get returns it; None when it cannot be read now."""
        assert self._session is not None and isinstance(self._target, MlflowTarget)
        url = URL(self._target.endpoint + self._target.prefix + "/api/2.0/mlflow/runs/get")
        headers = {k: v for k, v in self._fixed_headers.items() if k != "content-type"}
        try:
            async with self._session.get(url.with_query(run_id=run_id), headers=headers) as resp:
                if resp.status != 200:
                    return None
                doc = orjson.loads(await resp.read())
        except (asyncio.TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
            return None
        run = doc.get("run") if isinstance(doc, dict) else None
        return run if isinstance(run, dict) else None


def logged_models(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The models in an MLflow run's mlflow.log-model.history tag."""
    for tag in run.get("data", {}).get("tags", []):
        if tag.get("key") == "mlflow.log-model.history":
            try:
                models = orjson.loads(tag.get("value", "[]"))
            except orjson.JSONDecodeError:
                return []
            return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
    return []


def model_identity(model: dict[str, Any]) -> tuple[str, str]:
    return str(model.get("artifact_path")), str(model.get("utc_time_created"))


def _error_body(payload: bytes) -> tuple[str, str]:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "", payload[:_MAX_MESSAGE].decode("utf-8", errors="replace")
    if not isinstance(doc, dict):
        return "", str(doc)[:_MAX_MESSAGE]
    code = doc.get("code") or doc.get("error_code") or ""
    message = doc.get("message") or ""
    return str(code), str(message)[:_MAX_MESSAGE]
