"""What the command line shows on stderr and appends to ``--log-file``: events.

Part of the CLI layer (with cli.py, the only code that writes to the terminal). Everything
shown is an event: ``progress``, ``failure`` (one per record, with its source line),
``warning``, ``info`` (-v), ``message``, ``error``, ``signal`` and the final ``summary`` (the
report's fields). ``--log-format text`` shows each as the familiar ``batchlog: ...`` lines,
progress on a terminal as one live line redrawn in place; ``--log-format json`` as one JSON
object per line. ``-q`` keeps only errors on stderr (and the summary of a run that did not
succeed); ``--log-file`` gets every event, whatever ``-q`` says.

Library code logs (logger "batchlog"); the CLI prints. Both end up here: a logging handler
turns log records into events, and ``Console.out`` (what the CLI prints to) turns each
printed line into one.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, TextIO, cast

import orjson

from batchlog.errors import ConfigurationError, redact
from batchlog.report import EXIT_OK, Counters, Report, counted, utc_iso

LIVE_EVERY = 0.25  # seconds between redraws of the live line on a terminal
EVENT_EVERY = 5.0  # seconds between progress events (lines) otherwise
WINDOW = 10.0  # seconds the achieved rate is measured over: the pace now, not since start
CLEAR = "\r\033[K"  # back to the row's start, erase it


class RedactingFormatter(logging.Formatter):
    """Tracebacks (-v) with anything shaped like a credential cut out: they quote messages
    batchlog did not write. batchlog's own messages never hold a secret."""

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


