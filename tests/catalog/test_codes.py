"""Issue 24 item 4: promotion codes. A purchase with a code is charged the discounted amount
(its lot's cost basis is what was paid); a code bringing the price to 0 grants without the
provider; unknown, expired, exhausted codes are a 422 with the reason; redemptions are exact
under concurrency."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import text

from tests.catalog.support import audit_rows, made, patch
from tests.support.api import Api, identity
from tests.support.flows import BUYER, VISA, pay


def buy(code: str, user: dict[str, str] = BUYER, **more: str) -> dict[str, str]:
    return {**user, "promotion_code": code, **more}


async def test_a_percent_code_discounts_the_purchase_and_the_lot_cost(api: Api) -> None:
    created = await made(
        api, "/v1/billing/promotion_codes", {"code": "LAUNCH20", "percent_off": 20}
    )
    assert created["redemptions"] == 0
    assert created["active"] is True
    response = await api.post("/v1/billing/purchases", buy("LAUNCH20"))
    assert response.status_code == 201, response.text
    bought = response.json()
    assert (bought["amount_minor"], bought["uses_purchased"], bought["promotion_code"]) == (
        400, 20, "LAUNCH20",
    )  # fmt: skip
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    async with api.engine.connect() as conn:
        lot = (
            await conn.execute(
                text(
                    "SELECT l.* FROM lots l JOIN purchases p ON p.id = l.purchase_id "
                    "WHERE p.payment_id = :p"
                ),
                {"p": bought["payment_id"]},
            )
        ).one()
    assert (lot.amount_minor, lot.cost_basis_minor) == (400, 20)
    listed = (await api.get("/v1/billing/promotion_codes")).json()["promotion_codes"]
    assert listed[0]["redemptions"] == 1
    async with api.engine.connect() as conn:
        event = (
            await conn.execute(text("SELECT data FROM events WHERE type = 'purchase.succeeded'"))
        ).one()
    assert (event.data["pack_id"], event.data["promotion_code"]) == ("default", "LAUNCH20")
    assert len(await audit_rows(api, "promotion_code_create")) == 1
    assert (await api.audit()).clean


async def test_a_code_bringing_the_price_to_zero_grants_without_the_provider(api: Api) -> None:
    await made(api, "/v1/billing/promotion_codes", {"code": "FREEPACK", "amount_off_minor": 10_000})
    response = await api.post("/v1/billing/purchases", buy("FREEPACK"))
    assert response.status_code == 201, response.text
    bought = response.json()
    assert bought["amount_minor"] == 0
    assert bought["status"] == "succeeded"
    assert bought["credited"] is True
    assert bought["provider"] == "promotion"
    assert "client_secret" not in bought
    status = await api.get(f"/v1/billing/purchases/{bought['payment_id']}")
    assert status.status_code == 200
    portal = httpx.URL(bought["portal_url"]).path
    receipt = await api.http.get(f"{portal}/receipts/{bought['payment_id']}")
    assert receipt.status_code == 200
    assert (status.json()["status"], status.json()["credited"]) == ("succeeded", True)
    check = (await api.post("/v1/billing/credits/check", BUYER)).json()
    assert check["credits_remaining"] == 20
    async with api.engine.connect() as conn:
        sandbox = await conn.scalar(text("SELECT count(*) FROM sandbox_payments"))
    assert sandbox == 0
    assert (await api.audit()).clean


async def test_unknown_expired_exhausted_and_wrong_pack_codes_are_refused(api: Api) -> None:
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    await made(
        api, "/v1/billing/promotion_codes", {"code": "OLD", "percent_off": 10, "expires_at": past}
    )
    await made(
        api, "/v1/billing/promotion_codes", {"code": "ONE", "percent_off": 10, "max_redemptions": 1}
    )
    await made(
        api, "/v1/billing/promotion_codes", {"code": "OTHER", "percent_off": 10, "pack_ids": ["x"]}
    )
    await made(api, "/v1/billing/promotion_codes", {"code": "OFF", "percent_off": 10})
    assert (
        await patch(api, "/v1/billing/promotion_codes/OFF", {"active": False})
    ).status_code == 200
    assert (await api.post("/v1/billing/purchases", buy("ONE"))).status_code == 201
    for code, reason in [
        ("NOPE", "unknown"),
        ("OLD", "expired"),
        ("ONE", "exhausted"),
        ("OTHER", "not_for_pack"),
        ("OFF", "inactive"),
    ]:
        refused = await api.post("/v1/billing/purchases", buy(code))
        assert refused.status_code == 422, (code, refused.text)
        assert refused.json()["error"] == "promotion_code_refused"
        assert refused.json()["reason"] == reason
    # Exactly one of percent_off and amount_off_minor.
    both = {"code": "BOTH", "percent_off": 10, "amount_off_minor": 5}
    assert (await api.post("/v1/billing/promotion_codes", both, "admin")).status_code == 422
    assert (
        await api.post("/v1/billing/promotion_codes", {"code": "X"}, "admin")
    ).status_code == 422
    assert len(await audit_rows(api, "promotion_code_update")) == 1
    assert (await api.audit()).clean


async def test_once_per_account(api: Api) -> None:
    await made(
        api,
        "/v1/billing/promotion_codes",
        {"code": "WELCOME", "percent_off": 50, "once_per_account": True},
    )
    assert (await api.post("/v1/billing/purchases", buy("WELCOME"))).status_code == 201
    again = await api.post("/v1/billing/purchases", buy("WELCOME"))
    assert again.status_code == 422
    assert again.json()["reason"] == "already_redeemed"
    other = await api.post("/v1/billing/purchases", buy("WELCOME", identity("other@example.com")))
    assert other.status_code == 201
    codes = (await api.get("/v1/billing/promotion_codes")).json()["promotion_codes"]
    assert codes[0]["redemptions"] == 2  # the refused one counted nothing
    assert (await api.audit()).clean


async def test_fifty_concurrent_purchases_against_a_limit_of_ten(api: Api) -> None:
    await made(
        api,
        "/v1/billing/promotion_codes",
        {"code": "TEN", "percent_off": 50, "max_redemptions": 10},
    )
    users = [identity(f"racer{i}@example.com") for i in range(50)]
    answers = await asyncio.gather(
        *(api.post("/v1/billing/purchases", buy("TEN", user)) for user in users)
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [201] * 10 + [422] * 40, [a.text for a in answers if a.status_code >= 500]
    assert all(a.json()["amount_minor"] == 250 for a in answers if a.status_code == 201)
    assert all(a.json()["reason"] == "exhausted" for a in answers if a.status_code == 422)
    async with api.engine.connect() as conn:
        counted = await conn.scalar(
            text("SELECT redemptions FROM promotion_codes WHERE code = 'TEN'")
        )
        rows = await conn.scalar(text("SELECT count(*) FROM promotion_redemptions"))
        discounted = await conn.scalar(
            text("SELECT count(*) FROM purchases WHERE promotion_code = 'TEN'")
        )
    assert (counted, rows, discounted) == (10, 10, 10)
    assert (await api.audit()).clean


async def test_a_purchase_the_provider_cannot_start_gives_its_redemption_back(api: Api) -> None:
    import socket

    from sqlalchemy.ext.asyncio import create_async_engine

    from ciris_billing.payments.providers.sandbox import SandboxProvider

    await made(
        api,
        "/v1/billing/promotion_codes",
        {"code": "ONLY1", "percent_off": 50, "max_redemptions": 1},
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The provider is unreachable (its state lives in a database that does not answer).
    away = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x")
    api.state.provider, sandbox = SandboxProvider(away, "whsec_down", None), api.state.provider
    try:
        failed = await api.post("/v1/billing/purchases", buy("ONLY1"))
    finally:
        api.state.provider = sandbox
        await away.dispose()
    assert failed.status_code >= 500
    codes = (await api.get("/v1/billing/promotion_codes")).json()["promotion_codes"]
    assert codes[0]["redemptions"] == 0
    # The one redemption is still there for a purchase that starts.
    assert (await api.post("/v1/billing/purchases", buy("ONLY1"))).status_code == 201
    assert (await api.audit()).clean


async def test_the_receipt_pdf_names_the_pack_and_the_discount(api: Api) -> None:
    import io

    from pypdf import PdfReader

    big = {"pack_id": "big", "name": "50 uses", "uses": 50, "price_minor": 900, "currency": "USD"}
    await made(api, "/v1/billing/packs", big)
    await made(api, "/v1/billing/promotion_codes", {"code": "TWO", "amount_off_minor": 200})
    response = await api.post("/v1/billing/purchases", buy("TWO", pack_id="big"))
    assert response.status_code == 201, response.text
    bought = response.json()
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    portal = httpx.URL(bought["portal_url"]).path
    answer = await api.http.get(f"{portal}/receipts/{bought['payment_id']}/pdf")
    assert answer.status_code == 200
    text = PdfReader(io.BytesIO(answer.content)).pages[0].extract_text()
    lines = [line.strip() for line in text.splitlines()]
    for expected in (
        "Pack 50 uses (pack big)",
        "Price $9.00",
        "Discount $2.00",
        "Amount paid $7.00",
    ):
        assert expected in lines, (expected, lines)
