"""The adaptive rate against simulated servers, on a simulated clock (no sleeping)."""

from __future__ import annotations

import heapq
import math
import random
import time

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
    monkeypatch.setattr(time, "monotonic", clock)
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
    monkeypatch.setattr(time, "monotonic", clock)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the clock moves instead
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(anyio, "sleep", sleep)
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
    monkeypatch.setattr(time, "monotonic", clock)
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
    monkeypatch.setattr(time, "monotonic", clock)
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


class FakeTime:
    """A clock that moves only when the test says, and an ``anyio.sleep`` that waits for it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []  # every sleep asked for
        self._timers: list[tuple[float, int, anyio.Event]] = []
        self._count = 0
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(anyio, "sleep", self.sleep)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        wake = anyio.Event()
        self._count += 1
        heapq.heappush(self._timers, (self.now + max(seconds, 0.0), self._count, wake))
        await wake.wait()

    async def settle(self) -> None:
        """Lets every task that can run, run (a bounded number of loop turns)."""
        for _ in range(30):
            await anyio.lowlevel.checkpoint()

    async def advance(self, seconds: float) -> None:
        """Moves the clock ``seconds`` on, waking each sleeper at its time."""
        end = self.now + seconds
        await self.settle()
        while self._timers and self._timers[0][0] <= end:
            at, _, wake = heapq.heappop(self._timers)
            self.now = max(self.now, at)
            wake.set()
            await self.settle()
        self.now = end


async def _pace(
    pacer: ratecontrol.Pacer, fake: FakeTime, seconds: float, workers: int
) -> list[float]:
    """``workers`` tasks acquiring in a loop for ``seconds`` of fake time: when each passed."""
    passed: list[float] = []

    async def worker() -> None:
        while True:
            await pacer.acquire()
            passed.append(fake.now)

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
        await fake.advance(seconds)
        tg.cancel_scope.cancel()
    return passed


def _most_in_any_window(times: list[float], width: float) -> int:
    times = sorted(times)
    j, most = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        most = max(most, i - j + 1)
    return most


@pytest.mark.parametrize("rate", [3.0, 50.0, 1000.0, 5000.0])
def test_the_pacer_keeps_its_rate_in_any_window_within_a_small_burst(
    monkeypatch: pytest.MonkeyPatch, rate: float
) -> None:
    fake = FakeTime(monkeypatch)
    pacer = ratecontrol.Pacer(rate)
    passed = anyio.run(_pace, pacer, fake, 3.0, 64)
    allowance = 0.01 * rate + 1  # a burst of 10 ms' worth, at least one
    for width in (1.0, 0.1, 0.01):
        assert _most_in_any_window(passed, width) <= rate * width + allowance, width
    assert len(passed) >= 0.97 * rate * 3.0  # and it lets the rate through, not less


def test_the_pacer_sleeps_once_per_burst_not_once_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by profile: one timer and one wake-up per request at 2,000 requests/s made each
    request reach the signing threads alone: 114 µs per request of thread hand-offs."""
    fake = FakeTime(monkeypatch)
    passed = anyio.run(_pace, ratecontrol.Pacer(4000.0), fake, 1.0, 64)
    assert len(passed) >= 3800
    assert len(fake.sleeps) <= len(passed) / 4, (len(fake.sleeps), len(passed))


