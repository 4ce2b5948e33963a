"""What a request's rate limits cost the service's CPU: per process, and shared through Redis.

`python bench/ratelimit_cost.py [REDIS_URL]` (default redis://127.0.0.1:6379/0) takes a request's
two limits (its API key's and its account's, as the fast path does: ratelimit.check_all) many
times, alone and with 32 requests at once, and prints the process's CPU time per request (CPU
time, not wall time: on a shared machine it moves far less than req/s do) and the wall time.
Redis's own CPU is not counted (another process: the service's machine pays it only if Redis
runs there). Keys are prefixed with a random run id and expire by themselves.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

from prometheus_client import REGISTRY

from ciris_billing.ratelimit import Limiter, SharedBuckets, SharedStore, TokenBuckets, check_all

REQUESTS = 20_000


async def measure(
    key_limit: Limiter, account_limit: Limiter, concurrency: int
) -> tuple[float, float]:
    """(CPU microseconds, wall microseconds) per request."""
    run = secrets.token_hex(4)

    async def requests(worker: int) -> None:
        for n in range(REQUESTS // concurrency):
            await check_all(
                [
                    (key_limit, f"{run}-key-{worker}", "API key"),
                    (account_limit, f"{run}-user-{worker}-{n % 500}@example.com", "account"),
                ]
            )

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(requests(w) for w in range(concurrency)))
    done = REQUESTS // concurrency * concurrency
    return (
        (time.process_time() - cpu) / done * 1e6,
        (time.perf_counter() - wall) / done * 1e6,
    )


def _failed_open() -> float:
    return sum(
        REGISTRY.get_sample_value("billing_rate_limit_fail_open_total", {"limit": limit}) or 0.0
        for limit in ("bench-key", "bench-account")
    )


async def main(url: str) -> None:
    rate = 1e9  # never refuses: the cost of asking, not of refusing
    local = (TokenBuckets(rate, rate), TokenBuckets(rate, rate))
    store = SharedStore.open(url)
    await store.warm_up()
    shared = (
        SharedBuckets(store, "bench-key", rate, rate),
        SharedBuckets(store, "bench-account", rate, rate, hashed=True),
    )
    try:
        for concurrency in (1, 32):
            for label, (key_limit, account_limit) in (("per process", local), ("Redis", shared)):
                before = _failed_open()
                cpu, wall = await measure(key_limit, account_limit, concurrency)
                print(
                    f"limits {label:<11} {concurrency:>2} at once: {cpu:6.1f} us CPU, "
                    f"{wall:6.1f} us wall per request (2 limits); failed open (Redis later "
                    f"than 50 ms): {_failed_open() - before:.0f}",
                    flush=True,
                )
    finally:
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0"))
