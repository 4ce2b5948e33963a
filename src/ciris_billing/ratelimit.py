"""Rate limits: token buckets per API key and per account, answered with 429 + Retry-After.

The buckets live in each worker process (no shared store on the hot path), so with N workers
the service-wide ceiling is N times the configured rate; size the settings accordingly.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from ciris_billing.errors import RateLimited


class TokenBuckets:
    """`rate` tokens per second, up to `burst`, per key; the least recently used keys are
    forgotten beyond `max_keys` (a forgotten key starts again with a full bucket)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 20_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str, now: float | None = None) -> float | None:
        """Spend one token; None if allowed, else the seconds until one is available."""
        if not self.enabled:
            return None
        moment = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, moment))
        tokens = min(self.burst, tokens + (moment - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, moment)
            wait = None
        else:
            self._buckets[key] = (tokens, moment)
            wait = (1.0 - tokens) / self.rate
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def waiting(self, key: str, now: float | None = None) -> float | None:
        """Like `take`, without spending: None if a token is there, else the seconds to wait
        (to refuse before doing the work whose failure `take` then counts)."""
        if not self.enabled or key not in self._buckets:
            return None
        moment = time.monotonic() if now is None else now
        tokens, last = self._buckets[key]
        tokens = min(self.burst, tokens + (moment - last) * self.rate)
        return None if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def check(self, key: str, what: str) -> None:
        wait = self.take(key)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise RateLimited(
                f"Too many requests for this {what}; retry in {seconds} s",
                retry_after_seconds=seconds,
            )
