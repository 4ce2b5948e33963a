"""The guide's steps 6 to 9 with the built-in sandbox provider, over the HTTP API only."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from tests.support.api import Api, identity
from tests.support.flows import (
    BUYER,
    DECLINED,
    NEEDS_3DS,
    VISA,
    check,
    exhaust_free_uses,
    pay,
    purchase,
)


async def test_buy_20_uses_with_4242(api: Api) -> None:
    await exhaust_free_uses(api)
    assert (await check(api))["purchase_required"] is True

    bought = await purchase(api)
    assert bought["payment_id"].startswith("pi_")
    assert bought["client_secret"].startswith(bought["payment_id"] + "_secret_")
    assert (bought["amount_minor"], bought["currency"], bought["uses_purchased"]) == (
        500,
        "USD",
        20,
    )
    assert bought["status"] == "requires_payment_method"
    assert "publishable_key" not in bought

    paid = await pay(api, bought, VISA)
    assert paid.status_code == 200
    assert paid.json()["status"] == "succeeded"

    after = await check(api)
    assert after["has_credit"] is True
    assert after["credits_remaining"] == 20
    assert after["purchase_required"] is False
    status = await api.get(f"/v1/billing/purchases/{bought['payment_id']}")
    assert status.json()["status"] == "succeeded"
    assert status.json()["credited"] is True
    assert "client_secret" not in status.json()

    # The guide's troubleshooting query finds the credit.
    async with api.engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT * FROM credits WHERE external_transaction_id LIKE 'pi_%' "
                    "ORDER BY created_at DESC LIMIT 10"
                )
            )
        ).all()
    assert [row.external_transaction_id for row in rows] == [bought["payment_id"]]
    assert rows[0].paid_uses_delta == 20

    charged = await api.post("/v1/billing/charges", BUYER)
    assert charged.json()["paid_uses_used"] == 1
    assert (await api.audit()).clean


async def test_declined_card_marks_the_purchase_failed(api: Api) -> None:
    bought = await purchase(api)
    declined = await pay(api, bought, DECLINED)
    assert declined.status_code == 402
    assert declined.json()["error"] == "card_declined"
    assert "insufficient funds" in declined.json()["detail"]
    status = (await api.get(f"/v1/billing/purchases/{bought['payment_id']}")).json()
    assert status["status"] == "failed"
    assert status["credited"] is False
    assert (await check(api))["credits_remaining"] == 0

    # Stripe lets the customer try another card on the same intent.
    retried = await pay(api, bought, VISA)
    assert retried.json()["status"] == "succeeded"
    assert (await check(api))["credits_remaining"] == 20
    assert (await api.audit()).clean


async def test_3ds_card_needs_authentication_first(api: Api) -> None:
    bought = await purchase(api)
    pending = await pay(api, bought, NEEDS_3DS)
    assert pending.json()["status"] == "requires_action"
    assert (await check(api))["credits_remaining"] == 0

    done = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/authenticate",
        json={"client_secret": bought["client_secret"], "success": True},
    )
    assert done.json()["status"] == "succeeded"
    assert (await check(api))["credits_remaining"] == 20


async def test_failed_3ds_fails_the_purchase(api: Api) -> None:
    bought = await purchase(api)
    await pay(api, bought, NEEDS_3DS)
    failed = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/authenticate",
        json={"client_secret": bought["client_secret"], "success": False},
    )
    assert failed.json()["status"] == "requires_payment_method"
    status = (await api.get(f"/v1/billing/purchases/{bought['payment_id']}")).json()
    assert status["status"] == "failed"
    assert (await check(api))["credits_remaining"] == 0


async def test_wrong_client_secret_or_bad_card_is_refused(api: Api) -> None:
    bought = await purchase(api)
    wrong = await pay(api, {**bought, "client_secret": "pi_x_secret_y"}, VISA)
    assert wrong.status_code == 404
    bad = await pay(api, bought, "4242 4242 4242 4241")
    assert bad.status_code == 402
    assert bad.json()["decline_code"] == "incorrect_number"
    assert (await pay(api, bought, VISA)).status_code == 200
    again = await pay(api, bought, VISA)
    assert again.status_code == 409
    assert (await check(api))["credits_remaining"] == 20


async def test_purchase_idempotency_returns_the_same_intent(api: Api) -> None:
    first = await purchase(api, idempotency_key="buy-1")
    again = await purchase(api, idempotency_key="buy-1")
    assert first == again
    other = await api.post(
        "/v1/billing/purchases",
        identity("someone-else@example.com"),
        **{"Idempotency-Key": "buy-1"},
    )
    assert other.status_code == 409


async def test_two_purchases_paid_credit_40(api: Api) -> None:
    first, second = await asyncio.gather(purchase(api), purchase(api))
    assert first["payment_id"] != second["payment_id"]
    await pay(api, first, VISA)
    await pay(api, second, VISA)
    assert (await check(api))["credits_remaining"] == 40
    assert (await api.audit()).clean


async def test_purchase_needs_a_write_key(api: Api) -> None:
    response = await api.post("/v1/billing/purchases", BUYER, scope="read")
    assert response.status_code == 403
    no_key = await api.http.post("/v1/billing/purchases", json=BUYER)
    assert no_key.status_code == 401


async def test_unknown_purchase_is_404(api: Api) -> None:
    response = await api.get("/v1/billing/purchases/pi_nope")
    assert response.status_code == 404
    assert response.json()["error"] == "purchase_not_found"
