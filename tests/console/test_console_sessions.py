"""Console sign-in and sessions, over HTTP as a browser without JavaScript sends them.

A session comes only from an admin key posted through the login form with its CSRF token; its
cookie is HttpOnly, SameSite=Strict, Path=/console (and Secure under https); it ends when idle
too long, at its absolute end, at logout, and when its key is revoked. Every form needs its
CSRF token (403 otherwise, and nothing changes). Failed logins are limited (429).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select

from ciris_billing import auth
from ciris_billing.db import accounts, audit_trail, console_sessions, utcnow
from ciris_billing.web.templating import CONTENT_SECURITY_POLICY
from tests.support.api import Api, identity, make_settings, running_app
from tests.support.console import CONSOLE_SESSION, Console, age_sessions, csrf_of, trail


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(database_url, console_login_failures_per_minute=3)
    async with running_app(settings) as api:
        yield api


@pytest.fixture
def console(api: Api) -> Console:
    return Console(api.http)


async def sessions(api: Api) -> int:
    async with api.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(console_sessions)) or 0)


async def test_an_admin_key_signs_in_and_the_cookie_is_strict(api: Api, console: Console) -> None:
    assert (await api.http.get("/console")).headers["location"] == "/console/login"
    signed_in = await console.sign_in(api.keys["admin"])
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/console"
    cookie = next(
        c for c in signed_in.headers.get_list("set-cookie") if c.startswith("ciris_console=")
    )
    flags = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/console"} <= flags
    assert "secure" not in flags  # plain http here (see the https test below)
    page = await api.http.get("/console")
    assert page.status_code == 200
    assert "Signed in as <strong>test-admin</strong>" in page.text
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    # The token in the cookie is not what the table keeps (only its digest).
    token = api.http.cookies["ciris_console"]
    async with api.engine.connect() as conn:
        assert await conn.scalar(select(console_sessions.c.id)) != token


async def test_under_https_the_cookie_is_secure(api: Api) -> None:
    transport = httpx.ASGITransport(app=api.http._transport.app)  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=transport, base_url="https://billing.test") as http:
        signed_in = await Console(http).sign_in(api.keys["admin"])
    cookie = next(
        c for c in signed_in.headers.get_list("set-cookie") if c.startswith("ciris_console=")
    )
    assert "secure" in {part.strip().lower() for part in cookie.split(";")}


async def test_behind_a_tls_proxy_the_cookies_are_secure(database_url: str) -> None:
    """Plain http from a proxy that terminates TLS: PUBLIC_BASE_URL says https, so the cookies
    are Secure (the browser, on https, sends them back; this plain-http client would not)."""
    settings = make_settings(database_url, public_base_url="https://billing.example.com")
    async with running_app(settings) as api:
        form = await api.http.get("/console/login")
    cookie = next(
        c for c in form.headers.get_list("set-cookie") if c.startswith("ciris_console_login=")
    )
    assert "secure" in {part.strip().lower() for part in cookie.split(";")}


@pytest.mark.parametrize("scope", ["read", "write"])
async def test_a_key_without_admin_scope_is_refused(api: Api, console: Console, scope: str) -> None:
    refused = await console.sign_in(api.keys[scope])
    assert refused.status_code == 401
    assert "That key is not a valid admin API key." in refused.text
    assert "ciris_console=" not in refused.headers.get("set-cookie", "")
    assert (await api.http.get("/console")).status_code == 303
    assert await sessions(api) == 0


async def test_a_wrong_key_is_refused_and_failures_are_rate_limited(
    api: Api, console: Console
) -> None:
    for _ in range(3):  # CONSOLE_LOGIN_FAILURES_PER_MINUTE=3
        refused = await console.sign_in("cbk_not-a-key")
        assert refused.status_code == 401
        assert 'aria-invalid="true"' in refused.text
    limited = await console.sign_in(api.keys["admin"])  # even the right key, for now
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert "Too many failed logins" in limited.text
    assert await sessions(api) == 0


async def test_the_login_form_needs_its_csrf_token(api: Api) -> None:
    await api.http.get("/console/login")  # the login cookie, but no token posted
    refused = await api.http.post("/console/login", data={"api_key": api.keys["admin"]})
    assert refused.status_code == 403
    assert "csrf_refused" in refused.text
    # A token made for another browser's nonce does not fit this browser's cookie.
    other = httpx.AsyncClient(transport=api.http._transport, base_url="http://billing.test")
    async with other:
        foreign = csrf_of((await other.get("/console/login")).text)
    refused = await api.http.post(
        "/console/login", data={"api_key": api.keys["admin"], "csrf_token": foreign}
    )
    assert refused.status_code == 403
    assert await sessions(api) == 0


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    api: Api, console: Console
) -> None:
    check = await api.post("/v1/billing/credits/check", identity("csrf@example.com"))
    assert check.status_code == 200
    await console.sign_in(api.keys["admin"])
    async with api.engine.connect() as conn:
        account_id = await conn.scalar(select(accounts.c.id))
    fields = {"account_id": str(account_id), "uses": "5", "reason": "goodwill"}
    # Even the confirmation step itself, with a valid confirmation id, needs the token.
    page = await console.confirmation("grant", fields)
    assert page.status_code == 200
    hidden = {**fields, "confirm": "yes", "request_id": "forged-request-id"}
    for posted in (hidden, {**hidden, "csrf_token": "wrong"}):
        refused = await api.http.post("/console/actions/grant", data=posted)
        assert refused.status_code == 403
        assert "csrf_refused" in refused.text
    assert (await api.post("/v1/billing/credits/check", identity("csrf@example.com"))).json()[
        "credits_remaining"
    ] == 0
    assert await trail(api.engine) == []
    assert (await api.audit()).clean


async def test_an_idle_session_goes_back_to_login(api: Api, console: Console) -> None:
    await console.sign_in(api.keys["admin"])
    assert (await api.http.get("/console")).status_code == 200
    idle = api.settings.console_session_idle_seconds
    await age_sessions(api.engine, last_seen_at=utcnow() - timedelta(seconds=idle + 1))
    expired = await api.http.get("/console")
    assert expired.status_code == 303
    assert expired.headers["location"] == "/console/login"
    # Forms of an ended session do nothing either: back to login.
    gone = await api.http.post("/console/actions/grant", data={"csrf_token": "x"})
    assert gone.headers["location"] == "/console/login"


async def test_a_session_ends_at_its_absolute_end_however_active(
    api: Api, console: Console
) -> None:
    await console.sign_in(api.keys["admin"])
    await age_sessions(api.engine, expires_at=utcnow() - timedelta(seconds=1))
    assert (await api.http.get("/console")).headers["location"] == "/console/login"


async def test_expiry_is_configured(database_url: str) -> None:
    settings = make_settings(
        database_url, console_session_idle_seconds=60, console_session_max_seconds=120
    )
    async with running_app(settings) as api:
        await Console(api.http).sign_in(api.keys["admin"])
        async with api.engine.connect() as conn:
            row = (await conn.execute(select(console_sessions))).one()
        assert row.expires_at - row.created_at == timedelta(seconds=120)
        await age_sessions(api.engine, last_seen_at=utcnow() - timedelta(seconds=61))
        assert (await api.http.get("/console")).headers["location"] == "/console/login"


async def test_logout_ends_the_session(api: Api, console: Console) -> None:
    await console.sign_in(api.keys["admin"])
    token = api.http.cookies["ciris_console"]
    out = await api.http.post("/console/logout", data={"csrf_token": await console.csrf()})
    assert out.headers["location"] == "/console/login"
    assert await sessions(api) == 0
    # The old cookie, sent again by hand, opens nothing.
    api.http.cookies.set("ciris_console", token, path="/console")
    assert (await api.http.get("/console")).headers["location"] == "/console/login"


async def test_revoking_the_key_ends_its_sessions(api: Api, console: Console) -> None:
    await console.sign_in(api.keys["admin"])
    async with api.engine.begin() as conn:
        key_id = next(k.id for k in await auth.list_keys(conn) if k.name == "test-admin")
        await auth.revoke_key(conn, key_id)
    assert (await api.http.get("/console")).headers["location"] == "/console/login"


async def test_a_confirmation_sent_twice_is_applied_once(api: Api, console: Console) -> None:
    user = identity("twice@example.com")
    await api.post("/v1/billing/credits/check", user)
    await console.sign_in(api.keys["admin"])
    async with api.engine.connect() as conn:
        account_id = str(await conn.scalar(select(accounts.c.id)))
    page = await console.confirmation(
        "grant", {"account_id": account_id, "uses": "5", "reason": "sorry"}
    )
    first = await console.confirm("grant", page.text)
    assert first.status_code == 303
    again = await console.confirm("grant", page.text)
    assert again.status_code == 409
    assert "already used" in again.text
    balance = await api.post("/v1/billing/credits/check", user)
    assert balance.json()["credits_remaining"] == 5
    async with api.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(audit_trail)) == 1
    assert (await api.audit()).clean


async def test_every_console_page_needs_a_session(api: Api) -> None:
    """Without a session (or with a made-up cookie) every page and form of the console goes
    to the login form and does nothing (tests/api/test_security.py: these are all of them)."""
    for cookie in (None, "made-up-session-token"):
        if cookie:
            api.http.cookies.set("ciris_console", cookie, path="/console")
        for path in sorted(CONSOLE_SESSION):
            concrete = path.replace("{account_id}", "acct_x").replace("{action}", "grant")
            for method in ("GET", "POST"):
                answer = await api.http.request(method, concrete, data={"csrf_token": "x"})
                if answer.status_code == 405:
                    continue
                assert answer.status_code == 303, (method, concrete, answer.status_code)
                assert answer.headers["location"] == "/console/login"
    assert await sessions(api) == 0