class Console:
    """Where events go: stderr (text, a live line on a terminal, or JSON) and a log file."""

    def __init__(self, stream: TextIO, json: bool = False) -> None:
        self._stream = stream
        self._json = json
        self._quiet = False
        self._file: TextIO | None = None
        self._file_name = ""
        self._live = False  # a live line is on the terminal's current row
        self._lock = threading.RLock()  # log records can come from other threads
        self._handler: _EventHandler | None = None
        self._root_level = logging.NOTSET
        self._rates = _Rates()
        self._last_live = self._last_event = 0.0
        self.tty = not json and _isatty(stream)  # progress as a live line
        self._lines = _Lines(self)
        self.out = cast(TextIO, self._lines)  # what the CLI prints to

    def configure(
        self,
        json: bool,
        quiet: bool,
        verbose: bool,
        log_file: str | None,
        inputs: Sequence[str] = (),
    ) -> None:
        """Apply --log-format, -q, -v and --log-file; a log file that cannot be used, or
        that is one of ``inputs`` (appending to a manifest would add lines to it), is a
        ConfigurationError."""
        self._json = json
        self.tty = not json and _isatty(self._stream)
        self._quiet = quiet
        if log_file:
            self._file = _open_log(log_file, inputs)
            self._file_name = log_file
        root = logging.getLogger()
        for old in [h for h in root.handlers if isinstance(h, _EventHandler)]:
            root.removeHandler(old)  # main() called again in one process
        self._root_level = root.level
        root.setLevel(logging.INFO if verbose else logging.WARNING)
        self._handler = _EventHandler(self)
        root.addHandler(self._handler)

    def close(self) -> None:
        self._lines.finish()
        with self._lock:
            if self._live:
                self._stream.write(CLEAR)
                self._stream.flush()
                self._live = False
        if self._handler is not None:
            root = logging.getLogger()
            root.removeHandler(self._handler)
            root.setLevel(self._root_level)
            self._handler = None
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- events ----------------------------------------------------------------------------

    def emit(
        self,
        kind: str,
        fields: dict[str, Any],
        text: Sequence[str],
        loud: bool = False,
        show: bool = True,
    ) -> None:
        """One event. ``text``: its lines as --log-format text writes them; ``loud``: on
        stderr even with -q; ``show``: on stderr at all (else only in the log file)."""
        event = {"event": kind, "time": utc_iso(time.time()), **fields}
        with self._lock:
            if show and (loud or not self._quiet):
                if self._live:
                    self._stream.write(CLEAR)  # the live line never stays above
                    self._live = False
                _write(self._stream, event, text, self._json)
            if self._file is not None:
                try:
                    _write(self._file, event, text, self._json)
                except OSError as exc:  # a full disk must not end the upload
                    self._file = None
                    self.warning(
                        f"cannot write --log-file {self._file_name}: "
                        f"{exc.strerror or exc}; it gets nothing more"
                    )

    def line(self, text: str) -> None:
        """A line the CLI printed: an error (``batchlog: error: ...``) or a message."""
        if not text.strip():
            return
        if text.startswith("batchlog: error: "):
            self.emit("error", {"message": text.removeprefix("batchlog: error: ")}, [text], True)
        else:
            self.emit("message", {"message": text.removeprefix("batchlog: ")}, [text])

    def warning(self, message: str) -> None:
        self.emit("warning", {"message": message}, [f"batchlog: {message}"])

    def signal(self, name: str, message: str) -> None:
        self.emit("signal", {"signal": name, "message": message}, [f"batchlog: {message}"])

    def record(self, record: logging.LogRecord, text: str) -> None:
        """A log record, ``text`` as the text format shows it."""
        failure = getattr(record, "batchlog_failure", None)
        if isinstance(failure, dict):  # a record that did not succeed: the dead letter's _error
            kind, fields = "failure", dict(failure)
        else:
            levels = ((logging.ERROR, "error"), (logging.WARNING, "warning"), (0, "info"))
            kind = next(name for level, name in levels if record.levelno >= level)
            fields = {"message": record.getMessage()}
        if record.exc_info:
            fields["traceback"] = RedactingFormatter().formatException(record.exc_info)
        self.emit(kind, fields, text.splitlines(), loud=record.levelno >= logging.ERROR)

    def progress(self, c: Counters) -> None:
        """Called often while the job runs: the live line, and an event every 5 s."""
        now = time.monotonic()
        first = self._rates.add(now, c)
        if first:  # the first line after one interval, not at once
            self._last_live = self._last_event = now
            return
        if self.tty and not self._quiet and now - self._last_live >= LIVE_EVERY:
            self._last_live = now
            with self._lock:
                self._stream.write(CLEAR + self._fit(progress_text(c, self._rates)))
                self._stream.flush()
                self._live = True
        if now - self._last_event >= EVENT_EVERY:
            self._last_event = now
            text = "batchlog: " + progress_text(c, self._rates)
            self.emit("progress", progress_fields(c, self._rates), [text], show=not self.tty)

    def summary(self, r: Report) -> None:
        """The final report: on stderr even with -q when the run did not succeed."""
        self.emit("summary", r.as_dict(), summary_lines(r), loud=r.exit_code != EXIT_OK)

    def _fit(self, line: str) -> str:
        """The live line cut to the terminal's width: a wrapped one could not be erased."""
        try:
            width = os.get_terminal_size(self._stream.fileno()).columns
        except (OSError, ValueError, io.UnsupportedOperation):
            width = 0
        width = width or 80
        return line if len(line) < width else line[: width - 2] + "~"


def console_of(out: TextIO) -> Console:
    """The console ``out`` belongs to (what main() passes around); for any other stream, a
    new text console on it."""
    lines: object = out
    if isinstance(lines, _Lines):
        return lines.console
    return Console(out)


def json_requested(argv: Sequence[str]) -> bool:
    """Whether ``argv`` asks for --log-format json: known before the arguments are parsed,
    so that an error in them is written as JSON too."""
    args = list(argv)
    return "--log-format=json" in args or any(
        a == "--log-format" and b == "json" for a, b in itertools.pairwise(args)
    )


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


# ---- what the events say -------------------------------------------------------------------


