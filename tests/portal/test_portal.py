"""The customer portal: a signed link per account in credit checks, 402s and purchases (and in
the agent client), that shows that account only: balance, usage history, purchases with their
receipts (card brand and last 4 from the provider), refunds, a way to buy more. A tampered
link is 404, an expired one 410, and another account's receipt through it is 404.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.portal.links import (
    DEFAULT_PORTAL_LINK_SECONDS,
    PortalLinkExpired,
    PortalLinkInvalid,
    portal_token,
    read_portal_token,
)
from ciris_billing_client import AsyncBillingClient, PurchaseRequiredError
from tests.support.api import Api, identity, make_settings
from tests.support.flows import VISA, check, exhaust_free_uses, pay, purchase

ALICE = identity("alice@example.com")
BOB = identity("bob@example.com")
WHO = (ALICE["oauth_provider"], ALICE["external_id"])


def path_of(url: str) -> str:
    return httpx.URL(url).path


async def portal_of(api: Api, user: dict[str, str]) -> str:
    url: str = (await check(api, user))["portal_url"]
    return path_of(url)


async def test_checks_402s_and_purchases_carry_the_portal_link(api: Api) -> None:
    body = await check(api, ALICE)
    assert body["portal_url"].startswith("http://billing.test/v1/billing/portal/")
    await exhaust_free_uses(api, ALICE)
    refused = await api.post("/v1/billing/charges", ALICE)
    assert refused.status_code == 402
    assert refused.json()["checkout_url"].startswith("http://billing.test/v1/billing/buy/")
    bought = await purchase(api, ALICE)
    # Each link names the account's identity, what it may do and when it was made, sealed:
    # nothing to store per check (a new seal each time).
    secret = api.state.secrets.portal_link_secret
    for url in (body["portal_url"], refused.json()["portal_url"], bought["portal_url"]):
        assert url.startswith("http://billing.test/v1/billing/portal/")
        named = read_portal_token(secret, path_of(url).rsplit("/", 1)[1])
        assert (named.oauth_provider, named.external_id) == WHO


async def test_the_fast_path_answers_the_same_link_as_the_framework(database_url: str) -> None:
    """The two apps on one database (one installation secret): the fast path for Alice, the
    framework for Bob; their answers differ only by whose link it is, and each link is
    exactly the one the portal's own function makes."""
    answers: dict[bool, list[tuple[str, int, dict[str, object]]]] = {}
    for hot_path, user in ((True, ALICE), (False, BOB)):
        app = create_app(make_settings(database_url), hot_path=hot_path)
        async with app.router.lifespan_context(app):
            state = app.state.billing
            async with state.engine.begin() as conn:
                _id, key = await auth.create_key(conn, "twin", frozenset({"write"}))
            secret = state.secrets.portal_link_secret
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
                seen = answers.setdefault(hot_path, [])
                for path in ["/v1/billing/credits/check"] + ["/v1/billing/charges"] * 4:
                    # (`context` is a check's field: a charge refuses it, 422.)
                    extra: dict[str, object] = {"context": {}} if path.endswith("/check") else {}
                    response = await http.post(
                        path, json={**user, **extra}, headers={"X-API-Key": key}
                    )
                    body = response.json()
                    for volatile in ("charge_id", "account_id", "created_at", "checkout_url"):
                        body.pop(volatile, None)
                    body.pop("external_id", None)
                    if "lots" in body:  # a charge's lots: each account's own ids
                        body["lots"] = [lot["uses"] for lot in body["lots"]]
                    if "portal_url" in body:
                        url = body["portal_url"]
                        assert url.startswith("http://localhost/v1/billing/portal/")
                        named = read_portal_token(secret, url.rsplit("/", 1)[1])
                        assert (named.oauth_provider, named.external_id, named.scope) == (
                            user["oauth_provider"],
                            user["external_id"],
                            "write",
                        )
                        body["portal_url"] = "the user's"
                    seen.append((path, response.status_code, body))
    assert answers[True] == answers[False]
    assert answers[True][0][2]["portal_url"] == "the user's"  # the check
    assert answers[True][-1][1:] == (402, answers[True][-1][2])
    assert answers[True][-1][2]["portal_url"] == "the user's"  # the 402


async def test_the_agent_client_exposes_it(api: Api) -> None:
    transport = httpx.ASGITransport(app=api.http._transport.app)  # type: ignore[attr-defined]
    async with AsyncBillingClient(
        "http://billing.test", api.keys["write"], transport=transport
    ) as client:
        checked = await client.check(*WHO)
        assert checked.portal_url is not None
        assert checked.portal_url.startswith("http://billing.test/v1/billing/portal/")
        assert checked.portal_url not in repr(checked)  # a link to the account: not in logs
        bought = await client.purchase(*WHO)
        assert bought.portal_url is not None
        for _ in range(3):
            await client.charge(*WHO)
        with pytest.raises(PurchaseRequiredError) as refused:
            await client.charge(*WHO)
        assert refused.value.portal_url is not None
        assert refused.value.portal_url.startswith("http://billing.test/v1/billing/portal/")


