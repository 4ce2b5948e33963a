"""The guide's purchase flow with the sandbox provider, over the in-process app's HTTP API."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.api import Api, identity

BUYER = identity("buyer@example.com")
# The sandbox's test cards (Stripe's numbers).
VISA = "4242 4242 4242 4242"
DECLINED = "4000 0000 0000 9995"
NEEDS_3DS = "4000 0025 0000 3155"


async def exhaust_free_uses(api: Api, user: dict[str, str] = BUYER) -> None:
    for _ in range(3):
        assert (await api.post("/v1/billing/charges", user)).status_code == 201


async def purchase(
    api: Api, user: dict[str, str] = BUYER, idempotency_key: str | None = None
) -> dict[str, Any]:
    headers = {} if idempotency_key is None else {"Idempotency-Key": idempotency_key}
    response = await api.post(
        "/v1/billing/purchases", {**user, "customer_email": user["external_id"]}, **headers
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def pay(api: Api, bought: dict[str, Any], card: str) -> httpx.Response:
    return await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/confirm",
        json={"client_secret": bought["client_secret"], "card_number": card},
    )


async def paid_purchase(api: Api, user: dict[str, str] = BUYER) -> dict[str, Any]:
    """A purchase paid with VISA: its 20 uses credited."""
    bought = await purchase(api, user)
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    return bought


async def check(api: Api, user: dict[str, str] = BUYER) -> dict[str, Any]:
    body: dict[str, Any] = (await api.post("/v1/billing/credits/check", user)).json()
    return body
