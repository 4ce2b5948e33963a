"""Refunds and disputes never take reserved uses (issue 13; SPEC.md "Refunds and disputes":
held uses are never taken, recorded as shortfall). A hold is a promise: whatever money goes
back meanwhile (our API's refund, a refund made in the provider's dashboard and told by its
webhook, a lost chargeback), the reservation's uses stay reserved and its capture succeeds.

Request in, response out; the reserved counters read from the accounts row; the ledger
invariant (`await api.audit()`) after each test.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from ciris_billing.accounts import reservations
from ciris_billing.db import accounts, credits, utcnow
from tests.support.api import Api, identity
from tests.support.flows import check, paid_purchase

USER = identity("holds-then-refunds@example.com")
RESERVE = "/v1/billing/reservations"


async def reserve(api: Api, uses: int) -> dict[str, Any]:
    held = await api.post(RESERVE, {**USER, "uses": uses})
    assert held.status_code == 201, held.text
    body: dict[str, Any] = held.json()
    return body


async def capture(api: Api, reservation_id: str, uses: int | None = None) -> Any:
    body = {} if uses is None else {"uses": uses}
    return await api.post(f"{RESERVE}/{reservation_id}/capture", body)


async def refund(api: Api, payment_id: str, amount_minor: int | None = None) -> Any:
    body = {} if amount_minor is None else {"amount_minor": amount_minor}
    return await api.post(f"/v1/billing/purchases/{payment_id}/refund", body, scope="admin")


async def dashboard_refund(api: Api, payment_id: str, amount_minor: int | None = None) -> Any:
    """A refund made in the provider's dashboard: only its webhook tells the service."""
    body = {} if amount_minor is None else {"amount_minor": amount_minor}
    answer = await api.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/dashboard_refund", body, scope="admin"
    )
    assert answer.status_code == 200, answer.text
    return answer


async def dispute(api: Api, payment_id: str, status: str) -> None:
    answer = await api.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/dispute",
        {"status": status},
        scope="admin",
    )
    assert answer.status_code == 200, answer.text


async def counters(api: Api) -> dict[str, int]:
    """The account's counters: available free/paid, reserved free/paid, dispute-held."""
    async with api.engine.connect() as conn:
        row = (
            await conn.execute(
                select(
                    accounts.c.free_uses_remaining,
                    accounts.c.paid_uses_remaining,
                    accounts.c.reserved_free_uses,
                    accounts.c.reserved_paid_uses,
                    accounts.c.held_uses,
                ).where(accounts.c.external_id == USER["external_id"])
            )
        ).one()
    return {key: int(value) for key, value in row._mapping.items()}


async def refund_rows(api: Api) -> list[tuple[int, int]]:
    """(paid uses taken, shortfall uses) of each refund's ledger row, oldest first."""
    async with api.engine.connect() as conn:
        rows = await conn.execute(
            select(credits.c.paid_uses_delta, credits.c.shortfall_uses)
            .where(credits.c.kind == "refund")
            .order_by(credits.c.created_at)
        )
        return [(-int(r.paid_uses_delta), int(r.shortfall_uses)) for r in rows]


async def clean(api: Api) -> None:
    report = await api.audit()
    assert report.clean, report


async def held_by_the_hold(api: Api) -> dict[str, Any]:
    """One pack bought (3 free + 20 paid uses), then 18 of them held: 3 free and 15 paid."""
    bought = await paid_purchase(api, USER)
    hold = await reserve(api, 18)
    assert (hold["held_uses"], hold["free_uses_remaining"], hold["credits_remaining"]) == (
        18,
        0,
        5,
    )
    assert (await counters(api))["reserved_paid_uses"] == 15
    return {"payment_id": bought["payment_id"], "reservation_id": hold["reservation_id"]}


async def test_api_refund_never_takes_reserved_uses(api: Api) -> None:
    both = await held_by_the_hold(api)
    refunded = await refund(api, both["payment_id"])
    assert refunded.status_code == 201, refunded.text
    body = refunded.json()
    # Only the 5 available paid uses go back; the 15 reserved ones are shortfall.
    assert (body["uses_reversed"], body["shortfall_uses"]) == (5, 15)
    after = await counters(api)
    assert (after["reserved_free_uses"], after["reserved_paid_uses"]) == (3, 15)
    assert (after["free_uses_remaining"], after["paid_uses_remaining"]) == (0, 0)
    # A hold is a promise: its capture still succeeds, all 18 uses.
    captured = await capture(api, both["reservation_id"])
    assert captured.status_code == 201, captured.text
    charge = captured.json()
    assert (charge["uses"], charge["free_uses_used"], charge["paid_uses_used"]) == (18, 3, 15)
    assert (charge["held_uses"], charge["credits_remaining"]) == (0, 0)
    await clean(api)


