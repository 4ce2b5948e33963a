"""Rate limits: token buckets per API key and per account, answered with 429 + Retry-After.

Two stores, one behaviour (`rate` tokens per second, bursts up to `burst`):

- without REDIS_URL, `TokenBuckets`: the buckets live in each worker process (no shared store),
  so with N workers on M instances the service-wide ceiling is N x M times the configured rate;
- with REDIS_URL, `SharedBuckets`: one bucket per key in Redis, taken by a server-side Lua script
  (atomic: read, refill, spend and write in one step, on Redis's own clock), so the limits hold
  across every worker and instance.

Rate limiting protects the service; it must never stop billing. A shared check that fails (Redis
down, refusing, or slower than STORE_TIMEOUT_SECONDS) lets the request through ("fails open"),
counts it (`billing_rate_limit_fail_open_total`) and logs at most one warning a minute per
process. Each request asks Redis again: a stopped Redis refuses at once, a slow one costs that
request at most the timeout (no circuit breaker: one slow answer under a burst of load must not
switch the limits off for everyone for a while).

Why redis-py and a script rather than the `limits` package: `limits` offers fixed, moving and
sliding windows, not the token bucket (rate + burst, exact Retry-After) these settings already
define, and its moving window keeps one entry per request (4,000 per API key at the default
2,000/s); the script is one EVALSHA round trip and one small hash per key.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ciris_billing.errors import RateLimited
from ciris_billing.observability import RATE_LIMIT_FAIL_OPEN, log

# A shared check that takes longer than this lets the request through (the 50 ms: a
# healthy Redis on the same network answers in well under a millisecond).
STORE_TIMEOUT_SECONDS = 0.05
# At most one "rate limits fail open" warning per process per this many seconds.
WARNING_EVERY_SECONDS = 60.0

# KEYS: buckets (each a hash: tokens, at = microseconds on Redis's clock); ARGV: each bucket's
# rate (tokens per second) and burst, in turn. Returns, per bucket, 0 when a token was spent,
# else the milliseconds until one is there. Atomic (Redis runs a script alone), so concurrent
# takers from any number of processes never spend the same token twice; a bucket named twice
# is taken twice, in order. A bucket idle long enough to be full again expires.
_TAKE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local waits = {}
for i, bucket in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local saved = redis.call('HMGET', bucket, 'tokens', 'at')
  local tokens = tonumber(saved[1])
  local at = tonumber(saved[2])
  if tokens == nil or at == nil then
    tokens = burst
    at = now
  end
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000000)
  local wait = 0
  if tokens >= 1 then
    tokens = tokens - 1
  else
    wait = math.ceil((1 - tokens) * 1000 / rate)
  end
  redis.call('HSET', bucket, 'tokens', string.format('%.6f', tokens), 'at',
    string.format('%.0f', now))
  redis.call('PEXPIRE', bucket, math.ceil(burst * 1000 / rate) + 1000)
  waits[i] = wait
end
return waits
"""

# KEYS[1]: one bucket; ARGV: its rate and burst. Like _TAKE without spending: 0 when a token is
# there, else the milliseconds until one is (to refuse before doing the work a failure spends).
_PEEK = """
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(saved[1])
local at = tonumber(saved[2])
if tokens == nil or at == nil then
  return 0
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local rate = tonumber(ARGV[1])
tokens = math.min(tonumber(ARGV[2]), tokens + math.max(0, now - at) * rate / 1000000)
if tokens >= 1 then
  return 0
end
return math.ceil((1 - tokens) * 1000 / rate)
"""


class Limiter(Protocol):
    """What the edge and the answers ask: may `key` go on? (raises RateLimited if not)."""

    @property
    def enabled(self) -> bool: ...

    async def check(self, key: str, what: str) -> None: ...


def _refuse(wait_seconds: float, what: str) -> RateLimited:
    seconds = max(1, math.ceil(wait_seconds))
    return RateLimited(
        f"Too many requests for this {what}; retry in {seconds} s",
        retry_after_seconds=seconds,
    )


