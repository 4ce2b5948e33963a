"""Operator tools (admin scope): grants, suspension, erasure and export."""

from __future__ import annotations

import json

import httpx

from tests.support.api import Api, identity
from tests.support.cli import cli
from tests.support.flows import paid_purchase
from tests.support.servers import service_env

USER = identity("operator-target@example.com")
ACCOUNT = "/v1/billing/accounts/oauth:google/operator-target@example.com"


async def grant(
    api: Api, uses: int, reason: str = "Support goodwill", **headers: str
) -> httpx.Response:
    return await api.post(
        "/v1/billing/credits", {**USER, "uses": uses, "reason": reason}, scope="admin", **headers
    )


async def test_grant_and_adjust_with_reasons(api: Api) -> None:
    granted = await grant(api, 10)
    assert granted.status_code == 201
    assert granted.json()["account"]["credits_remaining"] == 10
    adjusted = await grant(api, -4, "Duplicate grant")
    assert adjusted.json()["kind"] == "adjustment"
    below = await grant(api, -7, "Too much")
    assert below.status_code == 422
    assert below.json()["error"] == "adjustment_below_zero"
    ledger = (await api.get("/v1/billing/transactions", **USER)).json()
    assert [t["description"] for t in ledger["transactions"][:2]] == [
        "Duplicate grant",
        "Support goodwill",
    ]
    assert (await api.audit()).clean


async def test_grant_is_idempotent_and_admin_only(api: Api) -> None:
    first = await grant(api, 5, **{"Idempotency-Key": "g-1"})
    again = await grant(api, 5, **{"Idempotency-Key": "g-1"})
    assert first.json() == again.json()
    account = (await api.get(ACCOUNT)).json()
    assert account["credits_remaining"] == 5
    denied = await api.post(
        "/v1/billing/credits", {**USER, "uses": 5, "reason": "x"}, scope="write"
    )
    assert denied.status_code == 403
    for bad in (
        {**USER, "uses": 0, "reason": "x"},
        {**USER, "uses": 5},
        {**USER, "uses": 5, "reason": ""},
    ):
        assert (await api.post("/v1/billing/credits", bad, scope="admin")).status_code == 422


async def test_suspended_account_cannot_charge_and_checks_say_why(api: Api) -> None:
    await api.post("/v1/billing/accounts", USER)
    suspended = await api.post(f"{ACCOUNT}/suspend", {"reason": "Chargeback fraud"}, scope="admin")
    assert suspended.status_code == 200
    assert suspended.json()["status"] == "suspended"
    charged = await api.post("/v1/billing/charges", USER)
    assert charged.status_code == 403
    assert charged.json()["error"] == "account_suspended"
    verdict = (await api.post("/v1/billing/credits/check", USER)).json()
    assert verdict["has_credit"] is False
    assert verdict["reason"] == "Account is suspended: Chargeback fraud"
    assert verdict["purchase_required"] is False
    await api.post(f"{ACCOUNT}/reactivate", {}, scope="admin")
    assert (await api.post("/v1/billing/charges", USER)).status_code == 201
    assert (await api.post(f"{ACCOUNT}/suspend", {}, scope="write")).status_code == 403


async def test_erasure_keeps_the_ledger_and_forgets_the_person(api: Api) -> None:
    email = USER["external_id"]
    await api.post(
        "/v1/billing/accounts",
        {
            **USER,
            "customer_email": email,
            "display_name": "Ada Lovelace",
            "initial_balance_minor": 2,
        },
        scope="admin",
        **{"Idempotency-Key": "create-ada"},
    )
    await api.post(
        "/v1/billing/charges",
        {**USER, "description": f"Chat with {email}", "metadata": {"email": email}},
    )
    bought = await api.post("/v1/billing/purchases", {**USER, "customer_email": email})
    assert bought.status_code == 201

    erased = await api.http.delete(ACCOUNT, headers=api.headers("admin"))
    assert erased.status_code == 200
    assert erased.json()["erased"] is True
    assert (await api.get(ACCOUNT)).status_code == 404

    export = await api.http.get(f"{ACCOUNT}/export", headers=api.headers("admin"))
    assert export.status_code == 200
    text = export.text
    assert email not in text
    assert "Ada Lovelace" not in text
    data = json.loads(text)
    assert data["account"]["customer_email"] is None
    assert data["account"]["erased_at"] is not None
    # Issue 23: the erased account's uses are written off (one `void` row naming its lots);
    # the ledger before it stays.
    assert (data["account"]["free_uses_remaining"], data["account"]["paid_uses_remaining"]) == (
        0,
        0,
    )
    assert len(data["charges"]) == 1
    assert data["charges"][0]["uses"] == 1
    assert {c["kind"] for c in data["credits"]} == {"free_grant", "initial_balance", "void"}
    assert len(data["purchases"]) == 1
    assert (await api.audit()).clean


