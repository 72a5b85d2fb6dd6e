"""How fast to send: a pacer whose rate can change, an adaptive controller, a fixed ceiling.

The server's limit is unknown. ``AdaptiveRate`` raises the rate while requests succeed and
the pacer is what holds requests back, and lowers it when a window's 429s say it is over
the limit, at most once per window. A user's ``--rate`` is a
fixed ceiling enforced by an ``aiolimiter.AsyncLimiter`` (which cannot change its rate, so
the changing part is this module's own pacer).
"""

from __future__ import annotations

import math
import time
from collections import deque

import anyio
from aiolimiter import AsyncLimiter

from batchlog.retry import MAX_RETRY_AFTER


class _Waiter:
    __slots__ = ("granted", "wake")

    def __init__(self) -> None:
        self.granted = False  # a slot is its own: it may go
        self.wake = anyio.Event()  # set when granted, or when it is first in line and must time


class Pacer:
    """A token bucket whose rate can change: credit accrues at ``rate`` up to BURST seconds'
    worth (at least one request), and each acquisition takes one.

    With credit there and nobody waiting, an acquisition passes at once (no lock, no timer).
    Otherwise it queues (FIFO); the first in line sleeps until half the bucket has accrued
    and then lets as many through as there is credit: one timer and one wake-up per burst,
    and a burst reaches the signing threads together instead of one request at a time. A
    rate change wakes that sleeper, so it applies to every request not yet let through. A
    hold (Retry-After) lets nothing through and earns no credit until it ends.
    """

    BURST = 0.01  # seconds' worth of requests that may pass at once

    __slots__ = ("_credit", "_depth", "_hold_until", "_rate", "_stamp", "_timer", "_waiters")

    def __init__(self, rate: float) -> None:
        self._rate = rate  # requests per second
        self._depth = max(1.0, rate * self.BURST)  # most credit the bucket holds
        self._credit = self._depth  # requests that may pass now
        self._stamp = time.monotonic()  # when credit was last brought up to date
        self._hold_until = 0.0  # nothing passes and no credit accrues before this (Retry-After)
        self._waiters: deque[_Waiter] = deque()  # in arrival order
        self._timer: anyio.CancelScope | None = None  # the first waiter's sleep

    def set_rate(self, rate: float) -> None:
        self._refill(time.monotonic())  # what accrued so far, at the old rate
        self._rate = rate
        self._depth = max(1.0, rate * self.BURST)
        self._credit = min(self._credit, self._depth)
        if self._timer is not None:  # the sleeper's wake-up was timed at the old rate
            self._timer.cancel()

    @property
    def hold_until(self) -> float:
        return self._hold_until

    def hold(self, seconds: float) -> None:
        """No slot for ``seconds`` (a Retry-After): at most MAX_RETRY_AFTER, as for one call."""
        if not 0.0 < seconds <= MAX_RETRY_AFTER:  # nan and inf too: a hold must end
            seconds = MAX_RETRY_AFTER if seconds > MAX_RETRY_AFTER else 0.0
        now = time.monotonic()
        self._refill(now)  # credit earned before the hold is kept, none during it
        self._hold_until = max(self._hold_until, now + seconds)

    def _refill(self, now: float) -> None:
        since = max(self._stamp, self._hold_until)
        if now > since:
            self._credit = min(self._depth, self._credit + (now - since) * self._rate)
        if now > self._stamp:
            self._stamp = now

    async def acquire(self) -> None:
        if not self._waiters:
            now = time.monotonic()
            self._refill(now)
            if self._credit >= 1.0 and now >= self._hold_until:
                self._credit -= 1.0
                return
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            while not waiter.granted:
                if self._waiters[0] is waiter:
                    await self._lead()
                else:
                    await waiter.wake.wait()
        except BaseException:  # cancelled: its place (or its slot) goes to the next
            if waiter.granted:
                self._credit += 1.0
            else:
                first = self._waiters[0] is waiter
                self._waiters.remove(waiter)
                if first and self._waiters:
                    self._waiters[0].wake.set()
            raise

    async def _lead(self) -> None:
        """First in line: sleep until half a bucket (or the hold's end), then grant."""
        now = time.monotonic()
        self._refill(now)
        # half the bucket: a late wake-up loses no credit, which accrues up to the whole
        want = max(1.0, math.floor(self._depth / 2))
        delay = max(0.0, self._hold_until - now) + max(0.0, want - self._credit) / self._rate
        if delay > 0.0:
            with anyio.CancelScope() as timer:
                self._timer = timer
                try:
                    await anyio.sleep(delay)
                finally:
                    self._timer = None
            now = time.monotonic()
            self._refill(now)
            if now < self._hold_until:
                return
        grants = min(len(self._waiters), math.floor(self._credit + 1e-9))
        self._credit -= grants
        for _ in range(grants):
            waiter = self._waiters.popleft()
            waiter.granted = True
            waiter.wake.set()
        if self._waiters:  # the next in line times the next burst
            self._waiters[0].wake.set()


