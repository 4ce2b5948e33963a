"""Every change the issue names writes its event with it (sandbox provider, in process):
purchases, refunds, disputes, holds and their expiry, grants; balance events once per crossing,
re-armed when the balance rises above the threshold again."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import select

from ciris_billing.accounts import reservations
from ciris_billing.db import accounts, utcnow
from ciris_billing.unit_of_work import unit_of_work
from tests.support.api import Api, identity
from tests.support.events import events_of, types
from tests.support.flows import DECLINED, paid_purchase, pay, purchase

USER = identity("events@example.com")


async def dispute(api: Api, payment_id: str, status: str) -> None:
    response = await api.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/dispute",
        {"status": status},
        scope="admin",
    )
    assert response.status_code == 200, response.text


async def test_purchase_succeeded_then_refund_crosses_low_and_depletes(api: Api) -> None:
    # An app's own plan: the default balance.low threshold applies (none on `free`).
    await api.post("/v1/billing/accounts", {**USER, "plan_name": "pro"}, scope="admin")
    for _ in range(3):  # free uses: low at 2 left, depleted at 0
        await api.post("/v1/billing/charges", USER)
    bought = await paid_purchase(api, USER)  # 20 uses: back above 3 (re-armed)
    refunded = await api.post(
        f"/v1/billing/purchases/{bought['payment_id']}/refund", {}, scope="admin"
    )
    assert refunded.status_code == 201, refunded.text
    found = await events_of(api.engine, "events@example.com")
    assert types(found) == [
        "account.created",
        "balance.low",
        "balance.depleted",
        "purchase.succeeded",
        "refund.succeeded",
        "balance.low",  # 20 -> 0 crosses the threshold again: re-armed by the purchase
        "balance.depleted",
    ]
    assert [e["sequence"] for e in found] == list(range(1, 8))
    succeeded = found[3]["data"]
    assert succeeded["payment_id"] == bought["payment_id"]
    assert (succeeded["uses"], succeeded["amount_minor"], succeeded["status"]) == (
        20,
        500,
        "succeeded",
    )
    refund = found[4]["data"]
    # The API's refund or the provider's charge.refunded webhook, whichever came first: once.
    assert (refund["amount_minor"], refund["uses_reversed"]) == (500, 20)
    assert (await api.audit()).clean


async def test_a_declined_card_is_one_purchase_failed(api: Api) -> None:
    bought = await purchase(api, USER)
    declined = await pay(api, bought, DECLINED)
    assert declined.json()["error"] == "card_declined", declined.text
    again = await pay(api, bought, DECLINED)  # a second failed attempt: the status is unchanged
    assert again.json()["error"] == "card_declined", again.text
    found = await events_of(api.engine, "events@example.com")
    assert types(found) == ["account.created", "purchase.failed"]
    assert found[1]["data"]["payment_id"] == bought["payment_id"]


async def test_dispute_opened_holds_and_closed(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    await dispute(api, bought["payment_id"], "needs_response")
    await dispute(api, bought["payment_id"], "needs_response")  # again: nothing new
    await dispute(api, bought["payment_id"], "won")
    await dispute(api, bought["payment_id"], "won")
    found = await events_of(api.engine, "events@example.com")
    # 23 available -> 3 while held: not below the threshold of 3, so no balance event.
    assert types(found) == [
        "account.created",
        "purchase.succeeded",
        "dispute.opened",
        "dispute.closed",
    ]
    opened = next(e for e in found if e["type"] == "dispute.opened")["data"]
    closed = next(e for e in found if e["type"] == "dispute.closed")["data"]
    assert (opened["held_uses"], opened["state"]) == (20, "open")
    assert (closed["state"], closed["released_uses"]) == ("won", 20)
    assert (await api.audit()).clean


async def test_a_hold_that_crosses_low_and_its_expiry(api: Api) -> None:
    await api.post("/v1/billing/accounts", {**USER, "plan_name": "pro"}, scope="admin")
    created = await api.post("/v1/billing/reservations", {**USER, "uses": 2, "ttl_seconds": 60})
    assert created.status_code == 201, created.text
    async with api.engine.connect() as conn:
        account_id = await conn.scalar(
            select(accounts.c.id).where(accounts.c.external_id == "events@example.com")
        )
    async with unit_of_work(api.engine) as work:
        expired = await reservations.expire_account(
            await work.connection(), str(account_id), utcnow() + timedelta(seconds=61)
        )
    assert len(expired) == 1
    found = await events_of(api.engine, "events@example.com")
    assert types(found) == ["account.created", "balance.low", "reservation.expired"]
    assert found[1]["data"]["available_uses"] == 1
    gone = found[2]["data"]
    assert (gone["reservation_id"], gone["uses"]) == (created.json()["reservation_id"], 2)
    assert (await api.audit()).clean


async def test_per_account_threshold_and_negative_adjustments(api: Api) -> None:
    await api.post("/v1/billing/accounts", {**USER, "initial_balance_minor": 10}, scope="admin")
    path = "/v1/billing/accounts/oauth:google/events@example.com/low_balance_threshold"
    changed = await api.http.put(path, json={"uses": 10}, headers=api.headers("admin"))
    assert changed.status_code == 200, changed.text
    assert changed.json()["threshold_in_force"] == 10
    refused = await api.http.put(path, json={"uses": 10}, headers=api.headers("write"))
    assert refused.status_code == 403
    taken = await api.post(
        "/v1/billing/credits", {**USER, "uses": -5, "reason": "correction"}, scope="admin"
    )
    assert taken.status_code == 201, taken.text
    found = await events_of(api.engine, "events@example.com")
    assert types(found) == ["account.created", "balance.low"]
    assert (found[1]["data"]["threshold_uses"], found[1]["data"]["available_uses"]) == (10, 8)
    await api.post("/v1/billing/charges", USER)  # 7: still below, no new crossing
    assert types(await events_of(api.engine, "events@example.com")) == [
        "account.created",
        "balance.low",
    ]
    default = await api.http.put(path, json={"uses": None}, headers=api.headers("admin"))
    assert (default.json()["low_balance_threshold_uses"], default.json()["threshold_in_force"]) == (
        None,
        3,
    )


async def test_concurrent_holds_cross_low_once_on_either_path(api: Api) -> None:
    """50 holds at once (the hot path's statement, batched) on 23 uses: one balance.low, one
    balance.depleted; then a keyed hold (the unit-of-work path) after a release crosses again."""
    await api.post("/v1/billing/accounts", {**USER, "initial_balance_minor": 20}, scope="admin")
    answers = await asyncio.gather(
        *(api.post("/v1/billing/reservations", {**USER, "uses": 1}) for _ in range(50))
    )
    held = [a.json()["reservation_id"] for a in answers if a.status_code == 201]
    assert len(held) == 23
    assert types(await events_of(api.engine, "events@example.com")) == [
        "account.created",
        "balance.low",
        "balance.depleted",
    ]
    for reservation_id in held[:5]:  # back to 5 available: re-armed
        released = await api.post(f"/v1/billing/reservations/{reservation_id}/release", {})
        assert released.status_code == 200, released.text
    keyed = await api.post(
        "/v1/billing/reservations", {**USER, "uses": 3}, **{"Idempotency-Key": "hold-3"}
    )
    assert keyed.status_code == 201, keyed.text
    found = await events_of(api.engine, "events@example.com")
    assert types(found)[3:] == ["balance.low"]
    assert found[3]["data"]["available_uses"] == 2
    assert [e["sequence"] for e in found] == [1, 2, 3, 4]
    assert (await api.audit()).clean
