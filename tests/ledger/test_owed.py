"""Owed uses paid off when held uses come back (a refund could not take them: they were held)
name the lots they were taken from: the `owed_taken` ledger row's lot_ids / lot_uses (negative,
summing to its paid delta), on release, on expiry and on a partial capture (the hot statement)."""

from __future__ import annotations

from sqlalchemy import select

from ciris_billing.db import credits, lots
from tests.payments.test_refunds_spare_reservations import (
    capture,
    dashboard_refund,
    expire_now,
    held_by_the_hold,
    refund,
)
from tests.support.api import Api

RESERVE = "/v1/billing/reservations"


async def owed_taken(api: Api) -> list[tuple[int, list[str], list[int], set[str]]]:
    """Each owed_taken row: (its paid delta, its lots, their uses, those lots' kinds)."""
    async with api.engine.connect() as conn:
        rows = list(await conn.execute(select(credits).where(credits.c.kind == "owed_taken")))
        kinds = {row.id: row.kind for row in await conn.execute(select(lots.c.id, lots.c.kind))}
    return [
        (
            int(row.paid_uses_delta),
            list(row.lot_ids or []),
            list(row.lot_uses or []),
            {kinds[lot] for lot in row.lot_ids or []},
        )
        for row in rows
    ]


async def test_owed_uses_paid_off_on_release_name_their_lot(api: Api) -> None:
    both = await held_by_the_hold(api)
    await refund(api, both["payment_id"])  # 5 taken, 15 owed
    released = await api.post(f"{RESERVE}/{both['reservation_id']}/release", {})
    assert released.status_code == 200, released.text
    [(paid, lot_ids, lot_uses, kinds)] = await owed_taken(api)
    assert (paid, sum(lot_uses), len(lot_ids), kinds) == (-15, -15, 1, {"paid"})


async def test_owed_uses_paid_off_on_expiry_name_their_lot(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dashboard_refund(api, both["payment_id"], 250)  # 5 owed
    assert await expire_now(api) == 1
    [(paid, lot_ids, lot_uses, kinds)] = await owed_taken(api)
    assert (paid, sum(lot_uses), len(lot_ids), kinds) == (-5, -5, 1, {"paid"})


async def test_owed_uses_paid_off_by_a_partial_capture_name_their_lot(api: Api) -> None:
    both = await held_by_the_hold(api)
    await refund(api, both["payment_id"])  # 15 owed
    captured = await capture(api, both["reservation_id"], 10)  # 3 free + 7 paid; 8 paid back
    assert captured.status_code == 201, captured.text
    assert [lot["uses"] for lot in captured.json()["lots"]] == [3, 7]
    [(paid, lot_ids, lot_uses, kinds)] = await owed_taken(api)
    assert (paid, sum(lot_uses), len(lot_ids), kinds) == (-8, -8, 1, {"paid"})
