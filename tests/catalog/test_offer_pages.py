"""Issue 24 item 1: the payment page and the portal show the offers (the account's plan's
packs), each with a buy link that starts a purchase of that pack; a 402's buy link buys the
plan's pack when the default pack is not among its offers."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from tests.catalog.support import EUR_PACK, eur_account, made
from tests.support.api import Api, identity
from tests.support.flows import BUYER, check, purchase

BIG = {**EUR_PACK, "pack_id": "big", "currency": "USD", "price_minor": 900, "uses": 50}


async def test_the_payment_page_offers_the_other_packs(api: Api) -> None:
    await made(api, "/v1/billing/packs", BIG)
    bought = await purchase(api)
    summary = await api.http.get(
        f"/v1/billing/checkout/{bought['payment_id']}/summary",
        headers={"X-Client-Secret": bought["client_secret"]},
    )
    assert summary.status_code == 200, summary.text
    body = summary.json()
    assert body["pack_id"] == "default"
    assert [(o["pack_id"], o["price"]) for o in body["offers"]] == [
        ("default", "$5.00"),
        ("big", "$9.00"),
    ]
    # The other pack's link starts its own purchase and goes to its payment page.
    link = urlsplit(body["offers"][1]["buy_url"])
    opened = await api.http.get(f"{link.path}?{link.query}")
    assert opened.status_code == 303
    payment_id = urlsplit(opened.headers["location"]).path.rsplit("/", 1)[-1]
    status = (await api.get(f"/v1/billing/purchases/{payment_id}")).json()
    assert (status["pack_id"], status["amount_minor"], status["uses_purchased"]) == ("big", 900, 50)
    page = await api.http.get(urlsplit(opened.headers["location"]).path)
    assert 'id="other-packs"' in page.text


async def test_the_portal_lists_the_offers(api: Api) -> None:
    await made(api, "/v1/billing/packs", BIG)
    await made(api, "/v1/billing/packs", EUR_PACK)  # another currency: not offered
    portal = httpx.URL((await check(api, BUYER))["portal_url"]).path
    page = await api.http.get(portal)
    assert page.status_code == 200
    assert 'id="offers"' in page.text
    assert "Buy 20 uses for $5.00" in page.text
    assert "Buy 50 uses for $9.00" in page.text
    assert "pro-eur" not in page.text
    assert "?pack_id=big" in page.text


async def test_a_402_buy_link_buys_a_pack_the_account_may_buy(api: Api) -> None:
    await made(api, "/v1/billing/packs", EUR_PACK)
    euro = identity("euro-402@example.com")
    await eur_account(api, euro)
    for _ in range(3):
        assert (
            await api.post("/v1/billing/charges", {**euro, "currency": "EUR"})
        ).status_code == 201
    refused = await api.post("/v1/billing/charges", {**euro, "currency": "EUR"})
    assert refused.status_code == 402
    assert [o["pack_id"] for o in refused.json()["offers"]] == ["pro-eur"]
    opened = await api.http.get(urlsplit(refused.json()["checkout_url"]).path)
    assert opened.status_code == 303, opened.text
    payment_id = urlsplit(opened.headers["location"]).path.rsplit("/", 1)[-1]
    status = (await api.get(f"/v1/billing/purchases/{payment_id}")).json()
    assert (status["pack_id"], status["currency"]) == ("pro-eur", "EUR")
    assert (await api.audit()).clean
