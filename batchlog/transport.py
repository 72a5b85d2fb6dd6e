"""Sending one signed attempt over a kept-alive aiohttp session.

RSA signing runs on a small dedicated thread pool (the GIL is released while signing), so
it neither blocks the event loop nor waits behind anything else; retries sleep on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import errno
import gc
import hashlib
import html
import itertools
import json
import logging
import os
import re
import secrets
import ssl
import threading
import unicodedata
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import orjson
from yarl import URL

from batchlog.errors import ConfigurationError, redact
from batchlog.files import UnusableFile, read_ca_bundle
from batchlog.operations import operation
from batchlog.plan import Call
from batchlog.records import OPS
from batchlog.retry import (
    BAD_STATUS,
    CANNOT_CONNECT,
    DATABASE_BUSY,
    NO_ANSWER,
    NOT_THE_API,
    REDIRECT,
    SIGNING_FAILED,
    UNIQUE_CONFLICT,
    Answer,
    parse_retry_after,
)
from batchlog.signing import KeySnapshot, KeySource, get_headers, post_headers
from batchlog.target import Target

_MAX_MESSAGE = 500  # characters of an answer's message, one line (logs, dead letter)
_MAX_CODE = 100  # characters of an answer's code and request id
_MAX_ETAG = 200
# bytes of an answer's body read at most: the API's answers are a few hundred bytes, and
# only a short message is kept of the rest; a proxy's page of megabytes must neither fill
# memory (times every call in flight) nor hold the call while it trickles in. Counted after
# decompression: a gzip answer of a few kB can hold gigabytes.
_MAX_BODY = 1 << 16
# bytes of a run read back at most (runs/get, decompressed): a run with many dataset inputs
# and a long model history is large, but not this large; a bigger answer is not read on
_MAX_RUN = 64 << 20
# what never goes into a message: controls (line breaks, escapes), format characters
# (bidi overrides, zero-width), lone surrogates (invalid UTF-8 as aiohttp decodes it, which
# no JSON writer accepts), line and paragraph separators
_UNSAFE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_HTML_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*>?")
HISTORY_TAG = "mlflow.log-model.history"  # where MLflow keeps a run's logged models
# a database's unique-constraint violation (sqlite, Postgres, MySQL, SQL Server): MLflow
# answers 400 or 500 with one of these when a late-applied duplicate and its retry race
_UNIQUE_VIOLATION = re.compile(
    r"UNIQUE constraint failed|duplicate key value violates unique constraint"
    r"|Duplicate entry|Cannot insert duplicate key"
)
_UNIQUE_STATUSES = frozenset({400, 409, 500})
# the database's connection pool ran out behind the server (SQLAlchemy, as MLflow's SQL
# stores use it): answered 400 (or 500) under load, although nothing is wrong with the
# request; retry.DATABASE_BUSY says what is done with it
_POOL_EXHAUSTED = re.compile(r"QueuePool limit")


_THREADS_ENV = "BATCHLOG_SIGNING_THREADS"  # 1 to 64: how signing scales (benchmarks)


def signing_threads() -> int:
    """Threads that sign: one per core this process may run on (8 at most), or the number
    in BATCHLOG_SIGNING_THREADS (a bad value is warned about and the default kept)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    default = max(1, min(cores, 8))
    raw = os.environ.get(_THREADS_ENV, "").strip()
    if not raw:
        return default
    if raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 64:
        return int(raw)
    log.warning(
        "%s=%s is not a number of threads from 1 to 64: signing on %d",
        _THREADS_ENV,
        ascii(raw[:20]),  # ascii(): no control character reaches the log line
        default,
    )
    return default


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


log = logging.getLogger("batchlog")
# the key generation the current task's last request was signed with: a 401 to it asks for
# a refresh only if no other request's 401 has refreshed since (one refresh per burst)
_signed_with: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "batchlog_signed_with", default=None
)


def tls_context(
    ca_bundle: str | None, verify: bool, name: str = "CA file"
) -> ssl.SSLContext | bool:
    """How the session verifies TLS: with the system's CAs (True), with ``ca_bundle``'s, or
    not at all (False, only on request). A CA file that cannot be used is a
    ConfigurationError naming it (as ``name``) and why."""
    if not verify:
        if ca_bundle:
            raise ConfigurationError(
                f"TLS verification is off and {name} {ca_bundle} is given: choose one"
            )
        return False
    if not ca_bundle:
        return True
    if os.path.isdir(ca_bundle):
        raise ConfigurationError(f"{name} {ca_bundle}: is a directory")
    try:  # read capped, never by OpenSSL: a FIFO would hold it forever, /dev/zero too
        return ssl.create_default_context(cadata=read_ca_bundle(ca_bundle))
    except UnusableFile as exc:
        raise ConfigurationError(f"{name} {ca_bundle}: {exc}") from None
    except ssl.SSLError:
        raise ConfigurationError(f"{name} {ca_bundle}: no PEM certificate in it") from None


