"""Holds take from lots in the consumption order and remember which (issue 23, item 5): a
release gives back to those lots, a partial capture spends the hold's first lots and gives
back the rest; a hold is a promise (its uses of a lot that expired meanwhile are captured);
released, they go back to the expired lot and stay unusable."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from ciris_billing.db import charges, reservations, utcnow
from ciris_billing.ledger.wallet import NewLot
from tests.ledger.support import account_row, account_with, books_problems
from tests.support.api import Api

RESERVE = "/v1/billing/reservations"


def who(name: str) -> dict[str, str]:
    return {"oauth_provider": "oauth:google", "external_id": f"{name}@ledger.example"}


def two_lots(expires_in_ms: int | None = None) -> list[NewLot]:
    """A promotional lot of 2 first (priority 50), then a paid lot of 5."""
    expires = None if expires_in_ms is None else utcnow() + timedelta(milliseconds=expires_in_ms)
    return [
        NewLot(kind="promotional", uses=2, source="grant", priority=50, expires_at=expires),
        NewLot(kind="paid", uses=5, source="purchase", amount_minor=500),
    ]


async def held_lots(api: Api, reservation_id: str) -> list[tuple[str, int]]:
    async with api.engine.connect() as conn:
        row = (
            await conn.execute(select(reservations).where(reservations.c.id == reservation_id))
        ).one()
    return list(zip(row.lot_ids, row.lot_uses, strict=True))


async def left(api: Api, account_id: str) -> dict[str, int]:
    wallet = await account_row(api.engine, account_id)
    return dict(zip(wallet.lot_ids, (int(n) for n in wallet.lot_left), strict=True))


async def reserve(api: Api, name: str, uses: int) -> dict[str, Any]:
    held = await api.post(RESERVE, {**who(name), "uses": uses})
    assert held.status_code == 201, held.text
    answer: dict[str, Any] = held.json()
    return answer


async def test_a_hold_spanning_two_lots_released_gives_back_to_both(api: Api) -> None:
    account_id = await account_with(api.engine, "span", two_lots(), utcnow())
    promo, paid = (await account_row(api.engine, account_id)).lot_ids
    hold = await reserve(api, "span", 4)
    assert await held_lots(api, hold["reservation_id"]) == [(promo, 2), (paid, 2)]
    assert await left(api, account_id) == {promo: 0, paid: 3}
    released = await api.post(f"{RESERVE}/{hold['reservation_id']}/release", {})
    assert released.status_code == 200, released.text
    assert await left(api, account_id) == {promo: 2, paid: 5}
    assert await books_problems(api.engine) == []
    assert (await api.audit()).clean


async def test_a_partial_capture_spends_the_holds_first_lots_and_gives_back_the_rest(
    api: Api,
) -> None:
    account_id = await account_with(api.engine, "partial", two_lots(), utcnow())
    promo, paid = (await account_row(api.engine, account_id)).lot_ids
    hold = await reserve(api, "partial", 4)
    captured = await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {"uses": 3})
    assert captured.status_code == 201, captured.text
    assert captured.json()["lots"] == [{"lot_id": promo, "uses": 2}, {"lot_id": paid, "uses": 1}]
    assert await left(api, account_id) == {promo: 0, paid: 4}
    async with api.engine.connect() as conn:
        row = (await conn.execute(select(charges))).one()
    assert (list(row.lot_ids), list(row.lot_uses)) == ([promo, paid], [2, 1])
    assert await books_problems(api.engine) == []
    assert (await api.audit()).clean


async def test_a_hold_is_a_promise_its_expired_lot_is_captured(api: Api) -> None:
    account_id = await account_with(api.engine, "promise", two_lots(400), utcnow())
    promo, paid = (await account_row(api.engine, account_id)).lot_ids
    hold = await reserve(api, "promise", 3)
    await asyncio.sleep(0.5)  # the promotional lot has expired; no job ran
    check = (await api.post("/v1/billing/credits/check", who("promise"), scope="read")).json()
    assert (check["credits_remaining"], check["held_uses"]) == (4, 3)
    captured = await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {"uses": 2})
    assert captured.status_code == 201, captured.text
    assert captured.json()["lots"] == [{"lot_id": promo, "uses": 2}]
    assert await left(api, account_id) == {promo: 0, paid: 5}
    assert await books_problems(api.engine) == []


async def test_released_uses_of_an_expired_lot_go_back_to_it_and_stay_unusable(api: Api) -> None:
    account_id = await account_with(api.engine, "expired-back", two_lots(400), utcnow())
    promo, paid = (await account_row(api.engine, account_id)).lot_ids
    hold = await reserve(api, "expired-back", 3)
    await asyncio.sleep(0.5)
    released = await api.post(f"{RESERVE}/{hold['reservation_id']}/release", {})
    assert released.status_code == 200, released.text
    assert await left(api, account_id) == {promo: 2, paid: 5}
    check = (await api.post("/v1/billing/credits/check", who("expired-back"), scope="read")).json()
    assert (check["has_credit"], check["credits_remaining"], check["held_uses"]) == (True, 5, 0)
    # The expired lot's uses are never charged: 5 charges take the paid lot, the 6th is refused.
    for _ in range(5):
        made = await api.post("/v1/billing/charges", who("expired-back"))
        assert made.json()["lots"] == [{"lot_id": paid, "uses": 1}]
    refused = await api.post("/v1/billing/charges", who("expired-back"))
    assert refused.status_code == 402, refused.text
    assert await books_problems(api.engine) == []
