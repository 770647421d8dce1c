"""Per-source token buckets with a bounded table, so a flood of sources cannot grow memory."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


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