async def test_export_lists_everything_and_needs_admin(api: Api) -> None:
    await api.post("/v1/billing/charges", USER)
    export = await api.http.get(f"{ACCOUNT}/export", headers=api.headers("admin"))
    data = export.json()
    assert data["account"]["external_id"] == USER["external_id"]
    assert len(data["charges"]) == 1
    assert (await api.http.get(f"{ACCOUNT}/export", headers=api.headers("read"))).status_code == 403
    missing = await api.http.get(
        "/v1/billing/accounts/oauth:google/nobody@x.y/export", headers=api.headers("admin")
    )
    assert missing.status_code == 404


async def test_operator_cli(api: Api) -> None:

    env = service_env(api.database_url, PAYMENT_PROVIDER="sandbox")
    bought = await paid_purchase(api, USER)
    granted = cli(
        env, "grant", "oauth:google", USER["external_id"], "--uses", "5", "--reason", "Sorry"
    )
    assert granted.returncode == 0, granted.stderr
    assert "paid uses now 25" in granted.stdout
    refunded = cli(env, "refund", bought["payment_id"], "--amount", "250")
    assert refunded.returncode == 0, refunded.stderr
    assert json.loads(refunded.stdout)["uses_refunded"] == 10
    again = cli(env, "refund", bought["payment_id"], "--amount", "300")
    assert again.returncode != 0
    assert "refund_exceeds_payment" in again.stderr
    assert cli(env, "suspend", "oauth:google", USER["external_id"], "--reason", "x").returncode == 0
    assert (await api.post("/v1/billing/charges", USER)).status_code == 403
    assert cli(env, "reactivate", "oauth:google", USER["external_id"]).returncode == 0
    exported = json.loads(cli(env, "export", "oauth:google", USER["external_id"]).stdout)
    assert exported["account"]["paid_uses_remaining"] == 15
    assert cli(env, "erase", "--yes", "oauth:google", USER["external_id"]).returncode == 0
    assert USER["external_id"] not in cli(env, "export", "oauth:google", USER["external_id"]).stdout
    assert cli(env, "audit").returncode == 0


async def test_operator_lookups(api: Api) -> None:

    env = service_env(api.database_url)
    bought = await paid_purchase(api, USER)
    await api.post("/v1/billing/charges", USER)
    shown = json.loads(
        cli(env, "accounts", "show", f"oauth:google/{USER['external_id']}", "--json").stdout
    )
    assert (shown["free_uses_remaining"], shown["paid_uses_remaining"]) == (2, 20)
    listed = json.loads(cli(env, "accounts", "list", "--json").stdout)
    assert [a["external_id"] for a in listed] == [USER["external_id"]]
    ledger = json.loads(
        cli(env, "transactions", "oauth:google", USER["external_id"], "--json").stdout
    )
    assert [t["kind"] for t in ledger] == ["charge", "purchase", "free_grant"]
    paid = json.loads(cli(env, "purchases", "list", "--status", "succeeded", "--json").stdout)
    assert [p["payment_id"] for p in paid] == [bought["payment_id"]]
    table = cli(env, "purchases", "list")
    assert table.returncode == 0
    assert "Purchases" in table.stdout
    missing = cli(env, "accounts", "show", "oauth:google/nobody@x.y")
    assert missing.returncode != 0
    assert "account_not_found" in missing.stderr
