"""Issue 21, finding 11: console sign-in behind a proxy.

The failed-login limit keyed on the address uvicorn took from any `X-Forwarded-For` sent from
loopback (uvicorn's default trusts 127.0.0.1), counted per worker process, and its log lines
carried no address; a login nonce planted in the browser's cookie got a valid CSRF token; an
action's confirmation was a field the client could post without ever seeing the page. Now
forwarded headers count only from FORWARDED_ALLOW_IPS, the limit is per real client and shared
(Redis with REDIS_URL), sign-in log lines carry the client's address, the nonce is the server's
own (signed with its time and the address it was issued to), and an action runs only with the
token its confirmation page issued, once.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from ciris_billing.cli import proxy_options
from ciris_billing.console.sessions import LOGIN_COOKIE, login_csrf
from ciris_billing.db import accounts, audit_trail, console_sessions
from tests.support.api import Api, identity, make_settings, running_app
from tests.support.console import Console, csrf_of
from tests.support.redis import OwnRedis, own_redis
from tests.support.servers import running_service, service_env


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(database_url, console_login_failures_per_minute=3)
    async with running_app(settings) as api:
        yield api


def browser_at(api: Api, address: str) -> httpx.AsyncClient:
    """A browser whose connection comes from `address` (the app's own, in process)."""
    transport = httpx.ASGITransport(app=api.http._transport.app, client=(address, 40000))  # type: ignore[attr-defined]
    return httpx.AsyncClient(transport=transport, base_url="http://billing.test")


async def sessions(api: Api) -> int:
    async with api.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(console_sessions)) or 0)


async def test_finding11_a_planted_login_cookie_yields_no_session(api: Api) -> None:
    planted = "chosen-by-the-attacker"
    api.http.cookies.set(LOGIN_COOKIE, planted, domain="billing.test", path="/console")
    page = await api.http.get("/console/login")
    token = csrf_of(page.text)
    # The page does not adopt the planted nonce (it issues its own)...
    assert token != login_csrf(api.state.secrets.console_secret, planted)
    # ...and a login with the planted cookie and the page's token is refused.
    refused = await api.http.post(
        "/console/login",
        data={"csrf_token": token, "api_key": api.keys["admin"]},
        headers={"Cookie": f"{LOGIN_COOKIE}={planted}"},
    )
    assert refused.status_code == 403, refused.text
    assert await sessions(api) == 0


async def test_finding11_a_nonce_issued_to_another_client_yields_no_session(api: Api) -> None:
    async with browser_at(api, "203.0.113.9") as attacker:
        page = await attacker.get("/console/login")
        nonce = attacker.cookies[LOGIN_COOKIE]
        token = csrf_of(page.text)
    # Planted in the victim's browser (at another address) with the token that fits it.
    refused = await api.http.post(
        "/console/login",
        data={"csrf_token": token, "api_key": api.keys["admin"]},
        headers={"Cookie": f"{LOGIN_COOKIE}={nonce}"},
    )
    assert refused.status_code == 403, refused.text
    assert await sessions(api) == 0
    # The victim's own form still works.
    assert (await Console(api.http).sign_in(api.keys["admin"])).status_code == 303


async def test_finding11_failures_are_counted_per_client_and_logged_with_its_address(
    api: Api, capsys: pytest.CaptureFixture[str]
) -> None:
    async with browser_at(api, "198.51.100.7") as guesser, browser_at(api, "192.0.2.44") as ops:
        for _ in range(3):  # CONSOLE_LOGIN_FAILURES_PER_MINUTE=3
            assert (await Console(guesser).sign_in("cbk_guess")).status_code == 401
        assert (await Console(guesser).sign_in(api.keys["admin"])).status_code == 429
        # Another client is not locked out by the guesser.
        assert (await Console(ops).sign_in(api.keys["admin"])).status_code == 303
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "{" in line]
    failed = [line for line in lines if line.get("event") == "console_login_failed"]
    assert [line["client"] for line in failed] == ["198.51.100.7"] * 3
    assert all(api.keys["admin"] not in json.dumps(line) for line in lines)
    limited = [line for line in lines if line.get("event") == "console_login_rate_limited"]
    assert [line["client"] for line in limited] == ["198.51.100.7"]
    signed_in = [line for line in lines if line.get("event") == "console_login"]
    assert [line["client"] for line in signed_in] == ["192.0.2.44"]


async def test_finding11_wrong_api_keys_count_as_failed_sign_ins(api: Api) -> None:
    async with browser_at(api, "198.51.100.8") as guesser:
        for n in range(3):  # guessing the admin key through the API
            guessed = await guesser.get(
                "/v1/billing/webhook_endpoints", headers={"X-API-Key": f"cbk_{n}"}
            )
            assert guessed.status_code == 401
        assert (await Console(guesser).sign_in(api.keys["admin"])).status_code == 429
    # Requests with no key at all are not guesses; other clients are not concerned.
    for _ in range(5):
        assert (await api.http.get("/v1/billing/webhook_endpoints")).status_code == 401
    assert (await Console(api.http).sign_in(api.keys["admin"])).status_code == 303


