"""One unit of work per request: committed once, before the answer; nothing left by a failure."""

from __future__ import annotations

from sqlalchemy import func, select

from ciris_billing.db import accounts, idempotency_keys
from ciris_billing.unit_of_work import UnitOfWork, unit_of_work
from tests.support.api import Api, identity

NEWCOMER = identity("uow-newcomer@example.com")


async def count_accounts(api: Api, external_id: str) -> int:
    async with api.engine.connect() as conn:
        found = await conn.scalar(
            select(func.count()).select_from(accounts).where(accounts.c.external_id == external_id)
        )
    return int(found or 0)


async def test_a_failed_request_leaves_nothing_behind(api: Api) -> None:
    # Taking uses from an identity never seen creates its account first, then fails: the whole
    # request rolls back, account and idempotency key included.
    refused = await api.post(
        "/v1/billing/credits",
        {**NEWCOMER, "uses": -5, "reason": "Take back"},
        scope="admin",
        **{"Idempotency-Key": "uow-failed"},
    )
    assert refused.status_code == 422
    assert refused.json()["error"] == "adjustment_below_zero"
    assert await count_accounts(api, NEWCOMER["external_id"]) == 0
    async with api.engine.connect() as conn:
        keys = await conn.scalar(
            select(func.count())
            .select_from(idempotency_keys)
            .where(idempotency_keys.c.key == "uow-failed")
        )
    assert keys == 0
    # The key is free for a retry that can succeed.
    granted = await api.post(
        "/v1/billing/credits",
        {**NEWCOMER, "uses": 5, "reason": "Take back"},
        scope="admin",
        **{"Idempotency-Key": "uow-failed"},
    )
    assert granted.status_code == 201
    assert (await api.audit()).clean


async def test_a_success_is_committed_before_the_answer_arrives(api: Api) -> None:
    created = await api.post(
        "/v1/billing/accounts", {**NEWCOMER, "currency": "USD"}, **{"Idempotency-Key": "uow-ok"}
    )
    assert created.status_code == 201
    # Another connection sees the account as soon as the client has its answer.
    assert await count_accounts(api, NEWCOMER["external_id"]) == 1
    assert (await api.audit()).clean


async def test_provider_call_commits_what_came_before_and_opens_a_new_transaction(
    api: Api,
) -> None:
    work = UnitOfWork(api.engine)
    first = await work.connection()
    assert await work.connection() is first  # one transaction until something ends it
    async with work.provider_call():
        pass
    second = await work.connection()
    assert second is not first
    await work.rollback()


async def test_unit_of_work_rolls_back_on_error(api: Api) -> None:
    try:
        async with unit_of_work(api.engine) as work:
            conn = await work.connection()
            await conn.execute(
                accounts.insert().values(
                    id="acct_uow_rollback",
                    oauth_provider="oauth:google",
                    external_id="uow-rollback@example.com",
                    plan_name="free",
                    currency="USD",
                    status="active",
                    free_uses_remaining=3,
                    paid_uses_remaining=0,
                    total_uses=0,
                    last_charge_free_uses=0,
                    created_at=func.now(),
                    updated_at=func.now(),
                )
            )
            raise RuntimeError("the request failed")
    except RuntimeError:
        pass
    assert await count_accounts(api, "uow-rollback@example.com") == 0