def test_the_pacer_does_not_sleep_or_wait_when_credit_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Requests spaced at the rate pass without suspending: no lock, no timer, no checkpoint."""
    fake = FakeTime(monkeypatch)
    pacer = ratecontrol.Pacer(1000.0)

    async def main() -> None:
        for _ in range(200):
            fake.now += 0.001
            acquire = pacer.acquire()
            try:
                acquire.send(None)
            except StopIteration:
                continue
            acquire.close()
            pytest.fail("the acquisition suspended with credit available")

    anyio.run(main)
    assert fake.sleeps == []


def test_the_pacer_lets_waiters_through_in_the_order_they_came(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeTime(monkeypatch)
    pacer = ratecontrol.Pacer(100.0)
    order: list[int] = []

    async def one(n: int) -> None:
        await pacer.acquire()
        order.append(n)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for n in range(40):
                tg.start_soon(one, n)
                await fake.settle()  # queued before the next comes
                if n % 7 == 0:
                    await fake.advance(0.003)  # some pass while others still arrive
            await fake.advance(2.0)

    anyio.run(main)
    assert order == list(range(40))


def test_a_rate_change_applies_to_requests_already_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeTime(monkeypatch)
    pacer = ratecontrol.Pacer(1.0)
    passed: list[float] = []

    async def one() -> None:
        await pacer.acquire()
        passed.append(fake.now)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            await pacer.acquire()  # the credit there was: the next waits a second
            for _ in range(5):
                tg.start_soon(one)
            await fake.settle()
            assert passed == []
            start = fake.now
            pacer.set_rate(1000.0)
            await fake.advance(0.05)
            assert len(passed) == 5 and max(passed) <= start + 0.02, passed
            # and slower: those still waiting wait at the new rate, not the old one
            for _ in range(30):
                tg.start_soon(one)
            await fake.advance(0.002)
            before = len(passed)
            assert before < 35
            pacer.set_rate(10.0)
            await fake.advance(0.5)
            assert len(passed) - before <= 0.5 * 10 + 2, len(passed) - before
            await fake.advance(3.0)
            assert len(passed) == 35

    anyio.run(main)


def test_a_hold_stops_every_request_until_it_ends_and_earns_no_credit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeTime(monkeypatch)
    pacer = ratecontrol.Pacer(1000.0)
    passed: list[float] = []

    async def worker() -> None:
        while True:
            await pacer.acquire()
            passed.append(fake.now)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(worker)
            await fake.advance(0.5)
            pacer.hold(2.0)
            held_at, before = fake.now, len(passed)
            await fake.advance(1.99)
            assert len(passed) == before  # nothing while held, waiters or newcomers
            assert pacer.hold_until == held_at + 2.0
            await fake.advance(0.11)
            # after it: the rate again, no burst for the time held
            assert 80 <= len(passed) - before <= 100 + 0.01 * 1000 + 1
            tg.cancel_scope.cancel()

    anyio.run(main)
    later = FakeTime(monkeypatch)
    pacer = ratecontrol.Pacer(1000.0)
    pacer.hold(MAX_RETRY_AFTER * 100)  # capped, as for one call
    assert pacer.hold_until == later.now + MAX_RETRY_AFTER


def test_a_waiter_that_gives_up_leaves_the_line_moving(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime(monkeypatch)
    pacer = ratecontrol.Pacer(10.0)
    order: list[int] = []
    scopes: list[anyio.CancelScope] = []

    async def one(n: int) -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await pacer.acquire()
            order.append(n)

    async def main() -> None:
        await pacer.acquire()  # the credit there was
        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(one, n)
                await fake.settle()
            scopes[0].cancel()  # the first in line, timing the next slot
            scopes[3].cancel()
            await fake.advance(0.45)
            assert order == [1, 2, 4, 5]  # the rate, from the first that stayed

    anyio.run(main)


def test_a_job_with_no_limit_reaches_capacity_within_half_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by benchmark: a 3,000-request job spent most of its time in slow start (from
    200 requests/s, doubling every 0.25 s), at half the records/s of --no-adaptive."""
    ctl, _ = simulate(monkeypatch, 0.6)
    assert ctl.rate >= CAPACITY
    _, log = simulate(monkeypatch, 1)
    assert log[0][1] >= 0.5 * CAPACITY  # sent in the first second


@pytest.mark.parametrize(("limit", "most"), [(50, 0.2), (150, 0.08)])
def test_the_first_seconds_under_a_limit_cost_few_429s_and_little_time(
    monkeypatch: pytest.MonkeyPatch, limit: int, most: float
) -> None:
    """Found by test: at a limit of 50, the first measure (over 60 ms, the server's burst
    counted) was taken for the limit, twice it; the probe that corrected it went to half of
    the limit, and the first 5 s sent 71% of what the limit allowed."""
    _, log = simulate(monkeypatch, 5, limit=limit)
    ok = sum(s for _, s, _ in log[:2])
    bad = sum(b for _, _, b in log[:2])
    assert bad / (ok + bad) <= most  # the first 2 s
    assert sum(s for _, s, _ in log) >= 0.85 * 5 * limit  # the first 5 s


