"""Sending one signed attempt over a kept-alive aiohttp session.

RSA signing runs on a small dedicated thread pool (the GIL is released while signing), so
it neither blocks the event loop nor waits behind anything else; retries sleep on the loop.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import uuid
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import aiohttp
import orjson
from yarl import URL

from batchlog.plan import Call
from batchlog.retry import NO_ANSWER, Answer, parse_retry_after
from batchlog.signing import KeySource, sign_post
from batchlog.target import OciTarget

_MAX_MESSAGE = 500


def signing_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class Transport:
    """One aiohttp session and one signing pool for a job."""

    def __init__(
        self,
        target: OciTarget,
        keys: KeySource,
        *,
        concurrency: int,
        timeout: float,
        ca_bundle: str | None = None,
        user_principal: str | None = None,
    ) -> None:
        self._target = target
        self._keys = keys
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 30.0))
        self._ca_bundle = ca_bundle
        self._host = target.host  # the Host header, as signed
        self._fixed_headers = {  # sent with every request
            "content-type": "application/json",
            "accept": "application/json",
            "host": self._host,
        }
        if user_principal:
            self._fixed_headers["dh-user-principal"] = user_principal
        self._urls = {
            op: URL(target.endpoint + target.path(op), encoded=True)
            for op in ("log-inputs", "log-model")
        }
        self._paths = {op: target.path(op) for op in ("log-inputs", "log-model")}
        self._session: aiohttp.ClientSession | None = None
        self._signers: ThreadPoolExecutor | None = None

    async def __aenter__(self) -> Transport:
        ssl_ctx: ssl.SSLContext | bool = True
        if self._ca_bundle:
            ssl_ctx = ssl.create_default_context(cafile=self._ca_bundle)
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, ssl=ssl_ctx, keepalive_timeout=60, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            skip_auto_headers=("User-Agent",),
            headers={"user-agent": "batchlog/0.1"},
        )
        self._signers = ThreadPoolExecutor(signing_threads(), thread_name_prefix="batchlog-sign")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
        if self._signers is not None:
            self._signers.shutdown(wait=False, cancel_futures=True)

    async def refresh_credentials(self) -> None:
        assert self._signers is not None
        await asyncio.get_running_loop().run_in_executor(self._signers, self._keys.refresh)

    async def send(self, call: Call) -> Answer:
        """One attempt: sign now, post, and describe what came back. Never raises on HTTP."""
        assert self._session is not None and self._signers is not None
        request_id = uuid.uuid4().hex.upper()
        headers = dict(self._fixed_headers)
        headers["opc-request-id"] = request_id
        headers["opc-retry-token"] = call.token
        try:
            signed = await asyncio.get_running_loop().run_in_executor(
                self._signers,
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
