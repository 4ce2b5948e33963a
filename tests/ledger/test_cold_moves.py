"""Issue 23, the cold moves: refunds, disputes, adjustments and erasure go through the money
core (ledger/moves.py) and name the lots they touched; `audit` checks every lot.

No charge or hold here: those are the hot half's statements. Uses are consumed by negative
adjustments (the promotional and paid lots, in the consumption order) instead.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from ciris_billing.db import accounts, credits, lots
from tests.support.api import Api, identity
from tests.support.flows import check, paid_purchase

USER = identity("cold-moves@example.com")
ACCOUNT = "/v1/billing/accounts/oauth:google/cold-moves@example.com"


async def grant(api: Api, uses: int, reason: str = "goodwill") -> Any:
    return await api.post(
        "/v1/billing/credits", {**USER, "uses": uses, "reason": reason}, scope="admin"
    )


async def refund(api: Api, payment_id: str, amount_minor: int | None = None) -> dict[str, Any]:
    body = {} if amount_minor is None else {"amount_minor": amount_minor}
    answer = await api.post(f"/v1/billing/purchases/{payment_id}/refund", body, scope="admin")
    assert answer.status_code == 201, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def dispute(api: Api, payment_id: str, status: str) -> None:
    answer = await api.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/dispute",
        {"status": status},
        scope="admin",
    )
    assert answer.status_code == 200, answer.text


async def account_row(api: Api) -> Any:
    async with api.engine.connect() as conn:
        return (
            await conn.execute(
                select(accounts).where(accounts.c.external_id == USER["external_id"])
            )
        ).one()


async def lots_by_source(api: Api) -> dict[str, Any]:
    """The account's lots by their purchase's payment id (paid lots) or source, with what each
    has left in the wallet."""
    account = await account_row(api)
    wallet = dict(zip(account.lot_ids, account.lot_left, strict=True))
    async with api.engine.connect() as conn:
        rows = list(
            await conn.execute(
                select(lots).where(lots.c.account_id == account.id).order_by(lots.c.created_at)
            )
        )
    found: dict[str, Any] = {}
    for row in rows:
        key = row.purchase_id or row.source
        found[key] = {"status": row.status, "left": wallet.get(row.id, 0), "id": row.id}
    return found


async def movements(api: Api, kind: str) -> list[Any]:
    async with api.engine.connect() as conn:
        return list(
            await conn.execute(
                select(credits).where(credits.c.kind == kind).order_by(credits.c.created_at)
            )
        )


async def purchase_id(api: Api, payment_id: str) -> str:
    async with api.engine.connect() as conn:
        from ciris_billing.db import purchases

        found = await conn.scalar(
            select(purchases.c.id).where(purchases.c.payment_id == payment_id)
        )
    assert found is not None
    return str(found)


async def assert_clean(api: Api) -> None:
    report = await api.audit()
    assert report.clean, (report.discrepancies, report.reservation_findings, report.lot_findings)


async def test_adjustment_takes_promotional_then_oldest_paid_never_free(api: Api) -> None:
    first = await paid_purchase(api, USER)
    second = await paid_purchase(api, USER)
    assert (await grant(api, 5)).status_code == 201
    removed = await grant(api, -12, "chargeback outside Stripe")
    assert removed.status_code == 201, removed.text
    after = await check(api, USER)
    assert (after["free_uses_remaining"], after["credits_remaining"]) == (3, 20 + 20 + 5 - 12)
    held = await lots_by_source(api)
    a, b = await purchase_id(api, first["payment_id"]), await purchase_id(api, second["payment_id"])
    assert held["free_grant"]["left"] == 3
    assert held["grant"] == {**held["grant"], "left": 0, "status": "used"}, "promotional first"
    assert (held[a]["left"], held[b]["left"]) == (13, 20), "then the oldest paid lot"
    [row] = await movements(api, "adjustment")
    assert dict(zip(row.lot_ids, row.lot_uses, strict=True)) == {
        held["grant"]["id"]: -5,
        held[a]["id"]: -7,
    }
    too_much = await grant(api, -34)
    assert too_much.status_code == 422, "the free uses are never adjusted away"
    await assert_clean(api)


async def test_refund_takes_only_from_its_purchase_lot(api: Api) -> None:
    first = await paid_purchase(api, USER)
    second = await paid_purchase(api, USER)
    assert (await grant(api, 5)).status_code == 201
    assert (await grant(api, -10)).status_code == 201  # promotional 5, then 5 of the first
    a, b = await purchase_id(api, first["payment_id"]), await purchase_id(api, second["payment_id"])

    whole = await refund(api, first["payment_id"])
    assert (whole["uses_reversed"], whole["shortfall_uses"]) == (15, 5), (
        "what was spent of its lot is shortfall, the other purchase's uses are not taken"
    )
    half = await refund(api, second["payment_id"], 250)
    assert (half["uses_reversed"], half["shortfall_uses"]) == (10, 0)

    held = await lots_by_source(api)
    assert held[a] == {**held[a], "left": 0, "status": "used"}, "used up: out of the wallet"
    assert held[b]["left"] == 10
    assert held["free_grant"]["left"] == 3
    rows = await movements(api, "refund")
    assert [dict(zip(r.lot_ids, r.lot_uses, strict=True)) for r in rows] == [
        {held[a]["id"]: -15},
        {held[b]["id"]: -10},
    ]
    assert [(r.paid_uses_delta, r.shortfall_uses) for r in rows] == [(-15, 5), (-10, 0)]
    assert (await check(api, USER))["credits_remaining"] == 10
    assert held[a]["id"] not in (await account_row(api)).lot_ids
    await assert_clean(api)


async def test_dispute_holds_from_its_lot_and_a_win_puts_the_lot_back(api: Api) -> None:
    first = await paid_purchase(api, USER)
    second = await paid_purchase(api, USER)
    a, b = await purchase_id(api, first["payment_id"]), await purchase_id(api, second["payment_id"])
    await dispute(api, second["payment_id"], "needs_response")
    held = await lots_by_source(api)
    assert held[b] == {**held[b], "left": 0, "status": "used"}, "all its uses held: it left"
    assert held[a]["left"] == 20, "another purchase's lot is never held"
    account = await account_row(api)
    assert (account.paid_uses_remaining, account.held_uses) == (20, 20)
    await assert_clean(api)

    await dispute(api, second["payment_id"], "won")
    held = await lots_by_source(api)
    assert held[b] == {**held[b], "left": 20, "status": "active"}, "back in the wallet"
    account = await account_row(api)
    assert list(account.lot_ids) == [held["free_grant"]["id"], held[a]["id"], held[b]["id"]], (
        "in the consumption order: free, then the paid lots oldest first"
    )
    assert (account.paid_uses_remaining, account.held_uses) == (40, 0)
    [hold] = await movements(api, "dispute_hold")
    [won] = await movements(api, "dispute_won")
    assert (list(hold.lot_ids), list(hold.lot_uses)) == ([held[b]["id"]], [-20])
    assert (list(won.lot_ids), list(won.lot_uses)) == ([held[b]["id"]], [20])
    await assert_clean(api)


async def test_dispute_lost_keeps_the_lot_closed(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    assert (await grant(api, -4)).status_code == 201
    lot = await purchase_id(api, bought["payment_id"])
    await dispute(api, bought["payment_id"], "needs_response")
    assert (await account_row(api)).held_uses == 16
    await dispute(api, bought["payment_id"], "lost")
    held = await lots_by_source(api)
    assert held[lot] == {**held[lot], "left": 0, "status": "used"}
    account = await account_row(api)
    assert (account.paid_uses_remaining, account.held_uses) == (0, 0)
    await assert_clean(api)


async def test_erasure_writes_every_lot_off(api: Api) -> None:
    await paid_purchase(api, USER)
    assert (await grant(api, 5)).status_code == 201
    before = await account_row(api)
    erased = await api.http.delete(ACCOUNT, headers=api.headers("admin"))
    assert erased.status_code == 200, erased.text
    account = await account_row_by_id(api, before.id)
    assert (account.free_uses_remaining, account.paid_uses_remaining) == (0, 0)
    assert list(account.lot_ids) == []
    assert list(account.lot_left) == []
    async with api.engine.connect() as conn:
        statuses = {
            r.status for r in await conn.execute(select(lots).where(lots.c.account_id == before.id))
        }
    assert statuses == {"erased"}
    [void] = await movements(api, "void")
    assert sorted(void.lot_uses) == [-20, -5, -3]
    assert (void.free_uses_delta, void.paid_uses_delta) == (-3, -25)
    await assert_clean(api)


async def account_row_by_id(api: Api, account_id: str) -> Any:
    async with api.engine.connect() as conn:
        return (await conn.execute(select(accounts).where(accounts.c.id == account_id))).one()


async def test_an_auto_topup_is_a_paid_lot_that_says_so(api: Api) -> None:
    from tests.autotopup.test_auto_topup import buy_saving_card, deliver_stored_webhooks, run_job

    who = "cold-topup@example.com"
    await buy_saving_card(api, who)  # 3 free + 20 paid, auto top-up on
    account = f"/v1/billing/accounts/oauth:google/{who}"
    threshold = await api.http.put(
        f"{account}/low_balance_threshold", json={"uses": 10}, headers=api.headers("admin")
    )
    assert threshold.status_code == 200, threshold.text
    body = {**identity(who), "uses": -15, "reason": "crossing by adjustment"}
    assert (await api.post("/v1/billing/credits", body, scope="admin")).status_code == 201
    assert (await run_job(api)).started == 1
    assert "credited" in await deliver_stored_webhooks(api)
    async with api.engine.connect() as conn:
        sources = sorted(
            (r.kind, r.source, r.uses_granted)
            for r in await conn.execute(
                select(lots).join(accounts).where(accounts.c.external_id == who)
            )
        )
    assert sources == [
        ("free", "free_grant", 3),
        ("paid", "auto_topup", 20),
        ("paid", "purchase", 20),
    ]
    await assert_clean(api)
