"""The issue's acceptance, through `ciris-billing serve --workers 2` with its job workers: a
receiver on 127.0.0.1 verifies every delivery with `standardwebhooks`; it is down while 50
concurrent charges drain an account and for a while after, so deliveries fail and are retried;
once it is back everything arrives: the received event ids equal the outbox's, a duplicate only
ever a retry of one webhook-id with the same body; balance.low exactly once per crossing (twice:
drained, topped up above the threshold, drained again); audit clean."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from ciris_billing.db import create_engine, events
from tests.support.cli import cli, create_key
from tests.support.receiver import receiving
from tests.support.servers import running_service, service_env

pytestmark = pytest.mark.slow  # real service processes (2 workers)

USER = {"oauth_provider": "oauth:google", "external_id": "drained@example.com"}


async def outbox(database_url: str) -> dict[str, str]:
    """Every event id in the outbox, with its type."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(select(events.c.id, events.c.type))
            return {row.id: row.type for row in rows}
    finally:
        await engine.dispose()


async def drain(http: httpx.AsyncClient) -> list[int]:
    answers = await asyncio.gather(
        *(http.post("/v1/billing/charges", json=USER) for _ in range(50))
    )
    return [answer.status_code for answer in answers]


async def test_receiver_down_then_back_gets_every_event_and_low_once_per_crossing(
    fresh_database: str, tmp_path: Path
) -> None:
    env = service_env(
        fresh_database,
        RATE_LIMIT_KEY_PER_SECOND="0",
        RATE_LIMIT_ACCOUNT_PER_MINUTE="0",
        ALLOW_PRIVATE_WEBHOOK_URLS="true",
        JOBS_POLL_SECONDS="1",
        WEBHOOK_RETRY_BASE_SECONDS="0.25",  # retries after 0.25 s, 1 s, 4 s, 16 s ...
    )
    key = create_key(env, "admin")
    with (
        receiving() as receiver,
        running_service(env, tmp_path / "server.log", workers=2) as base,
    ):
        async with (
            httpx.AsyncClient(
                base_url=base,
                headers={"X-API-Key": key},
                limits=httpx.Limits(max_connections=60),
                timeout=60,
            ) as http,
            asyncio.timeout(180),
        ):
            made = await http.post("/v1/billing/webhook_endpoints", json={"url": receiver.url})
            assert made.status_code == 201, made.text
            receiver.secret = made.json()["secret"]
            receiver.stop()  # down

            created = await http.post(
                "/v1/billing/accounts", json={**USER, "initial_balance_minor": 20}
            )
            assert created.status_code == 201, created.text
            statuses = await drain(http)  # 23 uses: 3 free + 20 paid
            assert (statuses.count(201), statuses.count(402)) == (23, 27)
            grant = {**USER, "uses": 20, "reason": "top up"}
            assert (await http.post("/v1/billing/credits", json=grant)).status_code == 201
            statuses = await drain(http)
            assert (statuses.count(201), statuses.count(402)) == (20, 30)

            # Deliveries fail while it is down (attempts recorded), then it comes back.
            endpoint_id = made.json()["id"]
            deadline = time.monotonic() + 60
            while True:
                listed = await http.get(f"/v1/billing/webhook_endpoints/{endpoint_id}/deliveries")
                failed = [d for d in listed.json()["data"] if d["attempts"] >= 2]
                if failed or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert failed, "no delivery was retried while the receiver was down"
            assert {d["last_error"] for d in failed} == {"connect_error"}
            receiver.start()

            expected = await outbox(fresh_database)
            while set(receiver.ids()) != set(expected) and time.monotonic() < deadline + 60:
                await asyncio.sleep(0.5)

    assert receiver.rejected == []  # every delivery verified with standardwebhooks
    assert set(receiver.ids()) == set(expected)
    # A duplicate is only ever a retry: the same webhook-id with the same body.
    bodies: dict[str, set[bytes]] = {}
    for got in receiver.received:
        bodies.setdefault(got.webhook_id, set()).add(got.body)
    assert all(len(found) == 1 for found in bodies.values())
    kinds = Counter(expected.values())
    assert kinds == {"account.created": 1, "balance.low": 2, "balance.depleted": 2}
    received_kinds = Counter(
        got.payload["type"] for got in {r.webhook_id: r for r in receiver.received}.values()
    )
    assert received_kinds == kinds
    sequences = sorted(
        {r.webhook_id: r.payload["data"]["sequence"] for r in receiver.received}.values()
    )
    assert sequences == [1, 2, 3, 4, 5]
    secret = made.json()["secret"]
    assert secret.removeprefix("whsec_") not in (tmp_path / "server.log").read_text()
    audited = cli(env, "audit", "--ledger-only")
    assert audited.returncode == 0, audited.stdout + audited.stderr
