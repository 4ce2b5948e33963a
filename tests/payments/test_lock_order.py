"""One lock order for money coming in and going out: a purchase's row, then its account's.

Refunds and disputes lock the purchase, then the account; crediting a payment must take them in the
same order, or a credit racing a refund of the same purchase deadlocks (one of them fails)."""

from __future__ import annotations

import asyncio

from sqlalchemy import select, text

from ciris_billing.db import accounts, purchases
from ciris_billing.payments.service import credit_purchase
from tests.support.api import Api, identity
from tests.support.flows import check, purchase

USER = identity("lock-order@example.com")


async def test_a_credit_waits_for_the_purchase_before_it_locks_the_account(api: Api) -> None:
    bought = await purchase(api, USER)
    async with api.engine.connect() as holder, api.engine.connect() as crediting:
        # As a refund does: the purchase's row first...
        await holder.begin()
        row = (
            await holder.execute(
                select(purchases)
                .where(purchases.c.payment_id == bought["payment_id"])
                .with_for_update()
            )
        ).one()

        async def credit() -> bool:
            async with crediting.begin():
                return await credit_purchase(crediting, row)

        credited = asyncio.create_task(credit())
        await until_a_backend_waits_for_a_lock(api)
        # ... then the account's. The credit must not hold it while it waits for the purchase.
        await holder.execute(text("SET LOCAL lock_timeout = '3s'"))
        await holder.execute(
            select(accounts.c.id).where(accounts.c.id == row.account_id).with_for_update()
        )
        await holder.commit()
        assert await asyncio.wait_for(credited, 10) is True
    assert (await check(api, USER))["credits_remaining"] == 20
    assert (await api.audit()).clean


async def until_a_backend_waits_for_a_lock(api: Api) -> None:
    async with api.engine.connect() as watcher:
        for _ in range(200):
            waiting = await watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
            if waiting:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the credit never waited for the purchase's lock")
