"""Every console action, over HTTP as the browser sends it: the form, the confirmation page
(what will change; nothing changed yet), Confirm. Each is asserted in the database (through
the API and the ledger audit) and in the audit trail (who, what, before -> after), and the
account page shows it. `ciris-billing audit-log` prints the same trail.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from ciris_billing.db import accounts, api_keys, purchases, utcnow, webhook_events
from tests.support.api import Api, identity
from tests.support.cli import cli
from tests.support.console import Console, paid_without_webhook, trail
from tests.support.flows import paid_purchase, purchase
from tests.support.servers import service_env

USER = identity("operator-target@example.com")


@pytest.fixture
async def console(api: Api) -> Console:
    signed_in = await Console(api.http).sign_in(api.keys["admin"])
    assert signed_in.status_code == 303
    return Console(api.http)


async def account_of(api: Api, user: dict[str, str] = USER) -> Any:
    async with api.engine.connect() as conn:
        return (
            await conn.execute(
                select(accounts).where(
                    accounts.c.oauth_provider == user["oauth_provider"],
                    accounts.c.external_id == user["external_id"],
                )
            )
        ).one()


async def balance(api: Api, user: dict[str, str] = USER) -> dict[str, Any]:
    body: dict[str, Any] = (await api.post("/v1/billing/credits/check", user)).json()
    return body


async def test_grant_five_uses(api: Api, console: Console) -> None:
    await balance(api)
    account = await account_of(api)
    page = await console.confirmation(
        "grant", {"account_id": account.id, "uses": "5", "reason": "support ticket 42"}
    )
    assert page.status_code == 200
    assert "Grant 5 paid uses to this account?" in page.text
    assert "Paid uses: 0 → 5" in page.text
    assert (await balance(api))["credits_remaining"] == 0  # nothing happens before Confirm
    done = await console.confirm("grant", page.text)
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/console/accounts/{account.id}?notice=aud_")
    assert (await balance(api))["credits_remaining"] == 5
    [entry] = await trail(api.engine, account.id)
    assert (entry.actor, entry.action, entry.detail) == (
        "test-admin",
        "grant",
        {"uses": 5, "reason": "support ticket 42"},
    )
    assert (entry.before["paid_uses"], entry.after["paid_uses"]) == (0, 5)
    shown = await api.http.get(done.headers["location"])
    assert "Done: grant" in shown.text
    assert "paid uses: 0 → 5" in shown.text
    assert "support ticket 42" in shown.text  # the ledger row's reason
    assert (await api.audit()).clean


async def test_refund_a_purchase_partially(api: Api, console: Console) -> None:
    bought = await paid_purchase(api, USER)
    account = await account_of(api)
    page = await console.confirmation(
        "refund", {"payment_id": bought["payment_id"], "amount_minor": "200"}
    )
    assert "Refund now: $2.00 (of $5.00 not yet refunded)" in page.text
    assert "Paid uses taken back: up to 8" in page.text
    done = await console.confirm("refund", page.text)
    assert done.status_code == 303, done.text
    assert (await balance(api))["credits_remaining"] == 12
    got = await api.get(f"/v1/billing/purchases/{bought['payment_id']}")
    assert got.json()["status"] == "partially_refunded"
    [entry] = await trail(api.engine, account.id)
    assert entry.action == "refund"
    assert entry.subject == bought["payment_id"]
    assert entry.detail["amount_minor"] == 200
    assert entry.detail["uses_reversed"] == 8
    assert (entry.before["refunded_minor"], entry.after["refunded_minor"]) == (0, 200)
    assert (entry.before["paid_uses"], entry.after["paid_uses"]) == (20, 12)
    assert (entry.before["status"], entry.after["status"]) == ("succeeded", "partially_refunded")
    assert (await api.audit()).clean


async def test_a_refund_beyond_what_is_left_is_refused_before_confirmation(
    api: Api, console: Console
) -> None:
    bought = await paid_purchase(api, USER)
    page = await console.confirmation(
        "refund", {"payment_id": bought["payment_id"], "amount_minor": "501"}
    )
    assert page.status_code == 422
    assert "between 1 and 500" in page.text
    assert await trail(api.engine) == []


async def test_suspend_and_reactivate(api: Api, console: Console) -> None:
    await balance(api)
    account = await account_of(api)
    suspended = await console.act("suspend", {"account_id": account.id, "reason": "chargebacks"})
    assert suspended.status_code == 303
    check = await balance(api)
    assert (check["has_credit"], check["reason"]) == (False, "Account is suspended: chargebacks")
    assert (await api.post("/v1/billing/charges", USER)).status_code == 403
    reactivated = await console.act("reactivate", {"account_id": account.id})
    assert reactivated.status_code == 303
    assert (await balance(api))["has_credit"] is True
    entries = await trail(api.engine, account.id)
    assert [(e.action, e.before["status"], e.after["status"]) for e in entries] == [
        ("suspend", "active", "suspended"),
        ("reactivate", "suspended", "active"),
    ]
    # The reason lives on the account (erasable), not in the trail.
    assert "chargebacks" not in json.dumps([e.detail for e in entries])


async def test_erase(api: Api, console: Console) -> None:
    await balance(api)
    account = await account_of(api)
    assert (await console.act("erase", {"account_id": account.id})).status_code == 303
    async with api.engine.connect() as conn:
        after = (await conn.execute(select(accounts).where(accounts.c.id == account.id))).one()
    assert after.external_id == f"erased:{account.id}"
    assert after.erased_at is not None
    [entry] = await trail(api.engine, account.id)
    assert (entry.action, entry.before["erased"], entry.after["erased"]) == ("erase", False, True)
    assert USER["external_id"] not in json.dumps([entry.detail, entry.before, entry.after])
    assert (await api.audit()).clean


async def test_release_a_reservation(api: Api, console: Console) -> None:
    held = await api.post("/v1/billing/reservations", {**USER, "uses": 2})
    assert held.status_code == 201, held.text
    reservation_id = held.json()["reservation_id"]
    account = await account_of(api)
    assert (await balance(api))["held_uses"] == 2
    done = await console.act("release", {"reservation_id": reservation_id})
    assert done.status_code == 303
    assert (await balance(api))["held_uses"] == 0
    assert (await balance(api))["free_uses_remaining"] == 3
    [entry] = await trail(api.engine, account.id)
    assert (entry.action, entry.subject) == ("release", reservation_id)
    assert (entry.before["reservation"], entry.after["reservation"]) == ("held", "released")
    assert (entry.before["held_uses"], entry.after["held_uses"]) == (2, 0)
    assert (await api.audit()).clean


async def test_replay_a_failed_webhook_event(api: Api, console: Console) -> None:
    bought = await purchase(api, USER)
    event_row = await paid_without_webhook(api.engine, bought["payment_id"])
    inbox = await api.http.get("/console/webhooks")
    assert f"evt_failed_{bought['payment_id']}" in inbox.text
    assert "ProviderUnavailable" in inbox.text
    account = await account_of(api)
    done = await console.act("replay", {"event": event_row})
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/console/accounts/{account.id}")
    assert (await balance(api))["credits_remaining"] == 20
    async with api.engine.connect() as conn:
        event = (
            await conn.execute(select(webhook_events).where(webhook_events.c.id == event_row))
        ).one()
    assert event.handled_at is not None
    assert event.outcome == "credited"
    [entry] = await trail(api.engine, account.id)
    assert (entry.action, entry.detail["outcome"]) == ("replay", "credited")
    assert (entry.before["handled"], entry.after["handled"]) == (False, True)
    assert "Every stored event is handled." in (await api.http.get("/console/webhooks")).text
    assert (await api.audit()).clean


async def test_reconcile_a_purchase(api: Api, console: Console) -> None:
    bought = await purchase(api, USER)
    await paid_without_webhook(api.engine, bought["payment_id"])
    account = await account_of(api)
    assert (await console.act("reconcile", {"payment_id": bought["payment_id"]})).status_code == 303
    assert (await balance(api))["credits_remaining"] == 20
    [entry] = await trail(api.engine, account.id)
    assert (entry.action, entry.detail["outcome"]) == ("reconcile", "credited")
    assert (entry.before["credited"], entry.after["credited"]) == (False, True)


async def test_create_a_key_shown_once_then_revoke_it(api: Api, console: Console) -> None:
    created = await console.act("create_key", {"name": "agent-7", "scope": "write"})
    assert created.status_code == 200
    assert created.headers["cache-control"] == "no-store"
    secret = created.text.split('id="new-key" type="text" readonly value="')[1].split('"')[0]
    assert secret.startswith("cbk_")
    ok = await api.http.post(
        "/v1/billing/credits/check", json={**USER, "context": {}}, headers={"X-API-Key": secret}
    )
    assert ok.status_code == 200
    keys_page = await api.http.get("/console/keys")
    assert "agent-7" in keys_page.text
    assert secret not in keys_page.text
    async with api.engine.connect() as conn:
        key_id = await conn.scalar(select(api_keys.c.id).where(api_keys.c.name == "agent-7"))
    assert (await console.act("revoke_key", {"key_id": str(key_id)})).status_code == 303
    actions = [(e.action, e.subject, e.api_key_id is not None) for e in await trail(api.engine)]
    assert actions == [("create_key", key_id, True), ("revoke_key", key_id, True)]


async def test_the_audit_log_command_prints_the_trail(api: Api, console: Console) -> None:
    await balance(api)
    account = await account_of(api)
    await console.act("grant", {"account_id": account.id, "uses": "5", "reason": "goodwill"})
    await console.act("suspend", {"account_id": account.id, "reason": ""})
    env = service_env(api.database_url)
    printed = cli(env, "audit-log", "--account", account.id)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "test-admin  suspend" in lines[0]
    assert "status: active -> suspended" in lines[0]
    assert "test-admin  grant" in lines[1]
    assert "paid_uses: 0 -> 5" in lines[1]
    as_json = cli(env, "audit-log", "--json", "--action", "grant")
    [row] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert (row["actor"], row["account_id"], row["detail"]["uses"]) == ("test-admin", account.id, 5)


async def test_the_overview_shows_a_stuck_purchase_to_reconcile(api: Api, console: Console) -> None:
    bought = await purchase(api, USER)
    async with api.engine.begin() as conn:
        await conn.execute(
            purchases.update()
            .where(purchases.c.payment_id == bought["payment_id"])
            .values(created_at=utcnow() - timedelta(hours=1))
        )
    await paid_without_webhook(api.engine, bought["payment_id"])
    overview = await api.http.get("/console")
    assert '<a href="/console/webhooks">1</a></span> unhandled webhook events' in overview.text
    row = overview.text.split(bought["payment_id"], 1)[1].split("</tr>", 1)[0]
    assert "pending (not final)" in row
    assert 'action="/console/actions/reconcile"' in row
    assert (await console.act("reconcile", {"payment_id": bought["payment_id"]})).status_code == 303
    assert (await balance(api))["credits_remaining"] == 20
    assert bought["payment_id"] not in (await api.http.get("/console")).text


async def test_the_account_page_links_the_users_portal(api: Api, console: Console) -> None:
    await balance(api)
    account = await account_of(api)
    page = await api.http.get(f"/console/accounts/{account.id}")
    # A link made for support to send (sealed anew each time, read-only): it opens.
    found = re.search(r'href="(http://billing.test/v1/billing/portal/[^"]+)"', page.text)
    assert found is not None
    assert (await api.http.get(httpx.URL(found.group(1)).path)).status_code == 200
