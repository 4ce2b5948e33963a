"""Issue 21, finding 5: "A read key writes through the portal".

The attack: a read-key credit check made the account and answered `portal_url`; that link alone
switched auto top-up and removed the saved card, for 7 days, and could not be revoked. Now a
link does what the key that made it may: a read key's link only shows (balance, usage,
receipts, buy); switching auto top-up or removing the card needs a link made by a write key.
Links are revocable per account (API, CLI), and their lifetime is PORTAL_LINK_SECONDS.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest
from sqlalchemy import select

from ciris_billing.db import accounts
from ciris_billing.portal.links import PortalLinkExpired, read_portal_token
from tests.autotopup.test_auto_topup import buy_saving_card, settings_row
from tests.support.api import Api, identity, make_settings, running_app
from tests.support.cli import cli
from tests.support.console import Console, trail
from tests.support.servers import service_env


def _user() -> str:
    return f"portal-ro-{uuid.uuid4().hex[:8]}@example.com"


async def _link(api: Api, email: str, scope: str) -> str:
    checked = await api.post("/v1/billing/credits/check", {**identity(email), "context": {}}, scope)
    assert checked.status_code == 200, checked.text
    return httpx.URL(checked.json()["portal_url"]).path


async def test_issue21_finding05_a_read_keys_link_only_shows(api: Api) -> None:
    email = _user()
    await buy_saving_card(api, email)
    link = await _link(api, email, "read")

    page = await api.http.get(link)
    assert page.status_code == 200, page.text
    assert "Remove saved card" not in page.text
    assert "only shows your account" in page.text

    switched = await api.http.post(f"{link}/auto-topup", data={"auto_topup": "off"})
    assert switched.status_code == 403, switched.text
    removed = await api.http.post(f"{link}/card", data={"confirm": "yes"})
    assert removed.status_code == 403, removed.text
    card = await settings_row(api, email)
    assert (card.enabled, card.payment_method_id is not None) == (True, True), "unchanged"

    # A write key's link (a check by it, or POST .../portal_link) may change the account.
    for writer in (
        await _link(api, email, "write"),
        httpx.URL(
            (await api.post(f"/v1/billing/accounts/oauth:google/{email}/portal_link", {})).json()[
                "portal_url"
            ]
        ).path,
    ):
        assert "Remove saved card" in (await api.http.get(writer)).text
    off = await api.http.post(f"{writer}/auto-topup", data={"auto_topup": "off"})
    assert off.status_code == 303, off.text
    assert (await settings_row(api, email)).enabled is False
    assert (await api.audit()).clean


async def test_issue21_finding05_links_are_revocable_by_api_and_cli(api: Api) -> None:
    email = _user()
    old = await _link(api, email, "write")
    assert (await api.http.get(old)).status_code == 200
    time.sleep(0.002)  # a link made in the very millisecond of the revocation is void too

    revoked = await api.post(f"/v1/billing/accounts/oauth:google/{email}/portal_links/revoke", {})
    assert revoked.status_code == 200, revoked.text
    assert (await api.http.get(old)).status_code == 404
    assert (await api.http.post(f"{old}/auto-topup", data={"auto_topup": "on"})).status_code == 404
    time.sleep(0.002)
    new = await _link(api, email, "write")
    assert (await api.http.get(new)).status_code == 200, "links made after it work"

    refused = await api.post(
        f"/v1/billing/accounts/oauth:google/{email}/portal_links/revoke", {}, scope="read"
    )
    assert refused.status_code == 403

    time.sleep(0.002)
    done = cli(service_env(api.database_url), "portal-links", "revoke", f"oauth:google/{email}")
    assert done.returncode == 0, done.stderr
    assert (await api.http.get(new)).status_code == 404


async def test_issue21_finding05_lifetime_is_configurable(database_url: str) -> None:
    async with running_app(make_settings(database_url, portal_link_seconds=120)) as api:
        link = await _link(api, _user(), "read")
        token = link.rsplit("/", 1)[1]
        secret = api.state.secrets.portal_link_secret
        assert read_portal_token(secret, token, now=time.time() + 100).scope == "read"
        with pytest.raises(PortalLinkExpired):
            read_portal_token(secret, token, now=time.time() + 125)


async def test_issue21_finding05_links_are_revocable_in_the_console(api: Api) -> None:
    email = _user()
    old = await _link(api, email, "write")
    async with api.engine.connect() as conn:
        account_id = await conn.scalar(select(accounts.c.id).where(accounts.c.external_id == email))
    console = Console(api.http)
    await console.sign_in(api.keys["admin"])
    time.sleep(0.002)
    done = await console.act("revoke_portal_links", {"account_id": str(account_id)})
    assert done.status_code == 303, done.text
    assert (await api.http.get(old)).status_code == 404
    [entry] = await trail(api.engine, str(account_id))
    assert entry.action == "revoke_portal_links"
    time.sleep(0.002)
    assert (await api.http.get(await _link(api, email, "read"))).status_code == 200
    assert (await api.audit()).clean
