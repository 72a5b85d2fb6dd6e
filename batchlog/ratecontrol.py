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


class Pacer:
    """Lets acquisitions through ``1/rate`` apart, one waiter timing at a time (FIFO).

    Waiters queue on a lock, and only its holder sleeps until its slot: a rate change
    applies to every request not yet let through, not only to those that arrive later.
    """

    __slots__ = ("_hold_until", "_interval", "_lock", "_next", "last_wait")

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate  # seconds between two acquisitions
        self._next = 0.0  # monotonic time of the next free slot
        self._hold_until = 0.0  # no slot before this (Retry-After)
        self._lock = anyio.Lock()  # the queue of waiters
        self.last_wait = -math.inf  # monotonic time an acquisition last had to wait

    def set_rate(self, rate: float) -> None:
        self._interval = 1.0 / rate

    @property
    def hold_until(self) -> float:
        return self._hold_until

    def hold(self, seconds: float) -> None:
        """No slot for ``seconds`` (a Retry-After): at most MAX_RETRY_AFTER, as for one call."""
        if not 0.0 < seconds <= MAX_RETRY_AFTER:  # nan and inf too: a hold must end
            seconds = MAX_RETRY_AFTER if seconds > MAX_RETRY_AFTER else 0.0
        self._hold_until = max(self._hold_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            slot = max(now, self._next, self._hold_until)
            if slot > now:
                self.last_wait = now
                await anyio.sleep(slot - now)
            self._next = slot + self._interval


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
    CREEP = 1.005  # growth per window once a limit is known, times the quiet windows
    GROW = 1.05  # growth per window before a limit is known, after slow start
    HORIZON = 1.0  # seconds over which the accepted rate is measured

    def __init__(
        self,
        initial: float = 200.0,
        ceiling: float | None = None,
        floor: float = 1.0,
        window: float = 0.5,
    ) -> None:
        self._ceiling = ceiling if ceiling is not None else math.inf  # never exceeded
        self._floor = floor  # never gone below
        self._window = window  # seconds between two decisions (half that in slow start)
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
        window = self._window / 2 if self._slow_start else self._window
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
            self._set(min(self.rate, accepted) * self.PROBE)
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
