"""Hostile answers: Retry-After values of every form and none, error bodies that are not the
API's JSON (a load balancer's HTML page, a list, invalid UTF-8, megabytes), odd statuses and
headers. None may crash a job, stall it, or put more than one short clean line in a log or
the dead letter."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http.server
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import unicodedata
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from batchlog.emulator import EmulatorThread
from batchlog.emulator.server import http_response
from batchlog.journal import read_checkpoint
from batchlog.retry import MAX_RETRY_AFTER, Answer, RetryPolicy, parse_retry_after
from batchlog.target import MlflowTarget
from batchlog.transport import _answer
from tests.conftest import Oci, inputs_record, model_record, run_cli, upload_args, write_manifest
from tests.test_crash import start_cli
from tests.test_manifest_input import PEAK_RSS, one_line_error, peak_rss_mb
from tests.test_transport import call_for, run, transport
from tests.test_upload import assert_exactly_once

StartEmulator = Callable[..., EmulatorThread]
POLICY = RetryPolicy()
VERDICTS = {"ok", "retry", "permanent", "unauthorized", "redirect"}
MAX_MESSAGE = 500  # what an answer's message is cut to
# characters that must never reach a log line or the dead letter's message: they break
# lines, move the cursor, hide or reorder text, or cannot be encoded as UTF-8
UNSAFE = {"Cc", "Cf", "Cs", "Zl", "Zp"}
HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def clean_line(text: str, limit: int) -> bool:
    """One line, at most ``limit`` characters, nothing unsafe in it."""
    return len(text) <= limit and not any(unicodedata.category(c) in UNSAFE for c in text)


def imf_fixdate(when: datetime, zone: str = "GMT") -> str:
    return (
        f"{WEEKDAYS[when.weekday()][:3]}, {when.day:02d} {MONTHS[when.month - 1]} {when.year} "
        f"{when:%H:%M:%S} {zone}"
    )


def rfc850_date(when: datetime) -> str:
    return (
        f"{WEEKDAYS[when.weekday()]}, {when.day:02d}-{MONTHS[when.month - 1]}-{when:%y} "
        f"{when:%H:%M:%S} GMT"
    )


def asctime_date(when: datetime) -> str:
    return (
        f"{WEEKDAYS[when.weekday()][:3]} {MONTHS[when.month - 1]} {when.day:2d} "
        f"{when:%H:%M:%S} {when.year}"
    )


# ---- 1. Retry-After: every form RFC 9110 allows, nothing else ---------------------------


@pytest.mark.parametrize("form", [imf_fixdate, rfc850_date, asctime_date])
@pytest.mark.parametrize("ahead", [-3600, 0, 30, 200])
def test_retry_after_http_dates_in_every_form(form: Callable[[datetime], str], ahead: int) -> None:
    when = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=ahead)
    got = parse_retry_after(form(when))
    assert got is not None
    assert max(0, ahead) - 2 <= got <= max(0, ahead) + 1


def test_retry_after_date_in_zone_minus_0000_and_other_zones() -> None:
    """``-0000`` made parsedate_to_datetime answer a naive datetime: the job crashed
    (naive minus aware)."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 -0000") == 0.0  # long past
    got = parse_retry_after(imf_fixdate(now + timedelta(seconds=60), "-0000"))
    assert got is not None and 57 <= got <= 61
    got = parse_retry_after(imf_fixdate(now + timedelta(seconds=3660), "+0100"))
    assert got is not None and 57 <= got <= 61
    assert parse_retry_after(email.utils.format_datetime(now + timedelta(days=2))) == (
        MAX_RETRY_AFTER
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),  # not RFC 9110, but harmless
        ("100000", MAX_RETRY_AFTER),  # capped
        ("9" * 5000, MAX_RETRY_AFTER),  # more digits than int() converts: still "long"
    ],
)
def test_retry_after_delay_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "1e400",
        "1e3",
        "-5",
        "-0.5",
        "+5",
        "1_000",
        "0x10",
        "soon",
        "5, 10",  # two headers joined by a proxy
        "Wed, 21 Oct 99999 07:28:00 GMT",
        "Wed, 32 Oct 2015 07:28:00 GMT",
        "\udcff\udcfe",  # invalid UTF-8 as aiohttp hands it over
        "١٢٣",  # digits, but not ASCII ones
    ],
)
def test_retry_after_that_cannot_be_read_is_ignored(value: str | None) -> None:
    """nan crashed the job (sleep(nan)), inf stalled it for ever, a negative value..."""
    assert parse_retry_after(value) is None


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.from_regex(r"\A[ 0-9.eE+-]{0,30}\Z")))
def test_retry_after_fuzz(value: str) -> None:
    got = parse_retry_after(value)
    assert got is None or 0.0 <= got <= MAX_RETRY_AFTER


