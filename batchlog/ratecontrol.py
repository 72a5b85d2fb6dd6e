"""How fast to send: a pacer whose rate can change, an adaptive controller, a fixed ceiling.

The server's limit is unknown. ``AdaptiveRate`` raises the rate while requests succeed and
the pacer is what holds requests back, and lowers it when a window's 429s say it is over
the limit, at most once per window. A user's ``--rate`` is a
fixed ceiling enforced by an ``aiolimiter.AsyncLimiter`` (which cannot change its rate, so
the changing part is this module's own pacer).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

import anyio
from aiolimiter import AsyncLimiter

from batchlog.retry import MAX_RETRY_AFTER

# one debug line per decision of the adaptive controller (a trace of its rate over time;
# benchmarks/run.py --trace-rate turns it on)
trace = logging.getLogger("batchlog.ratecontrol")


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
    The first time, the controller probes: it drops well under what the server accepted
    (a third of it when measured over less than HORIZON, which counts the server's burst)
    and, once the requests sent before are answered, looks again. If the 429s went away,
    they are the server's limit: the rate climbs back (halfway to where they began, then
    40% a window) until it is over again, and what the server accepted from the first 429
    of that overshoot on is the limit (its bucket is empty then: no burst is counted). The
    rate settles just under it, creeping up after a while to follow a limit that rises. If
    they came as often at the lower rate, they are not caused by our rate (some servers
    throttle a share of requests at any rate): the rate is restored and that share becomes
    the background. If they came less often but still came, the probe was still over the
    limit: it goes deeper. Once a limit is known, going over it again costs no probe: the
    rate drops straight to just under the newly measured limit (10% lower at most at a
    time), unless that is far below the known one (429s of another kind, which must not
    ratchet the rate down); below a known limit after a probe, it climbs back at once.

    Times are counted from the first answer, not from construction: the job's start-up
    (connections, the first signatures) is no measure of the server (found by benchmark:
    0.4 s of start-up counted took a limit of 50 for 17, and 20% one-off 429s for a limit).
    """

    __slots__ = (
        "_answers",
        "_background",
        "_ceiling",
        "_first_429",
        "_floor",
        "_held_until",
        "_limit",
        "_ok",
        "_ours",
        "_pacer",
        "_probe",
        "_quiet",
        "_recent",
        "_sent",
        "_settle_until",
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
    BELOW = 0.99  # where to settle, as a share of the measured limit
    PROBE = 0.35  # where to probe, as a share of what the server accepted
    PROBE_MEASURED = 0.8  # the same, when that was measured over a whole HORIZON
    # a probe's 429 share under GONE times the one that set it off (and no more than the
    # background): the limit's; at least SAME times: not caused by our rate; between: deeper
    GONE = 0.5
    SAME = 0.6
    CREEP = 1.002  # growth per window once a limit is known, times the quiet windows
    # quiet windows at a known limit before creeping above it (found by benchmark: creeping
    # at once, a limit of 50 was overshot every 4 s, a third of the job's 429s)
    PATIENCE = 8
    GROW = 1.05  # growth per window before a limit is known, after slow start
    CLIMB = 1.4  # growth per window after a probe showed the limit is under the old rate
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
        self._started = -math.inf  # the first answer's time (set then)
        self._window_start = time.monotonic()  # current window's start
        self._recent: deque[float] = deque()  # times of the successes of the last HORIZON
        self._ok = 0  # successes in the current window
        self._throttled = 0  # 429s in the current window
        self._first_429: tuple[float, int] | None = None  # the window's first 429: (time, ok)
        self._background = 0.0  # share of 429s that lowering the rate does not remove
        self._limit: float | None = None  # the server's limit, once measured
        self._ours = False  # a probe showed the 429s come from our rate: there is a limit
        self._probe: tuple[float, float, bool, float] | None = None
        # while probing: (rate before, 429 share seen, slow start before, accepted seen)
        self._settling = False  # a window of answers to requests sent before a change
        self._sent = 0  # requests let through
        self._answers = 0  # successes and 429s (answers of other kinds are not counted)
        self._settle_until = 0  # settling ends at this many answers (or a window's time)
        self._quiet = 0  # windows in a row without going over, since the limit was found
        self._held_until = -math.inf  # end of the last Retry-After hold: nothing was sent
        self.rate = min(initial, self._ceiling)  # requests per second now
        self._pacer = Pacer(self.rate)

    @property
    def limit(self) -> float | None:
        return self._limit

    async def acquire(self) -> None:
        await self._pacer.acquire()
        self._sent += 1

    def on_success(self) -> None:
        self._ok += 1
        self._answers += 1
        now = time.monotonic()
        if self._started < 0.0:
            self._started = self._window_start = now
        self._recent.append(now)
        while now - self._recent[0] > self.HORIZON:
            self._recent.popleft()
        self._judge(now)

    def on_throttle(self, retry_after: float | None) -> None:
        now = time.monotonic()
        if self._started < 0.0:
            self._started = self._window_start = now
        if retry_after:
            self._pacer.hold(retry_after)
            self._held_until = max(self._held_until, self._pacer.hold_until)
        if self._first_429 is None:
            self._first_429 = (now, self._ok)
        self._throttled += 1
        self._answers += 1
        self._judge(now)

    def _accepted(self, now: float) -> float:
        """Successes per second over the last HORIZON seconds: what the server let through
        (found by test: time held by a Retry-After, when nothing was sent, is no measure of
        it; one 429 with Retry-After: 3 took a small job's rate from 200 to 1)."""
        since = max(self._started, self._held_until)
        span = min(self.HORIZON, max(now - since, 0.05))
        return sum(1 for t in self._recent if t >= since) / span

    def _saturated(self, now: float) -> float | None:
        """What the server accepted from this window's first 429 on, when over its limit:
        its bucket was empty then, so its burst is not counted (None when that span is
        too short to say)."""
        if self._first_429 is None:
            return None
        at, ok = self._first_429
        span = now - max(at, self._held_until)
        if span < 0.1 or self._ok - ok < 10:
            return None
        # the first success after the 429 came up to 1/R later (half of it on average):
        # counted whole, a limit of 50 was taken for 52.9
        return (self._ok - ok - 0.5) / span

    def _judge(self, now: float) -> None:
        if now < self._held_until:  # holding on the server's word: nothing to measure
            return
        elapsed = now - max(self._window_start, self._held_until)
        events = self._ok + self._throttled
        if elapsed < 0.05 or not events:
            return
        # a probe's verdict needs MIN_EVENTS answers, not a whole window: its rate is low
        short = self._slow_start or self._probe is not None
        window = self._window * self.SLOW if short else self._window
        share = self._throttled / events
        bg = self._background
        # sampling noise of the background (3 sigma; 4 to cut a window short, which is
        # judged again on every answer), and one 429 more for small windows (found by
        # test: 6 of 12 against a background of 20% probed, then took that for a limit)
        sigma = math.sqrt(bg * (1.0 - bg) / events)
        noise = 3.0 * sigma + 1.0 / events
        # one 429 is not "over": a server may throttle one request for its own reasons
        over = self._throttled > 1 and share > bg + self.MARGIN + noise
        # a probe's verdict needs evidence: up to 16 windows' time for MIN_EVENTS answers
        patience = 16 * self._window if self._probe is not None else 4 * window
        due = elapsed >= window and (events >= self.MIN_EVENTS or elapsed >= patience)
        quick = (
            self._throttled >= self.QUICK_THROTTLES
            and share > bg + self.MARGIN + noise + sigma
            # climbing back to a limit: a window long enough to measure it
            and not (self._ours and self._limit is None and self._saturated(now) is None)
        )
        if self._settling:
            # answers to requests sent before the change are no evidence: settled once
            # as many answers came as requests had gone (some are never counted: or after
            # 4 windows); found by benchmark: a whole window to settle made a probe at 40
            # requests/s last 2 s, and a window's answers at 100 ms latency were not enough
            due = self._answers >= self._settle_until or elapsed >= 4 * self._window
            quick = False
        if not (due or quick):
            return
        if trace.isEnabledFor(logging.DEBUG):
            self._trace(now, elapsed, share, over)
        accepted = self._accepted(now)
        saturated = self._saturated(now) if over else None
        if saturated is None:
            saturated = accepted
        self._window_start = now
        self._ok = self._throttled = 0
        self._first_429 = None
        if self._settling:  # answers to requests sent before the change: not evidence
            self._settling = False
            return
        probe, self._probe = self._probe, None
        if probe is not None:
            before, probe_share, slow_start, seen = probe
            if not over and share < self.GONE * probe_share:  # gone: a limit, below before
                self._ours = True
                self._background = 0.9 * bg + 0.1 * share
                # halfway (geometrically) to where the limit was seen, measured short or
                # while the rate still grew: it may be off either way
                self._set(self.rate * max(self.CLIMB, math.sqrt(seen / self.rate)))
            elif share >= self.SAME * probe_share:  # as many at a lower rate: not our doing
                self._background = min(share, probe_share)
                self._slow_start = slow_start
                self._set(before)
            else:  # fewer but not gone: still over the limit, go deeper
                self._probe = (before, share, slow_start, saturated)
                self._settling = True
                self._set(min(self.rate, saturated) * self.PROBE_MEASURED)
        elif over and self._limit is None and self._ours:
            # over again, climbing from the probe: measured; not under what the server let
            # through from the last step, which was not over (found by benchmark: a stall
            # of the loaded client after the first 429 measured a limit of 500 as 190)
            self._found(max(saturated, min(accepted, self.rate / self.CLIMB)))
        elif (
            over
            and self._limit is not None
            and self.rate >= 0.9 * self._limit
            and saturated >= 0.8 * self._limit
        ):
            # the known limit again: re-measured, no probe needed; 10% lower at most per
            # overshoot (found by benchmark: a loaded client's stall, then a burst of 429s,
            # took its own slowness for the limit: 44 for 50)
            self._found(max(saturated, 0.9 * self._limit))
        elif over:
            self._probe = (self.rate, share, self._slow_start, min(self.rate, accepted))
            self._slow_start = False
            self._settling = True
            # accepted over less than HORIZON counts the server's burst: probe deeper
            full = now - max(self._started, self._held_until) >= self.HORIZON
            self._set(min(self.rate, accepted) * (self.PROBE_MEASURED if full else self.PROBE))
        else:
            if self._limit is None or self.rate < 0.95 * self._limit:  # surely under it
                self._background = 0.9 * bg + 0.1 * share  # follows a background that moves
            else:  # near the limit its own 429s may count: the background may only fall
                self._background = min(bg, 0.9 * bg + 0.1 * share)
            if events >= 0.8 * self.rate * elapsed:  # the rate is in use: it may be what binds
                self._quiet += 1
                if self._slow_start:
                    step = 2.0
                elif self._limit and self.rate < 0.9 * self._limit:
                    # back up to a known limit after a probe (found by benchmark: a stall's
                    # 429s probed a job at a limit of 50 down to 28, and it crept back at
                    # 0.2% a window)
                    step = min(self.CLIMB, self.BELOW * self._limit / self.rate)
                elif self._limit:  # probe above a known limit, bolder the longer it holds
                    creep = max(0, self._quiet - self.PATIENCE)
                    step = min(self.GROW, 1.0 + (self.CREEP - 1.0) * creep)
                elif self._ours:  # back up to the limit the probe showed
                    step = self.CLIMB
                else:
                    step = self.GROW
                self._set(self.rate * step)

    def _trace(self, now: float, elapsed: float, share: float, over: bool) -> None:
        trace.debug(
            "t=%.3f rate=%.1f window=%.3fs ok=%d 429=%d share=%.3f bg=%.3f over=%s "
            "accepted=%.1f limit=%s slow=%s probe=%s settling=%s",
            now - self._started,
            self.rate,
            elapsed,
            self._ok,
            self._throttled,
            share,
            self._background,
            over,
            self._accepted(now),
            None if self._limit is None else round(self._limit, 1),
            self._slow_start,
            self._probe is not None,
            self._settling,
        )

    def _found(self, limit: float) -> None:
        self._limit = limit
        self._quiet = 0
        self._slow_start = False
        self._set(limit * self.BELOW)

    def _set(self, rate: float) -> None:
        self.rate = max(self._floor, min(self._ceiling, rate))
        self._pacer.set_rate(self.rate)
        self._settle_until = self._sent


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
