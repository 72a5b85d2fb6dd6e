"""Per-request work on the request path (issue 12): the collector during a session, and
answers read without needless work."""

from __future__ import annotations

import asyncio
import gc
import unicodedata
from typing import Any

import pytest
from aiohttp import web

from batchlog import transport as transport_module
from batchlog.retry import Answer
from batchlog.target import MlflowTarget
from batchlog.transport import _one_line
from tests.conftest import KEY_ID, Oci, model_record
from tests.test_transport import (
    StartEmulator,
    call_for,
    oci_keys,
    oci_target,
    run,
    serve,
    transport,
)


def test_a_session_collects_young_objects_seldom_and_restores_the_collector(
    oci: Oci, emulator: StartEmulator
) -> None:
    """Young collections every 10,000 allocations while a session is open (not 700), what
    start-up made frozen; as it was once the last session closes."""
    emu = emulator()
    target = oci_target(emu)
    before = gc.get_threshold()
    seen: list[tuple[tuple[int, int, int], int]] = []

    async def go() -> None:
        async with transport(target, oci_keys(oci)) as t:
            seen.append((gc.get_threshold(), gc.get_freeze_count()))
            async with transport(target, oci_keys(oci)) as inner:  # nested: one owner
                answer = await inner.send(call_for(target, model_record("r1", 1)))
                assert answer.status == 200, answer
            seen.append((gc.get_threshold(), gc.get_freeze_count()))
            answer = await t.send(call_for(target, model_record("r2", 2)))
            assert answer.status == 200, answer

    try:
        run(go)
        after = (gc.get_threshold(), gc.get_freeze_count())
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()
    for threshold, frozen in seen:
        assert threshold[0] >= 10_000 and threshold[1:] == before[1:]
        assert frozen > 0
    assert after == (before, 0)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0123456789ABCDEF0123456789ABCDEF",
        KEY_ID,
        '"etag-1"',
        " lead",
        "trail ",
        "two  spaces",
        "tab\there",
        "line\nbreak",
        "bell\x07",
        "del\x7f",
        "x" * 100,
        "x" * 101,
        "é accent",
        "zero\u200bwidth",
        "bidi\u202eover",
        "nbsp\u00a0here",
        "\u2028sep",
    ],
)
def test_one_line_fast_path_says_what_the_careful_path_says(text: str) -> None:
    careful = " ".join(
        "".join(
            c
            for c in text[:400]
            if c.isspace() or unicodedata.category(c) not in transport_module._UNSAFE
        ).split()
    )
    careful = careful if len(careful) <= 100 else careful[:99] + "…"
    assert _one_line(text, 100) == careful


def test_a_plain_request_id_is_not_looked_at_character_by_character(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looked = 0
    category = unicodedata.category

    class Counting:
        @staticmethod
        def category(c: str) -> str:
            nonlocal looked
            looked += 1
            return category(c)

    monkeypatch.setattr(transport_module, "unicodedata", Counting)
    answer = transport_module._answer(
        200, {"opc-request-id": "0123456789ABCDEF0123456789ABCDEF", "etag": '"e1"'}, b"{}", "X"
    )
    assert (answer.request_id, answer.etag) == ("0123456789ABCDEF0123456789ABCDEF", '"e1"')
    assert looked == 0


def test_requests_carry_our_user_agent_once_and_read_a_whole_body() -> None:
    """Without a skip list, aiohttp adds no User-Agent of its own beside ours, on a POST and
    a GET; a body is read whole whether it comes at once or in pieces."""
    agents: list[list[str]] = []

    async def record_agent(request: web.Request) -> web.StreamResponse:
        await request.read()
        agents.append(request.headers.getall("User-Agent", []))
        if request.method == "GET":
            return web.json_response({"run": {"info": {"run_id": "r1"}}})
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for piece in (b'{"a":', b' "', b"x" * 70_000, b'"}'):  # in pieces, over the cap
            await response.write(piece)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def go() -> tuple[Answer, dict[str, Any] | None, Answer]:
        app = web.Application()
        app.router.add_post("/api/2.0/mlflow/runs/log-model", record_agent)
        app.router.add_post("/api/2.0/mlflow/experiments/search", record_agent)
        app.router.add_get("/api/2.0/mlflow/runs/get", record_agent)
        async with serve(app) as url:
            target = MlflowTarget(url)
            async with transport(target) as t:
                small = await t.send(call_for(target, model_record("r1", 1)))
                run = await t.get_run("r1")
                large, _ = await t.request("experiments/search", {"max_results": 1}, large=True)
        return small, run, large

    small, run_read, large = run(go)
    assert agents == [["batchlog/0.1"]] * 3
    assert small.code == "NotTheApi"  # over 64 KiB: cut, whatever it holds
    assert run_read == {"info": {"run_id": "r1"}}
    assert large.status == 200 and not large.code  # read whole, in pieces