class AdaptiveRate:
    """Finds the server's limit: grows while the pacer binds, backs off on excess 429s.

    Decisions are made once per window, so one overshoot's burst of 429s is one signal.
    A window with more 429s than the background share (plus sampling noise) is "over".
    The first time, the controller probes: it drops to half of what the server accepted and,
    a settling window later, looks again. If the 429s went away, a limit was found (what
    the server accepted while over it) and the rate settles just under it, creeping up
    slowly to follow a limit that rises. If they did not, they are not caused by our rate
    (some servers throttle a share of requests at any rate): the rate is restored and that
    share becomes the background. Once a limit is known, going over it again costs no
    probe: the rate drops straight to just under the newly measured limit, unless that is
    far below the known one (429s of another kind, which must not ratchet the rate down).
    """

    __slots__ = (
        "_background",
        "_ceiling",
        "_floor",
        "_held_until",
        "_limit",
        "_ok",
        "_pacer",
        "_probe",
        "_quiet",
        "_recent",
        "_settling",
        "_slow_start",
        "_started",
        "_throttled",
        "_window",
        "_window_start",
        "rate",
    )

    MIN_EVENTS = 40  # answers needed before a window is judged (or 4 windows' time)
    MARGIN = 0.02  # 429 share above the background that means "over the limit"
    QUICK_THROTTLES = 5  # this many 429s end a window early: react within a fraction of it
    BELOW = 0.97  # where to settle, as a share of the measured limit
    PROBE = 0.5  # where to probe, as a share of what the server accepted
    PROBE_MEASURED = 0.8  # the same, when that was measured over a whole HORIZON
    CREEP = 1.005  # growth per window once a limit is known, times the quiet windows
    GROW = 1.05  # growth per window before a limit is known, after slow start
    HORIZON = 1.0  # seconds over which the accepted rate is measured
    # slow start's window, as a share of the window: the rate doubles on each MIN_EVENTS
    # answers, 50 ms apart at least (a job with no limit at 3,200/s in 0.4 s, not 1 s)
    SLOW = 0.1

    def __init__(
        self,
        initial: float = 200.0,
        ceiling: float | None = None,
        floor: float = 1.0,
        window: float = 0.5,
    ) -> None:
        self._ceiling = ceiling if ceiling is not None else math.inf  # never exceeded
        self._floor = floor  # never gone below
        self._window = window  # seconds between two decisions (SLOW of that in slow start)
        self._slow_start = True  # double per window until the first 429s
        self._started = self._window_start = time.monotonic()  # start; current window's start
        self._recent: deque[float] = deque()  # times of the successes of the last HORIZON
        self._ok = 0  # successes in the current window
        self._throttled = 0  # 429s in the current window
        self._background = 0.0  # share of 429s that lowering the rate does not remove
        self._limit: float | None = None  # the server's limit, once measured
        self._probe: tuple[float, float, bool, float] | None = None
        # while probing: (rate before, 429 share seen, slow start before, accepted rate seen)
        self._settling = False  # a window of answers to requests sent before a change
        self._quiet = 0  # windows in a row without going over, since the limit was found
        self._held_until = -math.inf  # end of the last Retry-After hold: nothing was sent
        self.rate = min(initial, self._ceiling)  # requests per second now
        self._pacer = Pacer(self.rate)

    @property
    def limit(self) -> float | None:
        return self._limit

    async def acquire(self) -> None:
        await self._pacer.acquire()

    def on_success(self) -> None:
        self._ok += 1
        now = time.monotonic()
        self._recent.append(now)
        while now - self._recent[0] > self.HORIZON:
            self._recent.popleft()
        self._judge(now)

    def on_throttle(self, retry_after: float | None) -> None:
        if retry_after:
            self._pacer.hold(retry_after)
            self._held_until = max(self._held_until, self._pacer.hold_until)
        self._throttled += 1
        self._judge(time.monotonic())

    def _accepted(self, now: float) -> float:
        """Successes per second over the last HORIZON seconds: what the server let through
        (found by test: time held by a Retry-After, when nothing was sent, is no measure of
        it; one 429 with Retry-After: 3 took a small job's rate from 200 to 1)."""
        since = max(self._started, self._held_until)
        span = min(self.HORIZON, max(now - since, 0.05))
        return sum(1 for t in self._recent if t >= since) / span

    def _judge(self, now: float) -> None:
        if now < self._held_until:  # holding on the server's word: nothing to measure
            return
        elapsed = now - max(self._window_start, self._held_until)
        events = self._ok + self._throttled
        if elapsed < 0.05 or not events:
            return
        window = self._window * self.SLOW if self._slow_start else self._window
        share = self._throttled / events
        bg = self._background
        noise = 3.0 * math.sqrt(bg * (1.0 - bg) / events)  # sampling noise of the background
        # one 429 is not "over": a server may throttle one request for its own reasons
        over = self._throttled > 1 and share > bg + self.MARGIN + noise
        patience = 16 if self._probe is not None else 4  # a probe's verdict needs evidence
        due = elapsed >= window and (events >= self.MIN_EVENTS or elapsed >= patience * window)
        quick = over and self._throttled >= self.QUICK_THROTTLES and not self._settling
        if not (due or quick):
            return
        self._window_start = now
        self._ok = self._throttled = 0
        if self._settling:  # answers to requests sent before the change: not evidence
            self._settling = False
            return
        accepted = self._accepted(now)
        probe, self._probe = self._probe, None
        if probe is not None:
            before, probe_share, slow_start, probe_accepted = probe
            # well under any limit now: the 429s left are the background, whatever else
            self._background = share
            if share > 0.5 * probe_share:  # they did not go away: not our doing
                self._slow_start = slow_start
                self._set(before)
            else:
                self._found(probe_accepted)
        elif (
            over
            and self._limit is not None
            and self.rate >= 0.9 * self._limit
            and accepted >= 0.8 * self._limit
        ):
            self._found(accepted)  # the known limit again: re-measured, no probe needed
        elif over:
            self._probe = (self.rate, share, self._slow_start, accepted)
            self._slow_start = False
            self._settling = True
            # accepted over less than HORIZON counts the server's burst: probe deeper
            full = now - max(self._started, self._held_until) >= self.HORIZON
            self._set(min(self.rate, accepted) * (self.PROBE_MEASURED if full else self.PROBE))
        else:
            if self._limit is None or self.rate < 0.95 * self._limit:  # surely under it
                self._background = 0.9 * bg + 0.1 * share  # follows a background that moves
            if events >= 0.8 * self.rate * elapsed:  # the rate is in use: it may be what binds
                self._quiet += 1
                if self._slow_start:
                    step = 2.0
                elif self._limit:  # probe above a known limit, bolder the longer it holds
                    step = min(self.GROW, 1.0 + (self.CREEP - 1.0) * self._quiet)
                else:
                    step = self.GROW
                self._set(self.rate * step)

    def _found(self, limit: float) -> None:
        self._limit = limit
        self._quiet = 0
        self._slow_start = False
        self._set(limit * self.BELOW)

    def _set(self, rate: float) -> None:
        self.rate = max(self._floor, min(self._ceiling, rate))
        self._pacer.set_rate(self.rate)