@pytest.mark.parametrize("retry_after", [math.nan, math.inf, -math.inf, -5.0, 1e300])
def test_the_policy_delay_is_finite_and_capped_whatever_the_answer_holds(
    retry_after: float,
) -> None:
    import random

    delay = POLICY.delay(3, Answer(429, retry_after=retry_after), random.Random(1))
    assert 0.0 <= delay <= MAX_RETRY_AFTER
    assert POLICY.max_retry_after == MAX_RETRY_AFTER  # one cap, the pacer's too


# ---- 4. error bodies and headers as a hostile server sends them ------------------------


@contextlib.asynccontextmanager
async def raw_server(answers: list[bytes], stall: bool = False) -> AsyncIterator[str]:
    """A loopback server that reads one request per connection and writes the next raw
    bytes of ``answers`` as its answer (then closes; with ``stall``, it keeps the
    connection open without writing more, until the block ends)."""
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            answer = answers.pop(0)
            for start in range(0, len(answer), 1 << 16):  # flow-controlled, as a server does
                writer.write(answer[start : start + (1 << 16)])
                await writer.drain()
            if stall:
                await done.wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        done.set()
        server.close()
        await server.wait_closed()


def send_raw(answers: list[bytes], *, stall: bool = False, timeout: float = 10.0) -> list[Answer]:
    """What Transport.send makes of each raw answer, over real loopback HTTP."""

    async def go() -> list[Answer]:
        out = []
        async with raw_server(list(answers), stall) as url:
            target = MlflowTarget(url)
            async with transport(target, timeout=timeout) as t:
                for _ in answers:
                    out.append(await t.send(call_for(target, model_record("r1", 1))))
        return out

    return run(go)


def raw(status: int, body: bytes = b"", *headers: bytes) -> bytes:
    head = b"".join(h + b"\r\n" for h in headers)
    return (
        b"HTTP/1.1 %03d Odd\r\n%bContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, head, len(body))
        + body
    )


def assert_clean(answer: Answer) -> None:
    assert clean_line(answer.message, MAX_MESSAGE), answer
    assert clean_line(answer.code, 100), answer
    assert clean_line(answer.request_id, 100), answer
    assert clean_line(answer.etag, 200), answer
    # what the dead letter and the journal write: must encode
    orjson.dumps({"message": answer.message, "code": answer.code, "rid": answer.request_id})