def _sign(
    headers: Callable[..., dict[str, str]], keys: KeySource, *args: Any
) -> tuple[dict[str, str], int]:
    """Signed headers from one snapshot of the key, and the generation signed with.
    Blocking (a token refresh, RSA): runs on the signing pool."""
    snapshot: KeySnapshot = keys.snapshot()
    return headers(snapshot, *args), snapshot.generation


@dataclass(frozen=True, slots=True)
class RunRead:
    """What reading a run back gave."""

    run: dict[str, Any] | None  # the run; None: it does not exist, or see problem
    problem: str = ""  # why the server could not be asked (no connection, 401, a page...)


class _YoungGc:
    """While any session is open: what start-up made is frozen (the collector no longer
    walks it), and young collections come every 10,000 allocations instead of 700. Each
    request allocates hundreds of short-lived objects, almost all freed by reference
    counting: a 3,000-request upload spent 59-108 ms collecting with the defaults (~200
    young collections), 14-16 ms with this (gc.callbacks, start-up included)."""

    YOUNG = 10_000
    users = 0
    saved: tuple[int, int, int] = (700, 10, 10)

    @classmethod
    def enter(cls) -> None:
        if cls.users == 0:
            cls.saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(cls.YOUNG, cls.saved[0]), *cls.saved[1:])
        cls.users += 1

    @classmethod
    def exit(cls) -> None:
        cls.users -= 1
        if cls.users == 0:
            gc.set_threshold(*cls.saved)
            gc.unfreeze()


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
        self._ssl = tls_context(ca_bundle, verify_tls)
        self._oci = target.signed  # OCI: signed, with opc headers
        if self._ssl is False and urlsplit(target.endpoint).scheme == "https":
            log.warning(
                "TLS certificate verification is off (MLFLOW_TRACKING_INSECURE_TLS): "
                "nothing proves %s is the server, and credentials go to whoever answers",
                target.host,
            )
        self._host = target.host  # the Host header, as signed
        self._fixed_headers = {  # sent with every request
            "content-type": "application/json",
            "accept": "application/json",
            "host": self._host,
            "user-agent": "batchlog/0.1",
        }
        if user_principal and self._oci:
            self._fixed_headers["dh-user-principal"] = user_principal
        self._fixed_headers.update(target.headers())
        self._paths = {op: target.path(op) for op in OPS}
        self._urls = {
            op: URL(target.endpoint + path, encoded=True) for op, path in self._paths.items()
        }
        self._session: aiohttp.ClientSession | None = None
        self._signers: SigningPool | None = None
        self._ids = RequestIds()
        self._gc_entered = False

    async def __aenter__(self) -> Transport:
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, ssl=self._ssl, keepalive_timeout=60, enable_cleanup_closed=True
        )
        # no skip_auto_headers: every request carries our own User-Agent, so aiohttp adds
        # none, and a skip list costs a sort and two header copies per request
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        self._signers = SigningPool(signing_threads())
        _YoungGc.enter()
        self._gc_entered = True
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
        if self._signers is not None:
            self._signers.close()
        if self._gc_entered:
            self._gc_entered = False
            _YoungGc.exit()

    async def refresh_credentials(self) -> None:
        """Refresh the key after a 401 to the current task's last request, unless another
        401 has refreshed it since that request was signed."""
        assert self._signers is not None
        if self._keys is not None:
            await self._signers.run(self._keys.refresh, _signed_with.get())

    async def send(self, call: Call) -> Answer:
        """One attempt: sign now, post, and describe what came back. Never raises on HTTP.

        Redirects are never followed (a 302 to a login page is not a success): a 3xx is
        answered as code Redirect. A connection that could not be made (refused, DNS, TLS,
        connect timeout) or a request that could not be signed is answered with
        ``sent=False``: it never reached the server, so it is not in doubt.
        """
        answer, _ = await self._post(
            self._urls[call.op], self._paths[call.op], call.body, call.body_sha256, call.token
        )
        return answer

    async def request(
        self,
        rel: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        token: str = "",
        large: bool = False,
    ) -> tuple[Answer, Any]:
        """One attempt at an API call under the MLflow prefix (``rel``, e.g.
        "experiments/get-by-name"): a POST of ``body`` (JSON; with ``token`` as its retry
        token on OCI), or a GET with ``query`` when ``body`` is None. The answer, as
        ``send`` describes it, and on a 2xx the JSON object it held (else None). A GET's
        answer, or a POST's with ``large`` (a search's page), is read up to 64 MiB."""
        path = self._target.api_path(rel)
        if body is None:
            if query:
                path += "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
            return await self._get(path)
        data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
        return await self._post(
            URL(self._target.endpoint + path, encoded=True), path, data, sha, token, large
        )

    async def _post(
        self, url: URL, path: str, body: bytes, body_sha256: str, token: str, large: bool = False
    ) -> tuple[Answer, Any]:
        assert self._session is not None and self._signers is not None
        headers = dict(self._fixed_headers)
        request_id = ""
        if self._keys is not None:
            request_id = self._ids.next()
            headers["opc-request-id"] = request_id
            if token:
                headers["opc-retry-token"] = token
            try:
                signed, generation = await self._signers.run(
                    _sign, post_headers, self._keys, path, self._host, len(body), body_sha256
                )
            except Exception as exc:  # a principal token that cannot be fetched, a broken key
                kind = type(exc).__name__
                return Answer(NO_ANSWER, SIGNING_FAILED, kind, request_id, sent=False), None
            _signed_with.set(generation)
            headers.update(signed)
            headers["x-content-sha256"] = body_sha256
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                # ``large``: a search's page (export), read as a run is, up to _MAX_RUN
                payload, cut = await _read_capped(resp, _MAX_RUN if large else _MAX_BODY)
                if large and cut and resp.status == 200:
                    problem = f"answer too large (over {_MAX_RUN >> 20} MiB)"
                    return Answer(NO_ANSWER, NOT_THE_API, problem, request_id, sent=False), None
                answer = _answer(resp.status, resp.headers, payload, request_id, cut)
                return answer, _result(answer, payload)
        # A connector error is raised while the connection is being made, before any byte
        # of the request is written; aiohttp re-sends on a fresh connection only for
        # idempotent methods, never a POST, so it never follows a request that went out. A
        # reset of a kept-alive connection is a ClientOSError or ServerDisconnectedError
        # instead: the request may have been applied, it stays in doubt.
        except aiohttp.ClientConnectorError as exc:  # refused, DNS, TLS handshake/certificate
            problem = _connect_problem(exc)
            return Answer(NO_ANSWER, CANNOT_CONNECT, problem, request_id, sent=False), None
        except aiohttp.ConnectionTimeoutError:  # the connection was never made
            problem = f"connection to {self._host} timed out"
            return Answer(NO_ANSWER, CANNOT_CONNECT, problem, request_id, sent=False), None
        except asyncio.TimeoutError:
            return Answer(NO_ANSWER, "Timeout", "no answer within the timeout", request_id), None
        except aiohttp.ClientError as exc:  # e.g. a kept-alive connection reset: may have landed
            return Answer(NO_ANSWER, type(exc).__name__, _one_line(str(exc)), request_id), None

    async def _get(self, path_and_query: str) -> tuple[Answer, Any]:
        """One GET (OCI: signed over ``date (request-target) host``): the answer and, on a
        2xx, the JSON object it held. Nothing a GET does can be applied twice."""
        assert self._session is not None and self._signers is not None
        headers = {k: v for k, v in self._fixed_headers.items() if k != "content-type"}
        request_id = ""
        if self._keys is not None:
            request_id = headers["opc-request-id"] = self._ids.next()
            try:
                signed, _ = await self._signers.run(
                    _sign, get_headers, self._keys, path_and_query, self._host
                )
            except Exception as exc:
                kind = type(exc).__name__
                return Answer(NO_ANSWER, SIGNING_FAILED, kind, request_id, sent=False), None
            headers.update(signed)
        url = URL(self._target.endpoint + path_and_query, encoded=True)
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                limit = _MAX_RUN if resp.status == 200 else _MAX_BODY
                payload, cut = await _read_capped(resp, limit)
                if resp.status == 200 and cut:
                    problem = f"answer too large (over {_MAX_RUN >> 20} MiB)"
                    return Answer(NO_ANSWER, NOT_THE_API, problem, request_id, sent=False), None
                answer = _answer(resp.status, resp.headers, payload, request_id, False)
                return answer, _result(answer, payload)
        except aiohttp.ClientConnectorError as exc:
            problem = _connect_problem(exc)
            return Answer(NO_ANSWER, CANNOT_CONNECT, problem, request_id, sent=False), None
        except asyncio.TimeoutError:
            return Answer(NO_ANSWER, "Timeout", "no answer within the timeout", request_id), None
        except aiohttp.ClientError as exc:
            return Answer(NO_ANSWER, type(exc).__name__, _one_line(str(exc)), request_id), None

    @property
    def target(self) -> Target:
        return self._target

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run as runs/get returns it (``{"info", "data", "inputs"}``); None when it
        cannot be read now (no connection, timeout, any answer but 200, not JSON)."""
        return (await self.read_run(run_id)).run

    async def read_run(self, run_id: str) -> RunRead:
        """Read a run back with runs/get, telling a run the server says does not exist
        (``RunRead(None)``) from one it could not be asked about (``problem`` says why).
        A run is read up to 64 MiB (decompressed); a bigger answer is such a problem.

        OCI: a GET signed over ``date (request-target) host``, with an opc-request-id.
        MLflow: with the target's Authorization header, if any.
        """
        assert self._session is not None and self._signers is not None
        path_and_query = f"{self._target.path('get')}?run_id={quote(run_id, safe='')}"
        headers = {k: v for k, v in self._fixed_headers.items() if k != "content-type"}
        request_id = ""
        if self._keys is not None:
            request_id = headers["opc-request-id"] = self._ids.next()
            try:
                signed, _ = await self._signers.run(
                    _sign, get_headers, self._keys, path_and_query, self._host
                )
            except Exception as exc:
                return RunRead(None, f"the request could not be signed ({type(exc).__name__})")
            headers.update(signed)
        url = URL(self._target.endpoint + path_and_query, encoded=True)
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                payload, cut = await _read_capped(resp, _MAX_RUN if status == 200 else _MAX_BODY)
                if status == 200 and cut:
                    mib = _MAX_RUN >> 20
                    return RunRead(None, f"run too large to read back (over {mib} MiB)")
                answer = _answer(status, resp.headers, payload, request_id, cut)
        except aiohttp.ClientConnectorError as exc:
            return RunRead(None, _connect_problem(exc))
        except asyncio.TimeoutError:
            return RunRead(None, "no answer within the timeout")
        except aiohttp.ClientError as exc:
            return RunRead(None, f"no answer ({type(exc).__name__})")
        if status == 404 or answer.code == "RESOURCE_DOES_NOT_EXIST":
            return RunRead(None)
        if status != 200 or answer.code:
            rid = f" (opc-request-id {answer.request_id})" if answer.request_id else ""
            return RunRead(None, f"{status} {answer.code}: {answer.message}{rid}")
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = None
        run = doc.get("run") if isinstance(doc, dict) else None
        if not isinstance(run, dict):
            return RunRead(None, "200 without a run in it: not the API")
        return RunRead(run)

    async def is_applied(self, call: Call) -> bool | None:
        """Whether the call's effect is on the server, read back with runs/get: log-model,
        its model (by ``model_identity``) among the run's logged models; log-inputs, every
        (name, digest) of its datasets among the run's dataset inputs. None when the run
        cannot be read now (or its model history cannot be parsed)."""
        confirm = operation(call.op).confirm
        if confirm in ("resend", "lookup", "missing"):
            # sent again as it was: a replay changes nothing (README); a log-batch's
            # missing part is read by batchlog.replay.missing
            return False
        run = await self.get_run(call.run_id)
        if run is None:
            return None
        if confirm == "models":
            models = _history(run)
            if models is None:
                return None
            try:  # the model as sent: a plan's has its run_id rewritten to the target run
                ours = model_identity(parse_model(_sent_model_json(call)))
            except ValueError:
                return None
            return any(model_identity(m) == ours for m in models)
        have = logged_datasets(run)
        for record in call.records:
            for item in record.dataset_inputs:
                dataset = item.get("dataset") or {}
                if (dataset.get("name"), dataset.get("digest")) not in have:
                    return False
        return True


def _result(answer: Answer, payload: bytes) -> Any:
    """The JSON object of a 2xx answer that is the API's (``_answer`` checked it), else None."""
    if not 200 <= answer.status < 300 or answer.code:
        return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The body, decompressed, up to ``limit`` bytes, and whether there was more (the rest
    is never read: the connection is closed instead of reused). Never ``resp.read()``: a
    Content-Length counts compressed bytes, and a small gzip answer can unpack to gigabytes;
    the decompressed stream is read in bounded pieces instead."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:  # one byte beyond the limit tells a cut body from a whole one
        chunk = await resp.content.read(min(limit + 1 - size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if resp.content.at_eof():  # the whole body (the usual "{}"): no read for the end
            break
    if size > limit:  # the byte beyond goes, without copying the rest
        chunks[-1] = chunks[-1][: limit - size]
    return b"".join(chunks), size > limit


def _answer(
    status: int, headers: Mapping[str, str], payload: bytes, request_id: str, cut: bool = False
) -> Answer:
    """An HTTP answer described (``headers`` as aiohttp gives them: case-insensitive; the
    first of repeated ones counts; ``cut``: ``payload`` is the start of a longer body).
    Whatever the server sent, every text of the answer is one clean line of bounded
    length."""
    rid = _one_line(headers.get("opc-request-id") or request_id, _MAX_CODE)
    if not 200 <= status <= 599:  # 1xx as a final answer, 0, 600 and beyond: not HTTP
        message = f"answered with status {status}, which is not a final HTTP status"
        return Answer(status, BAD_STATUS, message, rid)
    if 200 <= status < 300:
        if cut:  # the API answers {}: so much is something else, whatever it holds
            message = (
                f"answered {status} with a body over {_MAX_BODY >> 10} KiB, not the API's answer"
            )
            return Answer(status, NOT_THE_API, message, rid)
        if not _json_object(payload):
            kind = _one_line(headers.get("content-type") or "", _MAX_CODE) or "no content type"
            message = (
                f"answered {status} with {kind}, not a JSON object: "
                "not the API (a login page, or a proxy?)"
            )
            return Answer(status, NOT_THE_API, message, rid)
        return Answer(status, request_id=rid, etag=_one_line(headers.get("etag", ""), _MAX_ETAG))
    if 300 <= status < 400:
        where = _one_line(_location(headers.get("location")))
        return Answer(status, REDIRECT, f"redirected to {where}", rid)
    code, message = _error_body(payload)
    code = _one_line(code, _MAX_CODE)
    retry_after = parse_retry_after(headers.get("retry-after"))
    if status in _UNIQUE_STATUSES:
        conflict = _unique_conflict(code, message, payload)
        if conflict is not None:
            return Answer(status, UNIQUE_CONFLICT, conflict, rid, retry_after=retry_after)
    if status >= 400 and status not in (401, 403) and _pool_exhausted(message, payload):
        # transient and in doubt, whatever the status says (the one rule: retry.py)
        said = _one_line(redact(message, long_runs=False)) or "QueuePool limit reached"
        return Answer(status, DATABASE_BUSY, said, rid, retry_after=retry_after)
    # a body without them (a proxy's page, nothing): the status names it, as OCI's codes do
    phrase = _phrase(status)
    code = code or "".join(phrase.replace("-", " ").split())
    # the server's own words may quote the request (an echoing proxy: its Authorization)
    message = _one_line(redact(message, long_runs=False)) or phrase
    return Answer(status, code, message, rid, retry_after=retry_after)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a status with no name
        return f"HTTP {status}"


def _one_line(text: str, limit: int = _MAX_MESSAGE) -> str:
    """``text`` as one clean line for logs and the dead letter: runs of white space (line
    breaks included) become one space, other unsafe characters go, and it is cut to
    ``limit`` characters."""
    if (  # printable ASCII with single inner spaces (a request id, an etag): already clean
        len(text) <= limit
        and text.isascii()
        and text.isprintable()
        and "  " not in text
        and text[:1] != " "
        and text[-1:] != " "
    ):
        return text
    text = text[: limit * 4]  # enough to fill the limit after cleaning, in most cases
    kept = "".join(c for c in text if c.isspace() or unicodedata.category(c) not in _UNSAFE)
    line = " ".join(kept.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _json_object(payload: bytes) -> bool:
    """Whether a 2xx body is the API's: a JSON object (``{}`` from both targets), or
    nothing at all. Not a login page or a proxy's page served with a 2xx."""
    body = payload.strip(b" \t\r\n")
    if body in (b"", b"{}"):  # the usual answers, without parsing
        return True
    if not body.startswith(b"{"):
        return False
    try:
        return isinstance(_loads(body), dict)
    except (ValueError, RecursionError):  # not JSON, or nested beyond the stack
        return False


def _location(value: str | None) -> str:
    """A Location header for a message: without credentials, query or fragment (a login
    page's query carries state and nonces)."""
    if not value:
        return "(no Location)"
    try:
        parts = urlsplit(value)
    except ValueError:
        return "(an unparsable Location)"
    netloc = parts.netloc.rpartition("@")[2]
    shown = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    if parts.query or parts.fragment:
        shown += "?…"
    return shown[:300]


def _unique_conflict(code: str, message: str, payload: bytes) -> str | None:
    """The message of a unique-constraint violation, or None if it is not one."""
    text = message
    found = _UNIQUE_VIOLATION.search(text)
    if found is None:  # elsewhere in the body (a stack trace field)?
        text = payload.decode("utf-8", errors="replace")
        found = _UNIQUE_VIOLATION.search(text)
        if found is None:
            return None
    start = max(0, found.start() - 60)
    excerpt = ("…" if start else "") + text[start : start + _MAX_MESSAGE * 4]
    return _one_line((f"{code}: " if code else "") + excerpt)


def _pool_exhausted(message: str, payload: bytes) -> bool:
    """Whether an error answer says the server's database pool ran out (its message, or
    elsewhere in its body: a stack trace field)."""
    if _POOL_EXHAUSTED.search(message):
        return True
    return _POOL_EXHAUSTED.search(payload.decode("utf-8", errors="replace")) is not None


def _connect_problem(exc: aiohttp.ClientConnectorError) -> str:
    """Why no connection was made, in a few words (no secrets: host, port, the OS's reason)."""
    where = f"{exc.host}:{exc.port}"
    error = exc.os_error
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {exc.host} ({error.strerror or type(error).__name__})"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        reason = getattr(cert, "verify_message", "") or str(cert)
        return f"TLS certificate of {where} not accepted: {reason}"[:_MAX_MESSAGE]
    if isinstance(exc, aiohttp.ClientSSLError):
        reason = getattr(error, "reason", "") or str(error)
        return f"TLS handshake with {where} failed: {reason}"[:_MAX_MESSAGE]
    if error.errno == errno.ECONNREFUSED or isinstance(error, ConnectionRefusedError):
        return f"connection refused to {where}"
    reason = error.strerror or str(error) or type(error).__name__
    return f"cannot connect to {where}: {reason}"[:_MAX_MESSAGE]


def _int_like_orjson(text: str) -> int | float:
    """json.loads' parse_int, as orjson reads integers: beyond 64 bits, a float."""
    try:
        value = int(text)
    except ValueError:  # more digits than int() converts by default: far beyond 64 bits
        return float(text)
    return value if -(1 << 63) <= value < (1 << 64) else float(text)


def _loads(text: str | bytes) -> Any:
    """JSON as orjson reads it; what orjson refuses (NaN, Infinity) through json, with the
    same reading of integers. Raises ValueError."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text, parse_int=_int_like_orjson)


def parse_model(model_json: str) -> dict[str, Any]:
    """A record's model_json as a dict, read the way ``logged_models`` reads the server's.
    Raises ValueError if it is not a JSON object."""
    model = _loads(model_json)
    if not isinstance(model, dict):
        raise ValueError("model_json is not a JSON object")
    return model


def _history(run: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The models in the run's history tag; [] without one; None if it cannot be parsed."""
    data = run.get("data")
    tags = data.get("tags") if isinstance(data, dict) else None
    for tag in tags if isinstance(tags, list) else []:
        if isinstance(tag, dict) and tag.get("key") == HISTORY_TAG:
            try:
                models = _loads(tag.get("value") or "[]")
            except ValueError:
                return None
            if not isinstance(models, list):
                return None
            return [m for m in models if isinstance(m, dict)]
    return []


def logged_models(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The models in an MLflow run's mlflow.log-model.history tag ([] if unreadable)."""
    return _history(run) or []


def logged_datasets(run: dict[str, Any]) -> set[tuple[str, str]]:
    """(name, digest) of every dataset input of a run as runs/get returns it."""
    inputs = run.get("inputs")
    items = inputs.get("dataset_inputs") if isinstance(inputs, dict) else None
    have: set[tuple[str, str]] = set()
    for item in items if isinstance(items, list) else []:
        dataset = item.get("dataset") if isinstance(item, dict) else None
        if isinstance(dataset, dict):
            have.add((str(dataset.get("name", "")), str(dataset.get("digest", ""))))
    return have


# What MLflow keeps of a logged model in the run's history tag: its server stores
# Model.from_dict(sent).get_tags_dict(), i.e. only these fields, plus model_uuid (null when
# none was sent) and flavors without each flavor's "config" entry; everything else
# (signature, metadata, mlflow_version, saved_input_example_info, ...) is dropped, and
# utc_time_created goes through str(). Checked against a real `mlflow server`
# (tests/test_transport.py).
_MODEL_FIELDS_KEPT = ("artifact_path", "run_id", "utc_time_created")


def _sent_model_json(call: Call) -> str:
    """The model_json a log-model call sends (its body's), as text."""
    try:
        doc = orjson.loads(call.body)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    text = doc.get("model_json") if isinstance(doc, dict) else None
    if not isinstance(text, str):
        raise ValueError("no model_json")
    return text


def model_identity(model: dict[str, Any]) -> str:
    """What makes a logged model the one a record sent, comparable with ``==`` between a
    record's model and one read back from a run's history.

    The model's ``model_uuid`` when it has one (MLflow keeps it). Otherwise the canonical
    JSON (sorted keys, at any depth) of the whole model as MLflow keeps it: artifact_path,
    run_id, utc_time_created and flavors, each flavor without its "config" entry. Fields
    MLflow drops from the history cannot tell two models apart on the server, so they are
    left out on both sides; a server that keeps the model whole (the emulator) compares
    equal the same way.
    """
    uuid = model.get("model_uuid")
    if isinstance(uuid, str) and uuid:
        return uuid
    kept: dict[str, Any] = {k: model[k] for k in _MODEL_FIELDS_KEPT if model.get(k) is not None}
    if "utc_time_created" in kept:
        kept["utc_time_created"] = str(kept["utc_time_created"])
    flavors = model.get("flavors")
    if isinstance(flavors, dict):
        kept["flavors"] = {
            name: (
                {k: v for k, v in config.items() if k != "config"}
                if isinstance(config, dict)
                else config
            )
            for name, config in flavors.items()
        }
    else:
        kept["flavors"] = {} if flavors is None else flavors
    return _canonical(kept)


def _canonical(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError: integers beyond 64 bits, for one
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        )


def _error_body(payload: bytes) -> tuple[str, str]:
    """The error's code and message (callers make them one line), from whatever came: the
    API's ``{"code", "message"}``, other JSON, a proxy's HTML page, text, or bytes."""
    body = payload.strip(b" \t\r\n")
    if not body:
        return "", ""
    try:
        doc = _loads(body)
    except (ValueError, RecursionError):  # not JSON (or cut short, or nested too deep)
        return "", _text_of(body)
    if isinstance(doc, str):
        return "", doc  # a bare JSON string: the message itself
    if not isinstance(doc, dict):
        kind = {list: "array", bool: "boolean", type(None): "null"}.get(type(doc), "number")
        return "", f"a JSON {kind}, not an error object: {_text_of(body)}"
    code = doc.get("code") or doc.get("error_code") or ""
    message = doc.get("message")
    if message is not None and message != "":
        return _json_text(code), _json_text(message)
    if len(doc) > (1 if code else 0):  # no message, but more than a code: show the object
        return _json_text(code), _text_of(body)
    return _json_text(code), ""


def _json_text(value: Any) -> str:
    """A JSON value as text: a string as it is, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError: integers beyond 64 bits, nested too deep
        return type(value).__name__


def _text_of(body: bytes) -> str:
    """What a body that is not the API's error says: an HTML page's title (or its text),
    other text as it is, or that it is not text at all."""
    text = body[: _MAX_MESSAGE * 8].decode("utf-8", errors="replace")
    if text.lstrip().startswith("<"):
        title = _HTML_TITLE.search(text)
        shown = title[1] if title else _HTML_TAG.sub(" ", text)
        return "an HTML page: " + _one_line(html.unescape(shown))
    readable = sum(1 for c in text if c != "\ufffd" and (c.isprintable() or c.isspace()))
    if readable * 2 < len(text):
        return f"a body that is not text ({len(body):,} bytes or more)"
    return text
