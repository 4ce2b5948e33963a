"""Issue 21 finding 2: uses a dispute could not hold because a reservation had them are owed to
the dispute and go into its hold when the reservation ends (release, partial capture, expiry),
never back to the user while the dispute is open.

Buy 20 (3 free + 20 paid), hold 18 (3 free, 15 paid), a dispute opens: it holds the 5 paid uses
free of holds and is owed the 15. Request in, response out, through the sandbox provider; the
ledger invariant (`audit`) clean after each test.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from ciris_billing.db import credits
from tests.payments.test_refunds_spare_reservations import (
    RESERVE,
    USER,
    capture,
    clean,
    counters,
    dispute,
    expire_now,
    held_by_the_hold,
    owed,
)
from tests.support.api import Api
from tests.support.flows import check


async def release(api: Api, reservation_id: str) -> None:
    released = await api.post(f"{RESERVE}/{reservation_id}/release", {})
    assert released.status_code == 200, released.text


async def spendable(api: Api) -> int:
    found = await check(api, USER)
    return int(found["free_uses_remaining"]) + int(found["credits_remaining"])


async def lost_shortfall(api: Api) -> int:
    async with api.engine.connect() as conn:
        value = await conn.scalar(
            select(credits.c.shortfall_uses).where(credits.c.kind == "dispute_lost")
        )
    return int(value or 0)


async def test_finding2_released_hold_during_a_dispute_stays_held_then_lost(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dispute(api, both["payment_id"], "needs_response")
    assert (await counters(api))["held_uses"] == 5

    await release(api, both["reservation_id"])

    during = await counters(api)
    # The 15 paid uses go into the dispute's hold; only the 3 free ones come back.
    assert (during["held_uses"], during["paid_uses_remaining"]) == (20, 0)
    assert await spendable(api) == 3
    for _ in range(3):
        assert (await api.post("/v1/billing/charges", USER)).status_code == 201
    assert (await api.post("/v1/billing/charges", USER)).status_code == 402
    await clean(api)

    await dispute(api, both["payment_id"], "lost")
    after = await counters(api)
    assert (after["held_uses"], after["paid_uses_remaining"]) == (0, 0)
    assert await lost_shortfall(api) == 0, "no use was spent: nothing short"
    assert await owed(api) == 0
    await clean(api)


async def test_finding2_released_hold_during_a_dispute_then_won_gives_all_back(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dispute(api, both["payment_id"], "needs_response")
    await release(api, both["reservation_id"])
    assert (await counters(api))["held_uses"] == 20

    await dispute(api, both["payment_id"], "won")

    after = await counters(api)
    assert (after["held_uses"], after["paid_uses_remaining"]) == (0, 20)
    assert await spendable(api) == 23
    await clean(api)


async def test_finding2_partial_capture_during_a_dispute_then_lost(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dispute(api, both["payment_id"], "needs_response")

    # 10 of the 18: 3 free, then 7 paid; the 8 paid uses given back go into the dispute's hold.
    captured = await capture(api, both["reservation_id"], 10)

    assert captured.status_code == 201, captured.text
    assert (captured.json()["paid_uses_used"], captured.json()["credits_remaining"]) == (7, 0)
    during = await counters(api)
    assert (during["held_uses"], during["paid_uses_remaining"]) == (13, 0)
    await dispute(api, both["payment_id"], "lost")
    after = await counters(api)
    assert (after["held_uses"], after["paid_uses_remaining"]) == (0, 0)
    assert await lost_shortfall(api) == 7, "the 7 captured paid uses were spent"
    await clean(api)


async def test_finding2_expired_hold_during_a_dispute_stays_held_then_won(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dispute(api, both["payment_id"], "needs_response")

    assert await expire_now(api) == 1

    during = await counters(api)
    assert (during["held_uses"], during["paid_uses_remaining"], during["free_uses_remaining"]) == (
        20,
        0,
        3,
    )
    await clean(api)
    await dispute(api, both["payment_id"], "won")
    assert (await counters(api))["paid_uses_remaining"] == 20
    await clean(api)


async def test_finding2_hold_still_active_when_lost_is_owed_and_its_capture_succeeds(
    api: Api,
) -> None:
    """A hold is a promise: lost while the hold is active, its capture still succeeds; the
    owed uses are recorded as shortfall (as before this finding)."""
    both = await held_by_the_hold(api)
    await dispute(api, both["payment_id"], "needs_response")
    await dispute(api, both["payment_id"], "lost")
    assert await owed(api) == 15
    captured = await capture(api, both["reservation_id"])
    assert captured.status_code == 201, captured.text
    assert captured.json()["uses"] == 18
    await clean(api)


async def test_finding2_a_dispute_opening_while_the_hold_is_released_holds_all_either_way(
    api: Api,
) -> None:
    """The opening (purchase, the account's holds, then the account) and the release (the
    reservation, then the account) race: either order, no deadlock, all 20 uses held."""
    both = await held_by_the_hold(api)

    await asyncio.gather(
        dispute(api, both["payment_id"], "needs_response"),
        release(api, both["reservation_id"]),
    )

    during = await counters(api)
    assert (during["held_uses"], during["paid_uses_remaining"]) == (20, 0)
    await clean(api)
    await dispute(api, both["payment_id"], "lost")
    assert (await counters(api))["paid_uses_remaining"] == 0
    await clean(api)


async def test_finding2_a_dispute_opening_while_the_hold_is_captured_in_part(api: Api) -> None:
    both = await held_by_the_hold(api)

    _opened, captured = await asyncio.gather(
        dispute(api, both["payment_id"], "needs_response"),
        capture(api, both["reservation_id"], 10),
    )

    assert captured.status_code == 201, captured.text
    during = await counters(api)
    # 3 free + 7 paid spent; the other 13 paid uses are the dispute's, whichever came first.
    assert (during["held_uses"], during["paid_uses_remaining"]) == (13, 0)
    await dispute(api, both["payment_id"], "won")
    assert (await counters(api))["paid_uses_remaining"] == 13
    await clean(api)