def test_error_bodies_become_short_readable_lines() -> None:
    answers = send_raw(
        [
            raw(502, HTML_502, b"Content-Type: text/html"),
            raw(500, b"[1, 2, 3]", b"Content-Type: application/json"),
            raw(500, b'"Service Unavailable"', b"Content-Type: application/json"),
            raw(500, b"42"),
            raw(500, b"null"),
            raw(503, b"\xff\xfe\x00\x01 broken \xc3", b"Content-Type: application/octet-stream"),
            raw(400, b'{"code": "Bad\\nCode", "message": "line one\\nline two\\u001b[31m red"}'),
            raw(400, b'{"code": 7, "message": {"why": ["nested"]}}'),
            raw(400, b'{"error": "no code nor message here"}'),
            raw(502, b""),
            raw(500, b"Internal error\r\n\tat Foo.bar(Foo.java:1)\r\n" + "\u202e".encode()),
        ]
    )
    html, lst, text, number, null, binary, ctrl, odd, other, empty, trace = answers
    for answer in answers:
        assert answer.status in (400, 500, 502, 503)
        assert_clean(answer)
        assert answer.message, answer  # always something to read
    assert (html.code, html.message) == ("BadGateway", "an HTML page: 502 Bad Gateway")
    assert lst.message == "a JSON array, not an error object: [1, 2, 3]"
    assert text.message == "Service Unavailable"
    assert number.message == "a JSON number, not an error object: 42"
    assert null.message == "a JSON null, not an error object: null"
    assert "broken" in binary.message
    assert (ctrl.code, ctrl.message) == ("Bad Code", "line one line two[31m red")
    assert (odd.code, odd.message) == ("7", '{"why":["nested"]}')
    assert other.message == '{"error": "no code nor message here"}'
    assert (empty.code, empty.message) == ("BadGateway", "Bad Gateway")  # the status's own
    assert trace.message == "Internal error at Foo.bar(Foo.java:1)"


def test_odd_headers_are_cleaned_and_duplicates_take_the_first() -> None:
    (answer,) = send_raw(
        [
            raw(
                429,
                b'{"code": "TooManyRequests", "message": "slow down"}',
                b"Retry-After: 3",
                b"Retry-After: nan",
                b"opc-request-id: ab\x01cd\xff\xfe" + b"x" * 300,
                b"opc-request-id: second",
                b"Content-Type: \xe2\x80\xae text/evil",
            )
        ]
    )
    assert (answer.status, answer.code, answer.message) == (429, "TooManyRequests", "slow down")
    assert answer.retry_after == 3.0
    assert answer.request_id.startswith("abcd")
    assert_clean(answer)


def test_a_2xx_page_with_hostile_bytes_is_named_cleanly() -> None:
    (answer,) = send_raw([raw(200, HTML_502, b"Content-Type: text/html;\x01\xff evil")])
    assert answer.code == "NotTheApi"
    assert_clean(answer)


@pytest.mark.parametrize("status", [0, 199, 600, 999])
def test_a_status_that_is_not_a_final_http_status_is_retried_in_doubt(status: int) -> None:
    (answer,) = send_raw([raw(status, b"odd")]) if status != 199 else [_answer(199, {}, b"", "")]
    assert answer.code == "BadStatus"
    assert f"status {status}" in answer.message
    assert POLICY.verdict(answer) == "retry"
    assert answer.in_doubt  # it was sent and something came back: it may have been applied
    assert_clean(answer)


def test_a_huge_body_is_not_read_whole() -> None:
    """A body of 100 MB announced, 1 MB sent, then nothing: only the first bytes are read, so
    the answer comes at once (reading it whole would wait for the timeout, and hold
    megabytes per call in flight)."""
    body_start = b"<html><title>Too big</title>" + b"x" * (1 << 20)
    head = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 100000000\r\n\r\n"
    started = time.monotonic()
    (answer,) = send_raw([head + body_start], stall=True, timeout=20.0)
    assert time.monotonic() - started < 15  # generous: it answers at once
    assert (answer.status, answer.message) == (502, "an HTML page: Too big")
    assert_clean(answer)


def test_a_huge_body_of_unknown_length_is_not_held_in_memory() -> None:
    """5 MB of error body, no Content-Length (read until the server closes): at most a few
    hundred kB are ever held, whatever is sent."""
    import tracemalloc

    head = b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n"
    body = b'{"code": "X", "message": "' + b"m" * (5 << 20) + b'"}'
    answers = [head + body]
    tracemalloc.start()
    try:
        (answer,) = send_raw(answers)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status == 500
    assert_clean(answer)
    assert peak < 2 << 20, peak