class FixedRate:
    """``--rate R`` with adaptation off: an aiolimiter bucket, R per second, small bursts."""

    __slots__ = ("_limiter", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        period = max(0.05, 1.0 / rate)  # a burst of at most 5% of a second's worth
        self._limiter = AsyncLimiter(rate * period, period)

    async def acquire(self) -> None:
        await self._limiter.acquire()

    def on_success(self) -> None:
        return None

    def on_throttle(self, retry_after: float | None) -> None:
        return None


class Unlimited:
    """No rate limit: only the concurrency bounds the load."""

    __slots__ = ("rate",)

    def __init__(self) -> None:
        self.rate = math.inf

    async def acquire(self) -> None:
        return None

    def on_success(self) -> None:
        return None

    def on_throttle(self, retry_after: float | None) -> None:
        return None


class CeilingRate:
    """Adaptive rate under a user's hard ceiling (an aiolimiter bucket)."""

    __slots__ = ("_adaptive", "_ceiling")

    def __init__(self, ceiling: float) -> None:
        self._adaptive = AdaptiveRate(ceiling=ceiling)
        self._ceiling = FixedRate(ceiling)

    @property
    def rate(self) -> float:
        return self._adaptive.rate

    async def acquire(self) -> None:
        await self._adaptive.acquire()
        await self._ceiling.acquire()

    def on_success(self) -> None:
        self._adaptive.on_success()

    def on_throttle(self, retry_after: float | None) -> None:
        self._adaptive.on_throttle(retry_after)


RateGate = AdaptiveRate | FixedRate | Unlimited | CeilingRate


def make_gate(rate: float | None, adaptive: bool) -> RateGate:
    if rate is None:
        return AdaptiveRate() if adaptive else Unlimited()
    return CeilingRate(rate) if adaptive else FixedRate(rate)
