"""How fast to send: a pacer whose rate can change, an adaptive controller, a fixed ceiling.

The server's limit is unknown. ``AdaptiveRate`` raises the rate while requests succeed and
the pacer is what holds requests back, and lowers it on 429, at most once per ``window`` so
that the burst of 429s one overshoot causes counts as one signal. A user's ``--rate`` is a
fixed ceiling enforced by an ``aiolimiter.AsyncLimiter`` (which cannot change its rate, so
the changing part is this module's own pacer).
"""

from __future__ import annotations

import math
import time

import anyio
from aiolimiter import AsyncLimiter


class Pacer:
    """Spaces acquisitions ``1/rate`` apart; a reservation scheme, so the average is exact."""

    __slots__ = ("_hold_until", "_interval", "_next", "last_wait")

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate  # seconds between two acquisitions
        self._next = 0.0  # monotonic time of the next free slot
        self._hold_until = 0.0  # no slot before this (Retry-After)
        self.last_wait = 0.0  # monotonic time an acquisition last had to wait

    def set_rate(self, rate: float) -> None:
        self._interval = 1.0 / rate

    def hold(self, seconds: float) -> None:
        self._hold_until = max(self._hold_until, time.monotonic() + seconds)

    async def acquire(self) -> None:
        now = time.monotonic()
        slot = max(now, self._next, self._hold_until)
        self._next = slot + self._interval
        if slot > now:
            self.last_wait = now
            await anyio.sleep(slot - now)


class AdaptiveRate:
    """AIMD with slow start, one decrease per window, growth only while the rate binds."""

    __slots__ = (
        "_ceiling", "_floor", "_last_decrease", "_pacer", "_slow_start", "_window", "rate",
    )

    def __init__(
        self,
        initial: float = 50.0,
        ceiling: float | None = None,
        floor: float = 1.0,
        window: float = 0.5,
    ) -> None:
        self._ceiling = ceiling if ceiling is not None else math.inf  # never exceeded
        self._floor = floor  # never gone below
        self._window = window  # seconds: at most one decrease per window
        self._slow_start = True  # grow fast until the first 429
        self._last_decrease = -math.inf  # monotonic time of the last decrease
        self.rate = min(initial, self._ceiling)  # requests per second now
        self._pacer = Pacer(self.rate)

    async def acquire(self) -> None:
        await self._pacer.acquire()

    def _binding(self, now: float) -> bool:
        return now - self._pacer.last_wait < self._window

    def on_success(self) -> None:
        now = time.monotonic()
        if not self._binding(now):
            return  # something else (concurrency, latency) limits us: do not drift upward
        step = 1.0 if self._slow_start else 0.02  # slow start doubles in < 1 s, then ~+2%/s
        self._set(self.rate + step)

    def on_throttle(self, retry_after: float | None) -> None:
        now = time.monotonic()
        if retry_after:
            self._pacer.hold(retry_after)
        if now - self._last_decrease < self._window:
            return
        self._last_decrease = now
        self._set(self.rate * (0.7 if self._slow_start else 0.9))
        self._slow_start = False

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