# ---- the answer parser, fuzzed ---------------------------------------------------------

STATUSES = st.one_of(
    st.sampled_from([0, 1, 99, 100, 101, 199, 200, 201, 204, 299, 300, 302, 399, 400, 401]),
    st.sampled_from([403, 404, 405, 409, 429, 500, 501, 502, 503, 599, 600, 999, 1000]),
    st.integers(min_value=0, max_value=1000),
)
WHEN = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(timezone.utc)
)
RETRY_AFTER = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["nan", "inf", "-1", "", " ", "1e400", "soon"]),
    WHEN.map(imf_fixdate),
    WHEN.map(lambda w: imf_fixdate(w, "-0000")),
    WHEN.map(rfc850_date),
    WHEN.map(asctime_date),
    st.text(max_size=40),
)
HEADER_VALUES = {
    "retry-after": RETRY_AFTER,
    "content-type": st.one_of(
        st.sampled_from(["application/json", "text/html", "", "application/json; x=\x01"]),
        st.text(max_size=300),
    ),
    "opc-request-id": st.text(max_size=300),
    "etag": st.text(max_size=300),
    "location": st.text(max_size=300),
}
HEADERS = st.lists(
    st.sampled_from(sorted(HEADER_VALUES)).flatmap(
        lambda name: st.tuples(st.sampled_from([name, name.upper()]), HEADER_VALUES[name])
    ),
    max_size=6,
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
ERROR_DOC = st.fixed_dictionaries(
    {}, optional={"code": JSON, "message": JSON, "error_code": JSON, "other": JSON}
)
BODIES = st.one_of(
    st.binary(max_size=3000),
    JSON.map(lambda doc: json.dumps(doc).encode()),
    ERROR_DOC.map(lambda doc: json.dumps(doc).encode()),
    st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([HTML_502, b"{}", b"", b"[" * 5000, b"<title>" + b"\xff" * 40]),
    st.text(max_size=200).map(lambda t: f"<html><title>{t}</title>{t}</html>".encode()),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(STATUSES, HEADERS, BODIES, st.text(max_size=50))
def test_the_answer_parser_never_raises_and_keeps_its_promises(
    status: int, headers: list[tuple[str, str]], body: bytes, request_id: str
) -> None:
    import random

    answer = _answer(status, CIMultiDict(headers), body, request_id)
    assert answer.status == status
    assert_clean(answer)
    assert answer.retry_after is None or 0.0 <= answer.retry_after <= MAX_RETRY_AFTER
    assert POLICY.verdict(answer) in VERDICTS
    assert isinstance(answer.in_doubt, bool)
    delay = POLICY.delay(1, answer, random.Random(0))
    assert 0.0 <= delay <= max(POLICY.max_delay, MAX_RETRY_AFTER)


# ---- end to end: the CLI against an emulator that answers oddly ------------------------


def dead_letter(path: Path) -> dict[str, dict[str, Any]]:
    """The dead letter's records by run id, each with its _error."""
    docs = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return {d["run_id"]: d for d in docs}


def assert_clean_stderr(err: str) -> None:
    assert "Traceback" not in err, err
    assert "<html" not in err and "<title" not in err, err
    for line in err.splitlines():
        assert clean_line(line, 2000), line


def test_a_job_gets_odd_answers_and_finishes_cleanly(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    soon = datetime.now(timezone.utc) + timedelta(seconds=1)
    html_502 = http_response(502, [("Content-Type", "text/html")], HTML_502)
    canned = {
        # recovered after their odd answers
        "nan": [http_response(429, [("Retry-After", "nan")], b'{"code": "TooManyRequests"}')],
        "date": [
            http_response(503, [("Retry-After", imf_fixdate(soon, "-0000"))], b""),
            http_response(503, [("Retry-After", asctime_date(soon))], b""),
        ],
        "odd": [
            http_response(500, [("Content-Type", "application/json")], b"[1, 2]"),
            http_response(503, [("opc-request-id", "\x01evil")], b"\xff\xfe broken \xc3\x28"),
            http_response(502, [], b"null"),
        ],
        "lb": [html_502] * 2,
        # failing for good: the dead letter, with a readable reason
        "down": [html_502] * 10,
        "bad": [http_response(400, [], b'"the \\u001b[31mrun\\nis\\tbroken"')] * 10,
        "big": [http_response(400, [], b"<html>" + b"y" * (3 << 20))] * 10,
        "junk": [http_response(500, [("opc-request-id", "r\u202eid")], bytes(range(256)))] * 10,
    }
    emu = emulator(canned={k: list(v) for k, v in canned.items()})
    good = [
        inputs_record("nan", "ds1"),
        model_record("date", 1),
        inputs_record("odd", "ds2"),
        model_record("lb", 2),
        inputs_record("plain", "ds3"),
    ]
    failing = [inputs_record(r, f"ds-{r}") for r in ("down", "bad", "big", "junk")]
    manifest = write_manifest(tmp_path / "m.jsonl", good + failing)
    args = [*upload_args(oci, emu, str(manifest)), "--max-attempts", "4"]
    out = run_cli([*args, "--report", str(tmp_path / "r.json")], timeout=60)
    assert out.returncode == 1, out.stderr
    assert_clean_stderr(out.stderr)
    assert_exactly_once(emu, good)
    dead = dead_letter(tmp_path / "m.dead-letter.jsonl")
    assert sorted(dead) == ["bad", "big", "down", "junk"]
    for doc in dead.values():
        error = doc["_error"]
        assert clean_line(error["message"], 700), error
        assert clean_line(error["code"], 100) and clean_line(error["opc_request_id"], 100)
    assert "502 Bad Gateway" in dead["down"]["_error"]["message"]
    assert dead["down"]["_error"]["message"].startswith("gave up after 4 attempts")
    assert dead["down"]["_error"]["code"] == "BadGateway"  # it did answer: not "NoAnswer"
    assert dead["bad"]["_error"]["message"] == "the [31mrun is broken"
    assert dead["big"]["_error"]["message"].startswith("an HTML page: yyy")
    assert "run the same command" not in out.stderr  # completed: nothing to resume
    again = run_cli(args, timeout=60)  # a rerun: nothing more sent, the same verdict
    assert again.returncode == 1, again.stderr
    assert_exactly_once(emu, good)


def test_a_huge_retry_after_is_capped_and_shown(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """One ``Retry-After: 100000`` held the whole job for 28 hours: the wait is capped (and
    the progress line says what the job is waiting on); interrupted there, it resumes."""
    throttled = http_response(429, [("Retry-After", "100000")], b'{"code": "TooManyRequests"}')
    emu = emulator(canned={"held": [throttled]})
    records = [inputs_record("held", "ds0"), *(inputs_record(f"r{i}", f"ds{i}") for i in range(5))]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = [*upload_args(oci, emu, str(manifest)), "--grace", "1"]
    proc = start_cli(args)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr or []])
    reader.start()
    seen: list[str] = []
    waiting = None
    deadline = time.monotonic() + 30
    try:
        while waiting is None and time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
                waiting = re.search(r"Retry-After (\d+)m(\d\d)s", seen[-1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    while not lines.empty():
        seen.append(lines.get())
    err = "".join(seen)
    assert waiting is not None, err
    assert 0 < int(waiting[1]) * 60 + int(waiting[2]) <= MAX_RETRY_AFTER
    assert proc.returncode == 130, err
    assert_clean_stderr(err)
    out = run_cli(args, timeout=60)  # resumed: the server says no more
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


def test_one_sigint_while_waiting_on_a_retry_after_stops_at_once_and_resumes(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """A call waiting out a ``Retry-After: 300`` (and the calls the shared rate holds back
    meanwhile) is not in flight: one SIGINT stopped the job only after the whole --grace
    (10 s), "finishing in-flight requests" with none in flight. It stops at once now, and
    the rerun applies every record exactly once."""
    throttled = http_response(429, [("Retry-After", "300")], b'{"code": "TooManyRequests"}')
    emu = emulator(canned={"held": [throttled], "model": [throttled]})
    records = [
        inputs_record("held", "ds0"),
        model_record("model", 1),
        *(inputs_record(f"r{i}", f"ds{i}") for i in range(1, 40)),
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    args = upload_args(oci, emu, str(manifest), "--concurrency", "2")  # the default --grace
    proc = start_cli(args)
    try:
        deadline = time.monotonic() + 30
        while emu.state.statuses[429] < 2:  # both answered 429: waiting now
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no 429 answered"
            time.sleep(0.02)
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert took < 4, (took, err)  # not the 10 s of --grace
    assert_clean_stderr(err)
    assert emu.state.statuses[429] == 2  # each sent once, then left waiting
    out = run_cli(args, timeout=60)  # resumed: the server says no more
    assert out.returncode == 0, out.stderr
    assert_exactly_once(emu, records)


# ---- answers that grow when decompressed, or are too big to be the API's ---------------


def gzip_bomb(head: bytes, mib: int, tail: bytes) -> bytes:
    """``head`` + ``mib`` MiB of spaces + ``tail``, gzipped (about 1 KiB per MiB), made in
    bounded memory."""
    compress = zlib.compressobj(9, zlib.DEFLATED, 31)
    spaces = b" " * (1 << 20)
    parts = [compress.compress(head), *(compress.compress(spaces) for _ in range(mib))]
    return b"".join([*parts, compress.compress(tail), compress.flush()])


@contextlib.contextmanager
def hostile_server(
    post: tuple[int, dict[str, str], bytes], get: bytes = b"", seen: list[str] | None = None
) -> Iterator[str]:
    """A loopback HTTP server (stdlib, in a thread) answering every POST with ``post``
    (status, headers, body) and every GET with 200 and ``get``, gzip-encoded as it is; the
    method of each request is appended to ``seen``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            if seen is not None:
                seen.append("POST")
            self.answer(*post)

        def do_GET(self) -> None:
            if seen is not None:
                seen.append("GET")
            self.answer(200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, get)

        def answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(ConnectionError):
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def cli_with_peak(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """The CLI in a process of its own, and its peak resident memory in MB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OCI_"))}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=env,
    )
    peak = peak_rss_mb(out.stderr)
    out.stderr = "".join(line for line in out.stderr.splitlines(True) if "VmHWM" not in line)
    return out, peak


def test_a_gzip_bomb_answer_is_read_no_further_than_the_cap(tmp_path: Path) -> None:
    """60 MiB of JSON white space in 60 KB of gzip, answered 200: its compressed length is
    under the 64 KiB cap, so the whole body was decompressed into memory (RSS 50 -> 188 MB)
    and taken for the API's ``{}``. Only 64 KiB are read now, and it is not the API."""
    bomb = gzip_bomb(b"{", 60, b"}")
    assert len(bomb) < 1 << 16
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    manifest = write_manifest(
        tmp_path / "m.jsonl", [inputs_record(f"r{i}", f"ds{i}") for i in range(3)]
    )
    with hostile_server((200, headers, bomb)) as url:
        args = ["upload", str(manifest), "--target", "mlflow", "--tracking-uri", url]
        out, peak = cli_with_peak([*args, "--max-attempts", "2"], tmp_path)
    assert out.returncode == 3, out.stderr
    one_line_error(out.stderr, "a body over 64 KiB, not the API's answer")
    assert_clean_stderr(out.stderr)
    assert peak < 120, out.stderr  # far below the 60 MiB decompressed, twice


def test_a_run_read_back_is_capped_through_the_decompressed_stream(tmp_path: Path) -> None:
    """runs/get answered 200 with 300 MiB of JSON in 300 KB of gzip: it was read whole
    (and joined: 600 MB). A run is read back up to 64 MiB; beyond that it is named."""
    bomb = gzip_bomb(b'{"run": {', 300, b"}}")
    manifest = write_manifest(tmp_path / "m.jsonl", [inputs_record("r1", "ds1")])
    with hostile_server((500, {}, b""), get=bomb) as url:
        args = ["verify", str(manifest), "--target", "mlflow", "--tracking-uri", url]
        out, peak = cli_with_peak(args, tmp_path)
    assert out.returncode == 3, out.stderr
    one_line_error(out.stderr, "run too large to read back")
    assert_clean_stderr(out.stderr)
    assert peak < 300, out.stderr  # 64 MiB held at most (twice while joined), not 300 MiB


def test_a_2xx_json_object_over_the_cap_is_named_as_too_big() -> None:
    """A 200 JSON object over 64 KiB was said to be "not a JSON object"."""
    body = b'{"padding": "' + b"x" * (70 << 10) + b'"}'
    (answer,) = send_raw([raw(200, body, b"Content-Type: application/json")])
    assert answer.code == "NotTheApi"
    assert answer.message == "answered 200 with a body over 64 KiB, not the API's answer", answer
    assert_clean(answer)


HTML_LOGIN = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>log in</body></html>"


def test_a_login_page_answered_200_is_named_as_not_the_api(
    tmp_path: Path, oci: Oci, emulator: StartEmulator
) -> None:
    """It said "every request answered 200 before any succeeded": contradictory."""
    page = (200, {"Content-Type": "text/html"}, HTML_LOGIN)
    records = [inputs_record(f"r{i}", f"ds{i}") for i in range(10)]
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    with hostile_server(page) as url:
        mlflow = run_cli(["upload", str(manifest), "--target", "mlflow", "--tracking-uri", url])
    login = http_response(200, [("Content-Type", "text/html")], HTML_LOGIN)
    emu = emulator(canned={f"r{i}": [login] for i in range(10)})
    (tmp_path / "m.batchlog-checkpoint").unlink(missing_ok=True)
    oci_out = run_cli(upload_args(oci, emu, str(manifest), "--restart"))
    for out in (mlflow, oci_out):
        assert out.returncode == 3, out.stderr
        assert_clean_stderr(out.stderr)
        assert "before any succeeded" not in out.stderr, out.stderr
        one_line_error(
            out.stderr, "stopped:", "something that is not the", "API (a login page or a proxy"
        )


def test_one_sigint_while_a_log_model_waits_to_be_read_back_stops_at_once(tmp_path: Path) -> None:
    """MLflow: a log-model answered 500 may have been applied; before it is read back, the
    job waits until that attempt can no longer land (--timeout). Nothing is in flight then:
    one SIGINT waited out the whole --grace. It stops at once, in this run and in the next
    (which waits the same way), and the call stays in doubt, to be read back later."""
    seen: list[str] = []
    manifest = write_manifest(tmp_path / "m.jsonl", [model_record("r1", 1)])
    error = (500, {"Content-Type": "application/json"}, b'{"error_code": "INTERNAL_ERROR"}')
    with hostile_server(error, seen=seen) as url:
        args = ["upload", str(manifest), "--target", "mlflow", "--tracking-uri", url]
        args += ["--max-attempts", "1", "--timeout", "120"]
        for run_number in (1, 2):
            proc = start_cli(args)
            try:
                time.sleep(1.5)  # sent and answered (first run), waiting in both
                started = time.monotonic()
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=30)
                took = time.monotonic() - started
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
            assert proc.returncode == 130, (run_number, err)
            assert took < 4, (run_number, took, err)  # not the 10 s of --grace
            assert_clean_stderr(err)
            assert seen == ["POST"], seen  # never sent again, nor read back before its time
    _, point = read_checkpoint(str(tmp_path / "m.batchlog-checkpoint"))
    assert len(point.doubt) == 1 and point.finished == 0
