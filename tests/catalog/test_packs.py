"""Issue 24 item 1: packs. The default pack is the environment's; operators add and archive
others; a purchase names one (in the account's currency) and its lot records it."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text

from tests.catalog.support import EUR_PACK, audit_rows, eur_account, made, patch
from tests.support.api import Api, identity
from tests.support.flows import BUYER, VISA, pay, purchase

EURO = identity("euro@example.com")


async def test_the_default_pack_comes_from_the_environment(api: Api) -> None:
    listed = await api.get("/v1/billing/packs")
    assert listed.status_code == 200
    assert listed.json() == {
        "packs": [
            {
                "pack_id": "default",
                "name": "20 uses",
                "uses": 20,
                "price_minor": 500,
                "currency": "USD",
                "expires_in_days": None,
                "active": True,
            }
        ]
    }
    # It is the environment's: not changed through the API.
    refused = await patch(api, "/v1/billing/packs/default", {"price_minor": 1})
    assert refused.status_code == 409
    assert (
        await api.post("/v1/billing/packs", {**EUR_PACK, "pack_id": "default"}, "admin")
    ).status_code == 409


async def test_packs_need_the_admin_key_and_strict_input(api: Api) -> None:
    assert (await api.post("/v1/billing/packs", EUR_PACK, "write")).status_code == 403
    unknown = await api.post("/v1/billing/packs", {**EUR_PACK, "colour": "red"}, "admin")
    assert unknown.status_code == 422
    assert (
        await api.post("/v1/billing/packs", {**EUR_PACK, "uses": 0}, "admin")
    ).status_code == 422


async def test_buy_a_second_pack_in_euros(api: Api) -> None:
    created = await made(api, "/v1/billing/packs", EUR_PACK)
    assert created == {**EUR_PACK, "active": True}
    assert [p["pack_id"] for p in (await api.get("/v1/billing/packs")).json()["packs"]] == [
        "default",
        "pro-eur",
    ]
    await eur_account(api, EURO)
    response = await api.post("/v1/billing/purchases", {**EURO, "pack_id": "pro-eur"})
    assert response.status_code == 201, response.text
    bought = response.json()
    assert (bought["amount_minor"], bought["currency"], bought["uses_purchased"]) == (
        2000,
        "EUR",
        100,
    )
    assert bought["pack_id"] == "pro-eur"
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"

    check = (await api.post("/v1/billing/credits/check", EURO)).json()
    assert check["credits_remaining"] == 100
    async with api.engine.connect() as conn:
        lot = (
            await conn.execute(
                text(
                    "SELECT l.*, p.pack_id AS purchase_pack FROM lots l "
                    "JOIN purchases p ON p.id = l.purchase_id WHERE p.payment_id = :p"
                ),
                {"p": bought["payment_id"]},
            )
        ).one()
    assert (lot.pack_id, lot.purchase_pack, lot.currency, lot.amount_minor) == (
        "pro-eur", "pro-eur", "EUR", 2000,
    )  # fmt: skip
    assert lot.cost_basis_minor == 20
    # The pack's expires_in_days sets its lot's expiry.
    assert lot.expires_at is not None
    assert abs(lot.expires_at - lot.created_at - timedelta(days=30)) < timedelta(seconds=5)
    assert len(await audit_rows(api, "pack_create")) == 1
    assert (await api.audit()).clean


async def test_an_account_buys_only_in_its_own_currency(api: Api) -> None:
    await made(api, "/v1/billing/packs", EUR_PACK)
    # A USD account (the default) and the EUR pack: 422.
    refused = await api.post("/v1/billing/purchases", {**BUYER, "pack_id": "pro-eur"})
    assert refused.status_code == 422
    assert refused.json()["error"] == "currency_mismatch"
    # A EUR account and the default (USD) pack: 422 too.
    await eur_account(api, EURO)
    refused = await api.post("/v1/billing/purchases", EURO)
    assert refused.status_code == 422
    assert refused.json()["error"] == "currency_mismatch"
    unknown = await api.post("/v1/billing/purchases", {**BUYER, "pack_id": "nope"})
    assert unknown.status_code == 422
    assert unknown.json()["reason"] == "unknown"
    assert (await api.audit()).clean


async def test_archiving_never_breaks_a_purchase_in_flight(api: Api) -> None:
    usd = {**EUR_PACK, "pack_id": "big", "currency": "USD", "price_minor": 900, "uses": 50}
    await made(api, "/v1/billing/packs", usd)
    bought = (await api.post("/v1/billing/purchases", {**BUYER, "pack_id": "big"})).json()
    archived = await patch(api, "/v1/billing/packs/big", {"active": False, "price_minor": 5000})
    assert archived.status_code == 200
    assert archived.json()["active"] is False
    # New purchases are refused...
    refused = await api.post("/v1/billing/purchases", {**BUYER, "pack_id": "big"})
    assert refused.status_code == 422
    assert refused.json()["reason"] == "archived"
    # ...the one in flight is paid and credited as it began (50 uses for 900).
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    check = (await api.post("/v1/billing/credits/check", BUYER)).json()
    assert check["credits_remaining"] == 50
    listed = (await api.get("/v1/billing/packs")).json()["packs"]
    assert [p["active"] for p in listed] == [True, False]
    assert len(await audit_rows(api, "pack_update")) == 1
    assert (await api.audit()).clean


async def test_the_guide_purchase_still_buys_the_default_pack(api: Api) -> None:
    bought = await purchase(api)
    assert (bought["amount_minor"], bought["uses_purchased"], bought["pack_id"]) == (
        500,
        20,
        "default",
    )
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    assert (await api.audit()).clean
