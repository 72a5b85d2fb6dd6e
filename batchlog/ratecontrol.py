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

import anyio
from aiolimiter import AsyncLimiter


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

    def hold(self, seconds: float) -> None:
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

    Decisions are made once per ``window``, so one overshoot's burst of 429s is one signal.
    A window with more 429s than the background share (plus sampling noise) means the rate
    is over the limit: the rate drops to just under what the server accepted in that
    window, which is the limit itself when a token bucket answers the 429s. The next window
    checks the diagnosis: if the 429s did not go away with the lower rate, they are not
    caused by our rate (some servers throttle a share of requests at any rate); the rate
    is restored and that share becomes the background.
    """

    __slots__ = (
        "_background",
        "_ceiling",
        "_floor",
        "_ok",
        "_pacer",
        "_probe",
        "_settling",
        "_slow_start",
        "_throttled",
        "_window",
        "_window_start",
        "rate",
    )

    MIN_EVENTS = 20  # answers needed before a window is judged
    MARGIN = 0.02  # 429 share above the background that means "over the limit"

    def __init__(
        self,
        initial: float = 100.0,
        ceiling: float | None = None,
        floor: float = 1.0,
        window: float = 0.5,
    ) -> None:
        self._ceiling = ceiling if ceiling is not None else math.inf  # never exceeded
        self._floor = floor  # never gone below
        self._window = window  # seconds between two decisions
        self._slow_start = True  # double per window until the first decrease
        self._window_start = time.monotonic()  # when the current window began
        self._ok = 0  # successes in the current window
        self._throttled = 0  # 429s in the current window
        self._background = 0.0  # share of 429s that lowering the rate does not remove
        self._probe: tuple[float, float, bool] | None = None
        # after a decrease: (rate before it, 429 share that caused it, slow start before it)
        self._settling = False  # the window after a change: answers to requests sent before
        self.rate = min(initial, self._ceiling)  # requests per second now
        self._pacer = Pacer(self.rate)

    async def acquire(self) -> None:
        await self._pacer.acquire()

    def on_success(self) -> None:
        self._ok += 1
        self._judge()

    def on_throttle(self, retry_after: float | None) -> None:
        if retry_after:
            self._pacer.hold(retry_after)
        self._throttled += 1
        self._judge()

    def _judge(self) -> None:
        now = time.monotonic()
        elapsed = now - self._window_start
        events = self._ok + self._throttled
        if elapsed < self._window or (events < self.MIN_EVENTS and elapsed < 4 * self._window):
            return
        if self._settling:  # answers to requests sent before the change: not evidence
            self._settling = False
            self._window_start = now
            self._ok = self._throttled = 0
            return
        share = self._throttled / events
        bg = self._background
        noise = 3.0 * math.sqrt(max(bg, 0.01) * (1.0 - bg) / events)
        over = self._throttled > 0 and share > bg + self.MARGIN + noise
        probe, self._probe = self._probe, None
        if over and probe is not None and share > 0.5 * probe[1]:
            # lowering the rate did not remove the 429s: they are background, not our doing
            self._background = share
            self._slow_start = probe[2]
            self._set(probe[0])
        elif over:
            self._probe = (self.rate, share, self._slow_start)
            accepted = self._ok / elapsed  # what the server let through
            self._set(max(self.rate * 0.5, min(self.rate * 0.95, accepted * 0.97)))
            self._slow_start = False
            self._settling = True
        else:
            if share < bg:
                self._background = 0.8 * bg + 0.2 * share
            if now - self._pacer.last_wait < elapsed:  # the pacer held requests back
                self._set(self.rate * (2.0 if self._slow_start else 1.01))
        self._window_start = now
        self._ok = self._throttled = 0

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