def progress_text(c: Counters, rates: _Rates) -> str:
    """The progress line, the facts that matter most first: a terminal 80 columns wide cuts
    it after the ETA (found by review: it was cut before it), a wait on the server next."""
    records_s, requests_s = rates.per_s()
    total = c.total()
    if total is None:  # stdin, or nothing read yet
        parts = [f"{c.finished:,} records"]
    else:
        n, exact = total
        parts = [f"{c.finished:,} of {'' if exact else '~'}{n:,} records ({_percent(c, n):.0f}%)"]
    parts.append(f"{records_s:,.0f} records/s")
    eta = c.eta(records_s)
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    wait = c.retry_after_left()
    if wait >= 1:
        parts.append(f"Retry-After {duration(wait)}")
    for count, word in (
        (c.failed, "failed"),
        (c.rejected, "rejected"),
        (c.skipped, "already done"),
        (c.throttled, "throttled"),
    ):
        if count:
            parts.append(f"{count:,} {word}")
    parts.append(f"{requests_s:,.0f} requests/s")
    if not math.isinf(c.rate):
        parts.append(f"rate limit {c.rate:,.0f} requests/s")
    parts.append(f"{c.in_flight:,} in flight")
    return ", ".join(parts)


def progress_fields(c: Counters, rates: _Rates) -> dict[str, Any]:
    records_s, requests_s = rates.per_s()
    total = c.total()
    eta = c.eta(records_s)
    return {
        "records": c.records,
        "finished": c.finished,
        "records_total": None if total is None else total[0],
        "records_total_exact": total is not None and total[1],
        "percent": None if total is None else round(_percent(c, total[0]), 1),
        "succeeded": c.succeeded,
        "failed": c.failed,
        "rejected": c.rejected,
        "already_done": c.skipped,
        "pending": c.pending,
        "requests": c.requests,
        "retries": c.retries,
        "throttled": c.throttled,
        "in_flight": c.in_flight,
        "records_per_s": round(records_s, 1),
        "requests_per_s": round(requests_s, 1),
        "rate_limit": None if math.isinf(c.rate) else round(c.rate, 1),
        "eta_s": None if eta is None else round(eta, 1),
        "retry_after_s": round(c.retry_after_left(), 1),
        "bytes_read": c.bytes_read,
        "bytes_total": c.bytes_total,
        "elapsed_s": round(time.monotonic() - c.started, 3),
    }


def _percent(c: Counters, total: int) -> float:
    # floored: 100% only when every record is finished
    return math.floor(1000 * c.finished / total) / 10 if total else 100.0


def summary_lines(r: Report) -> list[str]:
    """The report in words, the same words as its JSON fields; every count of a noun in
    the singular for one (found by review: "1 records of this job did not succeed")."""
    limit = (
        "no rate limit" if r.rate_limit is None else f"rate limit {r.rate_limit:,.1f} requests/s"
    )
    lines = [
        f"batchlog: {r.status}: {counted(r.records, 'record')}: {r.succeeded:,} succeeded, "
        f"{r.failed:,} failed, {r.rejected:,} rejected, {_already_done(r)}, "
        f"{r.pending:,} pending",
        f"batchlog: {counted(r.requests, 'request')}, {counted(r.retries, 'retry', 'retries')}, "
        f"{r.throttled:,} throttled, {counted(r.read_backs, 'read back')}; "
        f"{r.records_per_s:,.1f} records/s, {r.requests_per_s:,.1f} requests/s, {limit}; "
        f"elapsed {r.elapsed_s:.1f} s",
    ]
    if r.message and r.message != r.status:  # "interrupted: ... interrupted" said it twice
        lines.append(f"batchlog: {r.message}")
    if r.unsuccessful_total:
        here = r.failed + r.rejected
        earlier = r.unsuccessful_total - here
        when = f" ({here:,} in this run, {earlier:,} in earlier runs)" if earlier else ""
        lines.append(
            f"batchlog: {counted(r.unsuccessful_total, 'record')} of this job did not "
            f"succeed{when}: they are in {r.dead_letter}; fix them and upload that file"
        )
    if r.resolved_by:
        lines.append(
            f"batchlog: the {counted(r.resolved_total, 'failure')} of earlier runs were fixed "
            f"and uploaded from {r.dead_letter} (checkpoint {r.resolved_by})"
        )
    if r.status in ("stopped", "interrupted"):  # a "failed" job's message says what to do
        if r.pending:
            lines.append(f"batchlog: {_pending(r)}")
        else:
            lines.append("batchlog: run the same command again to resume")
    return lines


