"""From a 402 to the payment page: the answer carries a signed, expiring buy link."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from sqlalchemy import func, select

from ciris_billing.checkout.links import buy_token, read_buy_token
from ciris_billing.db import purchases
from tests.support.api import Api, identity
from tests.support.flows import VISA, check

USER = identity("buy-link@example.com")


async def refused_charge(api: Api) -> dict[str, object]:
    for _ in range(3):
        await api.post("/v1/billing/charges", USER)
    refused = await api.post("/v1/billing/charges", USER)
    assert refused.status_code == 402
    body: dict[str, object] = refused.json()
    return body


async def test_402_links_to_a_purchase_and_its_payment_page(api: Api) -> None:
    body = await refused_charge(api)
    link = str(body["checkout_url"])
    assert link.startswith("http://billing.test/v1/billing/buy/")
    opened = await api.http.get(urlsplit(link).path)  # no API key: the link is the credential
    assert opened.status_code == 303
    page = opened.headers["location"]
    assert "/v1/billing/checkout/pi_" in page
    assert "#cs=pi_" in page
    again = await api.http.get(urlsplit(link).path)
    assert again.headers["location"] == page, "opening the link twice gives one purchase"

    payment_id = urlsplit(page).path.rsplit("/", 1)[1]
    client_secret = urlsplit(page).fragment.removeprefix("cs=")
    paid = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
        json={"client_secret": client_secret, "card_number": VISA},
    )
    assert paid.json()["status"] == "succeeded"
    assert (await check(api, USER))["credits_remaining"] == 20


async def test_a_double_clicked_link_starts_one_purchase(api: Api) -> None:
    link = urlsplit(str((await refused_charge(api))["checkout_url"])).path
    opened = await asyncio.gather(*(api.http.get(link) for _ in range(4)))
    assert [response.status_code for response in opened] == [303] * 4
    assert len({response.headers["location"] for response in opened}) == 1
    async with api.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(purchases)) == 1


async def test_tampered_or_expired_links_are_refused(api: Api) -> None:
    body = await refused_charge(api)
    path = urlsplit(str(body["checkout_url"])).path
    token = path.rsplit("/", 1)[1]
    forged = token[:10] + ("0" if token[10] != "0" else "1") + token[11:]
    assert (await api.http.get(f"/v1/billing/buy/{forged}")).status_code == 404
    other = buy_token(b"another secret", "oauth:google", "buy-link@example.com")
    assert (await api.http.get(f"/v1/billing/buy/{other}")).status_code == 404
    expired = buy_token(api.state.link_secret, "oauth:google", "buy-link@example.com", now=0)
    assert read_buy_token(api.state.link_secret, expired) is None
    assert (await api.http.get(f"/v1/billing/buy/{expired}")).status_code == 404


async def test_purchase_response_has_the_checkout_url(api: Api) -> None:
    bought = (await api.post("/v1/billing/purchases", USER)).json()
    assert bought["checkout_url"] == (
        f"http://billing.test/v1/billing/checkout/{bought['payment_id']}#cs={bought['client_secret']}"
    )
