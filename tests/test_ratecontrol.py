"""The adaptive rate against simulated servers, on a simulated clock (no sleeping)."""

from __future__ import annotations

import math
import random

import anyio
import pytest

from batchlog import ratecontrol
from batchlog.ratecontrol import AdaptiveRate
from batchlog.retry import MAX_RETRY_AFTER

CAPACITY = 3200.0  # what the client could send anyway: 64 in flight, 20 ms latency


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def simulate(
    monkeypatch: pytest.MonkeyPatch,
    seconds: float,
    limit: float | None = None,
    random_429: float = 0.0,
    ceiling: float | None = None,
    seed: int = 1,
) -> tuple[AdaptiveRate, list[tuple[float, int, int]]]:
    """Send at the controller's rate for ``seconds``; a token bucket (limit, burst limit/10)
    and/or a share of random 429s answer. Returns the controller and per-second
    (rate, successes, 429s)."""
    clock = Clock()
    monkeypatch.setattr(ratecontrol.time, "monotonic", clock)
    rng = random.Random(seed)
    ctl = AdaptiveRate(ceiling=ceiling)
    level = burst = (limit or 0) / 10
    credit = 0.0
    dt = 0.001
    seconds_log: list[tuple[float, int, int]] = []
    ok = bad = 0
    next_mark = clock.now + 1
    end = clock.now + seconds
    while clock.now < end:
        clock.now += dt
        if limit:
            level = min(burst, level + limit * dt)
        credit += min(ctl.rate, CAPACITY) * dt
        while credit >= 1:
            credit -= 1
            if rng.random() < random_429 or (limit and level < 1):
                bad += 1
                ctl.on_throttle(None)
            else:
                if limit:
                    level -= 1
                ok += 1
                ctl.on_success()
        if clock.now >= next_mark:
            seconds_log.append((ctl.rate, ok, bad))
            ok = bad = 0
            next_mark += 1
    return ctl, seconds_log


@pytest.mark.parametrize("limit", [50, 150, 500, 2000])
def test_finds_an_unknown_limit_and_stays_just_under_it(
    monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    ctl, log = simulate(monkeypatch, 60, limit=limit)
    steady = log[10:]
    ok = sum(s for _, s, _ in steady)
    bad = sum(b for _, _, b in steady)
    assert ok / (len(steady) * limit) >= 0.95  # at least 95% of the limit
    assert bad / (ok + bad) <= 0.02  # at most 2% of requests throttled
    assert ctl.limit is not None and 0.9 * limit <= ctl.limit <= 1.1 * limit


def test_random_429s_do_not_drag_the_rate_down(monkeypatch: pytest.MonkeyPatch) -> None:
    ctl, _ = simulate(monkeypatch, 30, random_429=0.2)
    assert ctl.rate > 1000  # kept growing: the 429s were recognised as background
    assert ctl.limit is None


def test_random_429s_under_a_real_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    _, log = simulate(monkeypatch, 60, limit=300, random_429=0.1)
    steady = log[15:]
    ok = sum(s for _, s, _ in steady) / len(steady)
    assert ok >= 0.9 * 300


def test_never_exceeds_the_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    ctl, log = simulate(monkeypatch, 20, ceiling=120)
    assert max(rate for rate, _, _ in log) <= 120
    assert ctl.rate == 120


@pytest.mark.parametrize("retry_after", [100_000.0, 1e308, math.inf, math.nan, -5.0])
def test_a_retry_after_holds_the_shared_pacer_no_longer_than_the_cap(
    monkeypatch: pytest.MonkeyPatch, retry_after: float
) -> None:
    """One ``Retry-After: 100000`` held every request of the job for 28 hours; inf for ever."""
    clock = Clock()
    monkeypatch.setattr(ratecontrol.time, "monotonic", clock)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the clock moves instead
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(ratecontrol.anyio, "sleep", sleep)
    for gate in (AdaptiveRate(), ratecontrol.make_gate(50.0, adaptive=True)):
        slept.clear()
        gate.on_throttle(retry_after)

        async def twice(gate: ratecontrol.RateGate = gate) -> None:
            await gate.acquire()
            await gate.acquire()

        anyio.run(twice)
        assert all(0.0 <= s <= MAX_RETRY_AFTER for s in slept), slept
    assert AdaptiveRate().rate > 0  # and the controller still works


@pytest.mark.parametrize("capacity", [CAPACITY, 40.0, 8.0])
def test_one_429_with_a_retry_after_does_not_collapse_the_rate(
    monkeypatch: pytest.MonkeyPatch, capacity: float
) -> None:
    """Found by test: one 429 with ``Retry-After: 3`` from a server with no limit took the
    job's rate from 200 to 1 request/s, crawling back to 3 a minute later: the accepted
    rate measured across the hold (nothing sent) was taken for the server's limit."""
    clock = Clock()
    monkeypatch.setattr(ratecontrol.time, "monotonic", clock)
    ctl = AdaptiveRate()
    credit, dt, start = 0.0, 0.001, clock.now
    throttled = False
    while clock.now < start + 20:
        clock.now += dt
        if clock.now < ctl._pacer.hold_until:  # the pacer lets nothing through
            continue
        credit += min(ctl.rate, capacity) * dt  # a small job: few requests in flight
        while credit >= 1:
            credit -= 1
            if not throttled and clock.now >= start + 2:
                throttled = True
                ctl.on_throttle(3.0)
            else:
                ctl.on_success()
    assert throttled
    assert ctl.rate >= 150, ctl.rate  # the server has no limit: one 429 is not one
    assert ctl.limit is None, ctl.limit


@pytest.mark.parametrize("retry_after", [9.0, 2.0])
def test_429s_with_a_retry_after_at_the_start_leave_the_rate_where_it_was(
    monkeypatch: pytest.MonkeyPatch, retry_after: float
) -> None:
    """Found by newcomer review: a proxy answering 429 with Retry-After for the job's first
    seconds, before any success, left the rate at 1 request/s for minutes."""
    clock = Clock()
    monkeypatch.setattr(ratecontrol.time, "monotonic", clock)
    ctl = AdaptiveRate()
    credit, dt, start = 0.0, 0.001, clock.now
    while clock.now < start + 30:
        clock.now += dt
        if clock.now < ctl._pacer.hold_until:
            continue
        credit += min(ctl.rate, 40.0) * dt  # 4 in flight, 100 ms
        while credit >= 1:
            credit -= 1
            if clock.now < start + 4:
                ctl.on_throttle(retry_after)
            else:
                ctl.on_success()
    # what the client can send (40/s) is what binds, never the rate: the outage may be taken
    # for a limit where the job stood, not one at a fraction of it
    assert ctl.rate >= 40, ctl.rate
