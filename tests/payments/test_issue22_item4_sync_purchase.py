"""Issue 22 item 4: a paid purchase whose webhook was lost is credited as soon as the payer's
page (or the agent client) asks the service to confirm it: `POST .../checkout/{id}/sync`
(client secret) and `POST .../purchases/{id}/sync` (API key) ask the provider, never the
caller, and credit once (the same apply_payment as the webhook and reconcile). The purchase is
marked seen paid, so the jobs reconcile it at their next run if the request dies; and the
sandbox keeps a payment's webhook until the inbox takes it (redelivered with backoff).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from ciris_billing.db import purchases, sandbox_payments, sandbox_webhook_events
from ciris_billing.jobs import Recovery
from ciris_billing.payments.providers.sandbox_webhooks import redeliver_delay
from ciris_billing_client import AsyncBillingClient
from tests.support.api import Api, identity

USER = identity("sync@example.com")


async def bought(api: Api) -> dict[str, Any]:
    made = await api.post("/v1/billing/purchases", USER)
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    return body


async def paid_at_the_provider_but_its_webhook_lost(api: Api, payment_id: str) -> None:
    """The provider's own state says succeeded (as after a worker was killed between the
    payment and its webhook); nothing reached the service's inbox."""
    async with api.engine.begin() as conn:
        await conn.execute(
            update(sandbox_payments)
            .where(sandbox_payments.c.id == payment_id)
            .values(status="succeeded")
        )


async def credits_remaining(api: Api) -> int:
    check = await api.post("/v1/billing/credits/check", {**USER, "context": {}}, scope="read")
    return int(check.json()["credits_remaining"])


async def test_the_page_sync_credits_a_paid_purchase_whose_webhook_was_lost(api: Api) -> None:
    purchase = await bought(api)
    payment_id, secret = purchase["payment_id"], purchase["client_secret"]
    url = f"/v1/billing/checkout/{payment_id}/sync"
    # Not paid yet: nothing credited, the page learns the payment's state.
    early = await api.http.post(url, headers={"X-Client-Secret": secret})
    assert early.status_code == 200, early.text
    assert (early.json()["credited"], early.json()["payment_status"]) == (
        False,
        "requires_payment_method",
    )
    await paid_at_the_provider_but_its_webhook_lost(api, payment_id)
    assert await credits_remaining(api) == 0
    wrong = await api.http.post(url, headers={"X-Client-Secret": secret + "x"})
    assert wrong.status_code == 404
    synced = [await api.http.post(url, headers={"X-Client-Secret": secret}) for _ in range(3)]
    assert [s.status_code for s in synced] == [200, 200, 200]
    assert all(s.json()["credited"] and s.json()["status"] == "succeeded" for s in synced)
    assert await credits_remaining(api) == 20  # once, whatever the number of asks
    async with api.engine.connect() as conn:
        seen = (
            await conn.execute(
                select(purchases.c.paid_seen_at).where(purchases.c.payment_id == payment_id)
            )
        ).scalar_one()
    assert seen is not None
    assert (await api.audit()).clean


async def test_the_agent_client_sync_credits_a_paid_purchase_whose_webhook_was_lost(
    api: Api,
) -> None:
    purchase = await bought(api)
    payment_id = purchase["payment_id"]
    await paid_at_the_provider_but_its_webhook_lost(api, payment_id)
    refused = await api.post(f"/v1/billing/purchases/{payment_id}/sync", {}, scope="read")
    assert refused.status_code == 403
    synced = await api.post(f"/v1/billing/purchases/{payment_id}/sync", {})
    assert synced.status_code == 200, synced.text
    assert synced.json()["status"] == "succeeded"
    again = await api.post(f"/v1/billing/purchases/{payment_id}/sync", {})
    assert again.json()["status"] == "succeeded"
    assert await credits_remaining(api) == 20
    unknown = await api.post("/v1/billing/purchases/pi_sbx_nothing/sync", {})
    assert unknown.status_code == 404
    assert (await api.audit()).clean


async def test_a_purchase_the_page_saw_paid_is_reconciled_at_the_next_run(api: Api) -> None:
    """RECONCILE_AFTER_SECONDS (180) does not apply to a purchase marked seen paid."""
    purchase = await bought(api)
    payment_id = purchase["payment_id"]
    await paid_at_the_provider_but_its_webhook_lost(api, payment_id)
    recovery = Recovery(api.settings, api.engine, api.state.provider)
    assert (await recovery.run_once()).purchases == {}  # too young for the usual reconcile
    async with api.engine.begin() as conn:
        # What the sync request committed first, before it died (a worker killed mid-way).
        await conn.execute(
            update(purchases)
            .where(purchases.c.payment_id == payment_id)
            .values(paid_seen_at=purchases.c.created_at)
        )
    assert (await recovery.run_once()).purchases == {"credited": 1}
    assert await credits_remaining(api) == 20
    assert (await api.audit()).clean


@pytest.mark.parametrize("attempts", [1, 2, 3, 12, 40])
def test_sandbox_redelivery_backs_off_like_stripe(attempts: int) -> None:
    delay = redeliver_delay(attempts).total_seconds()
    assert delay == min(5 * 2 ** (attempts - 1), 3600)


async def test_the_sandbox_redelivers_a_webhook_the_inbox_did_not_take(api: Api) -> None:
    purchase = await bought(api)
    payment_id, secret = purchase["payment_id"], purchase["client_secret"]
    paid = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
        json={"client_secret": secret, "card_number": "4242424242424242"},
    )
    assert paid.status_code == 200, paid.text
    assert await credits_remaining(api) == 20  # its webhook, at once
    async with api.engine.begin() as conn:
        rows = list(
            await conn.execute(
                select(sandbox_webhook_events).where(
                    sandbox_webhook_events.c.payment_id == payment_id
                )
            )
        )
        assert [(r.type, r.attempts, r.delivered_at is not None) for r in rows] == [
            ("payment_intent.succeeded", 1, True)
        ]
        # As if the worker had died after the payment's commit, before its webhook went out.
        await conn.execute(
            update(sandbox_webhook_events)
            .where(sandbox_webhook_events.c.payment_id == payment_id)
            .values(
                delivered_at=None, attempts=0, next_attempt_at=sandbox_webhook_events.c.created_at
            )
        )
    recovery = Recovery(api.settings, api.engine, api.state.provider)
    await recovery.run_once()
    async with api.engine.connect() as conn:
        row = (
            await conn.execute(
                select(sandbox_webhook_events).where(
                    sandbox_webhook_events.c.payment_id == payment_id
                )
            )
        ).one()
    assert (row.attempts, row.delivered_at is not None) == (1, True)
    assert await credits_remaining(api) == 20  # the inbox took it again: credited once
    assert (await api.audit()).clean


async def test_the_agent_client_confirms_a_paid_purchase(api: Api) -> None:
    """`confirm_purchase`: what an agent calls once the provider told its user it succeeded."""
    purchase = await bought(api)
    payment_id = purchase["payment_id"]
    await paid_at_the_provider_but_its_webhook_lost(api, payment_id)
    # The in-process app's own transport (no server to start).
    transport = api.http._transport
    assert isinstance(transport, httpx.AsyncBaseTransport)
    async with AsyncBillingClient(
        "http://billing.test", api.keys["write"], transport=transport
    ) as client:
        confirmed = await client.confirm_purchase(payment_id)
    assert confirmed.status == "succeeded"
    assert await credits_remaining(api) == 20
    assert (await api.audit()).clean