def _already_done(r: Report) -> str:
    """Already done counts what earlier runs finished, failures and rejects included
    (README): when some did not succeed, say how many, as `batchlog status` does (found by
    review: "0 rejected, 9 already done" then "3 records ... did not succeed")."""
    succeeded, failed, rejected = r.already_done_parts
    if not failed and not rejected:
        return f"{r.already_done:,} already done"
    # failures fixed and uploaded from the dead letter since: not this job's to fix any more
    fixed = f", the {r.resolved_total:,} fixed since from the dead letter" if r.resolved_by else ""
    return (
        f"{r.already_done:,} already done (by earlier runs: {succeeded:,} succeeded, "
        f"{failed:,} failed, {rejected:,} rejected{fixed})"
    )


def _pending(r: Report) -> str:
    """The records a stop left unfinished, in two parts that add up to ``pending`` (found by
    review: "the 12 records held back by the stop", then "157 records were in flight or
    waiting to be sent", with nothing saying how the two relate)."""
    again = "run the same command again to resume; it sends them, with any records not read yet"
    held = min(r.held_back, r.pending)
    if not held:
        return f"{counted(r.pending, 'record')} pending, in flight or waiting to be sent: {again}"
    return (
        f"{counted(r.pending, 'record')} pending: {held:,} held back by the stop (not recorded "
        f"as failed) and {r.pending - held:,} in flight or waiting to be sent: {again}"
    )


# ---- plumbing --------------------------------------------------------------------------------


class _Rates:
    """Records and requests per second over the last WINDOW seconds."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque()

    def add(self, now: float, c: Counters) -> bool:
        """Take a sample; True for the first one."""
        self._samples.append((now, c.done_here, c.requests))
        while len(self._samples) > 2 and now - self._samples[1][0] >= WINDOW:
            self._samples.popleft()
        return len(self._samples) == 1

    def per_s(self) -> tuple[float, float]:
        (t0, records0, requests0), (t1, records1, requests1) = self._samples[0], self._samples[-1]
        span = t1 - t0
        if span <= 0:
            return 0.0, 0.0
        return (records1 - records0) / span, (requests1 - requests0) / span


class _Lines(io.TextIOBase):
    """What the CLI prints to: each whole line becomes an event."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._pending = ""

    def write(self, s: str) -> int:
        *lines, self._pending = (self._pending + s).split("\n")
        for line in lines:
            self.console.line(line)
        return len(s)

    def flush(self) -> None:  # a line is an event only once whole
        pass

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.console.tty

    def finish(self) -> None:
        """The end of a line printed without its newline."""
        if self._pending:
            self.console.line(self._pending)
            self._pending = ""


class _EventHandler(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__()
        self._console = console
        self.setFormatter(RedactingFormatter("batchlog: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console.record(record, self.format(record))
        except Exception:
            self.handleError(record)


def _write(target: TextIO, event: dict[str, Any], text: Sequence[str], json: bool) -> None:
    if json:
        try:
            data = orjson.dumps(event, default=str)
        except TypeError:  # a file name that is not UTF-8 (surrogate escapes): shown escaped
            data = orjson.dumps(_utf8(event), default=str)
        target.write(data.decode() + "\n")
    else:
        target.write("".join(line + "\n" for line in text))
    target.flush()


def _utf8(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_utf8(k): _utf8(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_utf8(v) for v in value]
    return value


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (ValueError, OSError):  # closed
        return False


def _open_log(path: str, inputs: Sequence[str]) -> TextIO:
    for other in inputs:
        try:
            same = os.path.samefile(path, other)
        except (OSError, ValueError):
            same = False
        if same:
            raise ConfigurationError(
                f"--log-file {path}: that is {other}, which this command reads: give another file"
            )
    try:
        return open(path, "a", encoding="utf-8", errors="backslashreplace")
    except OSError as exc:
        raise ConfigurationError(f"--log-file {path}: {exc.strerror or exc}") from None
