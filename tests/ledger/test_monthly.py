"""FREE_USES_RESET=monthly (issue 23, item 7): each calendar month (UTC) an account gets a new
free lot, added by its first charge, hold or check of the month (no job); the previous month's
lot is unusable from the month's start; an identity back after erasure gets none before the
next month. Times are passed explicitly (next month is a time, not a wait)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from ciris_billing import clock
from ciris_billing.accounts import charges, checks
from ciris_billing.accounts.hot.holds import HoldAttempt
from ciris_billing.accounts.service import Identity
from ciris_billing.db import accounts, iso, lots, new_id, utcnow
from ciris_billing.errors import PurchaseRequired
from ciris_billing.ledger import free_periods
from tests.ledger.support import books_problems
from tests.ledger.support import charge as attempt
from tests.support.api import Api, make_settings, running_app

WHO = {"oauth_provider": "oauth:google", "external_id": "monthly@ledger.example"}
IDENTITY = Identity(WHO["oauth_provider"], WHO["external_id"])


@pytest.fixture
async def monthly(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(
        database_url, free_uses_reset="monthly", rate_limit_account_per_minute=60_000
    )
    async with running_app(settings) as api:
        yield api


async def free_lots(api: Api) -> list[tuple[str, int, object]]:
    async with api.engine.connect() as conn:
        rows = await conn.execute(
            select(lots.c.source, lots.c.uses_granted, lots.c.expires_at)
            .where(lots.c.kind == "free")
            .order_by(lots.c.created_at)
        )
        return [(r.source, int(r.uses_granted), r.expires_at) for r in rows]


def request(uses: int = 1) -> charges.ChargeRequest:
    return charges.ChargeRequest(
        identity=IDENTITY,
        uses=uses,
        amount_minor=0,
        currency="USD",
        description=None,
        metadata={},
        idempotency_key=None,
        fingerprint=None,
        api_key_id="key_ledger_tests",
    )


async def test_a_new_month_brings_a_new_free_lot_and_ends_the_old_one(monthly: Api) -> None:
    api, state = monthly, monthly.state
    now = utcnow()
    this_month, next_month = free_periods.period_of(now), free_periods.next_period(now)
    first = (await api.post("/v1/billing/credits/check", WHO, scope="read")).json()
    assert (first["has_credit"], first["free_uses_remaining"]) == (True, 3)
    assert first["next_expiry"] == {"uses": 3, "expires_at": iso(next_month)}
    assert await free_lots(api) == [("free_grant", 3, next_month)]
    async with api.engine.connect() as conn:
        period = await conn.scalar(select(accounts.c.free_period))
    assert period == this_month
    spent = await api.post("/v1/billing/charges", WHO)
    assert spent.status_code == 201, spent.text  # 2 of this month's uses left

    later = next_month + timedelta(hours=1)
    # The hot statements make nothing until the month's lot is there (no row: the slow path).
    assert await state.charge_store.charge(attempt("monthly", 1, later)) is None
    hold = HoldAttempt(
        *("oauth:google", "monthly@ledger.example", 1, new_id("rsv"), "k", "{}"),
        at=later,
        expires_at=later + timedelta(minutes=5),
    )
    assert await state.hold_store.hold(hold) is None
    # A check on the 1st renews (once) and says so: this month's 3, not last month's 2 too.
    status = await checks.check_credit(
        state.account_reader, api.engine, IDENTITY, state.pricing, at=later
    )
    assert (status.has_credit, status.free_uses_remaining) == (True, 3)
    assert status.next_expiry == {"uses": 3, "expires_at": iso(free_periods.next_period(later))}
    assert [lot[0] for lot in await free_lots(api)] == ["free_grant", "free_period"]
    async with api.engine.begin() as conn:
        account_id = str(await conn.scalar(select(accounts.c.id)))
        assert not await free_periods.renew(conn, account_id, "USD", later, state.pricing)
    # A charge of the new month takes the new lot; 4 uses are more than it has (the old lot's
    # 2 are unusable since the month began).
    made = await charges.charge(
        request(), store=state.charge_store, engine=api.engine, pricing=state.pricing, at=later
    )
    assert made.free_uses_remaining == 2
    async with api.engine.connect() as conn:
        renewed = await conn.scalar(select(lots.c.id).where(lots.c.source == "free_period"))
    assert made.lots == [{"lot_id": renewed, "uses": 1}]
    with pytest.raises(PurchaseRequired):
        await charges.charge(
            request(3),
            store=state.charge_store,
            engine=api.engine,
            pricing=state.pricing,
            at=later,
        )
    assert await books_problems(api.engine) == []


async def test_the_months_first_charge_adds_its_free_lot(monthly: Api) -> None:
    api, state = monthly, monthly.state
    for _ in range(3):
        assert (await api.post("/v1/billing/charges", WHO)).status_code == 201
    assert (await api.post("/v1/billing/charges", WHO)).status_code == 402
    later = free_periods.next_period(utcnow()) + timedelta(minutes=1)
    made = await charges.charge(
        request(), store=state.charge_store, engine=api.engine, pricing=state.pricing, at=later
    )
    assert (made.free_uses_used, made.free_uses_remaining) == (1, 2)
    assert len(await free_lots(api)) == 2
    assert await books_problems(api.engine) == []


async def test_an_identity_back_after_erasure_gets_no_free_uses_before_next_month(
    monthly: Api,
) -> None:
    api, state = monthly, monthly.state
    assert (await api.post("/v1/billing/charges", WHO)).status_code == 201
    erased = await api.http.delete(
        f"/v1/billing/accounts/{WHO['oauth_provider']}/{WHO['external_id']}",
        headers=api.headers("admin"),
    )
    assert erased.status_code == 200, erased.text
    back = (await api.post("/v1/billing/credits/check", WHO, scope="read")).json()
    assert (back["has_credit"], back["free_uses_remaining"]) == (False, 0)
    assert (await api.post("/v1/billing/charges", WHO)).status_code == 402
    # Next month it is an account like any other.
    later = free_periods.next_period(utcnow()) + timedelta(minutes=1)
    status = await checks.check_credit(
        state.account_reader, api.engine, IDENTITY, state.pricing, at=later
    )
    assert (status.has_credit, status.free_uses_remaining) == (True, 3)


async def test_through_the_api_with_the_test_clock_next_month_brings_free_uses(
    monthly: Api,
) -> None:
    api = monthly
    try:
        for _ in range(3):
            assert (await api.post("/v1/billing/charges", WHO)).status_code == 201
        empty = (await api.post("/v1/billing/credits/check", WHO, scope="read")).json()
        assert (empty["has_credit"], empty["next_expiry"]) == (False, None)
        ahead = free_periods.next_period(utcnow()) - utcnow() + timedelta(hours=1)
        moved = await api.post(
            "/v1/billing/test_clock/advance", {"seconds": int(ahead.total_seconds())}, scope="admin"
        )
        assert moved.status_code == 200, moved.text
        # The month's first check renews: has_credit on the 1st.
        check = (await api.post("/v1/billing/credits/check", WHO, scope="read")).json()
        assert (check["has_credit"], check["free_uses_remaining"]) == (True, 3)
        assert check["next_expiry"]["uses"] == 3
        made = await api.post("/v1/billing/charges", WHO)
        assert made.status_code == 201, made.text
        assert made.json()["free_uses_remaining"] == 2
        assert len(await free_lots(api)) == 2
        assert await books_problems(api.engine) == []
        assert (await api.audit()).clean
    finally:
        clock.set_offset(0)
