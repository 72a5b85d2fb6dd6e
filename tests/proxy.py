"""A holding HTTP/1.1 proxy on loopback: a load balancer that finishes calls for dead clients.

Each request is read whole from the client (head and Content-Length or chunked body), held
for ``delay`` seconds (plus up to ``jitter``; reads for ``read_delay`` when it is given: a
slow write path behind fast reads), then forwarded to the upstream on a fresh
connection *whether or not the client is still connected*; the answer is relayed to the
client if it still is. A client killed while its request is held therefore leaves a call
that lands on the server later, as happens behind real load balancers and gateways.

    with HoldingProxy("127.0.0.1", upstream_port, delay=2.5) as proxy:
        ...  # point the client at proxy.url
        proxy.wait_idle(30)  # every held request has reached the upstream
        proxy.stats()  # {"held": ..., "delivered_after_client_left": ..., ...}

Counters (``stats()``): ``held`` requests read whole from clients, ``holding`` held now and
not yet answered by the upstream, ``forwarded`` answered by the upstream,
``delivered_after_client_left`` forwarded although the client had gone by the time the
answer came, ``relayed`` answers given to clients, ``upstream_errors``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

_MAX_HEAD = 64 << 10
_MAX_BODY = 64 << 20
_HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding")


@dataclass
class ProxyStats:
    held: int = 0
    holding: int = 0
    forwarded: int = 0
    delivered_after_client_left: int = 0
    relayed: int = 0
    upstream_errors: int = 0


@dataclass(frozen=True)
class Held:
    """One request the proxy held: what it was and when it went where (monotonic seconds)."""

    request_line: str
    body: bytes
    read_at: float  # read whole from the client
    landed_at: float  # the upstream's answer came back (the call had been applied by then)
    client_left: bool  # the client had gone when the answer came


class _BadRequest(Exception):
    pass


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, list[bytes], bytes] | None:
    """(request line, header lines, body) of the next request, or None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("truncated request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest("request head too large") from None
    lines = head[:-4].split(b"\r\n")
    request_line, headers = lines[0], [h for h in lines[1:] if h]
    length: int | None = None
    chunked = False
    for h in headers:
        name, _, value = h.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = await _read_chunked(reader)
    elif length:
        if length > _MAX_BODY:
            raise _BadRequest("body too large")
        body = await reader.readexactly(length)
    else:
        body = b""
    return request_line, headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        total += size
        if total > _MAX_BODY:
            raise _BadRequest("body too large")
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _upstream_request(request_line: bytes, headers: list[bytes], body: bytes) -> bytes:
    kept = [h for h in headers if h.partition(b":")[0].strip().lower() not in _HOP_BY_HOP]
    kept = [h for h in kept if h.partition(b":")[0].strip().lower() != b"content-length"]
    kept += [b"Content-Length: %d" % len(body), b"Connection: close"]
    return request_line + b"\r\n" + b"\r\n".join(kept) + b"\r\n\r\n" + body


def _closing(answer: bytes) -> bytes:
    """The upstream answer with ``Connection: close``: the client must not reuse the socket."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return answer
    lines = head.split(b"\r\n")
    kept = [
        h
        for h in lines[1:]
        if h.partition(b":")[0].strip().lower() not in (b"connection", b"keep-alive")
    ]
    return b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n" + body


class HoldingProxy:
    """The proxy, serving from a thread of its own on 127.0.0.1 (like EmulatorThread)."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        delay: float = 2.5,
        jitter: float = 0.0,
        seed: int | None = None,
        read_delay: float | None = None,
    ) -> None:
        assert upstream_host in ("127.0.0.1", "localhost"), "loopback only"
        self.upstream = (upstream_host, upstream_port)
        self.delay = delay  # read per request: may be changed while it runs
        self.jitter = jitter
        self.read_delay = read_delay  # GET and HEAD held this long instead (None: the same)
        self._rng = random.Random(seed)
        self._stats = ProxyStats()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.log: list[Held] = []  # every request held, in the order the upstream answered
        self._now: dict[int, str] = {}  # request lines held at this moment, by a serial
        self._serial = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict[str, int]:
        with self._lock:
            return asdict(self._stats)

    def holding(self, fragment: str = "") -> int:
        """Requests held at this moment whose request line contains ``fragment``."""
        with self._lock:
            return sum(fragment in line for line in self._now.values())

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until no request is held: everything held has reached the upstream."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats()["holding"] == 0:
                return True
            time.sleep(0.05)
        return self.stats()["holding"] == 0

    # ---- thread ------------------------------------------------------------------------

    def __enter__(self) -> HoldingProxy:
        self._thread = threading.Thread(target=self._serve, name="holding-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0, limit=_MAX_HEAD)
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    # ---- connections -----------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except (_BadRequest, ValueError, asyncio.IncompleteReadError, OSError):
                    return
                if request is None:
                    return
                if not await self._handle(reader, writer, *request):
                    return
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request_line: bytes,
        headers: list[bytes],
        body: bytes,
    ) -> bool:
        """Hold, forward, relay one request; True when the client connection stays usable."""
        self._count(held=1, holding=1)
        read_at = time.monotonic()
        with self._lock:
            self._serial += 1
            serial = self._serial
            self._now[serial] = request_line.decode("latin-1")
        gone = asyncio.Event()
        watch = asyncio.ensure_future(self._watch(reader, gone))
        # the upstream call is a task of its own: the client leaving does not cancel it
        upstream = _upstream_request(request_line, headers, body)
        call = asyncio.ensure_future(self._forward(upstream, self._delay(request_line)))
        self._tasks.add(call)
        call.add_done_callback(self._tasks.discard)
        try:
            answer = await call
        finally:
            watch.cancel()
            with self._lock:
                self._now.pop(serial, None)
        if answer is None:
            self._count(holding=-1, upstream_errors=1)
            return False
        client_left = gone.is_set() or writer.is_closing()
        with self._lock:
            self.log.append(
                Held(request_line.decode(), body, read_at, time.monotonic(), client_left)
            )
        self._count(holding=-1, forwarded=1, delivered_after_client_left=int(client_left))
        if client_left:
            return False
        try:
            writer.write(_closing(answer))
            await writer.drain()
        except OSError:
            self._count(delivered_after_client_left=1)
            return False
        self._count(relayed=1)
        return False  # the upstream answer carries its own framing; one request a connection

    async def _watch(self, reader: asyncio.StreamReader, gone: asyncio.Event) -> None:
        """Notice the client closing while its request is held (it sends nothing else)."""
        try:
            data = await reader.read(1)
        except OSError:
            data = b""
        if not data:
            gone.set()

    def _delay(self, request_line: bytes) -> float:
        if self.read_delay is not None and request_line.split(b" ", 1)[0] in (b"GET", b"HEAD"):
            return self.read_delay
        return self.delay + (self._rng.uniform(0.0, self.jitter) if self.jitter else 0.0)

    async def _forward(self, raw: bytes, delay: float) -> bytes | None:
        await asyncio.sleep(delay)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            return None
        try:
            up_writer.write(raw)
            await up_writer.drain()
            return await up_reader.read()  # Connection: close: the answer ends at EOF
        except OSError:
            return None
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()