def job(
    monkeypatch: pytest.MonkeyPatch,
    records: int,
    limit: float | None = None,
    random_429: float = 0.0,
    latency: float = 0.02,
    capacity: float = CAPACITY,
    seed: int = 1,
) -> tuple[AdaptiveRate, float, int, int]:
    """A whole short job as the benchmark runs it: 0.4 s of start-up before the first
    request (connections, the first signatures), answers ``latency`` after each request, a
    token bucket (limit, burst limit/10) and/or a share of 429s at any rate. Returns the
    controller, the job's seconds (start-up included), successes and 429s."""
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    rng = random.Random(seed)
    ctl = AdaptiveRate()
    start = clock.now
    clock.now += 0.4
    level = burst = (limit or 0) / 10
    filled = clock.now
    answers: list[tuple[float, bool]] = []  # (when, success), in order
    credit, dt, ok, bad = 0.0, 0.0005, 0, 0
    while ok < records and clock.now < start + 300:
        clock.now += dt
        while answers and answers[0][0] <= clock.now:
            _, good = answers.pop(0)
            if good:
                ok += 1
                ctl.on_success()
            else:
                bad += 1
                ctl.on_throttle(None)
        # the pacer's bucket (10 ms) and 64 requests in flight at most
        credit = min(credit + min(ctl.rate, capacity) * dt, max(1.0, ctl.rate * 0.01))
        while credit >= 1 and len(answers) < 64:
            credit -= 1
            ctl._sent += 1  # what acquire() counts
            good = rng.random() >= random_429
            if good and limit:
                level = min(burst, level + (clock.now - filled) * limit)
                filled = clock.now
                good = level >= 1
                level -= 1 if good else 0
            answers.append((clock.now + latency, good))
    return ctl, clock.now - start, ok, bad


@pytest.mark.parametrize(("limit", "latency"), [(50, 0.02), (150, 0.02), (500, 0.02), (150, 0.1)])
def test_a_short_job_finds_an_unknown_limit_and_uses_it(
    monkeypatch: pytest.MonkeyPatch, limit: int, latency: float
) -> None:
    """Found by benchmark: a job of 20 s at a limit of 50 sent 78% of it (40% on a loaded
    machine): the 0.4 s of start-up before the first answer were counted in what the
    server accepted (17 req/s taken for the limit of 50), and the rate crept back at
    0.5% a window; at 500, the probe went to 114 and the climb back took 14 s."""
    ctl, seconds, ok, bad = job(monkeypatch, 20 * limit, limit=limit, latency=latency)
    assert ok / seconds >= 0.93 * limit, ok / seconds  # start-up and discovery included
    assert bad / (ok + bad) <= 0.02
    assert ctl.limit is not None and 0.9 * limit <= ctl.limit <= 1.1 * limit, ctl.limit


@pytest.mark.parametrize("seed", range(1, 7))
def test_one_off_429s_at_any_rate_do_not_hold_a_short_job_back(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Found by benchmark: 20% of requests answered 429 once (at any rate) made a job of
    1,000 records 3x slower: the first 429s were taken for a limit, the probe went to 16
    requests/s (start-up counted) and took 4 s to judge; or its noisy verdict took them
    for a limit for good."""
    capacity = 800.0  # what a loaded 2-core client sends at most
    ctl, seconds, ok, _ = job(monkeypatch, 1000, random_429=0.2, capacity=capacity, seed=seed)
    assert ok / seconds >= 0.3 * capacity, ok / seconds
    assert ctl.limit is None
    assert ctl.rate >= capacity


def test_a_stall_while_climbing_back_to_a_limit_is_not_taken_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by benchmark: climbing back after a probe, a loaded client stalled just after
    its first 429; the few successes after it measured a limit of 500 as 190, for good."""
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    ctl = AdaptiveRate()
    ctl._slow_start, ctl._ours = False, True  # a probe showed a limit under the old rate
    ctl._set(480.0)
    for _ in range(480):  # a second at 480/s, not one 429: the limit is above that
        clock.now += 1 / 480
        ctl.on_success()
    ctl._set(480.0 * AdaptiveRate.CLIMB)  # the next step up
    for _ in range(100):
        clock.now += 1 / 500
        ctl.on_success()
    ctl.on_throttle(None)  # over: then the client stalls for 0.2 s
    clock.now += 0.2
    for _ in range(15):
        clock.now += 0.001
        ctl.on_success()
    for _ in range(6):
        ctl.on_throttle(None)
    assert ctl.limit is not None and ctl.limit >= 350, ctl.limit  # not a fraction of it