async def test_dashboard_refund_by_webhook_never_takes_reserved_uses(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dashboard_refund(api, both["payment_id"])
    assert await refund_rows(api) == [(5, 15)]
    after = await counters(api)
    assert (after["reserved_free_uses"], after["reserved_paid_uses"]) == (3, 15)
    assert after["paid_uses_remaining"] == 0
    status = (await api.get(f"/v1/billing/purchases/{both['payment_id']}")).json()
    assert status["status"] == "refunded"
    checked = await check(api, USER)
    assert (checked["has_credit"], checked["held_uses"]) == (False, 18)
    # Part of the hold captured, the rest given back where it came from (15 paid held, 10 used:
    # 3 free first, then 7 paid; 8 paid back), but those 8 were refunded: owed, so taken.
    captured = await capture(api, both["reservation_id"], 10)
    assert captured.status_code == 201, captured.text
    charge = captured.json()
    assert (charge["free_uses_used"], charge["paid_uses_used"], charge["released_uses"]) == (
        3,
        7,
        8,
    )
    after = await counters(api)
    assert (after["reserved_free_uses"], after["reserved_paid_uses"]) == (0, 0)
    assert after["paid_uses_remaining"] == 0
    assert await owed(api) == 0
    await clean(api)


async def test_lost_dispute_never_takes_reserved_uses(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dispute(api, both["payment_id"], "needs_response")
    during = await counters(api)
    # The dispute holds only what is available (5 paid uses), never the reservation's.
    assert (during["held_uses"], during["paid_uses_remaining"]) == (5, 0)
    assert (during["reserved_free_uses"], during["reserved_paid_uses"]) == (3, 15)
    await dispute(api, both["payment_id"], "lost")
    after = await counters(api)
    assert (after["held_uses"], after["paid_uses_remaining"]) == (0, 0)
    assert (after["reserved_free_uses"], after["reserved_paid_uses"]) == (3, 15)
    captured = await capture(api, both["reservation_id"])
    assert captured.status_code == 201, captured.text
    assert captured.json()["uses"] == 18
    await clean(api)


async def test_api_refund_dashboard_refund_and_lost_dispute_all_spare_an_active_hold(
    api: Api,
) -> None:
    """Two packs (3 free + 40 paid); 30 held (3 free, all 20 of pack A, 7 of pack B), 13 of
    pack B available. Pack A is refunded half by our API, the rest in the dashboard; pack B is
    charged back (lost). Issue 23: a refund takes only from its purchase's lot, so pack A's
    refunds take nothing (its lot is all held: shortfall, owed by the hold), and pack B's
    dispute holds its 13 available uses."""
    pack_a = await paid_purchase(api, USER)
    pack_b = await paid_purchase(api, USER)
    hold = await reserve(api, 30)
    assert (hold["free_uses_remaining"], hold["credits_remaining"]) == (0, 13)

    half = (await refund(api, pack_a["payment_id"], 250)).json()
    assert (half["uses_reversed"], half["shortfall_uses"]) == (0, 10)
    await dashboard_refund(api, pack_a["payment_id"])  # the other 10 uses: held too
    assert await refund_rows(api) == [(0, 10), (0, 10)]
    await dispute(api, pack_b["payment_id"], "needs_response")  # holds pack B's 13
    await dispute(api, pack_b["payment_id"], "lost")

    after = await counters(api)
    assert (after["reserved_free_uses"], after["reserved_paid_uses"]) == (3, 27)
    assert (after["free_uses_remaining"], after["paid_uses_remaining"], after["held_uses"]) == (
        0,
        0,
        0,
    )
    refused = await api.post("/v1/billing/charges", USER)
    assert refused.status_code == 402
    captured = await capture(api, hold["reservation_id"])
    assert captured.status_code == 201, captured.text
    assert (captured.json()["uses"], captured.json()["total_uses"]) == (30, 30)
    await clean(api)


async def test_refund_racing_a_capture_never_takes_reserved_uses(api: Api) -> None:
    """The refund (purchase's row, then the account's) and the capture (reservation's row,
    then the account's) both succeed in either order: no deadlock, no use taken twice."""
    both = await held_by_the_hold(api)
    refunded, captured = await asyncio.gather(
        refund(api, both["payment_id"]), capture(api, both["reservation_id"], 12)
    )
    assert refunded.status_code == 201, refunded.text
    assert captured.status_code == 201, captured.text
    # Refunded first: 5 available taken, 15 shortfall. Captured first (12 of the 18: 3 free,
    # 9 paid, 6 paid back): 11 taken, 9 shortfall. Either way all 20 uses are accounted for,
    # none taken from the hold, and none of the refunded ones comes back (refunded first, the
    # 6 the capture gave back were owed).
    taken, shortfall = refunded.json()["uses_reversed"], refunded.json()["shortfall_uses"]
    assert (taken, shortfall) in ((5, 15), (11, 9))
    after = await counters(api)
    assert (after["reserved_free_uses"], after["reserved_paid_uses"]) == (0, 0)
    assert after["paid_uses_remaining"] == 0
    await clean(api)


# -- owed uses: what a refund or a lost dispute could not take because it was held -----------


async def owed(api: Api) -> int:
    async with api.engine.connect() as conn:
        value = await conn.scalar(
            select(accounts.c.refund_owed_uses).where(accounts.c.external_id == USER["external_id"])
        )
    return int(value or 0)


async def expire_now(api: Api) -> int:
    """The expiry job's step for the user's account, as if its holds' TTL had passed."""
    async with api.engine.begin() as conn:
        account_id = await conn.scalar(
            select(accounts.c.id).where(accounts.c.external_id == USER["external_id"])
        )
        assert account_id is not None
        later = utcnow() + timedelta(days=2)
        return len(await reservations.expire_account(conn, account_id, later))


async def test_a_released_hold_never_gives_back_uses_a_refund_could_not_take(api: Api) -> None:
    """The refund's 15 shortfall uses were held, not spent: when the hold is released instead
    of captured, they are owed, and paid off before anything comes back."""
    both = await held_by_the_hold(api)
    refunded = (await refund(api, both["payment_id"])).json()
    assert (refunded["uses_reversed"], refunded["shortfall_uses"]) == (5, 15)
    assert await owed(api) == 15
    released = await api.post(f"{RESERVE}/{both['reservation_id']}/release", {})
    assert released.status_code == 200, released.text
    body = released.json()
    # The 3 free uses come back; the 15 paid ones were refunded: taken now.
    assert (body["free_uses_remaining"], body["credits_remaining"], body["held_uses"]) == (3, 0, 0)
    assert await owed(api) == 0
    refused = await api.post("/v1/billing/charges", {**USER, "uses": 4})
    assert refused.status_code == 402
    await clean(api)


async def test_an_expired_hold_pays_off_owed_uses_first(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dashboard_refund(api, both["payment_id"], 250)  # half: 10 uses due, 5 available
    assert await refund_rows(api) == [(5, 5)]
    assert await owed(api) == 5
    assert await expire_now(api) == 1
    after = await counters(api)
    # 15 paid held: 5 owed paid off, 10 back; the 3 free ones back.
    assert (after["free_uses_remaining"], after["paid_uses_remaining"]) == (3, 10)
    assert (after["reserved_free_uses"], after["reserved_paid_uses"]) == (0, 0)
    assert await owed(api) == 0
    await clean(api)


async def test_a_captured_hold_turns_owed_uses_into_plain_shortfall(api: Api) -> None:
    """Captured, the held uses were spent: nothing more is owed; part captured, the uses it
    gives back pay off what is owed first."""
    both = await held_by_the_hold(api)
    await refund(api, both["payment_id"])  # 5 taken, 15 owed
    captured = await capture(api, both["reservation_id"], 10)  # 3 free + 7 paid; 8 paid back
    assert captured.status_code == 201, captured.text
    charge = captured.json()
    assert (charge["released_uses"], charge["credits_remaining"], charge["held_uses"]) == (8, 0, 0)
    assert await owed(api) == 0
    await clean(api)


async def test_a_lost_dispute_takes_back_the_uses_it_could_not_hold(api: Api) -> None:
    """A dispute holds only available uses; the 15 reserved ones are recorded, and when it is
    lost they are owed: the released hold gives back none of the purchase's paid uses."""
    both = await held_by_the_hold(api)
    await dispute(api, both["payment_id"], "needs_response")
    assert await owed(api) == 0  # not yet: a won dispute gives everything back
    await dispute(api, both["payment_id"], "lost")
    assert await owed(api) == 15
    async with api.engine.connect() as conn:
        lost = (
            await conn.execute(
                select(credits.c.paid_uses_delta, credits.c.shortfall_uses).where(
                    credits.c.kind == "dispute_lost"
                )
            )
        ).one()
    assert (int(lost.paid_uses_delta), int(lost.shortfall_uses)) == (0, 15)
    released = await api.post(f"{RESERVE}/{both['reservation_id']}/release", {})
    assert released.status_code == 200, released.text
    assert (released.json()["free_uses_remaining"], released.json()["credits_remaining"]) == (3, 0)
    await clean(api)


async def test_a_won_dispute_owes_nothing(api: Api) -> None:
    both = await held_by_the_hold(api)
    await dispute(api, both["payment_id"], "needs_response")
    await dispute(api, both["payment_id"], "won")
    assert await owed(api) == 0
    released = await api.post(f"{RESERVE}/{both['reservation_id']}/release", {})
    assert (released.json()["free_uses_remaining"], released.json()["credits_remaining"]) == (
        3,
        20,
    )
    await clean(api)
