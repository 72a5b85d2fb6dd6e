"""One upload job: manifests in, calls out through the pool, outcomes to the journal.

    producer (read, validate, skip what is done, group)  --bounded stream-->  workers
    workers (rate gate, in-flight limit, sign + send, retry)  -->  outcomes
    outcomes  -->  journal + dead letter (group commit by the flush task), counters

Nothing in here prints; the CLI renders the counters and the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import anyio
import anyio.abc
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batchlog.deadletter import DeadLetter
from batchlog.errors import BatchlogError, CheckpointError
from batchlog.journal import (
    REJECTED,
    Journal,
    Mark,
    ResumePoint,
    header_doc,
    line_hash,
    open_journal,
)
from batchlog.manifest import STDIN, Line, check_readable, display_name, read_lines, read_span
from batchlog.plan import Call, Grouper, split
from batchlog.ratecontrol import RateGate, make_gate
from batchlog.records import Rejection
from batchlog.report import Counters, Report, Status
from batchlog.retry import NO_ANSWER, Answer
from batchlog.settings import Settings, resolve_paths
from batchlog.target import MlflowTarget
from batchlog.transport import Transport, logged_models, model_identity
from batchlog.validate import parse_line

log = logging.getLogger("batchlog")

HEAD_BYTES = 4096  # bytes of each manifest's beginning kept in the checkpoint header
READ_BATCH = 512  # manifest lines read per hop to the reader thread
IN_DOUBT_TTL = 24 * 3600.0  # retry tokens expire after this
LOUD_FAILURES = 100  # failures logged as warnings; the rest at info level (-v)


@dataclass
class _Held:
    """A 401/404 seen before any success: kept back until we know it is not systemic."""

    call: Call
    answer: Answer


class Job:
    def __init__(
        self,
        manifests: list[str],
        settings: Settings,
        on_progress: Callable[[Counters], None] | None = None,
    ) -> None:
        check_readable(manifests)
        self.manifests = manifests
        self.settings = settings
        self.checkpoint_path, self.dead_letter_path = resolve_paths(settings, manifests)
        self._sizes = _sizes(manifests)  # bytes of each manifest, None if unknown (.gz, stdin)
        known = [size for size in self._sizes if size is not None]
        self.counters = Counters(bytes_total=sum(known) if len(known) == len(self._sizes) else None)
        self._on_progress = on_progress
        self._rng = random.Random()
        self._gate: RateGate = make_gate(settings.rate, settings.adaptive)
        self._reads_back = isinstance(settings.target, MlflowTarget)  # no retry tokens there
        self._run_locks: dict[str, tuple[anyio.Lock, int]] = {}  # run -> (lock, users)
        self._inflight = asyncio.Semaphore(settings.concurrency)  # aiohttp runs on asyncio only
        self._draining = False  # a stop was requested: take no new work
        self._stop_status: Status | None = None
        self._stop_message = ""
        self._any_success = False
        self._held: list[_Held] = []
        self._failures_logged = 0
        self._expired: list[str] = []  # sources of calls in doubt for longer than 24 h
        self._journal: Journal | None = None
        self._dead: DeadLetter | None = None
        self._tg: anyio.abc.TaskGroup | None = None  # producer and workers
        self._outer: anyio.abc.TaskGroup | None = None  # flush, progress, timers
        self._producer_scope: anyio.CancelScope | None = None
        self._flush_lock = anyio.Lock()
        self._flushed = anyio.Event()  # set when what was journaled before it is on disk
        self._point: ResumePoint | None = None  # where the checkpoint says the job stands

    # ---- control -------------------------------------------------------------------------

    def request_stop(self, grace: float | None = None) -> None:
        """Stop taking records; let in-flight requests finish within the grace period."""
        if self._draining:
            if self._tg is not None:
                self._tg.cancel_scope.cancel()  # a second request: stop now
            return
        self._draining = True
        self._stop_status = self._stop_status or "interrupted"
        if not self._stop_message:
            self._stop_message = "interrupted"
        if self._producer_scope is not None:
            self._producer_scope.cancel()
        if self._outer is not None:
            self._outer.start_soon(
                self._cancel_after, self.settings.grace if grace is None else grace
            )

    async def _cancel_after(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _fail_job(self, status: Status, message: str) -> None:
        if self._stop_status in (None, "interrupted"):
            self._stop_status = status
            self._stop_message = message
        self._draining = True
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    # ---- run -----------------------------------------------------------------------------

    def open(self) -> None:
        """Open the checkpoint and dead letter; raises CheckpointError before any request."""
        if self._point is None:
            self._point = self._open_files()

    async def run(self) -> Report:
        self.open()
        point = self._point
        assert point is not None
        assert self._journal is not None and self._dead is not None
        self.counters.skipped = point.finished
        self.counters.records = point.finished
        self.counters.rate = self._gate.rate
        s = self.settings
        try:
            async with Transport(
                s.target,
                s.keys,
                concurrency=s.concurrency,
                timeout=s.timeout,
                ca_bundle=s.ca_bundle,
                verify_tls=s.verify_tls,
                user_principal=s.user_principal,
            ) as transport:
                send, receive = anyio.create_memory_object_stream[Call](s.concurrency)
                async with anyio.create_task_group() as outer:
                    self._outer = outer
                    outer.start_soon(self._flush_loop)
                    outer.start_soon(self._progress_loop)
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        tg.start_soon(self._produce, send, point)
                        workers = min(1024, s.concurrency * 2)  # sleeping retries hold no slot
                        async with receive:
                            for _ in range(workers):
                                tg.start_soon(self._work, receive.clone(), transport)
                    outer.cancel_scope.cancel()
        finally:
            self._tg = self._outer = None
            with anyio.CancelScope(shield=True):
                await self._flush()
                self._journal.close()
                self._dead.close()
        if self._held and not self._any_success and self._stop_status is None:
            self._stop_status = "stopped"
            self._stop_message = self._systemic_message()
        report = Report.build(
            self.counters,
            self._stop_status or "completed",
            self._stop_message,
            self.checkpoint_path,
            self.dead_letter_path,
        )
        return dataclasses.replace(report, in_doubt_expired=tuple(self._expired))

    def _open_files(self) -> ResumePoint:
        s = self.settings
        grouping = {"max_datasets": s.grouping.max_datasets, "max_body": s.grouping.max_body}
        heads = [_head(m) for m in self.manifests]
        header = header_doc(s.target.identity, heads, grouping)
        journal, point = open_journal(self.checkpoint_path, header, s.restart)
        fresh = point.finished == 0
        try:
            if not fresh:
                _verify_manifests(self.checkpoint_path, self.manifests, point)
            self._dead = DeadLetter(self.dead_letter_path, truncate=fresh and s.restart)
        except BaseException:
            journal.close()
            raise
        self._journal = journal
        return point

    # ---- producer ------------------------------------------------------------------------

    async def _produce(self, send: MemoryObjectSendStream[Call], point: ResumePoint) -> None:
        assert self._journal is not None
        journal, c = self._journal, self.counters
        grouper = Grouper(self.settings.target, self.settings.grouping)
        done = point.done_above  # seq -> line hash of records finished beyond the watermark
        seq = point.watermark
        try:
            with anyio.CancelScope() as scope:
                self._producer_scope = scope
                if self._draining:
                    scope.cancel()
                async with send:
                    for index, path in enumerate(self.manifests):
                        if index < point.at[0]:
                            continue
                        offset, first = (
                            (point.at[1], point.at[2]) if index == point.at[0] else (0, 1)
                        )
                        name = display_name(path)
                        before = sum(size or 0 for size in self._sizes[:index])
                        async for line in _lines(path, index, offset, first):
                            c.bytes_read = before + line.end
                            h = line_hash(line.raw)
                            mark = Mark(index, line.start, line.end, line.number, h)
                            item = parse_line(line.raw, seq, f"{name}:{line.number}")
                            known = done.get(seq)
                            seq += 1
                            if known is not None:  # finished by an earlier run
                                if known != h:
                                    self._fail_job("failed", self._changed(name, line.number))
                                    return
                                journal.skip(item.seq, mark)
                            else:
                                journal.read(item.seq, mark)
                                c.records += 1
                                if isinstance(item, Rejection):
                                    self._reject(item)
                                    continue
                            if isinstance(item, Rejection):
                                continue
                            # finished records still go through the grouper, so that the
                            # calls (and their retry tokens) are those of the first run
                            for call in grouper.add(item):
                                await self._send_unfinished(send, call, done)
                    for call in grouper.flush():
                        await self._send_unfinished(send, call, done)
        except BatchlogError as exc:
            self._fail_job("failed", str(exc))

    async def _send_unfinished(
        self, send: MemoryObjectSendStream[Call], call: Call, done: dict[int, str]
    ) -> None:
        finished = [r for r in call.records if r.seq in done]
        if not finished:
            await send.send(call)
        elif len(finished) < len(call.records):
            # only after a merged call was split on a 400: its records went one by one
            for single in split(self.settings.target, call):
                if single.records[0].seq not in done:
                    await send.send(single)

    def _changed(self, name: str, line: int) -> str:
        return (
            f"{name}:{line} changed since checkpoint {self.checkpoint_path} recorded it as "
            "done; use --restart to start over"
        )

    def _reject(self, item: Rejection) -> None:
        assert self._journal is not None and self._dead is not None
        self.counters.rejected += 1
        self._dead.add(
            item.raw,
            {
                "status": "rejected",
                "code": "InvalidRecord",
                "field": item.field,
                "message": item.reason,
                "source": item.source,
            },
        )
        self._journal.finish((item.seq,), REJECTED)
        self._log_failure("%s", item)

    # ---- workers -------------------------------------------------------------------------

    async def _work(self, receive: MemoryObjectReceiveStream[Call], transport: Transport) -> None:
        async with receive:
            async for call in receive:
                if self._draining:
                    return
                await self._process(call, transport)

    async def _process(self, call: Call, transport: Transport) -> None:
        s, c, policy = self.settings, self.counters, self.settings.retry
        assert self._point is not None
        refreshed = False
        attempt = 0
        # a log-model call to MLflow is not idempotent: before sending one that may already
        # have been applied (sent before a crash, or answered by a timeout or a 5xx), read
        # the run back and skip it if its model is there
        check_first = self._reads_back and call.op == "log-model"
        in_doubt = check_first and call.records[0].seq in self._point.doubt
        while True:
            attempt += 1
            await self._gate.acquire()
            c.rate = self._gate.rate
            if attempt == 1:
                self._mark_sent(call)
                if check_first:
                    # not idempotent: journal it as in doubt before it goes out, so that a
                    # crash at any moment leaves a resume that reads the run back first
                    await self._flushed.wait()
            async with self._run_lock(call), self._inflight:
                c.in_flight += 1
                try:
                    answer = await self._attempt(call, transport, in_doubt)
                finally:
                    c.in_flight -= 1
            in_doubt = check_first and (in_doubt or answer.in_doubt)
            verdict = policy.verdict(answer)
            if verdict == "ok":
                self._gate.on_success()
                self._succeed(call, answer)
                return
            if answer.status == 429:
                c.throttled += 1
                self._gate.on_throttle(answer.retry_after)
            if verdict == "unauthorized" and s.keys and s.keys.refreshable and not refreshed:
                refreshed = True
                await transport.refresh_credentials()
                continue
            if verdict == "retry" and attempt < policy.max_attempts:
                if self._draining:
                    return  # left unfinished: resent with the same token on resume
                c.retries += 1
                await anyio.sleep(policy.delay(attempt, answer, self._rng))
                if self._draining:
                    return
                continue
            if answer.status == 400 and len(call.records) > 1:
                for single in split(s.target, call):  # one bad dataset must not sink the rest
                    await self._process(single, transport)
                return
            self._permanent(call, answer, attempt)
            return

    @contextlib.asynccontextmanager
    async def _run_lock(self, call: Call) -> AsyncIterator[None]:
        """MLflow appends a model to a run's history tag by read-modify-write: two log-model
        calls for one run at once fail or lose one. They go one at a time per run."""
        if not (self._reads_back and call.op == "log-model"):
            yield
            return
        lock, users = self._run_locks.get(call.run_id, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._run_locks[call.run_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._run_locks[call.run_id]
            if users == 1:
                del self._run_locks[call.run_id]
            else:
                self._run_locks[call.run_id] = (lock, users - 1)

    async def _attempt(self, call: Call, transport: Transport, in_doubt: bool) -> Answer:
        if in_doubt:
            run = await transport.get_run(call.run_id)
            if run is None:
                return Answer(NO_ANSWER, "ReadBackFailed", "could not read the run back")
            ours = model_identity(orjson.loads(call.records[0].model_json))
            if any(model_identity(m) == ours for m in logged_models(run)):
                return Answer(200, "AlreadyLogged")
        self.counters.requests += 1
        return await transport.send(call)

    def _mark_sent(self, call: Call) -> None:
        assert self._journal is not None and self._point is not None
        first = call.records[0].seq
        earlier = self._point.doubt.get(first)  # sent by an earlier run, never answered
        now = time.time()
        if earlier is not None and now - earlier > IN_DOUBT_TTL:
            sources = ", ".join(r.source for r in call.records)
            self._expired.append(sources)
            log.warning(
                "%s: first sent %s, more than 24 h ago, and never answered: its retry token "
                "has expired, so the server may apply it a second time",
                sources,
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(earlier)),
            )
        self._journal.sent(first, earlier if earlier is not None else now)

    def _succeed(self, call: Call, answer: Answer) -> None:
        assert self._journal is not None
        if not self._any_success:
            self._any_success = True
            held, self._held = self._held, []
            for h in held:
                self._record_failure(h.call, h.answer)
        seqs = [r.seq for r in call.records]
        self._journal.finish(seqs, answer.status, answer.request_id, answer.etag)
        self._journal.answered(seqs[0])
        self.counters.succeeded += len(call.records)

    def _permanent(self, call: Call, answer: Answer, attempts: int) -> None:
        if answer.status in (401, 404) and not self._any_success:
            self._held.append(_Held(call, answer))
            if len(self._held) >= self.settings.systemic_after:
                self._fail_job("stopped", self._systemic_message())
            return
        if answer.status == NO_ANSWER or answer.status == 429 or answer.status >= 500:
            answer = Answer(
                answer.status,
                answer.code or "NoAnswer",
                f"gave up after {attempts} attempts: {answer.message}"
                + (
                    " (may have been applied: re-sending within 24 h is safe, same retry token)"
                    if answer.in_doubt
                    else ""
                ),
                answer.request_id,
            )
        self._record_failure(call, answer)

    def _record_failure(self, call: Call, answer: Answer) -> None:
        assert self._journal is not None and self._dead is not None
        for record in call.records:
            self._dead.add(
                record.raw,
                {
                    "status": answer.status,
                    "code": answer.code,
                    "message": answer.message,
                    "source": record.source,
                    "opc_request_id": answer.request_id,
                },
            )
        self._journal.finish([r.seq for r in call.records], answer.status, answer.request_id)
        self._journal.answered(call.records[0].seq)
        self.counters.failed += len(call.records)
        for record in call.records:
            self._log_failure(
                "%s: %s %s: %s",
                record.source,
                answer.status or "no answer",
                answer.code,
                answer.message,
            )

    def _log_failure(self, fmt: str, *args: object) -> None:
        self._failures_logged += 1
        if self._failures_logged <= LOUD_FAILURES:
            log.warning(fmt, *args)
            if self._failures_logged == LOUD_FAILURES:
                log.warning("more failures are in the dead letter only (-v shows them all)")
        else:
            log.info(fmt, *args)

    def _systemic_message(self) -> str:
        statuses = {h.answer.status for h in self._held}
        first = self._held[0].answer if self._held else Answer(0)
        if statuses == {401}:
            why = (
                "every request was refused as unauthenticated (401): check the key, its "
                "fingerprint and user in the OCI config, and that the clock is right"
            )
        else:
            why = (
                "every request answered 404 before any succeeded: the platform id or the "
                "workspace key is likely wrong, or the identity lacks permission "
                "(OCI answers NotAuthorizedOrNotFound for all three)"
            )
        return (
            f"stopped after {len(self._held)} failed requests: {why}. Last answer: "
            f"{first.status} {first.code} {first.message} (opc-request-id {first.request_id}). "
            "Nothing was recorded as failed: fix it and run the same command again."
        )

    # ---- journal and progress --------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.flush_interval)
            await self._flush()

    async def _flush(self) -> None:
        assert self._journal is not None and self._dead is not None
        async with self._flush_lock:
            written, self._flushed = self._flushed, anyio.Event()
            dead_data = self._dead.pending_bytes()
            journal_data = self._journal.pending_bytes()
            try:
                await anyio.to_thread.run_sync(
                    _write_both, self._dead, dead_data, self._journal, journal_data
                )
            except BatchlogError as exc:
                self._fail_job("failed", str(exc))
                return  # waiters stay blocked: nothing is sent that was not journaled
            written.set()

    async def _progress_loop(self) -> None:
        if self._on_progress is None:
            return
        while True:
            self.counters.rate = self._gate.rate
            self._on_progress(self.counters)
            await anyio.sleep(0.25)


def _write_both(dead: DeadLetter, dead_data: bytes, journal: Journal, journal_data: bytes) -> None:
    dead.write(dead_data)  # first: a journaled failure is always in the dead letter
    journal.write(journal_data)


def _lines(path: str, index: int, offset: int, first: int) -> _AsyncLines:
    return _AsyncLines(read_lines(path, index, offset, first))


class _AsyncLines:
    """Reads manifest lines in batches on a worker thread (stdin may block)."""

    def __init__(self, lines: Iterator[Line]) -> None:
        self._lines = lines
        self._batch: list[Line] = []
        self._pos = 0

    def __aiter__(self) -> _AsyncLines:
        return self

    async def __anext__(self) -> Line:
        if self._pos >= len(self._batch):
            self._batch = await anyio.to_thread.run_sync(_take, self._lines)
            self._pos = 0
            if not self._batch:
                raise StopAsyncIteration
        line = self._batch[self._pos]
        self._pos += 1
        return line


def _take(lines: Iterator[Line]) -> list[Line]:
    return list(islice(lines, READ_BATCH))


def _sizes(manifests: list[str]) -> list[int | None]:
    out: list[int | None] = []
    for path in manifests:
        if path == STDIN or path.endswith(".gz"):
            out.append(None)
        else:
            out.append(os.path.getsize(path))
    return out


def _head(path: str) -> dict[str, object]:
    if path == STDIN:
        return {"path": path, "head_len": 0, "head": None}
    data = read_span(path, 0, HEAD_BYTES) or b""
    return {"path": path, "head_len": len(data), "head": hashlib.sha256(data).hexdigest()}


def _verify_manifests(checkpoint: str, manifests: list[str], point: ResumePoint) -> None:
    """Refuse to resume when the part of a manifest already processed has changed."""
    hint = "use --restart to start over"
    for before in point.manifests:
        path = str(before.get("path"))
        if path == STDIN or not before.get("head"):
            continue
        data = read_span(path, 0, int(before["head_len"])) or b""
        if (
            len(data) < int(before["head_len"])
            or hashlib.sha256(data).hexdigest() != before["head"]
        ):
            raise CheckpointError(
                f"manifest {path} changed since checkpoint {checkpoint} was written "
                f"(its beginning differs); {hint}"
            )
    if point.check is not None:
        path = manifests[point.at[0]]
        start, end, h = point.check
        span = read_span(path, start, end)
        if span is not None and line_hash(span.rstrip(b"\r\n")) != h:
            raise CheckpointError(
                f"manifest {path} changed since checkpoint {checkpoint} was written "
                f"(line {point.at[2] - 1} is not what was uploaded); {hint}"
            )


async def upload(
    manifests: list[str],
    settings: Settings,
    on_progress: Callable[[Counters], None] | None = None,
) -> Report:
    """Upload every record of ``manifests``; resume from the checkpoint when there is one.

    Raises ConfigurationError or CheckpointError before any request when the job cannot
    start; everything after that ends in the returned Report.
    """
    return await Job(list(manifests), settings, on_progress).run()
