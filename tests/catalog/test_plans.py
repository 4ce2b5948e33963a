"""Issue 24 item 2: plans. The default plan `free` is the environment's; a plan has its own
free uses (never or monthly), its packs and its balance.low threshold; an account's plan
changes (API, CLI, console) and its free uses follow from the next period. A 402 keeps the
guide's fields (the default pack's) and adds `offers`: the packs the account's plan may buy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from ciris_billing import clock
from ciris_billing.accounts import checks
from ciris_billing.accounts.service import Identity
from ciris_billing.db import accounts, utcnow
from ciris_billing.ledger import free_periods
from tests.catalog.support import EUR_PACK, audit_rows, made, patch
from tests.support.api import Api, identity, make_settings, running_app
from tests.support.flows import BUYER, exhaust_free_uses

PRO_PACK = {**EUR_PACK, "pack_id": "pro-usd", "currency": "USD", "price_minor": 1500}
PRO = {
    "name": "pro",
    "free_uses": 10,
    "free_uses_reset": "monthly",
    "pack_ids": ["pro-usd"],
    "low_balance_threshold_uses": 5,
}
PRO_USER = identity("pro@example.com")


@pytest.fixture
async def monthly(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(
        database_url, free_uses_reset="monthly", rate_limit_account_per_minute=60_000
    )
    async with running_app(settings) as api:
        yield api


async def test_the_default_plan_comes_from_the_environment(api: Api) -> None:
    listed = await api.get("/v1/billing/plans")
    assert listed.status_code == 200
    assert listed.json() == {
        "plans": [
            {
                "name": "free",
                "free_uses": 3,
                "free_uses_reset": "never",
                "pack_ids": None,
                "low_balance_threshold_uses": None,
            }
        ]
    }
    refused = await api.post("/v1/billing/plans", {**PRO, "name": "free"}, "admin")
    assert refused.status_code == 409
    assert (await patch(api, "/v1/billing/plans/free", {"free_uses": 9})).status_code == 409


async def test_a_plans_free_uses_packs_and_offers(api: Api) -> None:
    await made(api, "/v1/billing/packs", PRO_PACK)
    created = await made(api, "/v1/billing/plans", PRO)
    assert created == PRO
    joined = await api.post("/v1/billing/accounts", {**PRO_USER, "plan_name": "pro"})
    assert joined.status_code in (200, 201), joined.text
    check = (await api.post("/v1/billing/credits/check", PRO_USER)).json()
    assert check["free_uses_remaining"] == 10
    async with api.engine.connect() as conn:
        threshold = await conn.scalar(select(accounts.c.low_balance_threshold_uses))
    assert threshold == 5  # the plan's balance.low threshold
    for _ in range(10):
        assert (await api.post("/v1/billing/charges", PRO_USER)).status_code == 201
    refused = await api.post("/v1/billing/charges", PRO_USER)
    assert refused.status_code == 402
    body = refused.json()
    # The guide's fields stay (the default pack's); `offers` are the plan's packs.
    assert (body["purchase_price_minor"], body["purchase_uses"], body["currency"]) == (
        500,
        20,
        "USD",
    )
    assert [offer["pack_id"] for offer in body["offers"]] == ["pro-usd"]
    assert body["offers"][0]["price_minor"] == 1500
    # A hold's 402 too.
    held = await api.post("/v1/billing/reservations", {**PRO_USER, "uses": 1})
    assert held.status_code == 402
    assert [offer["pack_id"] for offer in held.json()["offers"]] == ["pro-usd"]
    # The plan's packs only.
    outside = await api.post("/v1/billing/purchases", PRO_USER)
    assert outside.status_code == 422
    assert outside.json()["reason"] == "not_in_plan"
    assert (
        await api.post("/v1/billing/purchases", {**PRO_USER, "pack_id": "pro-usd"})
    ).status_code == 201
    assert (await api.audit()).clean


async def test_the_guides_402_offers_the_default_pack(api: Api) -> None:
    await made(api, "/v1/billing/packs", EUR_PACK)  # another currency: not offered
    await exhaust_free_uses(api)
    refused = await api.post("/v1/billing/charges", BUYER)
    assert refused.status_code == 402
    assert [offer["pack_id"] for offer in refused.json()["offers"]] == ["default"]


async def test_changing_an_accounts_plan_takes_effect_from_the_next_period(monthly: Api) -> None:
    api = monthly
    await made(api, "/v1/billing/plans", {**PRO, "pack_ids": None})
    first = (await api.post("/v1/billing/credits/check", BUYER)).json()
    assert first["free_uses_remaining"] == 3
    changed = await patch(
        api, "/v1/billing/accounts/oauth:google/buyer@example.com", {"plan_name": "pro"}
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["plan_name"] == "pro"
    # This period: as it was.
    assert (await api.post("/v1/billing/credits/check", BUYER)).json()["free_uses_remaining"] == 3
    # The next period: the plan's 10.
    later = free_periods.next_period(utcnow()) + timedelta(hours=1)
    who = Identity(BUYER["oauth_provider"], BUYER["external_id"])
    status = await checks.check_credit(
        api.state.account_reader, api.engine, who, api.state.pricing, at=later
    )
    assert status.free_uses_remaining == 10
    async with api.engine.connect() as conn:
        threshold = await conn.scalar(select(accounts.c.low_balance_threshold_uses))
    assert threshold == 5
    rows = await audit_rows(api, "account_plan")
    assert [(r.before, r.after) for r in rows] == [({"plan_name": "free"}, {"plan_name": "pro"})]
    unknown = await patch(
        api, "/v1/billing/accounts/oauth:google/buyer@example.com", {"plan_name": "nope"}
    )
    assert unknown.status_code == 404
    assert (await api.audit()).clean


async def test_a_monthly_plan_while_the_environment_says_never(api: Api) -> None:
    await made(api, "/v1/billing/plans", {**PRO, "pack_ids": None})
    await exhaust_free_uses(api)
    changed = await patch(
        api, "/v1/billing/accounts/oauth:google/buyer@example.com", {"plan_name": "pro"}
    )
    assert changed.status_code == 200
    later = free_periods.next_period(utcnow()) + timedelta(hours=1)
    who = Identity(BUYER["oauth_provider"], BUYER["external_id"])
    status = await checks.check_credit(
        api.state.account_reader, api.engine, who, api.state.pricing, at=later
    )
    assert status.free_uses_remaining == 10
    assert (await api.audit()).clean


async def test_a_monthly_plan_renews_before_the_first_charge_of_the_month(api: Api) -> None:
    """FREE_USES_RESET=never, an account on a monthly plan: the first charge of the next month
    takes the month's free uses, not the paid ones (the statements compare its period)."""
    await made(api, "/v1/billing/plans", {**PRO, "pack_ids": None})
    await exhaust_free_uses(api)
    changed = await patch(
        api, "/v1/billing/accounts/oauth:google/buyer@example.com", {"plan_name": "pro"}
    )
    assert changed.status_code == 200
    body = {**BUYER, "uses": 5, "reason": "goodwill", "kind": "paid", "cost_basis_minor": 10}
    assert (await api.post("/v1/billing/credits", body, "admin")).status_code == 201
    now = clock.now()
    seconds = int((free_periods.next_period(now) - now).total_seconds()) + 3600
    try:
        moved = await api.post("/v1/billing/test_clock/advance", {"seconds": seconds}, "admin")
        assert moved.status_code == 200, moved.text
        charged = await api.post("/v1/billing/charges", {**BUYER, "uses": 1})
        assert charged.status_code == 201, charged.text
        answer = charged.json()
        assert answer["free_uses_remaining"] == 9, answer
        assert answer["credits_remaining"] == 5, answer
    finally:
        clock.set_offset(0)
    assert (await api.audit()).clean


async def test_plan_updates_are_audited(api: Api) -> None:
    await made(api, "/v1/billing/plans", PRO)
    updated = await patch(api, "/v1/billing/plans/pro", {"free_uses": 20, "pack_ids": None})
    assert updated.status_code == 200
    assert (updated.json()["free_uses"], updated.json()["pack_ids"]) == (20, None)
    assert len(await audit_rows(api, "plan_create")) == 1
    assert len(await audit_rows(api, "plan_update")) == 1
    assert (await patch(api, "/v1/billing/plans/pro", {"free_uses": None})).status_code == 422
    assert (await patch(api, "/v1/billing/plans/nope", {"free_uses": 1})).status_code == 404