class TokenBuckets:
    """Per process: `rate` tokens per second, up to `burst`, per key; the least recently used
    keys are forgotten beyond `max_keys` (a forgotten key starts again with a full bucket)."""

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

    async def check(self, key: str, what: str) -> None:
        wait = self.take(key)
        if wait is not None:
            raise _refuse(wait, what)


_Taker = tuple[str, float, float, "asyncio.Future[int]"]
# A bucket to take from: its name, rate, burst and the limit it belongs to (for the metric).
Take = tuple[str, float, float, str]


class SharedStore:
    """The Redis connection pool and the bucket script, shared by a process's limits; it
    decides when a check fails open (see the module).

    Checks that arrive in the same turn of the event loop go to Redis together, as one script
    call (one round trip, one connection): under load a worker otherwise opened a Redis
    connection per request in flight and woke once per answer, and its own event loop fell
    behind the 50 ms bound (measured: checks failed open under a 60-request burst).
    """

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._take = redis.register_script(_TAKE)
        self._peek = redis.register_script(_PEEK)
        self._waiting: list[_Taker] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._warned_at = -math.inf
        self._failed_since_warning = 0

    @classmethod
    def open(cls, url: str) -> SharedStore:
        """A store on `url` (connections open on first use: the service starts without Redis).
        One retry inside the client, within the same time bound: a pooled connection that died
        while idle (Redis restarted) is replaced rather than failing the check open."""
        return cls(
            Redis.from_url(
                url,
                socket_timeout=STORE_TIMEOUT_SECONDS,
                socket_connect_timeout=STORE_TIMEOUT_SECONDS,
                retry=Retry(NoBackoff(), 1),
                # No CLIENT SETINFO round trips on each new connection.
                driver_info=None,
            )
        )

    async def warm_up(self) -> None:
        """Load the script and open a connection before the first request (a cold first
        request under load would otherwise often miss the timeout); Redis being away at
        start-up is only logged: checks fail open until it answers."""
        try:
            async with asyncio.timeout(5):
                self._take.sha = await self.redis.script_load(_TAKE)
        except (RedisError, OSError, TimeoutError) as exc:
            self._fail_open("startup", exc)

    async def take(self, takes: Sequence[Take]) -> list[float | None]:
        """Spend one token of each bucket, in order, in one round trip: for each, None if
        allowed (or failing open), else the seconds until one is there."""
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[int]] = []
        for bucket, rate, burst, _limit in takes:
            answer: asyncio.Future[int] = loop.create_future()
            self._waiting.append((bucket, rate, burst, answer))
            answers.append(answer)
        if len(self._waiting) == len(takes):  # the first of this turn: send all at its end
            loop.call_soon(self._send_waiting)
        try:
            async with asyncio.timeout(STORE_TIMEOUT_SECONDS):
                waits = [await answer for answer in answers]
        except (RedisError, OSError, TimeoutError) as exc:
            for answer in answers:  # no longer awaited: their outcome is dropped
                if not answer.done():
                    answer.cancel()
                elif not answer.cancelled():
                    answer.exception()  # retrieved (else asyncio logs it as never retrieved)
            for *_, limit in takes:
                self._fail_open(limit, exc)
            return [None] * len(takes)
        return [wait_ms / 1000 if wait_ms else None for wait_ms in waits]

    async def peek(self, take: Take) -> float | None:
        """The seconds until the bucket has a token (None: it has one, or failing open)."""
        bucket, rate, burst, limit = take
        try:
            async with asyncio.timeout(STORE_TIMEOUT_SECONDS):
                wait_ms = int(await self._peek(keys=[bucket], args=[rate, burst]))
        except (RedisError, OSError, TimeoutError) as exc:
            self._fail_open(limit, exc)
            return None
        return wait_ms / 1000 if wait_ms else None

    def _send_waiting(self) -> None:
        batch, self._waiting = self._waiting, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)  # a reference until it is done (the loop keeps only weak ones)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Taker]) -> None:
        try:
            args: list[float] = []
            for _bucket, rate, burst, _answer in batch:
                args += (rate, burst)
            waits = await self._take(keys=[taker[0] for taker in batch], args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            for *_, answer in batch:
                if not answer.done():  # a request that timed out has stopped waiting
                    answer.set_exception(exc)
            return
        for (*_, answer), wait in zip(batch, waits, strict=True):
            if not answer.done():
                answer.set_result(int(wait))

    def _fail_open(self, limit: str, error: BaseException) -> None:
        if limit != "startup":
            RATE_LIMIT_FAIL_OPEN.labels(limit).inc()
            self._failed_since_warning += 1
        now = time.monotonic()
        if now - self._warned_at >= WARNING_EVERY_SECONDS:
            # The error's type only: a Redis error's message may carry the URL (a password).
            log.warning(
                "rate_limits_fail_open",
                limit=limit,
                error_type=type(error).__name__,
                requests_let_through=self._failed_since_warning,
                message="the rate-limit store (Redis) is unreachable or slow: limits are off",
            )
            self._warned_at = now
            self._failed_since_warning = 0

    async def close(self) -> None:
        await self.redis.aclose()


class SharedBuckets:
    """Token buckets in a SharedStore: the same limit for every worker and instance."""

    def __init__(
        self, store: SharedStore, name: str, rate: float, burst: float, hashed: bool = False
    ) -> None:
        self.store = store
        self.name = name
        self.rate = rate
        self.burst = max(burst, 1.0)
        # Account identities (emails) are personal data: Redis sees only their digest.
        self.hashed = hashed
        self._prefix = f"ciris-billing:ratelimit:{name}:"

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def bucket(self, key: str) -> Take:
        if self.hashed:
            key = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return (self._prefix + key, self.rate, self.burst, self.name)

    async def check(self, key: str, what: str) -> None:
        if self.enabled:
            [wait] = await self.store.take([self.bucket(key)])
            if wait is not None:
                raise _refuse(wait, what)


async def check_all(checks: Sequence[tuple[Limiter, str, str]]) -> None:
    """Each (limit, key, what) in order; RateLimited for the first that refuses. Shared limits
    on one store are taken in one round trip (the hot path's API key and account limits: one
    Redis call per request, not two)."""
    checks = [check for check in checks if check[0].enabled]
    shared = [limit for limit, _, _ in checks if isinstance(limit, SharedBuckets)]
    stores = {limit.store for limit in shared}
    if len(checks) > 1 and len(shared) == len(checks) and len(stores) == 1:
        takes = [limit.bucket(key) for limit, key, _ in checks]  # type: ignore[attr-defined]
        waits = await stores.pop().take(takes)
        for (_limit, _key, what), wait in zip(checks, waits, strict=True):
            if wait is not None:
                raise _refuse(wait, what)
        return
    for limit, key, what in checks:
        if isinstance(limit, TokenBuckets):  # per process: no await needed
            wait = limit.take(key)
            if wait is not None:
                raise _refuse(wait, what)
        else:
            await limit.check(key, what)


class FailureLimit:
    """Failures per client address (console sign-ins with a wrong key): a client whose bucket
    is empty is refused before its attempt is even checked; only failures spend. Shared through
    Redis with REDIS_URL (every worker and instance count together), else per process."""

    def __init__(self, buckets: TokenBuckets | SharedBuckets) -> None:
        self.buckets = buckets

    async def waiting(self, client: str) -> float | None:
        """None if `client` may try, else the seconds until it may."""
        if not self.buckets.enabled:
            return None
        if isinstance(self.buckets, SharedBuckets):
            return await self.buckets.store.peek(self.buckets.bucket(client))
        return self.buckets.waiting(client)

    async def failed(self, client: str) -> None:
        """Count one failure of `client`."""
        if not self.buckets.enabled:
            return
        if isinstance(self.buckets, SharedBuckets):
            await self.buckets.store.take([self.buckets.bucket(client)])
        else:
            self.buckets.take(client)
