"""The webhook inbox under attack and disorder: verified, stored once, credited exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from sqlalchemy import func, select, update

from ciris_billing.db import sandbox_payments, webhook_events
from ciris_billing.payments import service as payments
from ciris_billing.payments.providers import signing
from ciris_billing.payments.providers.base import PaymentIntent
from tests.support.api import Api, identity
from tests.support.cli import CliResult, cli
from tests.support.flows import BUYER, VISA, check, pay, purchase

ROUTE = "/v1/billing/webhooks/sandbox"


def secret(api: Api) -> str:
    """The installation's own sandbox webhook secret (made once, stored)."""
    return api.state.secrets.sandbox_webhook_secret


def event(payment_id: str, event_type: str = "payment_intent.succeeded", **extra: Any) -> bytes:
    body = {
        "id": extra.pop("event_id", f"evt_test_{time.monotonic_ns()}"),
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "data": {"object": {"id": payment_id, "object": "payment_intent", **extra}},
    }
    return json.dumps(body).encode()


async def deliver(api: Api, payload: bytes, signature: str | None = None) -> Any:
    headers = {"Content-Type": "application/json"}
    headers["Stripe-Signature"] = (
        signing.sign(payload, secret(api)) if signature is None else signature
    )
    return await api.http.post(ROUTE, content=payload, headers=headers)


async def stored_events(api: Api) -> int:
    async with api.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(webhook_events)) or 0)


async def succeed_silently(api: Api, payment_id: str, **values: Any) -> None:
    """The provider's side changes, but its webhook never arrives."""
    async with api.engine.begin() as conn:
        await conn.execute(
            update(sandbox_payments)
            .where(sandbox_payments.c.id == payment_id)
            .values(status="succeeded", **values)
        )


def operator(api: Api, *args: str) -> CliResult:
    """`ciris-billing ARGS` on this test's database, in process."""
    env = {**os.environ, "DATABASE_URL": api.database_url, "PAYMENT_PROVIDER": "sandbox"}
    return cli(env, *args)


async def test_bad_signatures_are_400_and_store_nothing(api: Api) -> None:
    bought = await purchase(api)
    await succeed_silently(api, bought["payment_id"])
    payload = event(bought["payment_id"])
    stale = signing.sign(payload, secret(api), int(time.time()) - 301)
    for signature in ("", "t=1,v1=abc", signing.sign(payload, "whsec_wrong"), stale):
        response = await deliver(api, payload, signature)
        assert response.status_code == 400, signature
        assert response.json()["error"] == "invalid_webhook_signature"
    tampered = payload.replace(b'"payment_intent.succeeded"', b'"payment_intent.succeeded" ')
    response = await deliver(api, tampered, signing.sign(payload, secret(api)))
    assert response.status_code == 400
    no_header = await api.http.post(ROUTE, content=payload)
    assert no_header.status_code == 400
    assert await stored_events(api) == 0
    assert (await check(api))["credits_remaining"] == 0


async def test_a_valid_event_is_checked_against_the_provider(api: Api) -> None:
    bought = await purchase(api)
    # Signed, but the payment has not succeeded at the provider: the body is not trusted.
    response = await deliver(api, event(bought["payment_id"], status="succeeded", amount=500))
    assert response.status_code == 200
    assert response.json()["outcome"] == "status_updated"
    assert (await check(api))["credits_remaining"] == 0


async def test_unknown_payment_is_ignored(api: Api) -> None:
    response = await deliver(api, event("pi_does_not_exist"))
    assert response.status_code == 200
    assert response.json()["outcome"] == "unknown_payment"


async def test_amount_mismatch_is_not_credited(api: Api) -> None:
    bought = await purchase(api)
    await succeed_silently(api, bought["payment_id"], amount_minor=100)
    response = await deliver(api, event(bought["payment_id"]))
    assert response.json()["outcome"] == "amount_mismatch"
    assert (await check(api))["credits_remaining"] == 0
    assert (await api.audit()).clean


