"""Request size and rate limits: 413 for oversized bodies, 429 with Retry-After for floods."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.ratelimit import TokenBuckets
from tests.support.api import Api, identity, make_settings


async def test_oversized_bodies_are_413(api: Api) -> None:
    huge = {**identity(), "description": "x" * 300_000}
    response = await api.post("/v1/billing/charges", huge)
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b" " * 10_000

    streamed = await api.http.post(
        "/v1/billing/charges",
        content=chunks(),
        headers=api.headers(**{"Content-Type": "application/json"}),
    )
    assert streamed.status_code == 413
    assert (await api.post("/v1/billing/credits/check", identity())).json()["total_uses"] == 0


async def test_rate_limits_answer_429_with_retry_after(database_url: str) -> None:
    settings = make_settings(
        database_url, rate_limit_key_per_second=5, rate_limit_account_per_minute=60
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with app.state.billing.engine.begin() as conn:
            _, key = await auth.create_key(conn, "flood", frozenset({"write"}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            headers = {"X-API-Key": key}
            # Per account: a burst of 10 (a minute's rate / 6), then 429.
            answers = [
                (
                    await http.post(
                        "/v1/billing/credits/check", json=identity("a@x.y"), headers=headers
                    )
                )
                for _ in range(10)
            ]
            assert {a.status_code for a in answers} == {200}
            limited = await http.post(
                "/v1/billing/credits/check", json=identity("a@x.y"), headers=headers
            )
            assert limited.status_code == 429
            assert limited.json()["error"] == "rate_limited"
            assert int(limited.headers["Retry-After"]) >= 1
            # Per key: the burst is 10 (twice the rate); other accounts share the key's bucket.
            statuses = [
                (
                    await http.post(
                        "/v1/billing/credits/check", json=identity(f"u{i}@x.y"), headers=headers
                    )
                ).status_code
                for i in range(5)
            ]
            assert 429 in statuses


def test_token_bucket_refills() -> None:
    buckets = TokenBuckets(rate=1, burst=2)
    assert buckets.take("k", now=0) is None
    assert buckets.take("k", now=0) is None
    assert buckets.take("k", now=0) == 1.0
    assert buckets.take("k", now=1.5) is None
    assert TokenBuckets(rate=0, burst=0).take("k") is None
