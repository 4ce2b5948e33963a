"""Money going back (sandbox provider, both databases): refunds and disputes, exactly once,
never below zero."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from ciris_billing.db import credits, sandbox_payments
from tests.support.api import Api, identity
from tests.support.flows import check, paid_purchase, purchase

USER = identity("refund-me@example.com")


async def refund(
    api: Api, payment_id: str, body: dict[str, Any] | None = None, **headers: str
) -> Any:
    return await api.post(
        f"/v1/billing/purchases/{payment_id}/refund", body or {}, scope="admin", **headers
    )


async def refund_rows(api: Api) -> list[Any]:
    async with api.engine.connect() as conn:
        return list(await conn.execute(select(credits).where(credits.c.kind == "refund")))


async def provider_refunded(api: Api, payment_id: str) -> int:
    async with api.engine.connect() as conn:
        value = await conn.scalar(
            select(sandbox_payments.c.amount_refunded_minor).where(
                sandbox_payments.c.id == payment_id
            )
        )
    return int(value or 0)


async def test_full_refund_takes_the_uses_back(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    refunded = await refund(api, bought["payment_id"])
    assert refunded.status_code == 201, refunded.text
    body = refunded.json()
    assert body["refund_id"].startswith("re_")
    assert (body["amount_minor"], body["uses_reversed"], body["shortfall_uses"]) == (500, 20, 0)
    assert body["purchase_status"] == "refunded"
    assert (await check(api, USER))["credits_remaining"] == 0
    assert len(await refund_rows(api)) == 1, "the charge.refunded webhook added nothing"
    assert (await api.audit()).clean


async def test_partial_refunds_round_uses_up(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    first = (await refund(api, bought["payment_id"], {"amount_minor": 1})).json()
    assert (first["uses_reversed"], first["purchase_status"]) == (1, "partially_refunded")
    second = (await refund(api, bought["payment_id"], {"amount_minor": 249})).json()
    assert second["uses_refunded"] == 10
    rest = (await refund(api, bought["payment_id"])).json()
    assert (rest["amount_minor"], rest["uses_refunded"], rest["purchase_status"]) == (
        250,
        20,
        "refunded",
    )
    assert (await check(api, USER))["credits_remaining"] == 0
    assert (await api.audit()).clean


async def test_refund_after_spending_records_the_shortfall(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    for _ in range(3 + 15):  # the free uses, then 15 of the 20 paid ones
        assert (await api.post("/v1/billing/charges", USER)).status_code == 201
    body = (await refund(api, bought["payment_id"])).json()
    assert (body["uses_reversed"], body["shortfall_uses"]) == (5, 15)
    after = await check(api, USER)
    assert (after["credits_remaining"], after["free_uses_remaining"]) == (0, 0)
    assert (await api.audit()).clean


async def test_same_key_refunds_once(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    first = await refund(
        api, bought["payment_id"], {"amount_minor": 100}, **{"Idempotency-Key": "rf-1"}
    )
    again = await refund(
        api, bought["payment_id"], {"amount_minor": 100}, **{"Idempotency-Key": "rf-1"}
    )
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert await provider_refunded(api, bought["payment_id"]) == 100
    assert len(await refund_rows(api)) == 1


async def test_refunding_more_than_was_paid_is_422(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    assert (
        await refund(api, bought["payment_id"], {"amount_minor": 400}, **{"Idempotency-Key": "a"})
    ).status_code == 201
    beyond = await refund(
        api, bought["payment_id"], {"amount_minor": 200}, **{"Idempotency-Key": "b"}
    )
    assert beyond.status_code == 422
    assert beyond.json()["error"] == "refund_exceeds_payment"
    assert (await refund(api, bought["payment_id"], {"amount_minor": 501})).status_code == 422
    assert await provider_refunded(api, bought["payment_id"]) == 400
    assert (await api.audit()).clean


async def test_unpaid_or_unknown_purchases_cannot_be_refunded(api: Api) -> None:
    bought = await purchase(api, USER)
    unpaid = await refund(api, bought["payment_id"])
    assert unpaid.status_code == 409
    assert unpaid.json()["error"] == "refund_not_allowed"
    assert (await refund(api, "pi_nope")).status_code == 404
    assert (await refund(api, bought["payment_id"], {"amount_minor": 0})).status_code == 422
    assert (
        await api.post(f"/v1/billing/purchases/{bought['payment_id']}/refund", {})
    ).status_code == 403


async def test_dashboard_refund_arrives_by_webhook_then_api_refunds_the_rest(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    outside = await api.post(
        f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/dashboard_refund",
        {"amount_minor": 250},
        scope="admin",
    )
    assert outside.status_code == 200
    assert (await check(api, USER))["credits_remaining"] == 10
    status = (await api.get(f"/v1/billing/purchases/{bought['payment_id']}")).json()
    assert status["status"] == "partially_refunded"
    rest = (await refund(api, bought["payment_id"])).json()
    assert (rest["amount_minor"], rest["uses_refunded"]) == (250, 20)
    assert (await check(api, USER))["credits_remaining"] == 0
    assert len(await refund_rows(api)) == 2
    assert (await api.audit()).clean


async def dispute(api: Api, payment_id: str, status: str) -> Any:
    return await api.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/dispute",
        {"status": status},
        scope="admin",
    )


async def test_dispute_holds_then_lost_removes(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    for _ in range(3 + 5):
        await api.post("/v1/billing/charges", USER)
    assert (await dispute(api, bought["payment_id"], "needs_response")).status_code == 200
    held = (await api.get("/v1/billing/accounts/oauth:google/refund-me@example.com")).json()
    assert held["credits_remaining"] == 0
    assert (await api.post("/v1/billing/charges", USER)).status_code == 402, (
        "held uses are not spendable"
    )
    await dispute(api, bought["payment_id"], "lost")
    assert (await check(api, USER))["credits_remaining"] == 0
    assert (await api.audit()).clean


async def test_dispute_won_releases_the_hold(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    await dispute(api, bought["payment_id"], "needs_response")
    assert (await check(api, USER))["credits_remaining"] == 0
    await dispute(api, bought["payment_id"], "won")
    assert (await check(api, USER))["credits_remaining"] == 20
    await dispute(api, bought["payment_id"], "won")  # a second close changes nothing
    assert (await check(api, USER))["credits_remaining"] == 20
    async with api.engine.connect() as conn:
        kinds = sorted(
            r.kind
            for r in await conn.execute(select(credits.c.kind))
            if r.kind.startswith("dispute")
        )
    assert kinds == ["dispute_hold", "dispute_won"]
    assert (await api.audit()).clean
