"""Per-source token buckets with a bounded table, so a flood of sources cannot grow memory;
and a log that a flood of events cannot flood."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from twisted.logger import Logger, LogLevel


class RateLimiter:
    """Allow ``rate`` events per second per key, in bursts of up to ``burst``.

    At most ``maxKeys`` keys are remembered; the least recently seen is forgotten
    first (a forgotten key starts again with a full bucket).
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float], maxKeys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._maxKeys = maxKeys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def allow(self, key: Hashable) -> bool:
        """Take one token for ``key``; False when its bucket is empty."""
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._maxKeys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


class RateLimitedLog:
    """Emit events to ``log`` at ``level``, at most ``rate`` a second in bursts of ``burst``:
    a storm of clients cannot fill the disk. What is left out is counted (``unlogged``), and
    the next line logged says how many were skipped before it, so the log still shows the storm."""

    def __init__(self, log: Logger, level: LogLevel, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self._log = log
        self._level = level
        self._limiter = RateLimiter(rate, burst, clock, maxKeys=1)
        self.unlogged = 0
        self._skipped = 0

    def __call__(self, format: str, **fields: object) -> bool:
        """Log one event (True), or only count it when they come too fast (False)."""
        if not self._limiter.allow(None):
            self.unlogged += 1
            self._skipped += 1
            return False
        if self._skipped:
            format += " ({skipped} lines before this one not logged: too many at once)"
            fields["skipped"], self._skipped = self._skipped, 0
        self._log.emit(self._level, format, **fields)
        return True
