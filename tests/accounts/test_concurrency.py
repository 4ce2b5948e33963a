"""Under concurrent requests the ledger neither loses nor invents a use (in-process server)."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from ciris_billing.db import accounts, credits
from tests.support.api import Api, identity


async def test_100_concurrent_charges_spend_exactly_what_is_there(api: Api) -> None:
    user = identity("hot@example.com")
    await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 20}, scope="admin")
    responses = await asyncio.gather(*(api.post("/v1/billing/charges", user) for _ in range(100)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(201) == 23
    assert statuses.count(402) == 77
    check = (await api.post("/v1/billing/credits/check", user)).json()
    assert (check["free_uses_remaining"], check["credits_remaining"], check["total_uses"]) == (
        0,
        0,
        23,
    )
    assert (await api.audit()).clean


async def test_concurrent_first_checks_create_one_account(api: Api) -> None:
    user = identity("brand-new@example.com")
    responses = await asyncio.gather(
        *(api.post("/v1/billing/credits/check", user) for _ in range(50))
    )
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["free_uses_remaining"] for r in responses} == {3}
    async with api.engine.connect() as conn:
        count = await conn.scalar(
            select(func.count())
            .select_from(accounts)
            .where(accounts.c.external_id == "brand-new@example.com")
        )
        grants = await conn.scalar(select(func.count()).select_from(credits))
    assert count == 1
    assert grants == 1
    assert (await api.audit()).clean