async def test_one_event_delivered_50_times_concurrently_credits_once(api: Api) -> None:
    bought = await purchase(api)
    await succeed_silently(api, bought["payment_id"])
    payload = event(bought["payment_id"], event_id="evt_storm")
    responses = await asyncio.gather(*(deliver(api, payload) for _ in range(50)))
    assert {r.status_code for r in responses} == {200}
    outcomes = sorted(r.json()["outcome"] for r in responses)
    assert outcomes.count("credited") == 1
    assert outcomes.count("duplicate") == 49
    assert (await check(api))["credits_remaining"] == 20
    assert await stored_events(api) == 1
    assert (await api.audit()).clean


async def test_distinct_events_for_one_payment_credit_once(api: Api) -> None:
    bought = await purchase(api)
    await succeed_silently(api, bought["payment_id"])
    responses = await asyncio.gather(
        *(deliver(api, event(bought["payment_id"])) for _ in range(10))
    )
    outcomes = [r.json()["outcome"] for r in responses]
    assert outcomes.count("credited") == 1
    assert (await check(api))["credits_remaining"] == 20


async def test_payment_failed_after_succeeded_keeps_the_credit(api: Api) -> None:
    bought = await purchase(api)
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    late = await deliver(api, event(bought["payment_id"], "payment_intent.payment_failed"))
    assert late.json()["outcome"] == "already_credited"
    status = (await api.get(f"/v1/billing/purchases/{bought['payment_id']}")).json()
    assert status["status"] == "succeeded"
    assert (await check(api))["credits_remaining"] == 20


async def test_other_event_types_are_acknowledged_and_ignored(api: Api) -> None:
    payload = json.dumps(
        {
            "id": "evt_cust",
            "object": "event",
            "type": "customer.created",
            "created": int(time.time()),
            "data": {"object": {"id": "cus_1", "object": "customer"}},
        }
    ).encode()
    response = await deliver(api, payload)
    assert response.status_code == 200
    assert response.json()["outcome"] == "ignored"


async def test_routes_of_inactive_providers_and_huge_bodies(api: Api) -> None:
    payload = event("pi_x")
    assert (await api.http.post("/v1/billing/webhooks/stripe", content=payload)).status_code == 404
    huge = b"{" + b" " * (300 * 1024) + b"}"
    assert (await deliver(api, huge)).status_code == 413


async def test_webhook_before_the_purchase_is_recorded_is_retried(api: Api) -> None:
    """The provider's event outruns our purchase row: not handled, 503, credited on replay."""
    account = (await api.post("/v1/billing/accounts", BUYER)).json()
    provider = api.state.provider
    intent = PaymentIntent(500, "USD", "pur_early", account["account_id"], "purchase-pur_early")
    payment = await provider.create_payment_intent(intent)
    await succeed_silently(api, payment.payment_id)
    early = await deliver(api, event(payment.payment_id, event_id="evt_early"))
    assert early.status_code == 503
    assert early.json()["error"] == "purchase_not_yet_recorded"
    assert (await check(api))["credits_remaining"] == 0

    async with api.engine.begin() as conn:
        await payments.record_purchase(
            conn,
            purchase_id="pur_early",
            account_id=account["account_id"],
            provider="sandbox",
            payment=payment,
            offer=payments.Offer(500, "USD", 20),
            customer_email=None,
        )
    replayed = operator(api, "webhooks", "replay")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "evt_early: credited" in replayed.stdout
    assert (await check(api))["credits_remaining"] == 20
    # The provider's own retry now finds it handled.
    retry = await deliver(api, event(payment.payment_id, event_id="evt_early"))
    assert retry.json()["outcome"] == "duplicate"
    assert (await check(api))["credits_remaining"] == 20


async def test_reconcile_credits_a_payment_whose_webhook_never_came(api: Api) -> None:
    bought = await purchase(api)
    lost = await purchase(api, identity("other@example.com"))
    await succeed_silently(api, bought["payment_id"])
    first = operator(api, "reconcile")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"{bought['payment_id']}: credited" in first.stdout
    assert f"{lost['payment_id']}: status_updated" in first.stdout
    again = operator(api, "reconcile")
    assert bought["payment_id"] not in again.stdout
    assert (await check(api))["credits_remaining"] == 20
    # A late webhook after reconcile changes nothing.
    late = await deliver(api, event(bought["payment_id"]))
    assert late.json()["outcome"] == "already_credited"
    assert (await check(api))["credits_remaining"] == 20
    assert (await api.audit()).clean