async def test_the_portal_shows_balance_usage_and_receipts(api: Api) -> None:
    for n in range(3):
        charged = await api.post(
            "/v1/billing/charges", {**ALICE, "description": f"Chat number {n}"}
        )
        assert charged.status_code == 201
    bought = await purchase(api, ALICE)
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    refunded = await api.post(
        f"/v1/billing/purchases/{bought['payment_id']}/refund", {"amount_minor": 100}, "admin"
    )
    assert refunded.status_code == 201
    link = await portal_of(api, ALICE)
    page = await api.http.get(link)
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert re.search(r'id="free-uses">0<', page.text)
    assert re.search(r'id="paid-uses">16<', page.text)  # 20 bought, 4 taken back by $1.00
    assert re.search(r'id="held-uses">0<', page.text)
    for n in range(3):
        assert f"Chat number {n}" in page.text
    assert "$5.00" in page.text
    assert "partially refunded" in page.text
    assert "$1.00" in page.text  # the refund
    assert "Buy 20 uses for $5.00" in page.text
    buy = re.search(r'href="(http://billing.test/v1/billing/buy/[^"]+)"', page.text)
    assert buy is not None
    receipt_path = f"{link}/receipts/{bought['payment_id']}"
    assert receipt_path in page.text
    receipt = await api.http.get(receipt_path)
    assert receipt.status_code == 200
    assert 'id="receipt-card">Visa ending in 4242<' in receipt.text
    assert 'id="receipt-amount">$5.00<' in receipt.text
    assert "4242424242424242" not in receipt.text


async def test_usage_history_pages_by_key(api: Api) -> None:
    await api.post("/v1/billing/credits", {**ALICE, "uses": 40, "reason": "test"}, "admin")
    for n in range(30):
        assert (
            await api.post("/v1/billing/charges", {**ALICE, "description": f"use-{n:02d}"})
        ).status_code == 201
    first = await api.http.get(await portal_of(api, ALICE))
    shown = re.findall(r"use-(\d\d)", first.text)
    assert shown == [f"{n:02d}" for n in range(29, 4, -1)]  # the newest 25
    older = re.search(r'rel="next" href="([^"]+)"', first.text)
    assert older is not None
    second = await api.http.get(older.group(1).replace("&amp;", "&"))
    assert re.findall(r"use-(\d\d)", second.text) == ["04", "03", "02", "01", "00"]
    assert 'rel="next"' not in second.text


async def test_a_link_shows_only_its_own_account(api: Api) -> None:
    alice_portal = await portal_of(api, ALICE)
    bob_bought = await purchase(api, BOB)
    assert (await pay(api, bob_bought, VISA)).json()["status"] == "succeeded"
    bob_portal = await portal_of(api, BOB)
    assert bob_bought["payment_id"] in (await api.http.get(bob_portal)).text
    alice_page = await api.http.get(alice_portal)
    assert bob_bought["payment_id"] not in alice_page.text
    # Bob's receipt through Alice's link: as if it did not exist.
    other = await api.http.get(f"{alice_portal}/receipts/{bob_bought['payment_id']}")
    assert other.status_code == 404
    assert "This link does not work" in other.text


async def test_a_tampered_link_is_404_and_an_expired_one_410(api: Api) -> None:
    await check(api, ALICE)
    token = (await portal_of(api, ALICE)).rsplit("/", 1)[1]
    secret = api.state.secrets.portal_link_secret
    bob = portal_token(secret, BOB["oauth_provider"], BOB["external_id"])
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    for tampered in (
        flipped,  # one character changed
        token[:40] + bob[40:],  # Alice's start on Bob's end
        token[:-2],  # cut short
        portal_token(b"another secret", *WHO),  # sealed with another secret
        "ünïcode.x",
    ):
        refused = await api.http.get(f"/v1/billing/portal/{tampered}")
        assert refused.status_code == 404, tampered
        assert "This link does not work" in refused.text
    expired = portal_token(secret, *WHO, lifetime_seconds=60, now=time.time() - 61)
    gone = await api.http.get(f"/v1/billing/portal/{expired}")
    assert gone.status_code == 410
    assert "This link has expired" in gone.text
    # A valid link for an identity with no account: nothing to show.
    nobody = portal_token(secret, "oauth:google", "nobody@example.com")
    assert (await api.http.get(f"/v1/billing/portal/{nobody}")).status_code == 404


def test_links_last_a_week_by_default() -> None:
    secret = b"s" * 32
    now = 1_800_000_000.0
    first = portal_token(secret, "oauth:google", "a@example.com", now=now)
    named = read_portal_token(secret, first, now=now + DEFAULT_PORTAL_LINK_SECONDS)
    assert (named.oauth_provider, named.external_id, named.scope) == (
        "oauth:google",
        "a@example.com",
        "read",
    )
    with pytest.raises(PortalLinkExpired):
        read_portal_token(secret, first, now=now + DEFAULT_PORTAL_LINK_SECONDS + 1)
    with pytest.raises(PortalLinkInvalid):
        read_portal_token(b"t" * 32, first, now=now)


@pytest.fixture
async def erased(api: Api) -> str:
    link = await portal_of(api, ALICE)
    assert (
        await api.http.delete(
            "/v1/billing/accounts/oauth:google/alice@example.com",
            headers=api.headers("admin"),
        )
    ).status_code == 200
    return link


async def test_an_erased_account_has_no_portal(api: Api, erased: str) -> None:
    assert (await api.http.get(erased)).status_code == 404
