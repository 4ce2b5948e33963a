"""The guide's "Manual Testing" steps 2 to 5 and beyond, answered exactly as the guide shows."""

from __future__ import annotations

from tests.support.api import Api, identity

USER = identity("stripe-test@example.com")
CHECK = {**USER, "context": {}}
CHARGE = {
    **USER,
    "amount_minor": 100,
    "currency": "USD",
    "description": "Free use test",
    "metadata": {},
}


async def test_free_uses_then_purchase_required(api: Api) -> None:
    created = await api.post(
        "/v1/billing/accounts",
        {**USER, "initial_balance_minor": 0, "currency": "USD", "plan_name": "free"},
    )
    assert created.status_code == 201
    assert created.json()["free_uses_remaining"] == 3

    check = await api.post("/v1/billing/credits/check", CHECK)
    assert check.status_code == 200
    # Beyond the guide: the user's portal (tests/portal), a link on every answer (sealed anew
    # each time: compared below by its start).
    portal = check.json()["portal_url"]
    assert portal.startswith("http://billing.test/v1/billing/portal/")
    assert check.json() == {
        "has_credit": True,
        "credits_remaining": 0,
        "plan_name": "free",
        "reason": None,
        "free_uses_remaining": 3,
        "total_uses": 0,
        "held_uses": 0,
        "purchase_required": False,
        "next_expiry": None,  # issue 23: nothing of it expires
        "portal_url": portal,
    }

    first = await api.post("/v1/billing/charges", CHARGE)
    assert first.status_code == 201
    assert first.json()["free_uses_used"] == 1
    assert first.json()["balance_minor"] == 0

    check = await api.post("/v1/billing/credits/check", CHECK)
    assert check.json()["free_uses_remaining"] == 2
    assert check.json()["total_uses"] == 1

    for _ in range(2):
        assert (await api.post("/v1/billing/charges", CHARGE)).status_code == 201

    exhausted = await api.post("/v1/billing/credits/check", CHECK)
    assert exhausted.json()["portal_url"].startswith("http://billing.test/v1/billing/portal/")
    assert {**exhausted.json(), "portal_url": portal} == {
        "has_credit": False,
        "credits_remaining": 0,
        "plan_name": "free",
        "reason": "No free uses or credits remaining",
        "free_uses_remaining": 0,
        "total_uses": 3,
        "held_uses": 0,
        "purchase_required": True,
        "purchase_price_minor": 500,
        "purchase_uses": 20,
        "next_expiry": None,
        "portal_url": portal,
    }

    refused = await api.post("/v1/billing/charges", CHARGE)
    assert refused.status_code == 402
    body = refused.json()
    assert body["error"] == "purchase_required"
    assert body["purchase_required"] is True
    assert body["purchase_price_minor"] == 500
    assert body["purchase_uses"] == 20
    assert (await api.audit()).clean


async def test_get_or_create_grants_initial_balance_only_once(api: Api) -> None:
    body = {**identity("rich@example.com"), "initial_balance_minor": 5}
    first = await api.post("/v1/billing/accounts", body, scope="admin")
    again = await api.post(
        "/v1/billing/accounts", {**body, "initial_balance_minor": 50}, scope="admin"
    )
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["account_id"] == again.json()["account_id"]
    assert again.json()["credits_remaining"] == 5
    assert again.json()["balance_minor"] == 5

    fetched = await api.get("/v1/billing/accounts/oauth:google/rich@example.com")
    assert fetched.status_code == 200
    assert fetched.json()["free_uses_remaining"] == 3
    assert fetched.json()["credits_remaining"] == 5


async def test_free_uses_are_spent_before_paid_ones(api: Api) -> None:
    user = identity("mixed@example.com")
    await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 4}, scope="admin")
    charged = await api.post("/v1/billing/charges", {**user, "uses": 5})
    assert charged.status_code == 201
    body = charged.json()
    assert (body["free_uses_used"], body["paid_uses_used"]) == (3, 2)
    assert (body["free_uses_remaining"], body["credits_remaining"], body["total_uses"]) == (0, 2, 5)

    too_many = await api.post("/v1/billing/charges", {**user, "uses": 3})
    assert too_many.status_code == 402
    account = (await api.get("/v1/billing/accounts/oauth:google/mixed@example.com")).json()
    assert account["credits_remaining"] == 2, "a refused charge deducts nothing"
    assert (await api.audit()).clean


async def test_charge_for_unknown_identity_creates_the_account(api: Api) -> None:
    charged = await api.post("/v1/billing/charges", identity("first-contact@example.com"))
    assert charged.status_code == 201
    assert charged.json()["free_uses_remaining"] == 2


async def test_unknown_account_is_404(api: Api) -> None:
    missing = await api.get("/v1/billing/accounts/oauth:google/nobody@example.com")
    assert missing.status_code == 404
    assert missing.json()["error"] == "account_not_found"


async def test_transactions_newest_first_and_paginated(api: Api) -> None:
    user = identity("ledger@example.com")
    await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 2}, scope="admin")
    charge_ids = []
    for n in range(4):
        charged = await api.post("/v1/billing/charges", {**user, "description": f"use {n}"})
        charge_ids.append(charged.json()["charge_id"])

    page = await api.get("/v1/billing/transactions", **user, limit=3)
    assert page.status_code == 200
    body = page.json()
    assert body["total"] == 6  # free grant, initial balance, four charges
    assert body["has_more"] is True
    assert [t["transaction_id"] for t in body["transactions"]] == charge_ids[::-1][:3]
    assert body["transactions"][0]["paid_uses_delta"] == -1

    rest = (await api.get("/v1/billing/transactions", **user, limit=3, offset=3)).json()
    assert rest["has_more"] is False
    kinds = [t["kind"] for t in rest["transactions"]]
    assert kinds[0] == "charge"
    assert sorted(kinds[1:]) == ["free_grant", "initial_balance"]


async def test_health_metrics_and_docs(api: Api) -> None:
    health = await api.http.get("/health")
    assert health.status_code == 200
    assert health.json()["database"] == "ok"
    await api.post("/v1/billing/credits/check", identity("metrics@example.com"))
    await api.post("/v1/billing/charges", identity("metrics@example.com"))
    metrics = (await api.get("/metrics")).text
    assert 'billing_credit_checks_total{purchase_required="false"}' in metrics
    assert 'billing_charges_total{success="True"}' in metrics
    assert 'route="/v1/billing/charges"' in metrics
    assert (await api.http.get("/docs")).status_code == 200
    assert "/v1/billing/charges" in (await api.http.get("/openapi.json")).json()["paths"]