async def test_finding11_failures_are_shared_between_workers_through_redis(
    database_url: str,
) -> None:
    with own_redis() as redis_server:
        settings = make_settings(
            database_url, console_login_failures_per_minute=3, redis_url=redis_server.url
        )
        # Two worker processes' apps on one database and one Redis.
        async with running_app(settings) as one, running_app(settings) as two:
            for _ in range(3):
                assert (await Console(one.http).sign_in("cbk_guess")).status_code == 401
            limited = await Console(two.http).sign_in(two.keys["admin"])
            assert limited.status_code == 429, limited.text
            assert int(limited.headers["Retry-After"]) >= 1


async def test_finding11_an_action_runs_only_with_its_confirmation_token(api: Api) -> None:
    user = identity("confirm-me@example.com")
    await api.post("/v1/billing/credits/check", user)
    console = Console(api.http)
    assert (await console.sign_in(api.keys["admin"])).status_code == 303
    async with api.engine.connect() as conn:
        account_id = str(await conn.scalar(select(accounts.c.id)))
    fields = {"account_id": account_id, "uses": "5", "reason": "goodwill"}
    # Confirm posted without the confirmation page: refused, nothing done.
    skipped = await api.http.post(
        "/console/actions/grant",
        data={
            "csrf_token": await console.csrf(),
            "confirm": "yes",
            "request_id": secrets.token_urlsafe(24),
            **fields,
        },
    )
    assert skipped.status_code == 403, skipped.text
    # The page's token with other fields than it showed: refused.
    page = await console.confirmation("grant", fields)
    assert page.status_code == 200
    changed = page.text.replace('name="uses" value="5"', 'name="uses" value="500"')
    assert changed != page.text
    assert (await console.confirm("grant", changed)).status_code == 403
    async with api.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(audit_trail)) == 0
    check = await api.post("/v1/billing/credits/check", user)
    assert check.json()["credits_remaining"] == 0
    # The page as it was: done, once.
    assert (await console.confirm("grant", page.text)).status_code == 303
    assert (await console.confirm("grant", page.text)).status_code == 409
    check = await api.post("/v1/billing/credits/check", user)
    assert check.json()["credits_remaining"] == 5
    assert (await api.audit()).clean


def test_finding11_serve_trusts_forwarded_headers_only_from_configured_proxies() -> None:
    assert proxy_options(None) == {"proxy_headers": False, "forwarded_allow_ips": ""}
    assert proxy_options("") == {"proxy_headers": False, "forwarded_allow_ips": ""}
    assert proxy_options("10.0.0.5,10.0.1.0/24") == {
        "proxy_headers": True,
        "forwarded_allow_ips": "10.0.0.5,10.0.1.0/24",
    }


@pytest.fixture(scope="module")
def redis_for_serve() -> Iterator[OwnRedis]:
    with own_redis() as server:
        yield server


async def _guess_with_forwarded_addresses(base: str, count: int) -> list[int]:
    statuses = []
    for n in range(count):
        forwarded = {"X-Forwarded-For": f"203.0.113.{n + 1}"}
        async with httpx.AsyncClient(base_url=base, headers=forwarded, timeout=30) as browser:
            statuses.append((await Console(browser).sign_in("cbk_guess")).status_code)
    return statuses


def _failed_clients(log_path: Path) -> list[str]:
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line[:1] == "{"]
    return [line["client"] for line in lines if line.get("event") == "console_login_failed"]


@pytest.mark.slow
async def test_finding11_serve_ignores_x_forwarded_for_unless_its_proxy_is_configured(
    fresh_database: str, tmp_path: Path, redis_for_serve: OwnRedis
) -> None:
    env = service_env(
        fresh_database,
        CONSOLE_LOGIN_FAILURES_PER_MINUTE="3",
        REDIS_URL=redis_for_serve.url,
        JOBS_ENABLED="false",
    )
    # Default: a client on loopback cannot choose its address; two workers share the limit.
    with running_service(env, tmp_path / "direct.log", workers=2) as base:
        statuses = await _guess_with_forwarded_addresses(base, 5)
    assert statuses[:3] == [401, 401, 401], statuses
    assert statuses[3:] == [429, 429], statuses
    assert set(_failed_clients(tmp_path / "direct.log")) == {"127.0.0.1"}
    # Behind a configured proxy (here: loopback), the forwarded address is the client's.
    redis_for_serve.client().flushall()
    env["FORWARDED_ALLOW_IPS"] = "127.0.0.1"
    with running_service(env, tmp_path / "proxied.log") as base:
        statuses = await _guess_with_forwarded_addresses(base, 5)
    assert statuses == [401] * 5, statuses
    assert _failed_clients(tmp_path / "proxied.log") == [f"203.0.113.{n}" for n in range(1, 6)]
