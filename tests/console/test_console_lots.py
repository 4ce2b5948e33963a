"""Issue 23 item 6, the console's twin: the account page lists its lots (kind, remaining of
granted, expiry, status) and voids one in two steps (the form, then Confirm), recorded in the
audit trail like every console action."""

from __future__ import annotations

import pytest

from tests.console.test_console_actions import USER, account_of, balance
from tests.support.api import Api
from tests.support.console import Console, trail


@pytest.fixture
async def console(api: Api) -> Console:
    signed_in = await Console(api.http).sign_in(api.keys["admin"])
    assert signed_in.status_code == 303
    return Console(api.http)


async def test_the_account_page_lists_lots_and_voids_one(api: Api, console: Console) -> None:
    granted = await api.post(
        "/v1/billing/credits",
        {**USER, "uses": 5, "reason": "promo", "expires_at": "2099-01-12T00:00:00Z"},
        scope="admin",
    )
    lot_id = granted.json()["lot_id"]
    account = await account_of(api)
    page = await api.http.get(f"/console/accounts/{account.id}")
    assert page.status_code == 200
    assert 'id="lots"' in page.text
    assert lot_id in page.text
    assert "5 / 5" in page.text  # remaining / granted
    assert "2099-01-12 00:00:00 UTC" in page.text
    assert 'action="/console/actions/void_lot"' in page.text
    confirm = await console.confirmation("void_lot", {"lot_id": lot_id, "reason": "wrong user"})
    assert confirm.status_code == 200
    assert "Void this lot?" in confirm.text
    assert "5 of 5 uses left" in confirm.text
    assert (await balance(api))["credits_remaining"] == 5  # nothing before Confirm
    done = await console.confirm("void_lot", confirm.text)
    assert done.status_code == 303
    assert done.headers["location"].startswith(f"/console/accounts/{account.id}?notice=aud_")
    assert (await balance(api))["credits_remaining"] == 0
    [_grant, entry] = await trail(api.engine, account.id)
    assert (entry.door, entry.action, entry.subject) == ("console", "void_lot", lot_id)
    assert (entry.detail["uses"], entry.detail["reason"]) == (5, "wrong user")
    after = await api.http.get(f"/console/accounts/{account.id}")
    assert "voided" in after.text
    # A second void of the closed lot: refused, nothing done.
    again = await console.act("void_lot", {"lot_id": lot_id})
    assert "lot_not_open" in again.text
    unknown = await console.confirmation("void_lot", {"lot_id": "lot_nope"})
    assert "No lot lot_nope" in unknown.text
    assert (await api.audit()).clean


async def test_a_console_grant_may_expire(api: Api, console: Console) -> None:
    await balance(api)
    account = await account_of(api)
    page = await console.confirmation(
        "grant", {"account_id": account.id, "uses": "4", "reason": "trial", "expires_in_days": "7"}
    )
    assert page.status_code == 200
    assert "They expire in 7 days" in page.text
    done = await console.confirm("grant", page.text)
    assert done.status_code == 303
    lots = (
        await api.get(f"/v1/billing/accounts/{USER['oauth_provider']}/{USER['external_id']}/lots")
    ).json()["lots"]
    assert [(lot["kind"], lot["uses_remaining"]) for lot in lots] == [
        ("promotional", 4),
        ("free", 3),
    ]
    assert lots[0]["expires_at"] is not None
    [entry] = await trail(api.engine, account.id)
    assert entry.detail["lot_id"] == lots[0]["lot_id"]
    refused = await console.confirmation(
        "grant", {"account_id": account.id, "uses": "-1", "reason": "x", "expires_in_days": "7"}
    )
    assert "for a grant only" in refused.text
    assert (await api.audit()).clean
