"""A lot is unusable from its expires_at (issue 23, item 4): a charge, a hold or a check one
millisecond later never counts it, whether or not the expiry job has run (no job runs here)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from ciris_billing.accounts.checks import credit_status
from ciris_billing.accounts.hot.holds import HoldAttempt
from ciris_billing.accounts.service import Identity
from ciris_billing.db import new_id, utcnow
from ciris_billing.ledger.wallet import NewLot
from tests.ledger.support import account_row, account_with, books_problems, charge
from tests.support.api import Api

T = datetime(2026, 12, 7, 12, tzinfo=UTC)
AFTER = T + timedelta(milliseconds=1)
BEFORE = T - timedelta(milliseconds=1)
EXPIRING = NewLot(kind="promotional", uses=2, source="grant", priority=50, expires_at=T)
PAID = NewLot(kind="paid", uses=1, source="purchase", amount_minor=100)


def hold(name: str, uses: int, at: datetime) -> HoldAttempt:
    return HoldAttempt(
        oauth_provider="oauth:google",
        external_id=f"{name}@ledger.example",
        uses=uses,
        reservation_id=new_id("rsv"),
        api_key_id="key_ledger_tests",
        metadata_json="{}",
        at=at,
        expires_at=at + timedelta(minutes=5),
    )


async def test_a_lot_is_unusable_one_millisecond_after_it_expires(api: Api) -> None:
    state = api.state
    await account_with(api.engine, "expiring", [EXPIRING], T - timedelta(days=1))
    # At T+1ms: no charge, no hold, and a check says there is nothing (no job has run: the
    # counters still hold the 2 uses).
    assert await state.charge_store.charge(charge("expiring", 1, AFTER)) is None
    assert await state.hold_store.hold(hold("expiring", 1, AFTER)) is None
    row = await state.account_reader.read(Identity("oauth:google", "expiring@ledger.example"))
    assert row["free_uses_remaining"] + row["paid_uses_remaining"] == 2
    status = credit_status(row, state.pricing, AFTER)
    assert (status.has_credit, status.free_uses_remaining, status.credits_remaining) == (
        False,
        0,
        0,
    )
    assert status.next_expiry is None
    # A millisecond before, the same lot gives.
    before = credit_status(row, state.pricing, BEFORE)
    assert before.has_credit
    assert before.credits_remaining == 2
    assert before.next_expiry == {"uses": 2, "expires_at": "2026-12-07T12:00:00+00:00"}
    made = await state.charge_store.charge(charge("expiring", 1, BEFORE))
    assert made is not None
    assert list(made["lot_uses"]) == [1]
    assert await books_problems(api.engine) == []


async def test_past_its_expiry_a_lot_is_skipped_and_the_next_one_gives(api: Api) -> None:
    state = api.state
    account_id = await account_with(api.engine, "skips", [EXPIRING, PAID], T - timedelta(days=1))
    wallet = await account_row(api.engine, account_id)
    expiring, paid = wallet.lot_ids  # the expiring lot first: priority 50
    made = await state.charge_store.charge(charge("skips", 1, AFTER))
    assert made is not None
    assert (list(made["lot_ids"]), list(made["lot_uses"])) == ([paid], [1])
    assert await state.charge_store.charge(charge("skips", 1, AFTER)) is None
    held = await state.hold_store.hold(hold("skips", 1, BEFORE))  # before T: the expiring lot
    assert held is not None
    after = await account_row(api.engine, account_id)
    assert dict(zip(after.lot_ids, after.lot_left, strict=True)) == {expiring: 1, paid: 0}
    assert await books_problems(api.engine) == []


async def test_through_the_api_an_expired_grant_stops_counting_without_a_job(api: Api) -> None:
    soon = utcnow() + timedelta(milliseconds=400)
    lot = NewLot(kind="promotional", uses=2, source="grant", priority=50, expires_at=soon)
    await account_with(api.engine, "api-expiry", [lot], utcnow())
    who = {"oauth_provider": "oauth:google", "external_id": "api-expiry@ledger.example"}
    check = (await api.post("/v1/billing/credits/check", who, scope="read")).json()
    assert check["has_credit"] is True
    assert check["next_expiry"]["uses"] == 2
    await asyncio.sleep(max(0.0, (soon - utcnow()).total_seconds()) + 0.05)
    check = (await api.post("/v1/billing/credits/check", who, scope="read")).json()
    assert (check["has_credit"], check["credits_remaining"], check["next_expiry"]) == (
        False,
        0,
        None,
    )
    refused = await api.post("/v1/billing/charges", who)
    assert refused.status_code == 402, refused.text
    assert refused.json()["credits_remaining"] == 0
    held = await api.post("/v1/billing/reservations", {**who, "uses": 1})
    assert held.status_code == 402, held.text
    assert await books_problems(api.engine) == []
