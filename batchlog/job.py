"""One upload job: manifests in, calls out through the pool, outcomes to the journal.

    producer (read, check, validate, skip what is done, group)  --bounded stream-->  workers
    workers (rate gate, in-flight limit, read back if in doubt, sign + send, retry) --> outcomes
    outcomes  -->  journal + dead letter (group commit by the flush task), counters

A call that fails the same way as the calls before it (401, a redirect, 404 or nothing
listening before any success, or out of attempts) is held back rather than recorded as
failed: a run of them says the job, not the record, is wrong, and the job stops (exit 3)
with those calls not recorded as failed, so the same command sends them once the cause is
fixed (records that failed before the stop stay in the dead letter).

Nothing in here prints; the CLI renders the counters and the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import select
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.abc
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batchlog.deadletter import (
    CreateRunCopies,
    DeadLetter,
    create_runs_in,
    find_create_runs,
    run_named,
)
from batchlog.errors import BUG_ADVICE, BatchlogError, DeadLetterError, internal_error
from batchlog.journal import (
    REJECTED,
    Journal,
    ResumePoint,
    header_doc,
    line_hash,
    manifest_of,
    open_journal,
    record_key,
    record_of,
)
from batchlog.manifest import (
    STDIN,
    Boundary,
    ManifestChanged,
    ManifestReader,
    ManifestUnreadable,
    check_readable,
    display_name,
    read_lines,
)
from batchlog.migrate import (
    ALREADY_THERE,
    DEPENDENCY_FAILED,
    RunBook,
    create_run,
    other_copy,
    resolve,
)
from batchlog.operations import operation
from batchlog.plan import Call, Grouper, split
from batchlog.planorder import PlanOrder
from batchlog.records import Record, Rejection
from batchlog.replay import Replays, missing, reads_back, trimmed
from batchlog.report import Counters, Report, Status, counted
from batchlog.resolution import edited, resolved_by
from batchlog.retry import NO_ANSWER, NOT_THE_API, Answer
from batchlog.settings import Settings, resolve_paths
from batchlog.target import Target
from batchlog.validate import parse_line

if TYPE_CHECKING:  # aiohttp and asyncio load when a job starts: a dry run needs neither
    from batchlog.ratecontrol import RateGate
    from batchlog.transport import Transport

log = logging.getLogger("batchlog")


READ_BATCH = 512  # manifest lines read per hop to the reader thread
STREAM_IDLE = 0.5  # seconds a pipe may stay silent before the records it gave are sent
IN_DOUBT_TTL = 24 * 3600.0  # retry tokens expire after this
LOUD_FAILURES = 100  # failures logged as warnings; the rest at info level (-v)

Held = Literal["unauthorized", "redirect", "not-found", "cannot-connect", "gave-up", "unconfirmed"]
_RESENT_ON_SUCCESS = ("unauthorized", "redirect", "cannot-connect")  # tried again after one


MAX_NESTING = 1000  # parents followed at most (a loop in a hand-made plan ends there)
_UNLOCKED = contextlib.nullcontext()  # stateless: shared by every call that takes no lock


@dataclass
class _Tries:
    """What one call went through so far, in this run and (from the checkpoint) before."""

    attempts: int = 0
    first_sent: float | None = None  # unix time of the first attempt ever
    maybe_applied: bool = False  # an attempt may have landed (no answer, 5xx, earlier run)
    read_back: bool = False  # read the run back before sending again
    ready_at: float = 0.0  # unix time after which no earlier attempt can still land
    refreshed: bool = False  # credentials were refreshed once for this call


@dataclass
class _HeldCall:
    call: Call
    answer: Answer
    kind: Held
    tries: _Tries


class Job:
    def __init__(
        self,
        manifests: list[str],
        settings: Settings,
        on_progress: Callable[[Counters], None] | None = None,
    ) -> None:
        import asyncio

        from batchlog.ratecontrol import make_gate

        check_readable(manifests)
        self.manifests = manifests
        self.settings = settings
        self.checkpoint_path, self.dead_letter_path = resolve_paths(settings, manifests)
        self._sizes = _sizes(manifests)  # bytes of each manifest, None if unknown (stdin)
        known = [size for size in self._sizes if size is not None]
        self.counters = Counters(bytes_total=sum(known) if len(known) == len(self._sizes) else None)
        self._on_progress = on_progress
        self._rng = random.Random()
        self._gate: RateGate = make_gate(settings.rate, settings.adaptive)
        self._reads_back = not settings.target.retry_tokens  # what may be applied: read back
        self._run_locks: dict[str, tuple[anyio.Lock, int]] = {}  # run -> (lock, users)
        self._inflight = asyncio.Semaphore(settings.concurrency)  # aiohttp runs on asyncio only
        self._draining = False  # a stop was requested: take no new work
        self._stop_status: Status | None = None
        self._stop_message = ""
        self._any_success = False
        self._held: list[_HeldCall] = []  # failures that may be the job's, not the record's
        self._streak = 0  # calls held since the last success
        self._failures_logged = 0
        self._journal: Journal | None = None
        self._dead: DeadLetter | None = None
        self._copies = CreateRunCopies(set())  # a plan's create-run lines, for the dead letter
        self._readers: list[ManifestReader] = []
        self._open_ended: set[int] = set()  # first keys of each manifest's last call
        self._transport: Transport | None = None
        self._tg: anyio.abc.TaskGroup | None = None  # producer and workers
        self._outer: anyio.abc.TaskGroup | None = None  # flush, progress, timers
        self._producer_scope: anyio.CancelScope | None = None
        self._idle_scopes: set[anyio.CancelScope] = set()  # waits holding no request
        self._flush_lock = anyio.Lock()
        self._write_failed = False  # a flush failed: the checkpoint takes no more writes
        self._flushed = anyio.Event()  # set when what was journaled before it is on disk
        self._point: ResumePoint | None = None  # where the checkpoint says the job stands
        self._book = RunBook({})  # a plan's runs: source -> target, and their calls' order
        self._order = PlanOrder()  # a plan's order rules, fed by the producer
        self._replays = Replays()  # calls that repeat an earlier line: read back first
        # a plan's calls left unsent, and the run each needs ("" for an update-run behind a
        # held call of its run): their run's creation, or an earlier call, was held back
        self._unresolved: list[tuple[Call, str]] = []
        self._systemic_stop = False  # stopped by a run of held calls: told again at the end

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
        for scope in list(self._idle_scopes):  # nothing in flight there: no grace to give
            scope.cancel()
        outer = self._outer
        if outer is not None:
            try:
                outer.start_soon(
                    self._cancel_after, self.settings.grace if grace is None else grace
                )
            except RuntimeError:  # the job is finishing: nothing left to give a grace to
                pass

    async def _cancel_after(self, seconds: float) -> None:
        await anyio.sleep(seconds)
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    def _fail_job(self, status: Status, message: str) -> None:
        """Stop the job: take no new work; what is in flight gets its answer within the
        grace period (found by test: cancelled, it stayed in doubt, and the corrected
        rerun after a wrong --workspace was refused as another target's checkpoint)."""
        if self._stop_status in (None, "interrupted"):
            self._stop_status = status
            self._stop_message = message
        if not self._draining:
            self.request_stop()

    # ---- run -----------------------------------------------------------------------------

    def open(self) -> None:
        """Open the checkpoint and dead letter and check what earlier runs read.

        Raises CheckpointError (a changed manifest or stream included) before any request.
        """
        if self._point is None:
            self._point = self._open_files()
            self._book = RunBook(self._point.runs, self._point.found)
            self._order = PlanOrder(self._point.runs)

    async def run(self) -> Report:
        from batchlog.transport import Transport

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
                self._transport = transport
                send, receive = anyio.create_memory_object_stream[Call](s.concurrency)
                async with anyio.create_task_group() as outer:
                    self._outer = outer
                    outer.start_soon(self._flush_loop)
                    outer.start_soon(self._progress_loop)
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        tg.start_soon(self._produce, send)
                        workers = min(1024, s.concurrency * 2)  # sleeping retries hold no slot
                        async with receive:
                            for _ in range(workers):
                                tg.start_soon(self._work, receive.clone())
                    self._settle_held()
                    outer.cancel_scope.cancel()
                self._tg = self._outer = None  # a stop request from now on has nothing to stop
        except Exception as exc:  # a bug: end like a stopped job, the checkpoint flushed
            log.info("%s", internal_error(exc), exc_info=exc)
            self._stop_status = "failed"
            self._stop_message = f"{internal_error(exc)}: {BUG_ADVICE}"
        finally:
            self._tg = self._outer = None
            for reader in self._readers:
                reader.close()
            with anyio.CancelScope(shield=True):
                await self._flush()
                self._journal.close()
                self._dead.close()
        counts = self._journal.counts
        report = Report.build(
            self.counters,
            self._stop_status or "completed",
            self._stop_message,
            self.checkpoint_path,
            self.dead_letter_path,
        )
        return dataclasses.replace(
            report,
            failed_total=counts.failed,
            rejected_total=counts.rejected,
            held_back=sum(len(h.call.records) for h in self._held),  # part of pending
            resolved_by=self._resolved_by(counts.unsuccessful),
        )

    def _resolved_by(self, unsuccessful: int) -> str:
        """The checkpoint showing the failures of earlier runs fixed and uploaded from the
        dead letter, its lines but those this run added (resolution.resolved_by); "": not."""
        assert self._dead is not None
        if unsuccessful <= self._dead.count:  # none from earlier runs
            return ""
        shown = resolved_by(self.dead_letter_path, self.settings.target.identity, self._dead.lines)
        return shown[0] if shown else ""

    def _open_files(self) -> ResumePoint:
        s = self.settings
        grouping = {"max_datasets": s.grouping.max_datasets, "max_body": s.grouping.max_body}
        header = header_doc(
            s.target.identity, list(self.manifests), grouping, self.dead_letter_path
        )
        journal, point = open_journal(self.checkpoint_path, header, s.restart)
        try:
            readers = [
                ManifestReader(path, index, point.marks[index])
                for index, path in enumerate(self.manifests)
            ]
            for reader in readers:  # every processed part is checked before any request
                try:
                    reader.check_prefix()
                    check_done_lines(reader.path, reader.index, reader.start, point.done)
                except ManifestChanged as exc:
                    raise ManifestChanged(
                        f"{exc}, according to checkpoint {self.checkpoint_path}: nothing was "
                        "sent; use --restart to start this job over, or give another "
                        "--checkpoint for a new job"
                    ) from None
            self._readers = readers
            self._dead = DeadLetter(self.dead_letter_path, set_aside=point.created)
            if not point.created:
                self._own_dead_letter(self._dead, point)
                self._copies = CreateRunCopies(create_runs_in(self.dead_letter_path))
        except BaseException:
            journal.close()
            for reader in self._readers:
                reader.close()
            raise
        self._journal = journal
        return point

    def _own_dead_letter(self, dead: DeadLetter, point: ResumePoint) -> None:
        """Lines beyond what the journal accounts for were written just before a crash or
        a full disk: cut off, their records are processed and written again. But only in
        the file this job wrote (found by review: a resume cut another job's dead letter
        that had replaced it at the same path)."""
        current, recorded = dead.identity(), point.dead_letter_id
        if current is not None and recorded is not None and list(current) != recorded:
            raise DeadLetterError(
                f"dead letter {dead.path} is not the file this job wrote (replaced, or "
                "written by another job with the same --dead-letter): move it away or give "
                "this job its own --dead-letter; nothing was sent"
            )
        if current is not None and recorded is None and dead.size > (point.dead_letter_size or 0):
            dead.set_aside()  # not known to be this job's: kept, never cut
        elif not edited(dead.path, point.dead_letter_size or 0):
            dead.cut_to(point.dead_letter_size or 0)

    # ---- producer ------------------------------------------------------------------------

    async def _produce(self, send: MemoryObjectSendStream[Call]) -> None:
        assert self._point is not None
        sent = {key: doubt.records for key, doubt in self._point.doubt.items()}
        grouper = Grouper(self.settings.target, self.settings.grouping, sent)
        try:
            with anyio.CancelScope() as scope:
                self._producer_scope = scope
                if self._draining:
                    scope.cancel()
                async with send:
                    for reader in self._readers:
                        cut: ManifestUnreadable | None = None
                        try:
                            await self._produce_manifest(reader, grouper, send)
                        except ManifestUnreadable as exc:  # the lines before it still go
                            cut = exc
                        # a call never spans two manifests
                        await self._send_open_ended(grouper, send)
                        reader.close()
                        if cut is not None:
                            self._stop_reading(cut, reader.records_read)
                            break
        except BatchlogError as exc:
            self._fail_job("failed", str(exc))

    async def _send_open_ended(self, grouper: Grouper, send: MemoryObjectSendStream[Call]) -> None:
        """Send the call the grouper holds open. It could take in lines read later (appended,
        or still on their way through a pipe): journaled as sent before it goes out, so that
        a resume forms it again as it was (same records, same retry token)."""
        for call in grouper.flush():
            self._open_ended.add(call.records[0].seq)
            await self._send_unfinished(send, call)

    def _stop_reading(self, exc: ManifestUnreadable, records: int) -> None:
        """A manifest cannot be read on (a truncated gzip file): what was read before goes
        out, then the job stops (exit 3) to be resumed once the file is whole."""
        if self._stop_status is None:
            self._stop_status = "stopped"
            before = f"; its {records:,} records before that were processed" if records else ""
            self._stop_message = f"{exc}{before}"

    async def _await_input(
        self, reader: ManifestReader, grouper: Grouper, send: MemoryObjectSendStream[Call]
    ) -> None:
        """A pipe has nothing more for now: wait for it (a stop cancels the wait, no thread
        is stuck in a read). Records it gave go out once it stays silent for a moment."""
        with anyio.move_on_after(STREAM_IDLE):
            await _readable(reader.fileno())
            return
        await self._send_open_ended(grouper, send)
        await _readable(reader.fileno())

    async def _produce_manifest(
        self, reader: ManifestReader, grouper: Grouper, send: MemoryObjectSendStream[Call]
    ) -> None:
        assert self._journal is not None and self._point is not None
        journal, c, done = self._journal, self.counters, self._point.done
        index, name = reader.index, display_name(reader.path)
        before = sum(size or 0 for size in self._sizes[:index])
        while True:
            lines, boundary = await anyio.to_thread.run_sync(reader.batch, READ_BATCH)
            if not lines and boundary is None and not reader.blocked:
                break
            for line in lines:
                c.bytes_read = before + reader.file_offset(line.end)
                key = record_key(index, line.record)
                h = line_hash(line.raw)
                source = f"{name}:{line.number}"
                item: Record | Rejection = (
                    Rejection(key, source, line.raw, "(line)", line.problem)
                    if line.problem  # over-long: never read whole
                    else parse_line(line.raw, key, source)
                )
                known = done.get(key)
                if isinstance(item, Record) and item.source_run:
                    item = self._check_plan_line(item, known is not None)
                if known is not None:  # finished by an earlier run
                    if known != h:
                        raise ManifestChanged(self._changed(name, line.number))
                    journal.skip(key)
                else:
                    journal.read(key, h)
                    c.records += 1
                    await self._seek_create_run(item)
                    if isinstance(item, Rejection):
                        self._reject(item)
                        continue
                if isinstance(item, Rejection):
                    continue
                # finished records still go through the grouper, so that the calls (and
                # their retry tokens) are those of the first run
                for call in grouper.add(item):
                    await self._send_unfinished(send, call)
            if boundary is not None:
                journal.boundary(index, boundary)
            if reader.blocked:
                await self._await_input(reader, grouper, send)
        if reader.partial:
            log.warning(
                "%s:%d has no newline and is not a whole JSON document (still being written?): "
                "left for the next run",
                name,
                reader.partial,
            )
        gone = sorted(
            record_of(k)
            for k in done
            if manifest_of(k) == index and record_of(k) >= reader.records_read
        )
        if gone:
            raise ManifestChanged(
                f"{name} ends after {reader.records_read:,} records, but an earlier run "
                f"uploaded its record {gone[-1] + 1:,}: it was cut short since; "
                f"use --restart to start over"
            )

    async def _send_unfinished(self, send: MemoryObjectSendStream[Call], call: Call) -> None:
        assert self._point is not None
        self._replays.note(call)  # finished or not: a later repeat of it is read back
        for unfinished in calls_to_send(self.settings.target, call, self._point):
            if unfinished.records[0].source_run:  # its place among its run's calls
                ticket = self._book.ticket(unfinished.records[0].run_id)
                unfinished = dataclasses.replace(unfinished, ticket=ticket)
            await send.send(unfinished)

    def _check_plan_line(self, record: Record, done: bool) -> Record | Rejection:
        """A plan's line in its place (planorder: the rules validate and the dry run apply
        too; a line an earlier run finished is taken as it was). Reads create-run lines
        into the book."""
        checked = self._order.check(record, done)
        if isinstance(checked, Record) and record.op == "create-run":
            self._book.declare(record.run_id, done)
            self._copies.declared(record)
            if record.seq in self._order.repeats or record.seq in self._order.again:
                self._book.given_again(record.run_id)  # before its next lines are formed
        return checked

    async def _seek_create_run(self, item: Record | Rejection) -> None:
        """A line of a run whose create-run an earlier run of the job did, behind the
        watermark (never read again): that create-run line is looked for in the manifest,
        for the dead letter to copy if this line goes there (found by test: a line appended
        for such a run, refused, could not be uploaded from the dead letter)."""
        assert self._point is not None
        if isinstance(item, Record):
            run = item.run_id if item.source_run and item.op != "create-run" else None
        else:
            run = run_named(item.raw)
        if run is None or run not in self._point.runs or not self._copies.wants(run):
            return
        found = await anyio.to_thread.run_sync(
            find_create_runs, self.manifests, self._point.marks, run
        )
        self._copies.sought(run, found)

    def _changed(self, name: str, line: int) -> str:
        return (
            f"{name}:{line} changed since checkpoint {self.checkpoint_path} recorded it as "
            "done; use --restart to start over"
        )

    def _reject(self, item: Rejection) -> None:
        """Record an invalid line. One naming a plan's run whose create-run has not ended
        yet waits for it: the dead letter then holds a copy of that create-run before it
        if it was created, nothing more if it failed (its own line is there)."""
        run = run_named(item.raw)
        if run is not None and self._copies.knows(run):
            if self._book.target_of(run) is None and self._book.failure_of(run) is None:
                assert self._tg is not None
                self._tg.start_soon(self._reject_when_created, item, run)
                return
            self._copy_create_run(run)
        self._rejected(item)

    async def _reject_when_created(self, item: Rejection, run: str) -> None:
        with self._idle():
            await self._book.wait_created(run)
        if self._draining:
            return  # left unfinished: read and rejected again by the next run
        self._copy_create_run(run)  # none if its creation was held back: not known to be there
        self._rejected(item)

    def _rejected(self, item: Rejection) -> None:
        assert self._journal is not None and self._dead is not None
        self.counters.rejected += 1
        error: dict[str, object] = {
            "status": "rejected",
            "code": "InvalidRecord",
            "field": item.field,
            "message": item.reason,
            "source": item.source,
        }
        self._dead.add(item.raw, error)
        self._journal.finish((item.seq,), REJECTED)
        self._log_failure(error, "%s", item)

    def _copy_create_run(self, run: str) -> None:
        """Before a line of ``run`` goes to the dead letter: a copy of its create-run line,
        if the run is on the target and the dead letter has no create-run line of it yet,
        after its parents' (found by review: a nested run's dead letter was refused, "no
        create-run for the parent run earlier in the plan")."""
        assert self._dead is not None
        chain: list[str] = []
        each: str | None = run
        while each is not None and each not in chain and len(chain) < MAX_NESTING:
            chain.append(each)
            each = self._copies.parent_of(each)
        for each in reversed(chain):  # the eldest first
            target = self._book.target_of(each)
            copy = self._copies.copy_for(each, target) if target is not None else None
            if copy is not None:
                self._dead.add(*copy, record=False)

    # ---- workers -------------------------------------------------------------------------

    async def _work(self, receive: MemoryObjectReceiveStream[Call]) -> None:
        async with receive:
            while True:
                try:  # a call already waiting is taken without a checkpoint (a loop pass)
                    call = receive.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        call = await receive.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                if self._draining:
                    return
                tries = self._tries(call)
                if tries.read_back and tries.ready_at > time.time():
                    # an earlier attempt may still land: read back once it no longer can,
                    # and let other work go on meanwhile
                    assert self._tg is not None
                    self._tg.start_soon(self._process_when_ready, call, tries)
                else:
                    await self._handle(call, tries)

    def _tries(self, call: Call) -> _Tries:
        assert self._point is not None
        earlier = self._point.doubt.get(call.records[0].seq)  # sent, never answered for sure
        if earlier is None:
            return _Tries()
        expired = time.time() - earlier.first_sent > IN_DOUBT_TTL  # the token is forgotten
        return _Tries(
            first_sent=earlier.first_sent,
            maybe_applied=True,
            read_back=self._not_idempotent(call) or expired,
            ready_at=earlier.until,
        )

    def _not_idempotent(self, call: Call) -> bool:
        # without retry tokens, what a replay would apply twice is confirmed first
        return self._reads_back and not operation(call.op).replay_safe

    async def _process_when_ready(self, call: Call, tries: _Tries) -> None:
        with self._idle():
            await anyio.sleep(max(0.0, tries.ready_at - time.time()))
        if not self._draining:
            await self._handle(call, tries)
        elif call.ticket >= 0:
            self._book.ended(call.records[0].run_id, call.ticket, call.op)

    async def _handle(self, call: Call, tries: _Tries) -> None:
        """Process a call; a plan's call once its run is known on the target (its
        create-run has ended), or for an update-run once every call before it has ended.
        A call that may repeat another (batchlog.replay) goes after it, and reads back."""
        if call.ticket < 0:
            await self._process_in_turn(call, tries)
            return
        source = call.records[0].run_id
        try:
            if call.op == "create-run" and call.records[0].seq in self._order.repeats:
                await self._repeat(call)
                return
            resolved = await self._resolve(call)
            if resolved is not None and self._replays.repeats(resolved):
                resolved = await self._after_earlier_calls(resolved)
            if resolved is not None:
                if resolved.op in ("log-model", "log-inputs") and self._book.was_found(source):
                    tries.read_back = tries.maybe_applied = True  # an earlier upload's run
                await self._process(resolved, tries)
        finally:
            self._book.ended(source, call.ticket, call.op)

    async def _repeat(self, call: Call) -> None:
        """A create-run that repeats its run's first (planorder): it sends nothing, and
        ends as the first did (found by review: `cat plan plan` exited 1 on each repeat)."""
        source = call.records[0].run_id
        with self._idle():
            run = await self._book.wait_created(source)
        if run.target is not None:  # the run as it was, journaled as found: a resume reads back
            self._succeed(call, Answer(200, ALREADY_THERE, run_id=run.target, sent=False))
        elif run.failure is not None:
            self._not_created(call, source, run.failure)
        elif not self._draining:
            self._unresolved.append((call, source))  # the first was held back

    async def _process_in_turn(self, call: Call, tries: _Tries) -> None:
        """A hand-written call, one at a time among the calls of its identity (the same
        line given twice): the second reads back what the first did."""
        if not reads_back(call):
            await self._process(call, tries)
            return
        entered = False
        with self._idle():
            await self._replays.enter(call)
            entered = True
        if not entered:
            return  # stopping: left unfinished
        try:
            await self._process(call, tries)
        finally:
            self._replays.leave(call)

    async def _after_earlier_calls(self, call: Call) -> Call | None:
        """A plan's call that repeats an earlier one (or its run met again after its
        update-run) goes once every earlier call of its run has ended, so that its read
        back sees what they did; None if one of them was held back (sent again later) or
        the job is stopping: left unsent, as an update-run is then."""
        source = call.records[0].run_id
        with self._idle():
            await self._book.wait_before(source, call.ticket)
        if self._draining:
            return None
        if self._book.held_before(source, call.ticket):
            self._unresolved.append((call, ""))
            return None
        return call

    async def _resolve(self, call: Call) -> Call | None:
        """The call as it goes out (its target run in it); None when it cannot go: its run
        (or, for a create-run, its parent) failed to be created (the call is recorded as
        failed) or was left unfinished (so is the call), or the job is stopping."""
        book, source = self._book, call.records[0].run_id
        needs = source
        if call.op == "create-run":
            parent = (call.records[0].fields or {}).get("parent_source_run_id")
            if not parent:
                return call
            needs = str(parent)
        elif call.op == "update-run":  # the run's status last
            with self._idle():
                await book.wait_before(source, call.ticket)
            if book.held_before(source, call.ticket):  # it may still go (found by test)
                if not self._draining:
                    self._unresolved.append((call, ""))
                return None
        with self._idle():
            run = await book.wait_created(needs)
        if self._draining:
            return None
        if run.target is not None:
            if call.op == "update-run" and not await self._alone(call, source, run.target):
                return None
            return (
                call if call.op == "create-run" else resolve(self.settings.target, call, run.target)
            )
        if run.failure is not None:
            self._not_created(call, needs, run.failure)
            return None
        self._unresolved.append((call, needs))  # its run's creation was held back
        return None

    async def _alone(self, call: Call, source: str, run_id: str) -> bool:
        """Before a plan's update-run on a target without retry tokens: whether its run is
        the only copy of its source run (another upload of the same plan at the same time
        may have made one too late to converge); if not, the update-run is recorded
        failed, naming both."""
        if self.settings.target.retry_tokens:
            return True
        assert self._transport is not None

        async def pace() -> None:
            with self._idle():
                await self._gate.acquire()

        async with self._inflight:
            clash = await other_copy(
                _Counted(self._transport, self.counters), self._book, source, run_id, pace
            )
        if clash is None:
            return True
        self._record_failure(call, clash)
        return False

    def _not_created(self, call: Call, needs: str, failure: str) -> None:
        whose = "its parent run" if needs != call.records[0].run_id else "its run"
        self._record_failure(
            call,
            Answer(
                DEPENDENCY_FAILED,
                "RunNotCreated",
                f"{whose} ({needs}) was not created on the target: {failure}",
            ),
        )

    @contextlib.contextmanager
    def _idle(self) -> Iterator[None]:
        """A wait that holds no request (a back-off, the rate gate): a stop request ends it
        at once, and the call is left unfinished, to be resumed as it is (same retry token;
        on MLflow a log-model journaled as sent is read back first), as a cancel leaves it."""
        with anyio.CancelScope() as scope:
            if self._draining:
                scope.cancel()
            self._idle_scopes.add(scope)
            try:
                yield
            finally:
                self._idle_scopes.discard(scope)

    async def _process(self, call: Call, tries: _Tries) -> None:
        s, c, policy = self.settings, self.counters, self.settings.retry
        transport = self._transport
        assert self._journal is not None and transport is not None
        while True:
            tries.attempts += 1
            with self._idle():
                await self._gate.acquire()
            if self._draining:
                return  # not sent: left unfinished
            c.rate = self._gate.rate
            checked = await self._read_back(call, tries, transport)
            answer = checked if isinstance(checked, Answer) else None
            outgoing = checked if isinstance(checked, Call) else call
            if answer is None:  # not applied yet: send it (a log-batch: what is missing)
                plan_run = call.op == "create-run" and call.records[0].source_run
                # only a call that is not idempotent takes its run's lock (no per-call
                # context manager for the others)
                run_lock = self._run_lock(call) if self._not_idempotent(call) else _UNLOCKED
                async with run_lock, self._inflight:
                    # journaled once it holds its slot (found by review: journaled before,
                    # calls still waiting for one were "sent and never answered" after a
                    # stop, and their in-doubt window ended before they went out)
                    if not plan_run:  # a create-run's, as its runs/create goes out
                        await self._journal_sent(call, tries)
                    c.in_flight += 1
                    if not plan_run:  # a create-run's are counted one by one (_Counted)
                        c.requests += 1
                    try:
                        if plan_run:
                            answer = await self._create_run(call, transport, tries)
                        else:
                            answer = await transport.send(outgoing)
                    finally:
                        c.in_flight -= 1
            if answer.in_doubt:
                tries.maybe_applied = True
                if self._not_idempotent(call):
                    tries.read_back = True
            elif not tries.maybe_applied and not 200 <= answer.status < 300:
                self._journal.settled(call.records[0].seq)  # a 429, a 401: not applied
            verdict = policy.verdict(answer)
            if verdict == "ok":
                self._gate.on_success()
                self._succeed(call, answer)
                return
            if answer.status == 429:
                c.throttled += 1
                self._gate.on_throttle(answer.retry_after)
            if verdict == "unauthorized" and s.keys and s.keys.refreshable and not tries.refreshed:
                tries.refreshed = True  # a principal's token, or a session token file renewed
                await transport.refresh_credentials()
                tries.attempts -= 1
                continue
            kind = self._systemic(answer)
            if kind is not None:
                self._hold(_HeldCall(call, answer, kind, tries))
                return
            if verdict == "retry" and tries.attempts < policy.max_attempts:
                if self._draining:
                    return  # left unfinished: resent with the same token on resume
                c.retries += 1
                delay = policy.delay(tries.attempts, answer, self._rng)
                c.waiting_on_retry_after(delay if answer.retry_after is not None else None)
                if tries.read_back:
                    delay = max(delay, tries.ready_at - time.time())
                with self._idle():
                    await anyio.sleep(delay)
                if self._draining:
                    return
                continue
            if verdict == "retry" and tries.read_back:  # out of attempts, maybe applied
                with self._idle():  # until the last attempt can no longer land
                    await anyio.sleep(max(0.0, tries.ready_at - time.time()))
                if self._draining:
                    return  # left in doubt: read back on resume
                answer = await self._confirm(call, tries, transport, answer)
                if answer.status == 200:
                    self._succeed(call, answer)
                    return
            if verdict == "retry":  # out of attempts
                kind = "unconfirmed" if tries.read_back else "gave-up"
                self._hold(_HeldCall(call, answer, kind, tries))
                return
            if answer.status == 400 and len(call.records) > 1:
                for single in self._split(call):  # one bad dataset must not sink the rest
                    await self._process(single, self._fresh_tries(single))
                return
            self._record_failure(call, self._final(answer, tries))
            return

    def _split(self, call: Call) -> list[Call]:
        """One call per record of a merged call refused whole. A plan's go to the target run
        the merged call went to (found by test: they went out as templates, naming the
        source run, and were refused), and keep its place among its run's calls."""
        singles = split(self.settings.target, call)
        if call.ticket < 0:
            return singles
        return [
            resolve(self.settings.target, dataclasses.replace(c, ticket=call.ticket), call.run_id)
            for c in singles
        ]

    def _fresh_tries(self, call: Call) -> _Tries:
        """A call's first attempt: read back first if it is a log-model or log-inputs of a
        run an earlier upload made (it may have logged them already)."""
        found = call.ticket >= 0 and self._book.was_found(call.records[0].run_id)
        if found and operation(call.op).confirm in ("models", "datasets"):
            return _Tries(read_back=True, maybe_applied=True)
        return _Tries()

    async def _create_run(self, call: Call, transport: Transport, tries: _Tries) -> Answer:
        parent = (call.records[0].fields or {}).get("parent_source_run_id")
        parent_id = self._book.target_of(str(parent)) if parent else None

        counted = _Counted(transport, self.counters)

        async def pace() -> None:
            # each request of it passes the rate gate, the first on the attempt's own pass
            if counted.sent:
                await self._gate.acquire()

        async def sending() -> None:
            # in doubt from when runs/create goes out, not from the attempt's start: the
            # lookup and experiment before it may take most of the timeout, and a resume
            # must wait until this runs/create can no longer land (found by test)
            await self._journal_sent(call, tries)

        return await create_run(
            counted, self._book, self.settings.target, call, parent_id, pace, sending
        )

    async def _read_back(
        self, call: Call, tries: _Tries, transport: Transport
    ) -> Answer | Call | None:
        """When the call may already be applied and nothing protects a resend, read its run
        back (once no earlier attempt can land): an answer if it is there or cannot be read,
        None to go on and send it, or for a log-batch partly there the call with only what
        its run lacks (its points, params, tags)."""
        if self._may_be_there(call, tries):
            tries.read_back = True
        if not tries.read_back:
            return None
        if call.op == "create-run":  # looked up by its source tag before it is created
            self.counters.read_backs += 1
            tries.read_back = tries.maybe_applied = False
            return None
        if tries.ready_at > time.time():  # an earlier attempt may still land: wait it out
            with self._idle():
                await anyio.sleep(tries.ready_at - time.time())
            if self._draining:
                return Answer(NO_ANSWER, "Stopping", "not read back: stopping", sent=False)
        self.counters.read_backs += 1
        async with self._inflight:
            if operation(call.op).confirm == "missing":
                left = await missing(transport, call)
                applied = None if left is None else not left
            else:
                left, applied = None, await transport.is_applied(call)
        if applied is None:
            return Answer(NO_ANSWER, "ReadBackFailed", "could not read the run back", sent=False)
        if applied:
            return Answer(200, "AlreadyApplied")
        tries.read_back = False  # not there, and no earlier attempt can land any more
        tries.maybe_applied = False
        if left is not None and _smaller(call, left):
            return trimmed(call, left)
        return None

    def _may_be_there(self, call: Call, tries: _Tries) -> bool:
        """Read back first, besides what is in doubt where a resend is not free: a call that
        repeats an earlier line of the job (on every target: its effect may be there from
        that line), and a log-batch where an MLflow file store would keep its points twice:
        in doubt on a target without retry tokens, or of a run an earlier upload made."""
        if self._replays.repeats(call):
            return True
        if operation(call.op).confirm != "missing":
            return False
        if tries.maybe_applied and self._reads_back:
            return True
        found = call.ticket >= 0 and self._book.was_found(call.records[0].run_id)
        return found and tries.attempts == 1

    async def _confirm(
        self, call: Call, tries: _Tries, transport: Transport, last: Answer
    ) -> Answer:
        """Out of attempts and maybe applied, and the last attempt can no longer land: read
        back. Applied: a success; not there (or a log-batch not all there): the last answer,
        as a plain failure."""
        answer = await self._read_back(call, tries, transport)
        if not isinstance(answer, Answer):  # confirmed not (all) applied: flags now False
            return last
        return answer

    async def _journal_sent(self, call: Call, tries: _Tries) -> None:
        """Journal the call as in doubt before it goes out (24 h token horizon, read-back)."""
        assert self._journal is not None
        now = time.time()
        if tries.first_sent is None:
            tries.first_sent = now
        tries.ready_at = now + self.settings.timeout  # when this attempt can no longer land
        key = call.records[0].seq  # in doubt again if an answer had settled it (a 429)
        if tries.attempts == 1 or self._not_idempotent(call) or not self._journal.in_doubt(key):
            self._journal.sent(
                call.records[0].seq, tries.first_sent, tries.ready_at, len(call.records), call.token
            )
            if (
                self._not_idempotent(call)
                or call.records[0].seq in self._open_ended
                or (self._reads_back and operation(call.op).confirm == "missing")
            ):
                # on disk before it goes out: a crash at any moment leaves a resume that
                # reads the run back first, or forms the call again exactly (a log-batch
                # too where no retry token protects it: an MLflow file store keeps a
                # replayed point twice; found under load, a kill in the 0.2 s before the
                # next flush left no trace of it, and the resume sent it again)
                await self._flushed.wait()

    @contextlib.asynccontextmanager
    async def _run_lock(self, call: Call) -> AsyncIterator[None]:
        """MLflow appends a model to a run's history tag by read-modify-write: two log-model
        calls for one run at once fail or lose one. They go one at a time per run."""
        if not self._not_idempotent(call):
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

    # ---- outcomes --------------------------------------------------------------------------

    def _systemic(self, answer: Answer) -> Held | None:
        """The kind of answer that, repeated, says the job rather than the record is wrong."""
        status = answer.status
        if 300 <= status < 400 or answer.code == NOT_THE_API:
            return "redirect"  # not talking to the API (a login page, a proxy)
        if status in (401, 403):
            return "unauthorized"
        if self._any_success:
            return None
        if status in (404, 405) and not self.settings.target.is_record_404(answer):
            return "not-found"
        if status == NO_ANSWER and not answer.sent and answer.code == "CannotConnect":
            return "cannot-connect"
        return None

    def _hold(self, held: _HeldCall) -> None:
        assert self._journal is not None
        if not held.tries.maybe_applied:
            self._journal.settled(held.call.records[0].seq)  # no need to read it back
        self._held.append(held)
        if held.call.ticket >= 0 and held.kind != "gave-up":  # may be sent again later
            self._book.hold(held.call.records[0].run_id, held.call.ticket)
        self._streak += 1
        if self._streak >= self.settings.systemic_after:
            self._systemic_stop = True
            self._fail_job("stopped", self._systemic_message())

    def _succeed(self, call: Call, answer: Answer) -> None:
        assert self._journal is not None
        self._any_success = True
        # after a stop, what it held stays held for the next run, and its streak as told
        # (found by CI under load: a call in flight at a systemic stop succeeded after it,
        # and recorded the 8 calls the stop held as failed)
        held: list[_HeldCall] = []
        if self._stop_status is None:
            self._streak = 0
            held, self._held = self._held, []
        for h in held:  # not the job's fault after all
            if h.kind in _RESENT_ON_SUCCESS and h.tries.attempts < self.settings.retry.max_attempts:
                assert self._tg is not None
                self._tg.start_soon(self._process, h.call, h.tries)
            elif h.kind == "unconfirmed":
                self._held.append(h)  # never dead-lettered while it may have been applied
            else:
                self._record_failure(h.call, self._final(h.answer, h.tries))
        seqs = [r.seq for r in call.records]
        if call.ticket >= 0:
            self._book.settle(call.records[0].run_id, call.ticket)
        run: tuple[str, str, bool] | None = None
        if call.op == "create-run" and call.records[0].source_run and answer.run_id:
            run = (call.records[0].run_id, answer.run_id, answer.code == ALREADY_THERE)
            self._book.created(*run)
        self._journal.finish(seqs, answer.status, answer.request_id, answer.etag, run=run)
        self.counters.succeeded += len(call.records)

    def _settle_held(self) -> None:
        """At the end of the work: held calls that are the records' own failures are recorded,
        then the calls that waited on a create-run recorded failed so (found by test: they
        were left unsent and unaccounted for, and the job "completed"); any other held call,
        or a call still waiting, stops the job (exit 3) with nothing recorded, to be resumed."""
        if self._stop_status is not None:
            if self._systemic_stop and self._stop_status == "stopped":
                # told again at the end: calls in flight at the stop were held since (found
                # by test: "the 11 records held back" in the message, 27 in the report)
                self._stop_message = self._systemic_message()
            return
        if self._held and all(h.kind == "gave-up" for h in self._held):
            held, self._held = self._held, []
            for h in held:
                self._record_failure(h.call, self._final(h.answer, h.tries))
        left: list[tuple[Call, str]] = []
        for call, needs in sorted(self._unresolved, key=lambda u: u[0].records[0].seq):
            failure = self._book.failure_of(needs) if needs else None
            if failure is not None:  # parents first: a child's create-run fails before its calls
                self._not_created(call, needs, failure)
            else:
                left.append((call, needs))
        self._unresolved = left
        if self._held:
            self._stop_status = "stopped"
            self._stop_message = self._systemic_message()
        elif left:
            n = sum(len(call.records) for call, _ in left)
            self._stop_status = "stopped"
            self._stop_message = (
                f"stopped: {counted(n, 'record')} of runs whose creation, or an earlier call, "
                "was held back were not sent; run the same command again: it sends them"
            )

    def _final(self, answer: Answer, tries: _Tries) -> Answer:
        """The answer as the dead letter tells it: how many attempts, and whether it may
        have been applied."""
        if answer.status == NO_ANSWER or answer.status == 429 or answer.status >= 500:
            note = f" ({self.settings.target.in_doubt_note()})" if tries.maybe_applied else ""
            return dataclasses.replace(
                answer,
                code=answer.code or "NoAnswer",
                message=(
                    f"gave up after {counted(tries.attempts, 'attempt')}: {answer.message}{note}"
                ),
            )
        return answer

    def _record_failure(self, call: Call, answer: Answer) -> None:
        assert self._journal is not None and self._dead is not None
        if call.ticket >= 0:
            self._book.settle(call.records[0].run_id, call.ticket)
        if call.op == "create-run" and call.records[0].source_run:
            self._book.failed(
                call.records[0].run_id, f"{answer.status} {answer.code}: {answer.message}"
            )
        errors = [
            {
                "status": answer.status,
                "code": answer.code,
                "message": answer.message,
                "source": record.source,
                "opc_request_id": answer.request_id,
            }
            for record in call.records
        ]
        for record, error in zip(call.records, errors, strict=True):
            if not record.source_run:
                pass
            elif self._copies.is_declaration(record):
                parent = self._copies.parent_of(record.run_id)
                if parent is not None:
                    self._copy_create_run(parent)  # its parents' lines first
                self._copies.failed(record.run_id)  # its own line goes in
            else:
                self._copy_create_run(record.run_id)
            self._dead.add(record.raw, error)
        self._journal.finish([r.seq for r in call.records], answer.status, answer.request_id)
        self.counters.failed += len(call.records)
        for record, error in zip(call.records, errors, strict=True):
            self._log_failure(
                error,
                "%s: %s %s: %s",
                record.source,
                answer.status or "no answer",
                answer.code,
                answer.message,
            )

    def _log_failure(self, error: dict[str, object], fmt: str, *args: object) -> None:
        self._failures_logged += 1
        extra = {"batchlog_failure": error}  # the dead letter's _error: for JSON output
        if self._failures_logged <= LOUD_FAILURES:
            log.warning(fmt, *args, extra=extra)
            if self._failures_logged == LOUD_FAILURES:
                log.warning("more failures are in the dead letter only (-v shows them all)")
        else:
            log.info(fmt, *args, extra=extra)

    def _systemic_message(self) -> str:
        held = [h for h in self._held if h.kind != "gave-up"] or self._held
        last = held[-1].answer if held else Answer(0)
        unconfirmed = sum(len(h.call.records) for h in held if h.kind == "unconfirmed")
        if unconfirmed and len(held) == sum(1 for h in held if h.kind == "unconfirmed"):
            why = (
                f"{counted(unconfirmed, 'record')} may have been applied and could not be "
                "read back to confirm it; they are not resent blindly"
            )
        else:
            kind = held[-1].kind if held else "gave-up"
            if kind == "gave-up":
                why = (
                    f"{counted(len(self._held), 'request')} in a row got no usable answer "
                    "after every attempt: the server looks down or overloaded"
                )
            else:
                why = self.settings.target.systemic_hint(last.status)
        rid = f" (opc-request-id {last.request_id})" if last.request_id else ""
        return (
            f"stopped: {why}. Last answer: {last.status or 'none'} {last.code} "
            f"{last.message}{rid}. {self._held_back()}"
        )

    def _held_back(self) -> str:
        """What a stop leaves: the held calls are not failures (the same command sends
        them), but records that failed before the stop are (found by review: the message
        said "nothing was recorded as failed" with a dead letter already written)."""
        n = sum(len(h.call.records) for h in self._held)
        held = f"the {counted(n, 'record')} held back by the stop"
        again = "run the same command again once the cause is fixed: it sends them"
        if any(h.kind == "unconfirmed" for h in self._held):
            again += " (reading back first those that may have been applied)"
        c = self.counters
        before = [f"{counted(c.failed, 'record')} failed"] if c.failed else []
        if c.rejected:
            before.append(f"{counted(c.rejected, 'invalid line')} rejected")
        if not before:
            return f"Nothing was recorded as failed in this run: for {held}, {again}."
        return (
            f"{held[0].upper()}{held[1:]} {'was' if n == 1 else 'were'} not recorded as "
            f"failed: {again}. {' and '.join(before)} before the stop: they are in the dead "
            f"letter {self.dead_letter_path}."
        )

    # ---- journal and progress --------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.flush_interval)
            await self._flush()

    async def _flush(self) -> None:
        assert self._journal is not None and self._dead is not None
        async with self._flush_lock:
            if self._write_failed:  # what is on disk stays as the last commit left it
                return
            # shielded from taking the lines to having written them: the end of the job
            # cancels the flush loop, and a cancel at the thread pool's checkpoint dropped
            # lines already counted as finished (found by forcing timings: a CI run lost
            # 396 dead-letter lines; the final flush had nothing left to write)
            with anyio.CancelScope(shield=True):
                await self._write_pending()

    async def _write_pending(self) -> None:
        """Take what is pending in the dead letter and journal and write it (under the
        flush lock, shielded)."""
        assert self._journal is not None and self._dead is not None
        written, self._flushed = self._flushed, anyio.Event()
        dead_data = self._dead.pending_bytes()
        try:
            identity = self._dead.open_now() if dead_data else None
            journal_data = self._journal.pending_bytes(
                self._dead.size + len(dead_data), list(identity) if identity else None
            )
            await anyio.to_thread.run_sync(
                _write_both, self._dead, dead_data, self._journal, journal_data
            )
        except BatchlogError as exc:
            # a group cut short: resume goes back to the last commit, so nothing more
            # is written in this run (later groups would build on the lost one)
            self._write_failed = True
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


class _Counted:
    """The requests of one create-run attempt (experiment, lookup, creation), each counted
    once in the report as it goes out (found by review: the attempt was counted as well as
    each request after the first, one too many when the experiment was known)."""

    def __init__(self, transport: Transport, counters: Counters) -> None:
        self._transport = transport
        self._counters = counters
        self.sent = 0

    async def request(
        self,
        rel: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        token: str = "",
        large: bool = False,
    ) -> tuple[Answer, Any]:
        self.sent += 1
        self._counters.requests += 1
        return await self._transport.request(rel, body, query=query, token=token, large=large)


def calls_to_send(target: Target, call: Call, point: ResumePoint) -> list[Call]:
    """The calls a run sends for ``call``, formed as the first run formed it, given what
    ``point`` says is done: none if it finished, one per unfinished record if it was split
    after a 400, else the call itself. Raises ManifestChanged if an earlier run sent it and
    its lines changed since. Shared with the dry run, which counts them."""
    doubt = point.doubt.get(call.records[0].seq)
    if doubt is not None and doubt.token and not call.token.startswith(doubt.token):
        raise ManifestChanged(
            f"{call.records[0].source}: changed since an earlier run sent it (its answer "
            "never came, so it may have been applied as it was); restore the line, or "
            "use --restart to start over"
        )
    finished = [r for r in call.records if r.seq in point.done]
    if not finished:
        return [call]
    if len(finished) == len(call.records):
        return []
    # only after a merged call was split on a 400: its records went one by one
    return [single for single in split(target, call) if single.records[0].seq not in point.done]


def _smaller(call: Call, left: Mapping[str, Any]) -> bool:
    """Whether ``left`` (batchlog.replay.missing) lacks part of the log-batch ``call``."""
    body = orjson.loads(call.body)
    return any(len(left.get(k) or []) != len(body.get(k) or []) for k in _BATCH_LISTS)


_BATCH_LISTS = ("params", "metrics", "tags")


def _write_both(dead: DeadLetter, dead_data: bytes, journal: Journal, journal_data: bytes) -> None:
    dead.write(dead_data)  # first: a journaled failure is always in the dead letter
    journal.write(journal_data)


def check_done_lines(path: str, index: int, mark: Boundary, done: dict[int, str]) -> None:
    """Read the lines beyond the watermark that an earlier run finished and check that they
    are unchanged, before any request (stdin and pipes are checked as they stream past)."""
    wanted = {record_of(k): h for k, h in done.items() if manifest_of(k) == index}
    if not wanted or path == STDIN or not os.path.isfile(path):
        return
    last = max(wanted)
    for line in read_lines(path, index, mark):
        expected = wanted.get(line.record)
        if expected is not None and expected != line_hash(line.raw):
            raise ManifestChanged(
                f"{display_name(path)}:{line.number}, uploaded by an earlier run, "
                "is not what it was"
            )
        if line.record >= last:
            return
    raise ManifestChanged(
        f"{display_name(path)} ends before its record {last + 1:,}, which an earlier run "
        "uploaded: it was cut short"
    )


async def _readable(fd: int) -> None:
    try:
        await anyio.wait_readable(fd)
    except OSError:  # a descriptor the event loop cannot watch: poll it
        while not select.select([fd], [], [], 0)[0]:
            await anyio.sleep(0.05)


def _sizes(manifests: list[str]) -> list[int | None]:
    out: list[int | None] = []
    for path in manifests:
        if path == STDIN or not os.path.isfile(path):
            out.append(None)  # not known (a pipe such as <(...) included); a .gz: compressed
        else:
            out.append(os.path.getsize(path))
    return out


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
