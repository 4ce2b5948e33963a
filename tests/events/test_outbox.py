"""The outbox: events are written with the change they report, numbered per account."""

from __future__ import annotations

import asyncio

from ciris_billing.events.outbox import record_event
from tests.support.api import Api, identity
from tests.support.events import events_of, types


async def test_a_new_account_is_one_account_created_event(api: Api) -> None:
    user = identity("new@example.com")
    created = await api.post("/v1/billing/accounts", user)
    assert created.status_code in (200, 201)
    await api.post("/v1/billing/accounts", user)  # the same account: no second event
    found = await events_of(api.engine, "new@example.com")
    assert types(found) == ["account.created"]
    data = found[0]["data"]
    assert data["sequence"] == 1
    assert data["external_id"] == "new@example.com"
    assert data["free_uses_remaining"] == 3
    assert (await api.audit()).clean


async def test_charges_cross_low_once_then_deplete(api: Api) -> None:
    # 3 free uses, threshold 3: the first charge crosses below 3 (low), the third empties it.
    # An app's own plan: the default threshold applies (none on `free`: test_finding21_...).
    user = identity("low@example.com")
    await api.post("/v1/billing/accounts", {**user, "plan_name": "pro"}, scope="admin")
    for _ in range(3):
        assert (await api.post("/v1/billing/charges", user)).status_code == 201
    assert (await api.post("/v1/billing/charges", user)).status_code == 402
    found = await events_of(api.engine, "low@example.com")
    assert types(found) == ["account.created", "balance.low", "balance.depleted"]
    assert [event["sequence"] for event in found] == [1, 2, 3]
    assert [event["data"]["sequence"] for event in found] == [1, 2, 3]
    low = found[1]["data"]
    assert low["available_uses"] == 2
    assert low["threshold_uses"] == 3
    assert (low["free_uses_remaining"], low["paid_uses_remaining"]) == (2, 0)
    assert set(low) == {
        "account_id",
        "oauth_provider",
        "external_id",
        "sequence",
        "available_uses",
        "free_uses_remaining",
        "paid_uses_remaining",
        "threshold_uses",
    }
    assert (await api.audit()).clean


async def test_one_charge_can_cross_low_and_deplete_together(api: Api) -> None:
    user = identity("both@example.com")
    await api.post("/v1/billing/accounts", {**user, "plan_name": "pro"}, scope="admin")
    charged = await api.post("/v1/billing/charges", {**user, "uses": 3})
    assert charged.status_code == 201
    found = await events_of(api.engine, "both@example.com")
    assert types(found) == ["account.created", "balance.low", "balance.depleted"]
    assert [event["sequence"] for event in found] == [1, 2, 3]


async def test_concurrent_charges_cross_low_exactly_once(api: Api) -> None:
    user = identity("race@example.com")
    await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 20}, scope="admin")
    results = await asyncio.gather(*(api.post("/v1/billing/charges", user) for _ in range(50)))
    assert [r.status_code for r in results].count(201) == 23
    found = await events_of(api.engine, "race@example.com")
    assert types(found) == ["account.created", "balance.low", "balance.depleted"]
    assert [event["sequence"] for event in found] == [1, 2, 3]
    assert (await api.audit()).clean


async def test_record_event_numbers_an_accounts_events_in_the_callers_transaction(
    api: Api,
) -> None:
    user = identity("seq@example.com")
    account = (await api.post("/v1/billing/accounts", user)).json()
    account_id = account["account_id"] if "account_id" in account else account["id"]
    async with api.engine.begin() as conn:
        first = await record_event(conn, account_id, "purchase.failed", {"purchase_id": "p1"})
        second = await record_event(conn, account_id, "purchase.failed", {"purchase_id": "p2"})
    assert (first.sequence, second.sequence) == (2, 3)
    # Rolled back with its transaction: no event, and its number is not taken.
    async with api.engine.connect() as conn:
        await conn.begin()
        await record_event(conn, account_id, "purchase.failed", {"purchase_id": "p3"})
        await conn.rollback()
    async with api.engine.begin() as conn:
        fourth = await record_event(conn, account_id, "purchase.failed", {"purchase_id": "p4"})
    assert fourth.sequence == 4
    found = await events_of(api.engine, "seq@example.com")
    assert [event["data"].get("purchase_id") for event in found] == [None, "p1", "p2", "p4"]
